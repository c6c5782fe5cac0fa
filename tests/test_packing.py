"""Packed (padding-free) batches give the padded batch's loss and gradients; no cross-contamination."""

from __future__ import annotations

import pytest
import torch
import transformers

from alpaca_cot.packing import VARLEN_ATTENTION, PackCollator, packed_loss
from alpaca_cot.training import PadCollator
from tests.conftest import shared_path
from tests.fixtures.tiny_models import write_tiny_model


def _samples() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (7, 19, 3, 12):
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: grouped-query attention
def test_packed_loss_and_grads_equal_padded(tmp_path, model_type: str) -> None:
    path = write_tiny_model(str(tmp_path / "m"), model_type, shared_path("models", "stories260K-hf"))
    padded_model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    packed_model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=VARLEN_ATTENTION)
    samples = _samples()
    padded = PadCollator(pad_id=0)(samples)
    packed = PackCollator()(samples)
    assert packed["input_ids"].shape == (1, sum(len(s["input_ids"]) for s in samples))  # no padding at all
    loss_padded = padded_model(**padded).loss
    labels = packed.pop("labels")
    loss_packed = packed_loss(packed_model(**packed), labels)
    assert abs(loss_padded.item() - loss_packed.item()) < 1e-5
    loss_padded.backward()
    loss_packed.backward()
    for (name, a), (_, b) in zip(padded_model.named_parameters(), packed_model.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_no_cross_contamination(tmp_path) -> None:
    # A sample's logits do not depend on what else shares its row.
    path = write_tiny_model(str(tmp_path / "m"), "llama", shared_path("models", "stories260K-hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=VARLEN_ATTENTION).eval()
    a, b, c = _samples()[:3]
    def inputs(samples: list[dict]) -> dict:  # every position's logits; the packed labels are the loss's business
        return {**{k: v for k, v in PackCollator()(samples).items() if k != "labels"}, "logits_to_keep": 0}

    with torch.no_grad():
        alone = model(**inputs([b])).logits[0]
        n_a = len(a["input_ids"])
        together = model(**inputs([a, b, c])).logits[0, n_a:n_a + len(b["input_ids"])]
    assert torch.allclose(alone, together, atol=1e-5)


def test_in_place_cross_entropy_matches_torch_over_many_blocks() -> None:
    from alpaca_cot.packing import _LogitsCrossEntropy

    torch.manual_seed(0)
    logits = torch.randn(100, 40000) * 3  # 100 rows span several ~4 MB blocks of 26 rows
    targets = torch.randint(0, 40000, (100,))
    reference = logits.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(reference, targets, reduction="sum") * 0.25
    expected.backward()
    ours = logits.clone().requires_grad_()
    loss = _LogitsCrossEntropy.apply(ours * 1, targets) * 0.25  # `* 1`: a fresh non-leaf, as a head's output is
    loss.backward()
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert torch.allclose(ours.grad, reference.grad, atol=1e-7)
