"""Packed (padding-free) batches give the padded batch's loss and gradients for every model family."""

from __future__ import annotations

import pytest
import torch
import transformers

from alpaca_cot.training.packing import (
    VARLEN_ATTENTION,
    ChunkedCrossEntropy,
    PackCollator,
    PadCollator,
    apply_packing,
    choose_packing,
    packed_loss,
)

VOCAB = 300
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
          "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# name -> (config class, overrides, the attention choose_packing must pick). Sliding windows of 4
# tokens are shorter than the samples, so a window that is ignored changes the logits.
FAMILIES = {
    "llama": ("LlamaConfig", {}, VARLEN_ATTENTION),
    "mistral (sliding window)": ("MistralConfig", {"sliding_window": 4}, VARLEN_ATTENTION),
    "qwen2 (GQA)": ("Qwen2Config", {}, VARLEN_ATTENTION),
    "qwen2 (sliding layers)": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4,
                                               "max_window_layers": 1}, VARLEN_ATTENTION),
    "gemma (tied head)": ("GemmaConfig", {"head_dim": 8, "tie_word_embeddings": True}, VARLEN_ATTENTION),
    "gemma2 (softcapping, local/global)": ("Gemma2Config", {"head_dim": 8, "sliding_window": 4}, "stock"),
    "gemma3 (local/global)": ("Gemma3TextConfig", {"head_dim": 8, "sliding_window": 4, "num_hidden_layers": 3,
                                                   "tie_word_embeddings": True}, VARLEN_ATTENTION),
    "glm": ("GlmConfig", {"head_dim": 8}, VARLEN_ATTENTION),
    "phi3 (sliding window)": ("Phi3Config", {"sliding_window": 4}, VARLEN_ATTENTION),
    "gpt2": ("GPT2Config", {"n_layer": 2, "n_head": 4, "n_embd": 32}, VARLEN_ATTENTION),
    "bloom (ALiBi)": ("BloomConfig", {"n_layer": 2, "n_head": 4}, None),
}


def _model(config_class: str, overrides: dict) -> torch.nn.Module:
    config = getattr(transformers, config_class)(**{**COMMON, **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()  # dropout off (GPT-2 has some)


def _samples() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (7, 19, 3, 12):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_loss_and_grads_equal_padded(family: str) -> None:
    config_class, overrides, expected = FAMILIES[family]
    padded_model = _model(config_class, overrides)
    packed_model = _model(config_class, overrides)
    plan = choose_packing(packed_model, "lora", requested=True, remote_code=False, cuda=False)
    assert plan.attention == expected, plan.reason
    if not plan.packed:
        return
    apply_packing(packed_model, plan)
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


def test_varlen_refuses_what_it_cannot_apply() -> None:
    # Attention softcapping forced onto the fast path: an error, never a silent approximation.
    model = _model("Gemma2Config", {"head_dim": 8})
    q = torch.randn(1, 4, 5, 8)
    attention = transformers.AttentionInterface._global_mapping[VARLEN_ATTENTION]
    with pytest.raises(NotImplementedError, match="softcap"):
        attention(model.model.layers[0].self_attn, q, q, q, None, softcap=50.0)


def test_flash_where_training_runs_on_gpus_whatever_device_the_weights_load_on(monkeypatch) -> None:
    # DeepSpeed and FSDP load the weights on the CPU and move them inside train(): the choice follows the
    # training device (before, the weights' device, so those engines never packed with flash-attn).
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    model = _model("LlamaConfig", {})
    assert choose_packing(model, "lora", requested=True, remote_code=False, cuda=True).attention == "flash"
    assert choose_packing(model, "lora", requested=True, remote_code=False, cuda=False).attention == VARLEN_ATTENTION


def test_padding_where_samples_cannot_be_kept_apart() -> None:
    model = _model("LlamaConfig", {})
    assert not choose_packing(model, "prompt", requested=True, remote_code=False, cuda=False).packed
    assert not choose_packing(model, "lora", requested=True, remote_code=True, cuda=False).packed
    assert not choose_packing(model, "lora", requested=False, remote_code=False, cuda=False).packed


def test_no_cross_contamination() -> None:
    # A sample's logits do not depend on what else shares its row.
    model = _model("MistralConfig", {"sliding_window": 4})
    model.set_attn_implementation(VARLEN_ATTENTION)
    a, b, c = _samples()[:3]

    def inputs(samples: list[dict]) -> dict:  # every position's logits; the packed labels are the loss's business
        return {**{k: v for k, v in PackCollator()(samples).items() if k != "labels"}, "logits_to_keep": 0}

    with torch.no_grad():
        alone = model(**inputs([b])).logits[0]
        n_a = len(a["input_ids"])
        together = model(**inputs([a, b, c])).logits[0, n_a:n_a + len(b["input_ids"])]
    assert torch.allclose(alone, together, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_torch_and_leaves_logits_intact(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(100, 40000) * 3).to(dtype)  # 100 rows span several ~4 MB blocks of 26 rows
    targets = torch.randint(0, 40000, (100,))
    reference = logits.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(reference.float(), targets, reduction="sum") * 0.25
    expected.backward()
    ours = logits.clone().requires_grad_()
    head_output = ours * 1  # a fresh non-leaf, as a head's output is
    kept = head_output.detach().clone()
    loss = ChunkedCrossEntropy.apply(head_output, targets) * 0.25
    loss.backward()
    assert torch.equal(head_output.detach(), kept)  # the model's outputs are not overwritten
    assert torch.allclose(loss, expected, rtol=1e-6)
    tolerance = 1e-7 if dtype == torch.float32 else 1e-2
    assert torch.allclose(ours.grad.float(), reference.grad.float(), atol=tolerance)
