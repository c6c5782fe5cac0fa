"""Evaluate a fine-tuned model: chain-of-thought exact match on data files, preference accuracy on files of
preference pairs, and standard benchmarks through lm-evaluation-harness, into OUT/results.json,
OUT/results.md and OUT/generations/.

Usage:
  python3 evaluate.py --lora_dir saved_models/RUN --data heldout.json --output_dir eval/RUN
  python3 evaluate.py --lora_dir saved_models/RUN --data heldout.json --num_fewshot 3 --output_dir eval/RUN-3shot
  python3 evaluate.py --lora_dir saved_models/DPO-RUN --data heldout_pairs.jsonl --output_dir eval/DPO-RUN
  python3 evaluate.py --lora_dir saved_models/RUN --tasks arc_easy,hellaswag --output_dir eval/RUN-bench
  HF_HUB_OFFLINE=1 python3 evaluate.py --lora_dir saved_models/RUN --tasks alpaca_cot_yesno --output_dir eval/x
"""

from __future__ import annotations

import os

from alpaca_cot.cli import command, run_cli
from alpaca_cot.config import EvaluateArgs, ModelArgs
from alpaca_cot.evaluation.run import render_table, run_evaluation
from alpaca_cot.generation.sampling import SamplingParams


# Greedy by default, so a rerun gives the same generations and scores.
@command(ModelArgs, SamplingParams, EvaluateArgs,
         defaults={"do_sample": False, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0})
def main(model: ModelArgs, sampling: SamplingParams, args: EvaluateArgs) -> None:
    """Score a model on --data (final-answer accuracy, exact match and the share of generations that state
    an answer, with 95% confidence intervals, and the eval loss; on preference pairs, how often the chosen
    reply ranks above the rejected one) and/or on lm-evaluation-harness --tasks.

    A rerun with the same flags resumes where a killed run stopped; --overwrite starts again.
    """
    results = run_evaluation(model, sampling, args)
    print(render_table(results), end="")
    folders = [name for name, used in (("generations/", args.data), ("lm_eval/", args.tasks)) if used]
    print(f"Results: {os.path.join(args.output_dir, 'results.json')} (table: results.md; per record: "
          f"{' and '.join(folders)} in {args.output_dir})")


if __name__ == "__main__":
    run_cli(main)
