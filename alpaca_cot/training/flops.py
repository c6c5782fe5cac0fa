"""Model FLOPs utilisation: achieved training FLOP/s against this device's measured matmul peak."""

from __future__ import annotations

import time
from typing import Any

import torch


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, size: int | None = None, seconds: float = 0.5) -> float:
    """FLOP/s of square matmuls in ``dtype`` on ``device``, measured for about ``seconds``.

    The default size is 1024 on CPU and 8192 on GPU, where smaller products leave the chip idle.
    """
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(2):  # warm-up: thread pools, kernels
        a @ b
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        done += 1
    return done * 2 * size**3 / elapsed


def training_flops_per_token(model: Any, full: bool, mean_context: float) -> float:
    """Conventional training FLOPs per token: 6N for full fine-tuning, 4N for adapters (no weight
    gradients for the frozen N), N = non-embedding parameters, plus causal attention
    (12 x layers x hidden x mean context: QK and AV, forward and backward). A tied output head
    counts as non-embedding (it is a matmul per token); 4-bit weights count their unpacked size, ZeRO-3
    partitioned ones their whole size."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = sum(_numel(p) for name, p in base.named_parameters() if "lora_" not in name)
    embedding, head = base.get_input_embeddings().weight, base.get_output_embeddings()
    if head is None or head.weight is not embedding:  # untied (or no head): the input lookup costs no FLOPs
        n -= _numel(embedding)
    config = base.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    return (6 if full else 4) * n + 12 * layers * hidden * mean_context


def mean_causal_context(lengths: list[int]) -> float:
    """Mean number of positions a token attends to, over records of these lengths."""
    total = sum(lengths)
    return sum(n * (n + 1) / 2 for n in lengths) / total if total else 0.0


def _numel(p: torch.Tensor) -> int:
    state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit store two weights per byte
    if state is not None:
        return int(torch.Size(state.shape).numel())
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned parameter is empty; ds_numel is its whole size
