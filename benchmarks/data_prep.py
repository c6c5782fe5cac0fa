"""Times our data preparation: the Alpaca template and batched tokenization of 100,000 records.

Usage:
  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/data_prep.py [--n_records 100000]

The records are bench_2k.json's 2,000 repeated; the tokenizer is the workload's LLaMA-2 tokenizer.
Seconds cover ``alpaca_cot.tokenize.encode_records`` only (not reading JSON or loading the tokenizer).
"""

from __future__ import annotations

import os
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
sys.path.insert(1, os.path.dirname(BENCH_DIR))
from workload import build_workload, load_bench_records  # noqa: E402


def time_data_prep(n_records: int = 100_000, cutoff_len: int = 512) -> dict[str, float]:
    """Seconds to encode ``n_records`` records, and the tokens they give."""
    import transformers

    from alpaca_cot.templates import get_template
    from alpaca_cot.tokenize import encode_records

    tokenizer = transformers.AutoTokenizer.from_pretrained(build_workload().model_dir)
    base = load_bench_records()
    records = (base * -(-n_records // len(base)))[:n_records]
    started = time.perf_counter()
    encoded = encode_records(records, get_template("alpaca", tokenizer), tokenizer, cutoff_len)
    seconds = time.perf_counter() - started
    return {"records": n_records, "seconds": seconds, "records_per_s": n_records / seconds,
            "tokens": sum(len(e.input_ids) for e in encoded)}


def main(n_records: int = 100_000, cutoff_len: int = 512) -> None:
    """Print the data-preparation time."""
    result = time_data_prep(int(n_records), int(cutoff_len))
    print(f"{result['records']} records ({result['tokens']:.0f} tokens) prepared in {result['seconds']:.1f} s "
          f"({result['records_per_s']:.0f} records/s)")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
