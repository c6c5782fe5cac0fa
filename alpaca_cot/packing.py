"""Padding-free batches: a batch's samples flattened into one row, attention computed per sample.

Inputs ``[s1 s2 s3]`` in one row with ``position_ids`` restarting at 0 for each sample; labels are
-100 at each sample's first token, so no sample learns to predict across a boundary. The
attention function ``varlen_sdpa`` runs causal SDPA on each sample's slice (from the cumulative
lengths ``cu_seq_lens_q``), so the cost is that of the samples, not of one row-long quadratic mask,
and no sample attends to another. Linear layers see only real tokens: no padding at all.

The output head runs only where a label follows (``logits_to_keep``): prompt positions never
need logits, and the head (hidden x vocabulary) is a large share of a small model's cost.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from alpaca_cot.tokenize import IGNORE_INDEX

VARLEN_ATTENTION = "varlen_sdpa"


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                          pack_slots: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention per packed sample; query/key/value are (1, heads, tokens, head_dim).

    The samples are laid out right-padded as (samples, heads, longest, head_dim) for one causal
    SDPA call: with causal masking a real position never sees the padding after it, so no mask is
    needed, and only attention (not the linear layers) touches padding. Measured on the benchmark
    model, one call this way beats one SDPA call per sample, whose many small slices and
    concatenations cost a third of a training step.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each key/value head across its query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    dropout = dropout if module.training else 0.0
    if cu_seq_lens_q is None or len(cu_seq_lens_q) == 2:  # one sequence (e.g. generation): plain causal SDPA
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1,
                                                               scale=scaling, dropout_p=dropout)
        return out.transpose(1, 2).contiguous(), None
    lengths = cu_seq_lens_q.diff()
    samples = len(lengths)
    # The collator passes these once per batch (computing them here would cost every layer kernel
    # launches and, on a GPU, syncs: reading the longest length, sizing repeat_interleave's output).
    longest = max_length_q if max_length_q is not None else int(lengths.max())
    slots = pack_slots if pack_slots is not None else pack_layout(lengths.tolist())[0].to(query.device)

    def to_padded(x: torch.Tensor) -> torch.Tensor:  # (1, H, T, D) -> (samples, H, longest, D)
        heads, dim = x.shape[1], x.shape[3]
        flat = x.new_zeros(samples * longest, heads, dim).index_copy(0, slots, x[0].transpose(0, 1))
        return flat.view(samples, longest, heads, dim).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(to_padded(query), to_padded(key), to_padded(value),
                                                           is_causal=True, scale=scaling, dropout_p=dropout)
    # (samples, H, longest, D) -> (1, T, H, D), the layout attention interfaces return
    flat = out.transpose(1, 2).reshape(samples * longest, out.shape[1], out.shape[3])
    return flat.index_select(0, slots).unsqueeze(0), None


def pack_layout(lengths: list[int]) -> tuple[torch.Tensor, int]:
    """Row-major slot of every packed token in the (samples x longest) right-padded layout, and longest."""
    longest = max(lengths)
    slots = [i * longest + p for i, n in enumerate(lengths) for p in range(n)]
    return torch.tensor(slots), longest


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # causality and sample boundaries are handled inside varlen_sdpa_attention


AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
AttentionMaskInterface.register(VARLEN_ATTENTION, _no_mask)


def supports_packing(model: torch.nn.Module, peft_type: str) -> bool:
    """Packing needs the transformers attention interface (not old or remote-code models) and real tokens
    only (prompt/prefix tuning add virtual tokens to every sample)."""
    return bool(getattr(model, "_supports_attention_backend", False)) and peft_type in ("lora", "adalora", "full")


class PackCollator:
    """Flattens a batch of ``{"input_ids", "labels"}`` samples into one padding-free row.

    ``labels`` come out as ``[-100, t1 ... tK]``: the K targets of the kept positions, in order (the
    leading -100 because the Trainer counts a causal model's label tokens from index 1). Selecting
    them here, on the CPU, spares the loss a boolean mask that would stop a GPU's queue every step.
    """

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        bounds = [0]
        for f in features:
            n = len(f["input_ids"])
            ids += f["input_ids"]
            labels += [IGNORE_INDEX] + list(f["labels"][1:])
            positions += range(n)
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32)
        slots, longest = pack_layout([b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        # Position p predicts the token at p + 1: keep the positions whose next label counts.
        keep = [p for p, label in enumerate(labels[1:]) if label != IGNORE_INDEX]
        targets = [IGNORE_INDEX] + [labels[p + 1] for p in keep]
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([targets]),
                "position_ids": torch.tensor([positions]), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": longest, "max_length_k": longest, "pack_slots": slots,
                "logits_to_keep": torch.tensor(keep, dtype=torch.long)}


def packed_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Token cross-entropy over the kept logits (``Trainer(compute_loss_func=...)``): the mean over
    label tokens, or their sum over ``num_items_in_batch`` under gradient accumulation.

    ``outputs.logits`` is overwritten with its gradient (see ``_LogitsCrossEntropy``)."""
    targets = labels[0, 1:]  # PackCollator's labels: the kept positions' targets
    loss = _LogitsCrossEntropy.apply(outputs.logits[0].float(), targets)
    total = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    return loss / total


class _LogitsCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy whose gradient (softmax - one-hot) is computed in the forward pass, in
    the logits' own memory, a cache-sized block of rows at a time.

    The logits (tokens x vocabulary) are the largest tensor of a training step; the stock loss
    passes over them about eight times and allocates two more of their size (log-softmax and its
    gradient). Here each block is read and written once while it is in cache. The logits are the
    output head's fresh result (or a float copy), which nothing else reads afterwards; autograd's
    version counter would raise if some layer had saved them for its backward.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # ~4 MB blocks on CPU; a GPU's bandwidth makes one block cheapest.
        rows = len(logits) if logits.is_cuda else max(1, 2**20 // logits.shape[1])
        total = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, len(logits), rows):
            block, target = logits[start:start + rows], targets[start:start + rows].unsqueeze(1)
            lse = torch.logsumexp(block, dim=1, keepdim=True)
            total += (lse - block.gather(1, target)).sum()
            block.sub_(lse).exp_().scatter_add_(1, target, block.new_full(target.shape, -1.0))
        ctx.save_for_backward(logits)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (gradient,) = ctx.saved_tensors
        return gradient.mul_(grad), None
