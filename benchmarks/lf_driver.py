"""Runs one LLaMA-Factory training inside its own virtualenv and writes metrics.json (see measure.py).

Usage (llama_factory.py and run_all.py call it; run it by hand only to debug):
  benchmarks/.cache/lf-venv/bin/python benchmarks/lf_driver.py CONFIG.json

CONFIG.json holds LLaMA-Factory's training arguments (what its YAML files hold) plus ``_threads``
and ``_pad_id``. Tokens are counted by measure.py's callback, passed to ``run_exp`` with the
train-loop timer.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(config_path: str) -> None:
    """Train with LLaMA-Factory's ``run_exp`` on the given arguments; write metrics.json beside its output."""
    import torch
    from measure import count_tokens, summarize, write_metrics

    with open(config_path, encoding="utf-8") as f:
        args = json.load(f)
    torch.set_num_threads(int(args.pop("_threads")))
    counts, timer = count_tokens(int(args.pop("_pad_id")))

    from llamafactory.train.tuner import run_exp

    run_exp(args, callbacks=[timer])
    with open(os.path.join(args["output_dir"], "train_results.json"), encoding="utf-8") as f:
        train_results = json.load(f)
    metrics = summarize(counts, train_results["train_loss"], dtype="bfloat16" if args.get("bf16") else "float32",
                        neat_packing=bool(args.get("neat_packing")))
    print(f"metrics in {write_metrics(args['output_dir'], metrics)}")


if __name__ == "__main__":
    main(sys.argv[1])
