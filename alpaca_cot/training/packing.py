"""The collators: padding-free batches (a batch's samples flattened into one row, attention computed per
sample), or right-padded ones where packing is off.

Inputs ``[s1 s2 s3]`` in one row, ``position_ids`` restarting at 0 for each sample, labels -100 at each
sample's first token (no sample predicts across a boundary); linear layers see only real tokens. Which
attention keeps the samples apart is decided on the loaded model (``choose_packing``), never approximated:

- ``varlen_sdpa`` (ours): one causal SDPA over the samples laid out right-padded, with the layer's
  sliding window as a band mask. Its cost is that of the samples, not of one row-long quadratic
  mask (measured in ``benchmarks/``: the stock mask costs the whole row squared).
- ``stock``: transformers' own packed path (``position_ids`` restarting per sample, no attention
  mask) over the model's own attention, for what SDPA cannot express (attention softcapping), and
  its flash/varlen kernels on CUDA where flash-attn is installed and the run computes in fp16 or bf16.
- none: padded batches (remote-code models, prompt/prefix tuning's virtual tokens).

The output head runs only where a label follows (``logits_to_keep``): the head (hidden x vocabulary) is a
large share of a small model's cost, and prompt positions never need logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

from alpaca_cot.data.encoding import IGNORE_INDEX
from alpaca_cot.errors import UserError

VARLEN_ATTENTION = "varlen_sdpa"
# Keyword arguments of attention layers that change the attention itself in ways SDPA cannot apply
# (Gemma 2's logit softcapping, gpt-oss's sink logits). Others (positions, cache, loss counts) pass by.
_UNSUPPORTED = ("softcap", "s_aux", "sinks")


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          sliding_window: int | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                          max_length_q: int | None = None, pack_slots: torch.Tensor | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention per packed sample; query/key/value are (1, heads, tokens, head_dim).

    The samples are laid out right-padded as (samples, heads, longest, head_dim) for one SDPA call:
    under a causal (or causal band) mask a real position never sees the padding after it, and only
    attention (not the linear layers) touches padding. A keyword this function cannot honour
    (attention softcapping, sink logits) raises instead of being dropped.
    """
    unsupported = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if unsupported:
        raise NotImplementedError(f"varlen_sdpa cannot apply {unsupported}; this model must train with "
                                  "transformers' own packed attention or padded batches (see choose_packing).")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each key/value head across its query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    dropout = dropout if module.training else 0.0
    packed = cu_seq_lens_q is not None and len(cu_seq_lens_q) > 2
    if packed:
        # The collator passes these once per batch (computing them here would cost every layer kernel
        # launches and, on a GPU, syncs: reading the longest length, sizing index tensors).
        samples = len(cu_seq_lens_q) - 1
        longest = max_length_q if max_length_q is not None else int(cu_seq_lens_q.diff().max())
        slots = pack_slots if pack_slots is not None else pack_layout(cu_seq_lens_q.diff())[0]
        slots = slots.to(query.device)

        def to_padded(x: torch.Tensor) -> torch.Tensor:  # (1, H, T, D) -> (samples, H, longest, D)
            heads, dim = x.shape[1], x.shape[3]
            flat = x.new_zeros(samples * longest, heads, dim).index_copy(0, slots, x[0].transpose(0, 1))
            return flat.view(samples, longest, heads, dim).transpose(1, 2)

        query, key, value = to_padded(query), to_padded(key), to_padded(value)
    length = query.shape[2]
    mask = None
    if sliding_window is not None and sliding_window < length:
        # transformers' sliding window: position q sees keys k with q - sliding_window < k <= q.
        offset = torch.arange(length, device=query.device)
        offset = offset[:, None] - offset[None, :]
        mask = (offset >= 0) & (offset < sliding_window)
    causal = False  # one query (a decoding step) sees every key
    if mask is None and length > 1:  # a branch, which torch.compile guards: SDPA refuses a symbolic flag
        causal = True
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=causal, scale=scaling, dropout_p=dropout)
    if not packed:  # one sequence (e.g. generation)
        return out.transpose(1, 2).contiguous(), None
    # (samples, H, longest, D) -> (1, T, H, D), the layout attention interfaces return
    flat = out.transpose(1, 2).reshape(samples * longest, out.shape[1], out.shape[3])
    return flat.index_select(0, slots).unsqueeze(0), None


