"""Times our data preparation: the Alpaca template and batched tokenization of 100,000 records, and
the tokenized-data cache (the first run of ``prepare_splits`` from the JSON file, then a cache hit).

Usage:
  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/data_prep.py [--n_records 100000]

The records are bench_2k.json's 2,000 repeated; the tokenizer is the workload's LLaMA-2 tokenizer.
The tokenization seconds cover ``alpaca_cot.data.encoding.encode_records`` only (not reading JSON or
loading the tokenizer, in this one process); the cache seconds cover ``alpaca_cot.data.prepared.prepare_splits``
whole, as uniform_finetune.py calls it (hashing the file, reading it or the cache, tokenizing with the
default number of processes, writing the Arrow cache). benchmarks/data_scale.py measures larger sizes.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
sys.path.insert(1, os.path.dirname(BENCH_DIR))
from workload import build_workload, load_bench_records  # noqa: E402


def time_data_prep(n_records: int = 100_000, cutoff_len: int = 512) -> dict[str, float]:
    """Seconds to encode ``n_records`` records, and the tokens they give."""
    import transformers

    from alpaca_cot.data.encoding import encode_records
    from alpaca_cot.data.templates import get_template

    tokenizer = transformers.AutoTokenizer.from_pretrained(build_workload().model_dir)
    base = load_bench_records()
    records = (base * -(-n_records // len(base)))[:n_records]
    template = get_template("alpaca", tokenizer)
    started = time.perf_counter()
    encoded = encode_records(records, template, tokenizer, cutoff_len)
    seconds = time.perf_counter() - started
    return {"records": n_records, "seconds": seconds, "records_per_s": n_records / seconds,
            "tokens": sum(len(e.input_ids) for e in encoded), **time_cache(records, tokenizer, template, cutoff_len)}


def time_cache(records: list[dict], tokenizer: object, template: object, cutoff_len: int) -> dict[str, float]:
    """Seconds of ``prepare_splits`` on ``records`` saved as a JSON file: a cache miss, then a hit."""
    from alpaca_cot.data.prepared import prepare_splits

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=False)
        args = SimpleNamespace(data=[path], data_files=None, subset=None, streaming=False, cutoff_len=cutoff_len,
                               train_on_inputs=False, max_samples=None, val_set_size=0, seed=0,
                               preprocessing_num_workers=None)
        seconds = {}
        for expected in ("miss", "hit"):
            started = time.perf_counter()
            info = prepare_splits(args, tokenizer, template, cache_dir=tmp)[2]
            seconds[f"cache_{expected}_seconds"] = time.perf_counter() - started
            if info["cache"] != expected:
                raise RuntimeError(f"expected a cache {expected}, got {info['cache']}")
    return seconds


def main(n_records: int = 100_000, cutoff_len: int = 512) -> None:
    """Print the data-preparation time."""
    result = time_data_prep(int(n_records), int(cutoff_len))
    print(f"{result['records']} records ({result['tokens']:.0f} tokens) prepared in {result['seconds']:.1f} s "
          f"({result['records_per_s']:.0f} records/s); prepare_splits from the JSON file: "
          f"{result['cache_miss_seconds']:.1f} s, then {result['cache_hit_seconds']:.2f} s from the cache")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
