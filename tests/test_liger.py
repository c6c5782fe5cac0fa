"""--use_liger_kernel: the model computes its own loss from transformers' padding-free labels.

Liger's fused linear cross-entropy never materialises the logits, so ``packed_loss`` (over
``outputs.logits``) cannot run; the packed batch then carries ``labels`` (-100 at each sample's first
token) and ``shift_labels`` (the kept positions' targets) for the model's own loss. On CPU these
tests prove that layout gives the packed and padded losses and gradients, also through the Trainer;
the Liger kernels themselves need a CUDA GPU (test at the end, skipped without one).
"""

from __future__ import annotations

import importlib.util

import peft
import pytest
import torch
import transformers

from alpaca_cot.config import FinetuneArgs
from alpaca_cot.errors import UserError
from alpaca_cot.training.packing import PackCollator, PadCollator, apply_packing, choose_packing, packed_loss
from alpaca_cot.training.run import run_finetune

VOCAB = 300
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
          "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# Families whose forward passes shift_labels to their loss: varlen SDPA (Llama, Qwen3, a sliding
# window) and transformers' own packed attention (Gemma 2: softcapping).
FAMILIES = {"llama": ("LlamaConfig", {}), "qwen3": ("Qwen3Config", {"head_dim": 8}),
            "mistral (sliding window)": ("MistralConfig", {"sliding_window": 4}),
            "gemma2 (stock packed attention)": ("Gemma2Config", {"head_dim": 8, "sliding_window": 4})}
HAS_LIGER_GPU = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def _model(config_class: str, overrides: dict) -> torch.nn.Module:
    config = getattr(transformers, config_class)(**{**COMMON, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    apply_packing(model, choose_packing(model, "lora", requested=True, remote_code=False, cuda=False,
                                        dtype=torch.float32))
    return model


def _samples(lengths: tuple[int, ...] = (7, 19, 3, 12), seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    return out


def test_layout() -> None:
    a, b = _samples((4, 5))
    batch = PackCollator(model_loss=True)([a, b])
    # labels: the whole row, -100 at each sample's first token and over the prompts
    assert batch["labels"].tolist() == [[-100, -100, a["input_ids"][2], a["input_ids"][3],
                                         -100, -100, b["input_ids"][2], b["input_ids"][3], b["input_ids"][4]]]
    # shift_labels: what each kept position predicts (never across the boundary at position 3)
    assert batch["logits_to_keep"].tolist() == [1, 2, 5, 6, 7]
    assert batch["shift_labels"].tolist() == [a["input_ids"][2:4] + b["input_ids"][2:5]]
    assert "shift_labels" not in PackCollator()([a, b])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_loss_equals_packed_and_padded(family: str) -> None:
    config_class, overrides = FAMILIES[family]
    models = [_model(config_class, overrides) for _ in range(3)]
    samples = _samples()
    padded = models[0](**PadCollator(pad_id=0)(samples)).loss
    ours = PackCollator()(samples)
    labels = ours.pop("labels")
    packed = packed_loss(models[1](**ours), labels)
    own = models[2](**PackCollator(model_loss=True)(samples)).loss
    assert abs(own.item() - packed.item()) < 1e-5 and abs(own.item() - padded.item()) < 1e-5
    for loss in (padded, packed, own):
        loss.backward()
    for (name, a), (_, b), (_, c) in zip(*(m.named_parameters() for m in models), strict=True):
        assert torch.allclose(c.grad, b.grad, atol=1e-5) and torch.allclose(c.grad, a.grad, atol=1e-5), name


def _train(model_loss: bool, tmp_path) -> list[torch.Tensor]:
    """Three optimizer steps of two accumulated packed micro-batches through the Trainer."""
    model = _model("Qwen3Config", {"head_dim": 8})
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    data = _samples(tuple(range(5, 29)), seed=1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"model_loss={model_loss}"), per_device_train_batch_size=4,
        # plain SGD: the update is the gradient itself (Adam would hide a wrongly scaled loss)
        gradient_accumulation_steps=2, max_steps=3, learning_rate=1.0, optim="sgd", report_to=[], use_cpu=True,
        save_strategy="no", remove_unused_columns=False, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   data_collator=PackCollator(model_loss=model_loss),
                                   compute_loss_func=None if model_loss else packed_loss)
    trainer.train()
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_trainer_with_model_loss_trains_like_packed_loss(tmp_path) -> None:
    # The Trainer counts the tokens of an accumulated step from shift_labels and passes the count to
    # the model's loss: unequal micro-batches weigh each token alike, as packed_loss does.
    ours, own = _train(False, tmp_path), _train(True, tmp_path)
    assert len(ours) == len(own) > 0
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in own)
    for a, b in zip(ours, own, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def _args(model_dir: str, data: str, out, **kw) -> FinetuneArgs:
    base = {"model_type": "llama", "model_name_or_path": model_dir, "data": [data], "val_set_size": 0,
            "max_steps": 3, "per_gpu_train_batch_size": 4, "learning_rate": 1e-2, "output_dir": str(out),
            "compute_dtype": "fp32", "logging_steps": 1, "cutoff_len": 128}
    return FinetuneArgs(**{**base, **kw})


@pytest.mark.skipif(HAS_LIGER_GPU, reason="Liger and a CUDA GPU are here: the flag is accepted")
def test_refused_in_one_line_where_liger_cannot_run(tmp_path, tiny_model_dir: str, tiny_data_file: str) -> None:
    with pytest.raises(UserError) as error:
        run_finetune(_args(tiny_model_dir, tiny_data_file, tmp_path / "out", use_liger_kernel=True))
    message = str(error.value)
    assert message.startswith("--use_liger_kernel needs") and "\n" not in message
    assert ("not installed" in message) == (importlib.util.find_spec("liger_kernel") is None)
    assert not (tmp_path / "out").exists()  # refused before any data or model work


@pytest.mark.skipif(not HAS_LIGER_GPU, reason="needs a CUDA GPU and liger-kernel (Triton GPU kernels)")
def test_liger_trains_like_the_default_on_gpu(tmp_path, tiny_model_dir: str, tiny_data_file: str) -> None:
    runs = {}
    for liger in (False, True):
        metrics, model = run_finetune(_args(tiny_model_dir, tiny_data_file, tmp_path / f"liger={liger}",
                                            use_liger_kernel=liger))
        base = model.get_base_model()
        runs[liger] = (metrics, base.forward.__func__.__module__)
    (plain, plain_forward), (fused, fused_forward) = runs[False], runs[True]
    assert fused_forward.startswith("liger_kernel") and not plain_forward.startswith("liger_kernel")
    # what the run must choose here (flash-attn installed or not), derived, not written down
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = choose_packing(base, "lora", requested=True, remote_code=False, cuda=True, dtype=torch.float32)
    assert fused["attention"] == plain["attention"] == expected.attention
    # fp32 both: the fused kernels reorder sums, so equal to rounding (Adam's first steps amplify
    # differences in near-zero gradients, hence the losses, not the weights, are compared)
    assert abs(fused["train_loss"] - plain["train_loss"]) < 1e-4 * abs(plain["train_loss"])