def pack_layout(lengths: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Row-major slot of every packed token in the (samples x longest) right-padded layout, and longest."""
    lengths = lengths.long()
    longest = int(lengths.max())
    starts = lengths.cumsum(0) - lengths
    shift = torch.arange(len(lengths), device=lengths.device) * longest - starts  # sample i's slot minus its index
    return torch.arange(int(lengths.sum()), device=lengths.device) + shift.repeat_interleave(lengths), longest


# No mask function is registered for it: transformers then builds no mask (causality, windows and sample
# boundaries are applied inside varlen_sdpa_attention) and skips its packed-sequence detection, whose check of
# the position ids would synchronize a GPU on every forward (masking_utils._preprocess_mask_arguments).
AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)

# Config fields whose attention SDPA cannot express; the stock packed path applies them.
_SDPA_INEXPRESSIBLE = ("attn_logit_softcapping",)


@dataclass(frozen=True)
class PackingPlan:
    """How a run's batches are laid out: ``attention`` is VARLEN_ATTENTION, "stock", "flash" or None
    (padded batches); ``reason`` is the sentence the run log prints."""

    attention: str | None
    reason: str

    @property
    def packed(self) -> bool:
        """Whether batches are packed into one padding-free row."""
        return self.attention is not None


def choose_packing(model: torch.nn.Module, peft_type: str, requested: bool, remote_code: bool, *,
                   cuda: bool, dtype: torch.dtype) -> PackingPlan:
    """The exact packed attention for this loaded model, or padding, with the reason.

    ``cuda``: whether training runs on CUDA GPUs; the weights may still be on the CPU here (DeepSpeed and
    FSDP load them there and move each rank's part inside ``train()``). ``dtype``: the compute dtype
    (``--compute_dtype``); flash-attn runs only in fp16 and bf16.
    """
    if not requested:
        return PackingPlan(None, "padded, length-grouped batches (--packing False)")
    if peft_type not in ("lora", "adalora", "full"):
        return PackingPlan(None, f"padded batches: --peft_type {peft_type} adds virtual tokens to every sample")
    if remote_code or not getattr(model, "_supports_attention_backend", False):
        return PackingPlan(None, f"padded batches: {type(model).__name__} does not use transformers' attention "
                                 "interface, so samples cannot be kept apart in one row")
    config = model.config.get_text_config()
    no_flash = ""
    if cuda:
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available() and getattr(model, "_supports_flash_attn", False):
            if dtype in (torch.float16, torch.bfloat16):
                return PackingPlan("flash", "packed: transformers' flash-attention varlen kernels (flash-attn "
                                            "installed)")
            no_flash = (" (not flash-attn: it runs only in fp16 or bf16, and this run computes in "
                        f"{str(dtype).removeprefix('torch.')})")
    inexpressible = [name for name in _SDPA_INEXPRESSIBLE if getattr(config, name, None)]
    if inexpressible:
        return PackingPlan("stock", f"packed: transformers' own packed attention ({config._attn_implementation}, "
                                    f"block-diagonal mask), since SDPA cannot apply {', '.join(inexpressible)}"
                                    f"{no_flash}")
    window = getattr(config, "sliding_window", None)
    detail = f" with the {window}-token sliding window" if window and _uses_sliding_window(config) else ""
    return PackingPlan(VARLEN_ATTENTION, f"packed: per-sample causal SDPA{detail}{no_flash}")


def _uses_sliding_window(config: Any) -> bool:
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2 keeps a window size it does not use
        return False
    types = getattr(config, "layer_types", None)
    return types is None or "sliding_attention" in types


def apply_packing(model: torch.nn.Module, plan: PackingPlan) -> None:
    """Switch the model's attention for ``plan`` (the stock path keeps the model's own)."""
    if plan.attention == VARLEN_ATTENTION:
        model.set_attn_implementation(VARLEN_ATTENTION)
    elif plan.attention == "flash":
        model.set_attn_implementation("flash_attention_2")


class PackCollator:
    """Flattens a batch of ``{"input_ids", "labels"}`` samples into one padding-free row.

    ``labels`` come out as ``[-100, t1 ... tK]``: the K targets of the kept positions, in order (the
    leading -100 because the Trainer counts a causal model's label tokens from index 1), for
    ``packed_loss``. Selecting them here, on the CPU, spares the loss a boolean mask that would stop a
    GPU's queue every step.

    With ``model_loss`` the model computes its own loss (``--use_liger_kernel``: Liger's fused linear
    cross-entropy never materialises the logits, so no loss over ``outputs.logits`` is possible), from
    transformers' padding-free layout: ``labels`` over the whole row, -100 at each sample's first token,
    and ``shift_labels``, the targets of the kept positions, which the model's loss and the Trainer's
    token count read instead of shifting ``labels`` (the head still runs on the kept positions only).
    """

    def __init__(self, model_loss: bool = False):
        self.model_loss = model_loss

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        # Whole-batch tensor operations: per-token Python work here would hold up the training process.
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        ids = torch.cat([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])
        labels = torch.cat([torch.as_tensor(f["labels"], dtype=torch.long) for f in features])
        starts = lengths.cumsum(0) - lengths
        labels[starts] = IGNORE_INDEX  # a sample's first token is nobody's target: no prediction across samples
        positions = torch.arange(len(ids)) - starts.repeat_interleave(lengths)
        cu = torch.cat([starts, lengths.sum().view(1)]).to(torch.int32)
        slots, longest = pack_layout(lengths)
        # Position p predicts the token at p + 1: keep the positions whose next label counts.
        keep = (labels[1:] != IGNORE_INDEX).nonzero().view(-1)
        targets = torch.cat([labels.new_full((1,), IGNORE_INDEX), labels[keep + 1]])
        batch = {"input_ids": ids.view(1, -1), "labels": targets.view(1, -1), "position_ids": positions.view(1, -1),
                 "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
                 "pack_slots": slots, "logits_to_keep": keep,
                 # transformers detects packed position_ids only without a KV cache
                 "use_cache": False}
        if self.model_loss:
            batch["labels"] = labels.view(1, -1)
            batch["shift_labels"] = targets[1:].view(1, -1)
        return batch


class PadCollator:
    """Right-pads a batch (labels with -100) where packing is off: ``input_ids``/``labels`` lists in, tensors out."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def require_liger(model: torch.nn.Module | None = None) -> None:
    """Refuse ``--use_liger_kernel`` in one line where Liger cannot run: not installed, no CUDA GPU (its
    kernels are Triton GPU kernels) or, given the loaded model, a family it has no kernels for (the
    Trainer would then only log that nothing was applied)."""
    from transformers.utils import is_liger_kernel_available

    if not is_liger_kernel_available():
        raise UserError("--use_liger_kernel needs liger-kernel (pip install liger-kernel, on a CUDA machine); "
                        "it is not installed here. Drop the flag to train without it.")
    if not torch.cuda.is_available():
        raise UserError("--use_liger_kernel needs a CUDA GPU (Liger's kernels are Triton GPU kernels); "
                        "this machine has none. Drop the flag to train without it.")
    if model is None:
        return
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise UserError(f"--use_liger_kernel: Liger has no kernels for model type {model_type!r}; it has them for "
                        f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}. Drop the flag for this model.")


def packed_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Token cross-entropy over the kept logits (``Trainer(compute_loss_func=...)``): the mean over
    label tokens, or their sum over ``num_items_in_batch`` under gradient accumulation."""
    targets = labels[0, 1:]  # PackCollator's labels: the kept positions' targets
    logits = outputs.logits[0]
    # An evaluation (no grad) computes the loss alone: no gradient buffer, no gradient work.
    loss = ChunkedCrossEntropy.apply(logits, targets, torch.is_grad_enabled() and logits.requires_grad)
    total = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    return loss / total


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy whose gradient (softmax - one-hot) is computed in the forward pass, a
    block of rows at a time, into a buffer of its own (the logits stay intact).

    The logits (tokens x vocabulary) are the largest tensor of a training step; the stock loss
    passes over them about eight times and allocates up to three more of their size in fp32 (the
    upcast, log-softmax and its gradient). Here only one block at a time is in fp32, and on a CPU each
    block is read while it is in cache and its gradient written once; the gradient's dtype is the
    logits' (a bf16 head gets a bf16 gradient, as autograd would give).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, with_gradient: bool) -> torch.Tensor:
        # fp32 elements per block: ~4 MB on a CPU (cache-sized); ~256 MB on a GPU (few kernel launches, and a
        # small share of the fp32 copies the stock loss makes of all the logits).
        rows = max(1, (2**26 if logits.is_cuda else 2**20) // logits.shape[1])
        gradient = torch.empty_like(logits) if with_gradient else None
        total = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, len(logits), rows):
            block = logits[start:start + rows].float()  # a view when fp32: only read
            target = targets[start:start + rows].unsqueeze(1)
            lse = torch.logsumexp(block, dim=1, keepdim=True)
            total += (lse - block.gather(1, target)).sum()
            if gradient is None:
                continue
            out = gradient[start:start + rows]
            buffer = out if out.dtype == torch.float32 else torch.empty_like(block)
            torch.sub(block, lse, out=buffer).exp_().scatter_add_(1, target, buffer.new_full(target.shape, -1.0))
            if buffer is not out:
                out.copy_(buffer)
        if gradient is not None:
            ctx.save_for_backward(gradient)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (gradient,) = ctx.saved_tensors
        return gradient * grad.to(gradient.dtype), None, None
