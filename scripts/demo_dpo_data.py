"""The DPO demo's held-out split and its closing table.

split: hh-rlhf pairs (as ``data/collection.py convert`` writes them) -> ``heldout.jsonl``, drawn first with a
fixed seed, and ``pool.jsonl``, the rest in the same seeded order (demo_dpo.sh then decontaminates the pool
against the held-out set and trains on its first records). Only pairs whose conversation and longer reply
hold at most --max_chars characters are kept, so that a DPO step fits the 2-core machine's budget.

report: the before/after table from evaluate.py's results.json of the DPO adapter in EVAL_DIR: "after" is the
adapter, "before" its reference (the base model, adapter disabled), which the same run scores alike.

Usage: python3 scripts/demo_dpo_data.py split PAIRS OUT_DIR [--heldout 200] [--max_chars 600] [--seed 0]
       python3 scripts/demo_dpo_data.py report EVAL_DIR
"""

from __future__ import annotations

import json
import os
import random
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # import the project's packages

from alpaca_cot.data.records import read_records  # noqa: E402
from alpaca_cot.data.templates import to_messages  # noqa: E402
from alpaca_cot.io import write_text_atomic  # noqa: E402


def split(pairs: str, out_dir: str, heldout: int = 200, max_chars: int = 600, seed: int = 0) -> None:
    """Write OUT_DIR/heldout.jsonl (``heldout`` pairs) and OUT_DIR/pool.jsonl (the others)."""
    records = [r for r in read_records(pairs, kind="pairs")
               if sum(len(m["content"]) for m in to_messages(r)) + max(len(r["chosen"]), len(r["rejected"]))
               <= max_chars]
    random.Random(seed).shuffle(records)
    if len(records) <= heldout:
        sys.exit(f"{pairs}: only {len(records)} pairs of at most {max_chars} characters; lower --heldout")
    os.makedirs(out_dir, exist_ok=True)
    for name, part in (("heldout", records[:heldout]), ("pool", records[heldout:])):
        write_text_atomic(os.path.join(out_dir, f"{name}.jsonl"),
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    print(f"{len(records)} pairs of at most {max_chars} characters: {heldout} held out, {len(records) - heldout} "
          f"in the training pool ({out_dir})")


def report(eval_dir: str) -> None:
    """Print the held-out pairs' scores before and after DPO from evaluate.py's results.json of the DPO adapter:
    "before" is its reference, the base model with the adapter disabled, scored in the same run."""
    from alpaca_cot.evaluation.preference import render_pairs_table

    with open(os.path.join(eval_dir, "results.json"), encoding="utf-8") as f:
        (after,) = json.load(f)["data"].values()
    before = {**after, "reward_accuracy": None, "reward_margin": None,
              **{key: after[f"ref_{key}"] for key in ("logp_accuracy", "logp_accuracy_per_token", "chosen_logp",
                                                     "rejected_logp")}}
    print("\n".join(render_pairs_table({"before: base model (the reference)": before, "after: DPO adapter": after})))


if __name__ == "__main__":
    import fire

    fire.Fire({"split": split, "report": report})
