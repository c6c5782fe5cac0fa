"""merge.py: the merged checkpoint equals the adapter model; refusals come with their reason."""

from __future__ import annotations

import json
import os
import shutil

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from alpaca_cot.config import FinetuneArgs
from alpaca_cot.errors import UserError
from alpaca_cot.generation import Generator, SamplingParams
from alpaca_cot.loading import load_for_inference
from alpaca_cot.merging import merge_adapter
from tests.conftest import run_script


@pytest.fixture(scope="module")
def merged_dir(trained_adapter: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The trained adapter merged by merge.py, run with the seed's flags, in shards of 300 KB."""
    out = str(tmp_path_factory.mktemp("merged") / "yyy")
    run_script("merge.py", "--model_type", "llama", "--size", "7b", "--lora_dir", trained_adapter, "--merged_dir", out,
               "--max_shard_size", "300KB", env={"OMP_NUM_THREADS": "1"})
    return out


def test_merged_folder_is_a_complete_sharded_checkpoint(merged_dir: str) -> None:
    names = set(os.listdir(merged_dir))
    shards = sorted(n for n in names if n.startswith("model-") and n.endswith(".safetensors"))
    assert len(shards) >= 3 and "model.safetensors.index.json" in names  # 1.2 MB of fp32 weights
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "template.json",
            "finetune_args.json", "merge.json"} <= names
    keys = [k for s in shards for k in load_file(os.path.join(merged_dir, s))]
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    report = json.loads(open(os.path.join(merged_dir, "merge.json"), encoding="utf-8").read())
    assert report["updated_layers"] == report["changed_layers"] == 10  # q_proj and v_proj of 5 layers
    assert report["max_abs_logit_diff"] <= report["tolerance"]


@torch.inference_mode()
def test_merged_logits_equal_the_adapter_models(trained_adapter: str, merged_dir: str, alpaca_file: str) -> None:
    base_path = FinetuneArgs.load(trained_adapter).model_name_or_path
    base = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    base_q = base.model.layers[0].self_attn.q_proj.weight.clone()
    base_k = base.model.layers[0].self_attn.k_proj.weight.clone()
    adapter = peft.PeftModel.from_pretrained(base, trained_adapter).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base_q)  # LoRA target: changed
    assert torch.equal(merged.model.layers[0].self_attn.k_proj.weight, base_k)  # not a target: as it was
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged_dir)
    with open(alpaca_file, encoding="utf-8") as f:
        rows = json.load(f)[:4]
    texts = [f"{r['instruction']}\n\n{r['input']}\n\n{r['output']}" for r in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    expected = adapter(**batch).logits
    # Tolerance: 1e-5 of the largest logit (float32 only reorders the sums; measured 7.5e-7).
    assert (merged(**batch).logits - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_merged_folder_loads_like_a_run(trained_adapter: str, merged_dir: str, alpaca_file: str) -> None:
    with open(alpaca_file, encoding="utf-8") as f:
        records = json.load(f)[:4]
    greedy = SamplingParams(do_sample=False, max_new_tokens=16)
    from_adapter = Generator(*load_for_inference(trained_adapter, compute_dtype="fp32")).generate(records, greedy)
    assert Generator(*load_for_inference(merged_dir, compute_dtype="fp32")).generate(records, greedy) == from_adapter


def test_never_overwrites_a_non_empty_folder(trained_adapter: str, merged_dir: str, tmp_path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty; pass --overwrite"):
        merge_adapter(trained_adapter, str(target))
    assert os.listdir(target) == ["keep.txt"]
    merge_adapter(trained_adapter, str(target), overwrite=True)
    assert "keep.txt" not in os.listdir(target) and "model.safetensors" in os.listdir(target)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".merge-")]  # no temporary folder left


def test_refuses_a_quantized_base(trained_adapter: str, stories_dir: str, tmp_path) -> None:
    with pytest.raises(UserError, match="rounds it onto the quantization grid"):
        merge_adapter(trained_adapter, str(tmp_path / "a"), quantization_bit=4)
    quantized = tmp_path / "gptq-base"
    shutil.copytree(stories_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="stored gptq-quantized"):
        merge_adapter(trained_adapter, str(tmp_path / "b"), model_name_or_path=str(quantized))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_refuses_an_adapter_that_changes_nothing(trained_adapter: str, tmp_path) -> None:
    untrained = tmp_path / "untrained"
    shutil.copytree(trained_adapter, untrained, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = load_file(untrained / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              untrained / "adapter_model.safetensors")
    with pytest.raises(UserError, match="changes no weight"):
        merge_adapter(str(untrained), str(tmp_path / "out"))
    config = json.loads((untrained / "adapter_config.json").read_text())
    (untrained / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PROMPT_TUNING"}))
    with pytest.raises(UserError, match="cannot be merged"):
        merge_adapter(str(untrained), str(tmp_path / "out"))
    with pytest.raises(UserError, match="holds no adapter_config.json"):
        merge_adapter(str(tmp_path), str(tmp_path / "out"))
