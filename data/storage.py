"""Unified-format files: writing them safely, reading them back, and checking them."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from alpaca_cot.data.records import (
    DataError,
    answered,
    iter_records,
    record_kind,
    validate_preference,
    validate_record,
)
from alpaca_cot.data.sources import resolve_data
from alpaca_cot.io import write_text_atomic
from alpaca_cot.outputs import refuse_inputs

PLACEHOLDER = re.compile(r"\{\{\s*\w+\s*\}\}")  # template slots such as {{name}} (LLaMA-Factory identity data)


def check_writable(path: str, overwrite: bool, inputs: tuple[str, ...] = ()) -> None:
    """Refuse to replace an existing output unless asked to, and an input (or a folder holding one) whatever the
    flags, before any work is done."""
    refuse_inputs([path], inputs, flag="output", shown=path, input_flag="source")
    if os.path.exists(path) and not overwrite:
        raise DataError(f"{path} already exists; pass --overwrite to replace it")


def write_records(path: str, records: list[dict], *, overwrite: bool = False) -> None:
    """Write records atomically (a crash never leaves half a file): a JSON array with one record
    per line for .json, JSON Lines for .jsonl. A file holds one kind of record (SFT, pairs or KTO)."""
    check_writable(path, overwrite)
    kinds = Counter(map(record_kind, records))
    if len(kinds) > 1:
        raise DataError(f"{path}: not written: the records mix kinds ({_kinds(kinds)}); a file holds one kind "
                        "(SFT, pairs or KTO), so convert or mix them apart")
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    body = "\n".join(lines) + "\n" if path.endswith(".jsonl") else "[\n" + ",\n".join(lines) + "\n]\n"
    write_text_atomic(path, body)


def load_records(source: str, *, need_answer: bool = True) -> list[dict]:
    """Every record of a unified-format source: a file, a folder or a registry name (as ``--data``)."""
    records = []
    for path in resolve_data([source]):
        records.extend(validate_any(obj, where, need_answer=need_answer) for where, obj in iter_records(path))
    return records


def validate_any(record: Any, where: str, *, need_answer: bool = True) -> dict:
    """``validate_record`` for an SFT record, ``validate_preference`` for a pair or KTO record."""
    if record_kind(record) == "sft":
        return validate_record(record, where, need_answer=need_answer)
    return validate_preference(record, where)


def has_placeholder(record: dict) -> bool:
    """Whether a text of the record holds a template slot such as ``{{name}}``."""
    return any("{{" in text and PLACEHOLDER.search(text) for text in record_texts(record))


def literal_newline(record: dict) -> bool:
    """Whether a text of the record holds the two characters ``\\n`` and no line break: an escaped
    line break left in by an earlier conversion (code, which has real line breaks too, is not flagged)."""
    return any("\\n" in text and "\n" not in text for text in record_texts(record))


def record_texts(record: dict) -> list[str]:
    """The texts of a record in order: instruction and input, or every turn's content; then the replies
    (output, or chosen and rejected)."""
    prompt = [turn["content"] for turn in record["messages"]] if "messages" in record else \
        [record.get("instruction", ""), record.get("input", "")]
    return prompt + [record[key] for key in ("output", "chosen", "rejected") if key in record]


@dataclass
class FileCheck:
    """What ``validate`` found in one unified-format file."""

    path: str
    single: int = 0
    multi: int = 0
    unanswered: int = 0  # SFT records without an output / ending with a user turn
    kinds: Counter = field(default_factory=Counter)  # valid records by kind: sft, pairs, kto
    chosen_chars: int = 0  # the pairs' replies, in characters
    rejected_chars: int = 0
    identical: int = 0  # pairs refused because their two replies are the same
    desirable: int = 0  # KTO records labelled true
    errors: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)  # locations of empty answers
    placeholders: list[str] = field(default_factory=list)  # locations of {{...}} template slots
    escaped: list[str] = field(default_factory=list)  # locations of literal two-character \n

    def lines(self, limit: int = 20) -> list[str]:
        """The report: counts, whether the file is trainable, then errors and warnings."""
        total = self.single + self.multi
        lines = [f"{self.path}: {total} valid records ({self.single} single-turn, {self.multi} multi-turn)"]
        sft, pairs, kto = (self.kinds[kind] for kind in ("sft", "pairs", "kto"))
        if len(self.kinds) > 1:
            lines.append(f"  not trainable: the records mix kinds ({_kinds(self.kinds)}); a stage trains on one")
        if sft and self.unanswered == sft:
            lines.append("  not trainable: instruction-only, no record has an answer "
                         "(usable as prediction inputs, i.e. need_answer=False)")
        elif self.unanswered:
            lines.append(f"  not trainable as it is: {self.unanswered} records have no answer")
        elif sft:
            lines.append("  trainable: every record has an answer")
        if pairs:
            lines.append(f"  preference pairs: {pairs} (mean length: chosen {self.chosen_chars / pairs:.0f}, "
                         f"rejected {self.rejected_chars / pairs:.0f} characters)")
        if kto:
            lines.append(f"  KTO records: {kto} ({self.desirable} desirable, {kto - self.desirable} undesirable)")
        if self.identical:
            lines.append(f"  {self.identical} pairs have identical replies (invalid records, below)")
        if self.empty:
            lines.append(f"  warning: {len(self.empty)} records have an empty answer (first: {self.empty[0]})")
        if self.placeholders:
            lines.append(f"  warning: {len(self.placeholders)} records contain template placeholders such as "
                         f"{{{{name}}}} (first: {self.placeholders[0]})")
        if self.escaped:
            lines.append(f"  warning: {len(self.escaped)} records hold the two characters '\\n' and no line "
                         f"break, likely an escaped line break (first: {self.escaped[0]})")
        if self.errors:
            lines.append(f"  {len(self.errors)} invalid records:")
            lines += [f"    {error}" for error in self.errors[:limit]]
            if len(self.errors) > limit:
                lines.append(f"    ... and {len(self.errors) - limit} more")
        return lines


def check_file(path: str) -> FileCheck:
    """Validate every record of a unified-format file, counting kinds, answers and problems."""
    check = FileCheck(path)
    try:
        rows = list(iter_records(path))
    except DataError as e:
        check.errors.append(str(e))
        return check
    for where, obj in rows:
        kind = record_kind(obj)
        try:
            record = validate_any(obj, where, need_answer=False)
        except DataError as e:
            check.errors.append(str(e))
            check.identical += "is identical to 'chosen'" in str(e)
            continue
        check.kinds[kind] += 1
        check.multi += "messages" in record
        check.single += "messages" not in record
        if kind == "pairs":  # validation refuses empty replies
            check.chosen_chars += len(record["chosen"])
            check.rejected_chars += len(record["rejected"])
            answer = record["chosen"]
        else:
            check.desirable += record.get("label") is True
            answer = record["messages"][-1]["content"] if answered(record) and "messages" in record \
                else record.get("output")
        if answer is None:
            check.unanswered += 1
        elif not answer.strip():
            check.empty.append(where)
        if has_placeholder(record):
            check.placeholders.append(where)
        if literal_newline(record):
            check.escaped.append(where)
    if not rows:
        check.errors.append(f"{path}: the file holds no records")
    return check


def _kinds(kinds: Counter) -> str:
    names = {"sft": "SFT records", "pairs": "preference pairs", "kto": "KTO records"}
    return ", ".join(f"{n} {names[kind]}" for kind, n in kinds.items())
