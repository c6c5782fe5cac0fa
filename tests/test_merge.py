"""merge.py: the merged checkpoint equals the adapter model; refusals come with their reason.

The adapter is the session's tiny one (built in code); one check merges a LoRA on the real stories260K
when ../shared is there."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from alpaca_cot.config import FinetuneArgs
from alpaca_cot.errors import UserError
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.merging import merge_adapter
from alpaca_cot.models.loading import load_for_inference
from tests.conftest import run_script


@pytest.fixture(scope="module")
def merged_dir(trained_adapter: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The trained adapter merged by merge.py, run with the seed's flags, in shards of 100 KB."""
    out = str(tmp_path_factory.mktemp("merged") / "yyy")
    run_script("merge.py", "--model_type", "llama", "--size", "7b", "--lora_dir", trained_adapter, "--merged_dir", out,
               "--max_shard_size", "100KB", env={"OMP_NUM_THREADS": "1"})
    return out


@pytest.fixture(scope="module")
def merged_here(trained_adapter: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The trained adapter merged in this process (merge.py's function, without the script's start-up)."""
    out = str(tmp_path_factory.mktemp("merged") / "here")
    merge_adapter(trained_adapter, out)
    return out


@pytest.mark.slow
def test_merged_folder_is_a_complete_sharded_checkpoint(merged_dir: str) -> None:
    names = set(os.listdir(merged_dir))
    shards = sorted(n for n in names if n.startswith("model-") and n.endswith(".safetensors"))
    assert len(shards) >= 3 and "model.safetensors.index.json" in names  # 280 KB of fp32 weights
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "template.json",
            "finetune_args.json", "merge.json"} <= names
    keys = [k for s in shards for k in load_file(os.path.join(merged_dir, s))]
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    report = json.loads(open(os.path.join(merged_dir, "merge.json"), encoding="utf-8").read())
    layers = transformers.AutoConfig.from_pretrained(merged_dir).num_hidden_layers
    assert report["updated_layers"] == report["changed_layers"] == 2 * layers  # q_proj and v_proj of each layer
    assert report["max_abs_logit_diff"] <= report["tolerance"]


def _rows(path: str, n: int = 4) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [r for r in json.load(f) if "messages" not in r][:n]


def _assert_merged_equals_adapter(base: Any, adapter_dir: str, merged_dir: str, rows: list[dict]) -> None:
    """Merged logits equal the adapter model's on ``rows``, far closer than the adapter is to its base."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged_dir)
    texts = [f"{r['instruction']}\n\n{r['input']}\n\n{r['output']}" for r in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    base_logits = base(**batch).logits
    base_q = base.model.layers[0].self_attn.q_proj.weight.clone()
    base_k = base.model.layers[0].self_attn.k_proj.weight.clone()
    adapter = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base_q)  # LoRA target: changed
    assert torch.equal(merged.model.layers[0].self_attn.k_proj.weight, base_k)  # not a target: as it was
    expected = adapter(**batch).logits
    # Tolerance: 1e-5 of the largest logit (float32 only reorders the sums; measured 7.5e-7).
    tolerance = 1e-5 * expected.abs().max()
    assert (merged(**batch).logits - expected).abs().max() <= tolerance
    assert (base_logits - expected).abs().max() > 100 * tolerance  # the adapter does change the model


@torch.inference_mode()
def test_merged_logits_equal_the_adapter_models(trained_adapter: str, merged_here: str, tiny_data_file: str) -> None:
    base_path = FinetuneArgs.load(trained_adapter).model_name_or_path
    base = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    _assert_merged_equals_adapter(base, trained_adapter, merged_here, _rows(tiny_data_file))


@torch.inference_mode()
def test_real_model_lora_merges_exactly(stories_dir: str, alpaca_file: str, tmp_path) -> None:
    # A plain PEFT LoRA on the real stories260K Llama with random B (as if trained), merged in-process.
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(str(tmp_path / "adapter"))
    report = merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert report["updated_layers"] == report["changed_layers"] == 2 * base.config.num_hidden_layers
    base = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    _assert_merged_equals_adapter(base, str(tmp_path / "adapter"), str(tmp_path / "merged"), _rows(alpaca_file))


def test_merged_folder_loads_like_a_run(trained_adapter: str, merged_here: str, tiny_data_file: str) -> None:
    records = _rows(tiny_data_file)
    greedy = SamplingParams(do_sample=False, max_new_tokens=16)
    from_adapter = Generator(*load_for_inference(trained_adapter, compute_dtype="fp32")).generate(records, greedy)
    assert Generator(*load_for_inference(merged_here, compute_dtype="fp32")).generate(records, greedy) == from_adapter


def test_replaces_only_its_own_merge(trained_adapter: str, tmp_path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # a folder merge.py did not write is never replaced
        with pytest.raises(UserError, match="keep.txt exists and was not written by merge.py"):
            merge_adapter(trained_adapter, str(target), overwrite=overwrite)
    assert os.listdir(target) == ["keep.txt"]
    mine = tmp_path / "merged"
    merge_adapter(trained_adapter, str(mine))
    with pytest.raises(UserError, match="is not empty; pass --overwrite"):
        merge_adapter(trained_adapter, str(mine))
    merge_adapter(trained_adapter, str(mine), overwrite=True)
    assert {"model.safetensors", "run.json"} <= set(os.listdir(mine))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folder left


def test_refuses_a_quantized_base(trained_adapter: str, tmp_path) -> None:
    with pytest.raises(UserError, match="rounds it onto the quantization grid"):
        merge_adapter(trained_adapter, str(tmp_path / "a"), quantization_bit=4)
    quantized = tmp_path / "gptq-base"
    shutil.copytree(FinetuneArgs.load(trained_adapter).model_name_or_path, quantized)
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
