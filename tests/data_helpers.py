"""Test helpers for the data stage: records as training reads them, and trainable label counts."""

from __future__ import annotations

from alpaca_cot.data.encoding import IGNORE_INDEX, Encoded
from alpaca_cot.data.pipeline import file_rows, to_record
from alpaca_cot.data.sources import resolve_data


def load_data(sources: list[str]) -> list[dict]:
    """The records of ``--data`` sources (names or paths) in order, as training reads them (a file with
    unanswered records is refused as not trainable)."""
    return [to_record(row) for path in resolve_data(sources) for row in file_rows(path)]


def count_trainable(encoded: Encoded) -> int:
    """Number of label positions that carry loss."""
    return sum(1 for x in encoded.labels if x != IGNORE_INDEX)
