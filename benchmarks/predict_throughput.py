"""predict.py throughput: the same records one at a time and in batches, through predict's own code path.

Usage:
  PYTHONPATH=. .venv/bin/python benchmarks/predict_throughput.py --lora_dir RUN [--data FILE] [--n_records 32]
  PYTHONPATH=. .venv/bin/python benchmarks/predict_throughput.py --model_name_or_path benchmarks/.cache/llama-57m-random

Greedy decoding (so every batch size must give the same answers), --max_new_tokens 64 by default.
Each batch size writes its own predictions file in a temporary folder, as predict.py does. Prints,
per batch size, records/s and answer tokens/s (answers re-tokenized), and the speed-up over the
first batch size; the machine's load average is printed too, since a busy machine skews timings.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time

import torch

from alpaca_cot.cli import run_cli
from alpaca_cot.flags import as_list
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.models.loading import load_for_inference
from alpaca_cot.prediction import PredictionRun, load_inputs

BENCH_RECORDS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared",
                             "bench", "bench_2k.json")


def main(lora_dir: str | None = None, model_name_or_path: str | None = None, data: str = BENCH_RECORDS,
         n_records: int = 32, max_new_tokens: int = 64, batch_sizes: str = "1,8", compute_dtype: str = "fp32",
         threads: int | None = None) -> None:
    """Time predict's batched generation at each of --batch_sizes on the first --n_records of --data."""
    if threads:
        torch.set_num_threads(int(threads))
    generator = Generator(*load_for_inference(lora_dir, model_name_or_path=model_name_or_path,
                                              compute_dtype=compute_dtype))
    records = load_inputs([data], int(n_records))
    params = SamplingParams(do_sample=False, max_new_tokens=max_new_tokens, repetition_penalty=1.0,
                            no_repeat_ngram_size=0)
    generator.generate(records[:2], params, batch_size=2)  # warm-up: first-call allocations
    results, answers = [], {}
    for size in [int(s) for s in as_list(batch_sizes)]:
        with tempfile.TemporaryDirectory() as tmp:
            run = PredictionRun(records, os.path.join(tmp, "predictions.jsonl"))
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # predict's per-batch progress lines
                run.predict(generator, params, size)
            seconds = time.perf_counter() - start
            rows = run.finish()
        answers[size] = [r["generate"] for r in rows]
        tokens = sum(len(generator.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers[size])
        results.append({"batch_size": size, "seconds": round(seconds, 2),
                        "records_per_s": round(len(rows) / seconds, 2),
                        "answer_tokens_per_s": round(tokens / seconds, 1)})
    base = results[0]
    for r in results:
        r["speedup"] = round(r["records_per_s"] / base["records_per_s"], 2)
        r[f"same_answers_as_batch_{base['batch_size']}"] = answers[r["batch_size"]] == answers[base["batch_size"]]
    print(json.dumps({"model": lora_dir or model_name_or_path, "records": len(records),
                      "max_new_tokens": max_new_tokens, "threads": torch.get_num_threads(),
                      "load_average_1min": round(os.getloadavg()[0], 2), "results": results}, indent=2))


if __name__ == "__main__":
    run_cli(main)
