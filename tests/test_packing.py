"""Packed (padding-free) batches give the padded batch's loss and gradients for every model family."""

from __future__ import annotations

import json
from pathlib import Path

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
    plan = choose_packing(packed_model, "lora", requested=True, remote_code=False, cuda=False, dtype=torch.float32)
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
    plan = choose_packing(model, "lora", requested=True, remote_code=False, cuda=True, dtype=torch.bfloat16)
    assert plan.attention == "flash"
    plan = choose_packing(model, "lora", requested=True, remote_code=False, cuda=False, dtype=torch.bfloat16)
    assert plan.attention == VARLEN_ATTENTION


def test_padding_where_samples_cannot_be_kept_apart() -> None:
    model = _model("LlamaConfig", {})
    cpu = {"cuda": False, "dtype": torch.float32}
    assert not choose_packing(model, "prompt", requested=True, remote_code=False, **cpu).packed
    assert not choose_packing(model, "lora", requested=True, remote_code=True, **cpu).packed
    assert not choose_packing(model, "lora", requested=False, remote_code=False, **cpu).packed


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
    loss = ChunkedCrossEntropy.apply(head_output, targets, True) * 0.25
    loss.backward()
    assert torch.equal(head_output.detach(), kept)  # the model's outputs are not overwritten
    assert torch.allclose(loss, expected, rtol=1e-6)
    tolerance = 1e-7 if dtype == torch.float32 else 1e-2
    assert torch.allclose(ours.grad.float(), reference.grad.float(), atol=tolerance)


def _reference_pack(features: list[dict], model_loss: bool) -> dict:
    """The collator as it was written before it was vectorised (per-token Python lists): the oracle."""
    ids, labels, positions, bounds = [], [], [], [0]
    for f in features:
        n = len(f["input_ids"])
        ids += f["input_ids"]
        labels += [-100] + list(f["labels"][1:])
        positions += range(n)
        bounds.append(bounds[-1] + n)
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    longest = max(lengths)
    keep = [p for p, label in enumerate(labels[1:]) if label != -100]
    targets = [-100] + [labels[p + 1] for p in keep]
    cu = torch.tensor(bounds, dtype=torch.int32)
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([targets]),
             "position_ids": torch.tensor([positions]), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
             "max_length_q": longest, "max_length_k": longest,
             "pack_slots": torch.tensor([i * longest + p for i, n in enumerate(lengths) for p in range(n)]),
             "logits_to_keep": torch.tensor(keep, dtype=torch.long), "use_cache": False}
    if model_loss:
        batch["labels"] = torch.tensor([labels])
        batch["shift_labels"] = torch.tensor([targets[1:]])
    return batch


def _encoded_bench_records(tokenizer_dir: str, template: str) -> list[dict]:
    """The first 48 bench_2k records as a run tokenizes them (real prompts, answers and EOS)."""
    from alpaca_cot.data.encoding import encode_records
    from alpaca_cot.data.templates import get_template
    from tests.conftest import shared_path

    records = json.loads(Path(shared_path("bench", "bench_2k.json")).read_text(encoding="utf-8"))[:48]
    tokenizer = transformers.AutoTokenizer.from_pretrained(shared_path("models", tokenizer_dir))
    encoded = encode_records(records, get_template(template, tokenizer), tokenizer, cutoff_len=256)
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]


@pytest.mark.parametrize("source", ["edge cases", "llama2-tokenizer", "llama3-tokenizer", "qwen3-tokenizer"])
def test_collator_gives_the_per_token_collators_batches_bit_for_bit(source: str) -> None:
    if source == "edge cases":  # a one-token sample, a sample with no label at all, every token a label
        batches = [[{"input_ids": [5], "labels": [5]}, {"input_ids": [6, 7], "labels": [-100, -100]},
                    {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]}],
                   [{"input_ids": [8, 9, 10], "labels": [8, 9, 10]}], _samples()]
        # no target at all: the per-token collator's shift_labels were float32 (torch.tensor([[]])); now int64
        empty = PackCollator(model_loss=True)([{"input_ids": [5], "labels": [5]}])["shift_labels"]
        assert empty.dtype == torch.long and empty.shape == (1, 0)
    else:
        rows = _encoded_bench_records(source, "alpaca" if source == "llama2-tokenizer" else "chat")
        batches = [rows[i:i + size] for i, size in ((0, 1), (1, 8), (9, 32), (41, 7))]
    for features in batches:
        for model_loss in (False, True):
            ours, expected = PackCollator(model_loss)(features), _reference_pack(features, model_loss)
            assert ours.keys() == expected.keys()
            for key, value in expected.items():
                if isinstance(value, torch.Tensor):
                    assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
                else:
                    assert ours[key] == value and type(ours[key]) is type(value), key


def test_evaluation_computes_no_gradient() -> None:
    # Under no_grad (the Trainer's evaluation) the loss is the same and no gradient is computed or held.
    torch.manual_seed(0)
    logits, labels = torch.randn(64, 5000, requires_grad=True), torch.randint(0, 5000, (1, 65))
    outputs = transformers.modeling_outputs.CausalLMOutput(logits=logits.unsqueeze(0))
    ops = {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad), torch.profiler.profile() as profile:
            loss = packed_loss(outputs, labels)
        ops[grad] = ({e.key for e in profile.key_averages()}, loss.detach())
    assert torch.equal(ops[True][1], ops[False][1])
    gradient_ops = {"aten::empty_like", "aten::scatter_add_"}  # the gradient's buffer; softmax - one-hot
    assert gradient_ops <= ops[True][0] and not gradient_ops & ops[False][0]


def test_collating_in_worker_processes_trains_the_same(tmp_path, tiny_model_dir: str, tiny_data_file: str) -> None:
    # --dataloader_num_workers reaches the Trainer, whose workers collate the same batches (the collator pickles).
    from alpaca_cot.config import FinetuneArgs
    from alpaca_cot.training.engines import plan_engine
    from alpaca_cot.training.run import build_training_args, run_finetune

    losses = {}
    for workers in (0, 2):
        args = FinetuneArgs(model_type="llama", model_name_or_path=tiny_model_dir, data=[tiny_data_file],
                            val_set_size=0, max_steps=2, per_gpu_train_batch_size=4, compute_dtype="fp32",
                            cutoff_len=128, output_dir=str(tmp_path / f"workers={workers}"),
                            dataloader_num_workers=workers)
        training_args = build_training_args(args, plan_engine(args), torch.float32, 2, evaluate=False)
        assert training_args.dataloader_num_workers == workers
        losses[workers] = run_finetune(args)[0]["train_loss"]
    assert losses[0] == losses[2]
