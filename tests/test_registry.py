"""Every --model_type trains a few steps on a tiny model built from config, with the tiny tokenizer built in
code; the real Qwen3 and stories260K tokenizers train too when ../shared is there."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from alpaca_cot.config import FinetuneArgs
from alpaca_cot.errors import UserError
from alpaca_cot.models.loading import LoadError
from alpaca_cot.models.registry import MODEL_REGISTRY, get_model_spec
from alpaca_cot.training.run import run_finetune
from tests.conftest import shared_path
from tests.fixtures.remote_code import write_remote_model
from tests.fixtures.tiny_models import NATIVE, write_tiny_model

REMOTE = {"chatglm": "query_key_value", "chatglm2": "query_key_value", "moss": "qkv_proj",
          "baichuan": "W_pack", "internlm": "wqkv"}


def test_registry_covers_the_issue_types() -> None:
    assert set(NATIVE) | set(REMOTE) == set(MODEL_REGISTRY)


def test_unknown_type_lists_known_ones() -> None:
    with pytest.raises(UserError) as e:
        get_model_spec("llama3000")
    assert "llama, chatglm" in str(e.value) and "auto" in str(e.value)


def _train(tmp_path, model_dir: str, model_type: str, data: str, **extra) -> dict:
    extra.setdefault("cutoff_len", 512)
    args = FinetuneArgs(model_type=model_type, model_name_or_path=model_dir, data=[data], val_set_size=0,
                        max_steps=2, per_gpu_train_batch_size=4, output_dir=str(tmp_path / "out"),
                        compute_dtype="fp32", logging_steps=1, **extra)
    metrics, model = run_finetune(args)
    assert metrics["steps"] == 2
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items()), "LoRA B stayed zero"
    return metrics


@pytest.mark.parametrize("model_type", sorted(NATIVE))
def test_native_type_trains(tmp_path, model_type: str, tiny_data_file: str) -> None:
    # The tiny tokenizer has a chat template, so the chat types train on it (multi-turn records included).
    model_dir = write_tiny_model(str(tmp_path / "model"), model_type)
    metrics = _train(tmp_path, model_dir, model_type, tiny_data_file)
    assert metrics["template"] == get_model_spec(model_type).template


def test_chat_type_without_a_chat_template_trains_on_alpaca(tmp_path, tiny_data_file: str) -> None:
    model_dir = write_tiny_model(str(tmp_path / "model"), "mistral")
    os.remove(os.path.join(model_dir, "chat_template.jinja"))
    assert not AutoTokenizer.from_pretrained(model_dir).chat_template
    assert _train(tmp_path, model_dir, "mistral", tiny_data_file)["template"] == "alpaca"


@pytest.mark.parametrize(("model_type", "tokenizer", "template"), [
    pytest.param("qwen2", "qwen3-tokenizer", "chat", marks=pytest.mark.slow),  # 151k embeddings: 20 s
    ("llama", "stories260K-hf", "alpaca")])
def test_real_tokenizer_trains(tmp_path, model_type: str, tokenizer: str, template: str, alpaca_file: str) -> None:
    model_dir = write_tiny_model(str(tmp_path / "model"), model_type, shared_path("models", tokenizer))
    assert _train(tmp_path, model_dir, model_type, alpaca_file)["template"] == template


@pytest.mark.parametrize("model_type", sorted(REMOTE))
def test_remote_code_type_trains_only_when_trusted(tmp_path, model_type: str, tiny_tokenizer_dir: str,
                                                   tiny_data_file: str) -> None:
    model_dir = write_remote_model(str(tmp_path / "model"), REMOTE[model_type], tiny_tokenizer_dir)
    with pytest.raises(LoadError, match="--trust_remote_code"):
        _train(tmp_path, model_dir, model_type, tiny_data_file)
    # MOSS prompts open with its long meta instruction: leave room for it.
    _train(tmp_path, model_dir, model_type, tiny_data_file, trust_remote_code=True, cutoff_len=1024)
    assert os.path.isfile(tmp_path / "out" / "template.json")


def test_chatglm_type_on_native_glm_maps_seed_target_names(tmp_path, tiny_data_file: str) -> None:
    # The seed's `--lora_target_modules query_key_value` means q/k/v_proj in native GLM checkpoints.
    model_dir = write_tiny_model(str(tmp_path / "model"), "glm")
    _train(tmp_path, model_dir, "chatglm", tiny_data_file, lora_target_modules=["query_key_value"])
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {k.split(".")[-3] for k in weights if "lora_A" in k} == {"q_proj", "k_proj", "v_proj"}


def test_wrong_target_lists_the_linear_layers(tmp_path, tiny_data_file: str) -> None:
    model_dir = write_tiny_model(str(tmp_path / "model"), "llama")
    with pytest.raises(UserError, match="its linear layers are: down_proj, gate_proj"):
        _train(tmp_path, model_dir, "llama", tiny_data_file, lora_target_modules=["query_key_value"])
