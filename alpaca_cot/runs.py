"""Finding a training run by the data it was trained on (the seed's ``generate.py --data NAME``)."""

from __future__ import annotations

import glob
import json
import os

from alpaca_cot.config import ARGS_FILE
from alpaca_cot.errors import UserError

RUNS_DIR = "saved_models"  # where uniform_finetune.py puts runs by default


def _data_names(entries: list[str]) -> set[str]:
    return set(entries) | {os.path.splitext(os.path.basename(e))[0] for e in entries}


def find_run(data: str, root: str = RUNS_DIR) -> str:
    """The newest run folder under ``root`` trained on ``data`` (a dataset name, a file, or its stem)."""
    wanted = _data_names([str(data)])
    runs = []
    for path in glob.glob(os.path.join(root, "**", ARGS_FILE), recursive=True):
        try:
            with open(path, encoding="utf-8") as f:
                trained_on = json.load(f).get("data") or []
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if wanted & _data_names([str(d) for d in trained_on]):
            runs.append(os.path.dirname(path))
    if not runs:
        raise UserError(f"No run trained on --data {data} under {os.path.abspath(root)} (a folder with "
                        f"{ARGS_FILE}); pass --lora_dir, the output folder of uniform_finetune.py.")
    return max(runs, key=lambda run: os.path.getmtime(os.path.join(run, ARGS_FILE)))
