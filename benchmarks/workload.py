"""The fixed speed workload: a random-init ~57M Llama with the LLaMA-2 tokenizer, and bench_2k records.

Usage:
  .venv/bin/python benchmarks/workload.py [--n_records 200] [--cache_dir benchmarks/.cache]

Built once into the cache folder (git-ignored) and reused; every contender trains the same model
on the same records. See ../shared/bench/README.md for the definition.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
SHARED = os.environ.get("ALPACA_COT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
DEFAULT_CACHE = os.path.join(BENCH_DIR, ".cache")
TOKENIZER_DIR = os.path.join(SHARED, "models", "llama2-tokenizer")
RECORDS_FILE = os.path.join(SHARED, "bench", "bench_2k.json")
MODEL_NAME = "llama-57m-random"


@dataclass(frozen=True)
class Workload:
    """Where the built workload lies: a model folder (weights + tokenizer) and a unified-format JSON file."""

    model_dir: str
    data_file: str
    n_records: int


def load_bench_records(n_records: int | None = None) -> list[dict]:
    """The first ``n_records`` records of bench_2k.json (all 2,000 when None)."""
    with open(RECORDS_FILE, encoding="utf-8") as f:
        records = json.load(f)
    return records[:n_records] if n_records else records


def build_model(model_dir: str) -> None:
    """Save the random-init Llama (seed 0, fp32) with the LLaMA-2 tokenizer (pad = <unk>, id 0)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    # add_bos_token as in Meta's Llama-2 tokenizer_config.json (the bare tokenizer.model does not say).
    tokenizer = transformers.LlamaTokenizer.from_pretrained(TOKENIZER_DIR, add_bos_token=True, add_eos_token=False)
    tokenizer.pad_token = tokenizer.unk_token
    if tokenizer.pad_token_id != 0:
        raise RuntimeError(f"expected <unk> (id 0) as the pad token, got id {tokenizer.pad_token_id}")
    staging = model_dir + ".partial"
    for stale in (staging, model_dir):  # left by an interrupted build
        shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    os.replace(staging, model_dir)


def build_workload(n_records: int = 200, cache_dir: str = DEFAULT_CACHE) -> Workload:
    """Build (or reuse) the model and the first ``n_records`` records under ``cache_dir``."""
    os.makedirs(cache_dir, exist_ok=True)
    model_dir = os.path.join(cache_dir, MODEL_NAME)
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        build_model(model_dir)
    data_file = os.path.join(cache_dir, "data", f"bench_{n_records}.json")
    if not os.path.isfile(data_file):
        os.makedirs(os.path.dirname(data_file), exist_ok=True)
        with open(data_file + ".partial", "w", encoding="utf-8") as f:
            json.dump(load_bench_records(n_records), f, ensure_ascii=False)
        os.replace(data_file + ".partial", data_file)
    return Workload(model_dir=model_dir, data_file=data_file, n_records=n_records)


def main(n_records: int = 200, cache_dir: str = DEFAULT_CACHE) -> None:
    """Build the workload and say where it is."""
    workload = build_workload(int(n_records), cache_dir)
    print(f"model: {workload.model_dir}\nrecords: {workload.data_file} ({workload.n_records})")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
