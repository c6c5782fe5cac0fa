"""The CUDA-only paths of training, proved on CPU where their behaviour is logic (a device query replaced by a
stub) and run where they need a GPU (skipped elsewhere, with the reason): flash-attn only in half precision,
no per-forward packed-sequence detection, no recompilation per batch under torch.compile, flash-attn's numbers
against padded batches, and the chunked loss's memory on CUDA."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import masking_utils
from transformers.utils import is_flash_attn_2_available

from alpaca_cot.training.packing import (
    VARLEN_ATTENTION,
    ChunkedCrossEntropy,
    PackCollator,
    PadCollator,
    apply_packing,
    choose_packing,
    packed_loss,
)
from tests.test_liger import COMMON, _samples  # the same tiny configs and samples

# Sliding windows of 4 tokens are shorter than the samples: a window that is ignored changes the numbers.
FAMILIES = {"llama": ("LlamaConfig", {}), "mistral (sliding window)": ("MistralConfig", {"sliding_window": 4}),
            "qwen2 (sliding layers)": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4,
                                                       "max_window_layers": 1})}
CUDA = torch.cuda.is_available()
FLASH = CUDA and is_flash_attn_2_available()


def _model(family: str, device: str = "cpu") -> torch.nn.Module:
    config_class, overrides = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval().to(device)


def test_flash_only_where_the_compute_dtype_allows_it(monkeypatch) -> None:
    # flash-attn refuses fp32 on the first step: an fp32 run packs with SDPA and says why.
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    model = _model("llama")
    for dtype in (torch.bfloat16, torch.float16):
        assert choose_packing(model, "lora", True, False, cuda=True, dtype=dtype).attention == "flash"
    plan = choose_packing(model, "lora", True, False, cuda=True, dtype=torch.float32)
    assert plan.attention == VARLEN_ATTENTION
    assert "not flash-attn: it runs only in fp16 or bf16, and this run computes in float32" in plan.reason


@pytest.mark.parametrize("family", ["llama", "mistral (sliding window)"])
def test_varlen_forward_runs_no_packed_sequence_detection(family: str, monkeypatch) -> None:
    # transformers' detection reads the position ids back (a GPU sync) once per mask a forward builds;
    # with no mask function registered for varlen_sdpa, it never runs. The stock SDPA path is the control.
    calls = []
    detect = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda ids: calls.append(1) or detect(ids))
    model = _model(family)
    batch = PackCollator()(_samples())
    batch.pop("labels")
    counts = {}
    for attention in (VARLEN_ATTENTION, "sdpa"):
        model.set_attn_implementation(attention)
        calls.clear()
        with torch.no_grad():
            model(**batch)
        counts[attention] = len(calls)
    assert counts[VARLEN_ATTENTION] == 0 and counts["sdpa"] >= 1, counts


@pytest.mark.parametrize("family", ["llama", "mistral (sliding window)"])
def test_compiled_model_does_not_recompile_per_batch(family: str) -> None:
    # Each batch has its own longest sample, sample count and length. Under torch.compile as the Trainer's
    # --torch_compile runs it (dynamo decides what is dynamic) a batch may compile until what varies is marked
    # dynamic (static, dynamic sizes, a dynamic longest sample), never per batch. Before: a symbolic is_causal
    # broke the graph and the longest sample recompiled it, until dynamo gave up and ran eagerly.
    model = _model(family)
    apply_packing(model, choose_packing(model, "lora", True, False, cuda=False, dtype=torch.float32))
    graphs = []

    def count(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=count)
    per_batch = []
    batches = [(7, 19, 3, 12), (5, 30), (9, 9, 14), (21, 6, 11, 8, 3), (17, 4, 25), (13, 28), (6, 5, 22, 10)]
    for seed, lengths in enumerate(batches):
        batch = PackCollator()(_samples(lengths, seed))
        labels = batch.pop("labels")
        packed_loss(compiled(**batch), labels).backward()
        per_batch.append(len(graphs))
    torch._dynamo.reset()
    assert per_batch[-1] == per_batch[2] <= 3, per_batch


@pytest.mark.skipif(not FLASH, reason="needs a CUDA GPU with flash-attn installed")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_flash_matches_padded_batches(family: str) -> None:
    # bf16 autocast over fp32 weights, as a bf16 run computes: flash-attn's varlen kernels on packed rows
    # against SDPA on right-padded batches, loss and gradients.
    padded, packed = _model(family, "cuda"), _model(family, "cuda")
    plan = choose_packing(packed, "lora", True, False, cuda=True, dtype=torch.bfloat16)
    assert plan.attention == "flash", plan.reason
    apply_packing(packed, plan)
    samples = _samples()
    padded_batch = {k: v.cuda() for k, v in PadCollator(pad_id=0)(samples).items()}
    packed_batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in PackCollator()(samples).items()}
    labels = packed_batch.pop("labels")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_padded = padded(**padded_batch).loss
        loss_packed = packed_loss(packed(**packed_batch), labels)
    assert abs(loss_padded.item() - loss_packed.item()) < 1e-2 * loss_padded.item()
    loss_padded.backward()
    loss_packed.backward()
    for (name, a), (_, b) in zip(padded.named_parameters(), packed.named_parameters(), strict=True):
        similarity = torch.nn.functional.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0)
        assert similarity > 0.99, (name, similarity.item())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_chunked_loss_holds_less_than_the_stock_loss_on_cuda() -> None:
    # Qwen3's vocabulary over 4096 kept positions, bf16 logits: the stock loss's fp32 copies are GBs.
    torch.manual_seed(0)
    logits = torch.randn(4096, 151936, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 151936, (4096,), device="cuda")
    peaks, grads = {}, {}
    for name in ("stock", "chunked"):
        logits.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if name == "stock":
            loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        else:
            loss = ChunkedCrossEntropy.apply(logits, targets, True)
        loss.backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        grads[name] = (loss.item(), logits.grad.float())
    assert abs(grads["stock"][0] - grads["chunked"][0]) < 1e-4 * grads["stock"][0]
    assert torch.allclose(grads["stock"][1], grads["chunked"][1], rtol=2e-2, atol=1e-8)  # bf16: one rounding apart
    assert peaks["chunked"] < 0.5 * peaks["stock"], peaks
