"""Batch prediction into JSONL: each input record plus a ``generate`` field, resumable after a kill.

Each finished batch is appended to the predictions file, flushed and synced; a run that is killed
loses at most the batch in flight (a line torn by the kill is cut off). A rerun reads what is
there and predicts only the rest; when every record is done, the file is rewritten (atomically) in
input order. Records are matched by content, so the same input file must be given again.

predict.py writes only files it owns (``alpaca_cot.outputs``): a sidecar (``run.json`` in a result folder,
``<name>.run.json`` beside a predictions file) is written before the first prediction, and a predictions
file, metrics file or folder without it is never read, cut, resumed or replaced: such a --result_dir is refused.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict

from alpaca_cot.data.records import read_records
from alpaca_cot.data.sources import resolve_data
from alpaca_cot.errors import UserError
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.io import write_text_atomic
from alpaca_cot.outputs import check_not_file, claim, marker_path, refuse_all_inputs, write_marker

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


def run_file_path(result_dir: str) -> str:
    """The sidecar that marks the predictions and metrics of ``--result_dir`` as written by predict.py."""
    return marker_path(result_dir, single_file=result_dir.endswith(FILE_SUFFIXES))


def check_outputs(result_dir: str, sources: list[str], models: dict[str, list] | None = None) -> bool:
    """Whether ``--result_dir`` holds an earlier predict.py run (True) or nothing yet (False).

    Reads only (``alpaca_cot.outputs``). Raises UserError when an output path is (or holds) an input (``--data``
    files, the ``models`` folders by flag, the --config file), or when
    something is there that predict.py did not write (no sidecar): it is never cut, resumed or replaced.
    """
    predictions, metrics = output_paths(result_dir)
    marker = run_file_path(result_dir)
    refuse_all_inputs([result_dir, predictions, metrics, marker], {"--data": resolve_data(sources), **(models or {})},
                      flag="--result_dir", shown=result_dir)
    is_folder = not result_dir.endswith(FILE_SUFFIXES)
    if is_folder:
        check_not_file(result_dir, "--result_dir")
    if os.path.isdir(predictions):
        raise UserError(f"--result_dir {result_dir} is a folder; pass a name without {', '.join(FILE_SUFFIXES)} "
                        "for a result folder, or a new file")
    present = [path for path in (predictions, metrics) if os.path.exists(path)]
    if is_folder and os.path.isdir(result_dir):
        present += sorted(os.path.join(result_dir, name) for name in os.listdir(result_dir))
    return claim(marker, "predict", present, flag="--result_dir", shown=result_dir)


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

    def __init__(self, records: list[dict], result_dir: str, *, sources: list[str], overwrite: bool = False,
                 models: dict[str, list] | None = None):
        """Check ``result_dir`` against the ``--data`` ``sources`` (see ``check_outputs``); read what is done."""
        self.records = records
        self.path, self.metrics_path = output_paths(result_dir)
        self.run_file = run_file_path(result_dir)
        self.sources = sources
        self.overwrite = overwrite
        owned = check_outputs(result_dir, sources, models)
        self.done = read_predictions(self.path) if owned and not overwrite else []
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
            raise UserError(f"{self.path} holds predictions of {extra} records that are not in --data (another data "
                            "set or --max_samples?); pass --overwrite to replace it, or another --result_dir")
        self.new: list[dict] = []

    def predict(self, generator: Generator, params: SamplingParams, batch_size: int) -> float:
        """Predict the records left, appending each batch to the file; returns records per second."""
        todo = [self.records[i] for i in self.todo]
        # The sidecar goes first: a predictions file is never there without the mark that it is ours.
        write_marker(self.run_file, "predict", predictions=os.path.basename(self.path),
                     metrics=os.path.basename(self.metrics_path), data=self.sources)
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
