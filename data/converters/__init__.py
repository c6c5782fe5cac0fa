"""Converters from the formats instruction data is published in to the unified record format
(``alpaca_cot/records.py``): one converter per source format, chosen by name or detected.

Detection looks at the fields of a file's first rows: the format is the first in ``FORMATS`` whose
identifying fields are all present; a tab-separated file is FLAN CoT.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alpaca_cot.records import DataError, validate_record
from data.converters.base import BadRecord, Context
from data.converters.cot import convert_aqua, convert_flan_cot, convert_gsm8k
from data.converters.dialog import convert_firefly, convert_hh_rlhf, convert_moss, convert_sharegpt
from data.converters.instruct import (
    convert_alpaca,
    convert_gpteacher,
    convert_instructionwild,
    convert_messages,
    convert_mmcu,
    convert_moss_prompts,
    convert_seed_tasks,
    convert_self_instruct,
)
from data.converters.reading import Report, Unreadable, iter_rows
from data.storage import PLACEHOLDER, has_placeholder

SOURCE_EXTENSIONS = (".json", ".jsonl", ".tsv", ".gz")
DETECT_ROWS = 100  # rows whose fields are pooled to detect a format (real files mix keys)


@dataclass(frozen=True)
class Format:
    """A source format: its converter, the fields that identify it, and the fields it reads."""

    name: str
    convert: Callable[[Any, Context], list[dict]]
    keys: frozenset[str]  # all present in a file's first rows -> this format (empty: TSV)
    fields: frozenset[str]  # read by the converter; other fields are reported as unused
    dataset: str = ""  # names the CoT phrasings when the file name does not (train.jsonl)
    trainable: bool = True  # False: prompts without answers

    @property
    def description(self) -> str:
        """The first paragraph of the converter's docstring, on one line."""
        return " ".join((self.convert.__doc__ or "").split("\n\n")[0].split())


def _format(name: str, convert: Callable, keys: set[str], fields: set[str] = frozenset(), **kw: Any) -> Format:
    return Format(name, convert, frozenset(keys), frozenset(keys | set(fields)), **kw)


_INSTRUCTION_FIELDS = {"input", "context", "system", "history"}
FORMATS: dict[str, Format] = {f.name: f for f in (
    _format("flan_cot", convert_flan_cot, set()),
    _format("messages", convert_messages, {"messages"}),
    _format("moss", convert_moss, {"chat", "meta_instruction"}),
    _format("sharegpt", convert_sharegpt, {"conversations"}, {"tools", "system"}),
    _format("firefly", convert_firefly, {"conversation"}),
    _format("hh_rlhf", convert_hh_rlhf, {"chosen", "rejected"}),
    _format("self_instruct", convert_self_instruct, {"prompt", "completion"}),
    _format("seed_tasks", convert_seed_tasks, {"instruction", "instances"}),
    _format("aqua", convert_aqua, {"question", "options", "rationale", "correct"}, dataset="aqua"),
    _format("gsm8k", convert_gsm8k, {"question", "answer"}, dataset="gsm8k"),
    _format("mmcu", convert_mmcu, {"题目", "选项", "答案"}),
    _format("gpteacher", convert_gpteacher, {"instruction", "response"}, _INSTRUCTION_FIELDS),
    _format("alpaca", convert_alpaca, {"instruction", "output"}, _INSTRUCTION_FIELDS),
    _format("instructionwild", convert_instructionwild, {"instruction"}, trainable=False),
    _format("moss_prompts", convert_moss_prompts, {"user_prompt"}, trainable=False),
)}


def get_format(name: str) -> Format:
    """The format called ``name``; an unknown name raises an error that lists the known ones."""
    if name not in FORMATS:
        raise DataError(f"Unknown source format {name!r}. Known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_format(path: str, rows: list[tuple[str, Any]]) -> Format:
    """The format of a file from its first rows (see the module docstring)."""
    sample = [row for _, row in rows[:DETECT_ROWS] if not isinstance(row, Unreadable)]
    if sample and isinstance(sample[0], list):
        return FORMATS["flan_cot"]
    keys = {key for row in sample if isinstance(row, dict) for key in row}
    for fmt in FORMATS.values():
        if fmt.keys and fmt.keys <= keys:
            return fmt
    raise DataError(f"{path}: cannot tell the source format from the fields {sorted(keys)}; "
                    f"pass --format, one of: {', '.join(FORMATS)}")


def dataset_name(path: str) -> str:
    """The dataset a source file holds, from its name: ``aqua_train.tsv`` -> ``aqua``."""
    stem = os.path.basename(path).split(".")[0].lower()
    return re.sub(r"[_-](train|dev|test|valid|validation)$", "", stem)


def convert_file(path: str, format: str | None = None, *, seed: int = 42,
                 plain: bool = False) -> tuple[list[dict], Report]:
    """Convert one source file. Rows that cannot become records are listed in ``Report.bad``
    (file:line and field), repairs in ``Report.repaired``; nothing bad is raised. ``seed`` draws
    the CoT phrasings; ``plain`` keeps CoT questions without a phrasing."""
    report = Report(path)
    rows = list(iter_rows(path, report))
    fmt = get_format(format) if format else detect_format(path, rows)
    name = fmt.dataset or dataset_name(path)
    ctx = Context(name, random.Random(f"{seed}:{name}"), report, plain=plain)
    report.format = fmt.name
    records: list[dict] = []
    for where, row in rows:
        report.rows += 1
        if isinstance(row, Unreadable):
            continue
        ctx.where = where
        try:
            if isinstance(row, list) != (fmt.name == "flan_cot"):
                raise BadRecord("row", f"is a {type(row).__name__}, which the {fmt.name} format does not read")
            converted = [validate_record(r, where, need_answer=fmt.trainable) for r in fmt.convert(row, ctx)]
        except BadRecord as e:
            report.bad.append(f"{where}: {e}")
        except DataError as e:
            report.bad.append(str(e))
        else:
            records.extend(converted)
            if isinstance(row, dict):
                report.ignored_fields.update(key for key in row if key not in fmt.fields)
    report.records = len(records)
    with_placeholders = sum(map(has_placeholder, records))
    if with_placeholders:
        report.notes.append(f"{path}: {with_placeholders} records contain template placeholders such as "
                            "{{name}}; fill them with --fill name=...,author=...")
    if not fmt.trainable:
        report.notes.append(f"{path}: instruction-only prompts without outputs: not trainable "
                            "(usable as prediction inputs)")
    return records, report


def source_files(src: str) -> list[str]:
    """The source files of a file or folder (recursively, sorted; .json .jsonl .tsv .gz)."""
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise DataError(f"{src}: no such file or folder")
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(src) for name in names
                   if name.endswith(SOURCE_EXTENSIONS) and not name.startswith("."))
    if not files:
        raise DataError(f"{src}: the folder holds no {', '.join(SOURCE_EXTENSIONS)} files")
    return files


def fill_placeholders(records: list[dict], values: dict[str, str]) -> list[dict]:
    """Records with ``{{key}}`` replaced by ``values[key]`` in every string (LLaMA-Factory identity data)."""
    return [_fill(record, values) for record in records]


def _fill(value: Any, values: dict[str, str]) -> Any:
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: values.get(m.group(0)[2:-2].strip(), m.group(0)), value)
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    return value
