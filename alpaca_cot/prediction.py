"""Batch prediction into JSONL: each input record plus a ``generate`` field, resumable after a kill.

Each finished batch is appended to the predictions file, flushed and synced; a run that is killed
loses at most the batch in flight (a line torn by the kill is cut off). A rerun reads what is
there and predicts only the rest; when every record is done, the file is rewritten (atomically) in
input order. Records are matched by content, so the same input file must be given again.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict

from alpaca_cot.datasets import resolve_data
from alpaca_cot.errors import UserError
from alpaca_cot.generation import Generator, SamplingParams
from alpaca_cot.io import write_text_atomic
from alpaca_cot.records import read_records

PREDICTION_FIELD = "generate"  # the original's field name
FILE_SUFFIXES = (".jsonl", ".json", ".txt")


def output_paths(result_dir: str) -> tuple[str, str]:
    """(predictions file, metrics file) for ``--result_dir``.

    A path ending in .jsonl/.json/.txt is the predictions file itself (as the seed used it), with
    ``<name>.metrics.json`` beside it; any other path is a folder for predictions.jsonl and metrics.json.
    """
    if result_dir.endswith(FILE_SUFFIXES):
        return result_dir, os.path.splitext(result_dir)[0] + ".metrics.json"
    return os.path.join(result_dir, "predictions.jsonl"), os.path.join(result_dir, "metrics.json")


def load_inputs(data: list[str], max_samples: int | None = None) -> list[dict]:
    """Prediction inputs from ``--data`` names or files (answers optional), the first ``max_samples`` if given."""
    records = [r for path in resolve_data(data) for r in read_records(path, need_answer=False)]
    return records[:max_samples] if max_samples else records


def record_key(record: dict) -> str:
    """What identifies an input record: its JSON, keys sorted, without the prediction field."""
    return json.dumps({k: v for k, v in record.items() if k != PREDICTION_FIELD}, sort_keys=True,
                      ensure_ascii=False)


def read_predictions(path: str) -> list[dict]:
    """The complete prediction lines of ``path`` ([] if absent); a torn last line is cut from the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    complete = data.rfind(b"\n") + 1  # lines end with "\n"; bytes after the last one were torn
    if complete < len(data):
        with open(path, "r+b") as f:
            f.truncate(complete)
    done: list[dict] = []
    for lineno, line in enumerate(data[:complete].decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or PREDICTION_FIELD not in record:
            raise UserError(f"{path}:{lineno}: not a prediction line (a JSON object with a '{PREDICTION_FIELD}' "
                            "field); pass --overwrite to replace the file, or another --result_dir")
        done.append(record)
    return done


class PredictionRun:
    """The predictions of ``records`` in the file at ``path``: what is done, what is left, and writing the rest."""

    def __init__(self, records: list[dict], path: str, overwrite: bool = False):
        self.records = records
        self.path = path
        self.overwrite = overwrite
        self.done = [] if overwrite else read_predictions(path)
        left = Counter(record_key(r) for r in self.done)
        self.todo: list[int] = []
        for i, record in enumerate(records):
            key = record_key(record)
            if left[key]:
                left[key] -= 1
            else:
                self.todo.append(i)
        extra = sum(left.values())
        if extra:
            raise UserError(f"{path} holds predictions of {extra} records that are not in --data (another data "
                            "set or --max_samples?); pass --overwrite to replace it, or another --result_dir")
        self.new: list[dict] = []

    def predict(self, generator: Generator, params: SamplingParams, batch_size: int) -> float:
        """Predict the records left, appending each batch to the file; returns records per second."""
        todo = [self.records[i] for i in self.todo]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        start = time.perf_counter()
        with open(self.path, "w" if self.overwrite else "a", encoding="utf-8") as f:
            for batch in generator.generate_batches(todo, params, batch_size):
                rows = [{**todo[i], PREDICTION_FIELD: answer} for i, answer in batch]
                f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
                f.flush()
                os.fsync(f.fileno())  # what is reported as written survives a crash
                self.new.extend(rows)
                seconds = time.perf_counter() - start
                print(f"{len(self.done) + len(self.new)}/{len(self.records)} records predicted "
                      f"({len(self.new) / seconds:.2f} records/s)", flush=True)
        return len(self.new) / max(time.perf_counter() - start, 1e-9)

    def finish(self) -> list[dict]:
        """Every record with its prediction, in input order; the file is rewritten in that order if it is not."""
        written = self.done + self.new
        by_key: dict[str, list[dict]] = defaultdict(list)
        for row in written:
            by_key[record_key(row)].append(row)
        ordered = [by_key[record_key(r)].pop(0) for r in self.records]
        if ordered != written:  # batches are written longest prompts first
            write_text_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
        return ordered
