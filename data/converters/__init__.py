"""Converters from the formats instruction data is published in to the unified record format
(``alpaca_cot/data/records.py``): one converter per source format, chosen by name or detected.

Detection pools the fields of a file's first rows (one level of nesting as ``outer.inner``): the
format is the first in ``FORMATS`` that finds one field of each of its groups (and whose content
check, if any, passes). A tab-separated file is FLAN CoT with 3 fields per line, question and
answer with 2. A file that holds one object wrapping the list of rows (``{"examples": [...]}``)
is read as that list. A file no format fits is reported once, with the formats nearest to it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alpaca_cot.data.columns import FIELDS, map_record, row_fields
from alpaca_cot.data.records import DataError, answered, record_kind
from data.converters import preference as pref
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
from data.converters.qa import (
    ANSWER_KEYS,
    ID_KEYS,
    OPTION_KEYS,
    PROMPT_KEYS,
    QUESTION_KEYS,
    convert_choice,
    convert_humaneval,
    convert_mbpp,
    convert_prompts,
    convert_qa,
    convert_qa_tsv,
    convert_target_scores,
)
from data.converters.reading import Report, Unreadable, iter_rows
from data.storage import PLACEHOLDER, has_placeholder, literal_newline, validate_any

SOURCE_EXTENSIONS = (".json", ".jsonl", ".tsv", ".gz", ".parquet", ".csv")
DETECT_ROWS = 100  # rows whose fields are pooled to detect a format (real files mix keys)
NEAREST = 3  # formats named when none fits a file
# Keys under which a file's single top-level object holds its rows, tried in this order.
WRAPPER_KEYS = ("data", "examples", "instances", "Instances", "rows", "records", "items", "questions", "train", "test")
# Words a header line of a tab-separated file is made of.
HEADER_WORDS = {"question", "answer", "rationale", "chain_of_thought", "cot", "input", "target", "output", "label"}


@dataclass(frozen=True)
class Format:
    """A source format: its converter, the fields that identify it, and the fields it reads."""

    name: str
    convert: Callable[[Any, Context], list[dict]]
    groups: tuple[tuple[str, ...], ...]  # one field of each group present -> this format (empty: TSV)
    fields: frozenset[str]  # read by the converter; other fields are reported as unused
    dataset: str = ""  # names the CoT phrasings when the file name does not (train.jsonl)
    trainable: bool = True  # False: prompts without answers
    columns: int = 0  # tab-separated fields per line; 0: JSON rows
    check: Callable[[set[str], list[dict]], bool] | None = None  # content test beyond the fields
    kind: str = "sft"  # the records it makes: sft, pairs (chosen, rejected) or kto (output, label)

    @property
    def keys(self) -> frozenset[str]:
        """The first field of each group: the names ``formats`` shows."""
        return frozenset(group[0] for group in self.groups)

    @property
    def description(self) -> str:
        """The first paragraph of the converter's docstring, on one line."""
        return " ".join((self.convert.__doc__ or "").split("\n\n")[0].split())

    def missing(self, keys: set[str]) -> list[tuple[str, ...]]:
        """The groups none of whose fields is among ``keys``."""
        return [group for group in self.groups if not keys.intersection(group)]

    def fits(self, keys: set[str], sample: list[dict]) -> bool:
        """Whether rows with these pooled fields (and this sample) are in this format."""
        return bool(self.groups) and not self.missing(keys) and (self.check is None or self.check(keys, sample))


def _format(name: str, convert: Callable, groups: list, fields: set[str] = frozenset(), **kw: Any) -> Format:
    groups = tuple((group,) if isinstance(group, str) else tuple(group) for group in groups)
    return Format(name, convert, groups, frozenset({key for group in groups for key in group} | set(fields)), **kw)


def _gsm8k_answers(keys: set[str], sample: list[dict]) -> bool:
    # GSM8K's answer ends in a "#### N" line; other {question, answer} files are plain question-answer.
    return any(isinstance(row.get("answer"), str) and "####" in row["answer"] for row in sample)


def _prompt_only(keys: set[str], sample: list[dict]) -> bool:
    # No answer anywhere; a bare "text" field is a text corpus unless an id says it is a list of prompts.
    if keys.intersection(ANSWER_KEYS):
        return False
    return bool(keys.intersection(PROMPT_KEYS[:-1])) or bool(keys.intersection(ID_KEYS))


_INSTRUCTION_FIELDS = {"input", "context", "system", "history"}
_QA_FIELDS = {"passage", "context", "Body"}
FORMATS: dict[str, Format] = {f.name: f for f in (
    _format("flan_cot", convert_flan_cot, [], columns=3),
    _format("qa_tsv", convert_qa_tsv, [], columns=2),
    # Preference data first: its rows also carry the fields of SFT layouts (UltraFeedback's `messages`).
    _format("ultrafeedback", pref.convert_ultrafeedback, ["prompt", "chosen", "rejected"], kind="pairs"),
    _format("sharegpt_pairs", pref.convert_sharegpt_pairs, ["conversations", "chosen", "rejected"], {"system", "tools"},
            kind="pairs"),
    _format("pairs", pref.convert_alpaca_pairs, [("instruction", "messages"), "chosen", "rejected"],
            {"input", "system", "history"}, kind="pairs"),
    _format("kto", pref.convert_kto, [("messages", "instruction"), "label"], {"input", "output"}, kind="kto",
            check=lambda keys, rows: any(isinstance(row.get("label"), bool) for row in rows)),
    _format("hh_rlhf_pairs", pref.convert_hh_pairs, ["chosen", "rejected"], kind="pairs"),
    _format("messages", convert_messages, ["messages"]),
    _format("moss", convert_moss, ["chat", "meta_instruction"]),
    _format("sharegpt", convert_sharegpt, ["conversations"], {"tools", "system"}),
    _format("firefly", convert_firefly, ["conversation"]),
    _format("hh_rlhf", convert_hh_rlhf, ["chosen", "rejected"]),  # never detected (hh_rlhf_pairs is): --format
    _format("self_instruct", convert_self_instruct, ["prompt", "completion"]),
    _format("seed_tasks", convert_seed_tasks, ["instruction", "instances"]),
    _format("aqua", convert_aqua, ["question", "options", "rationale", "correct"], dataset="aqua"),
    _format("gsm8k", convert_gsm8k, ["question", "answer"], dataset="gsm8k", check=_gsm8k_answers),
    _format("mmcu", convert_mmcu, ["题目", "选项", "答案"]),
    _format("humaneval", convert_humaneval, ["prompt", "canonical_solution"]),
    _format("mbpp", convert_mbpp, ["text", "code"], {"test_list"}),
    _format("target_scores", convert_target_scores, ["input", "target_scores"]),
    _format("choice", convert_choice, [QUESTION_KEYS, (*OPTION_KEYS, "question.choices"), ANSWER_KEYS], _QA_FIELDS),
    _format("gpteacher", convert_gpteacher, ["instruction", "response"], _INSTRUCTION_FIELDS),
    _format("alpaca", convert_alpaca, ["instruction", "output"], _INSTRUCTION_FIELDS),
    _format("qa", convert_qa, [QUESTION_KEYS, ANSWER_KEYS], _QA_FIELDS),
    _format("instructionwild", convert_instructionwild, ["instruction"], trainable=False),
    _format("moss_prompts", convert_moss_prompts, ["user_prompt"], trainable=False),
    _format("prompts", convert_prompts, [PROMPT_KEYS], {"reference"}, trainable=False, check=_prompt_only),
)}


class UndetectedFormat(DataError):
    """No format fits a file; the message names the fields seen and the nearest formats."""


def get_format(name: str) -> Format:
    """The format called ``name``; an unknown name raises an error that lists the known ones."""
    if name not in FORMATS:
        raise DataError(f"Unknown source format {name!r}. Known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def mapped_format(columns: dict[str, str]) -> Format:
    """The format a ``--columns`` mapping makes: every field it names must be there, ``map_record`` reads them."""
    fields = [field for name, field in columns.items() if name in FIELDS]
    answers = "prompt" not in columns or "response" in columns
    return _format("--columns", lambda row, ctx: [map_record(row, columns, ctx.where)], fields,
                   {field.partition(".")[0] for field in fields}, trainable=answers)


def pooled_keys(sample: list[Any]) -> set[str]:
    """The fields of the sample rows, with one level of nesting as ``outer.inner``."""
    return {field for row in sample for field in row_fields(row)}


def _columns(sample: list[Any]) -> int:
    """The most common number of tab-separated fields among the sample's lines."""
    counts = Counter(len(row) for row in sample if isinstance(row, list))
    return counts.most_common(1)[0][0] if counts else 0


def _group_text(group: tuple[str, ...]) -> str:
    return group[0] if len(group) == 1 else "one of " + ", ".join(group[:4]) + (", ..." if len(group) > 4 else "")


def detect_format(path: str, rows: list[tuple[str, Any]]) -> Format:
    """The format of a file from its first rows (see the module docstring); UndetectedFormat names
    the fields it saw and the nearest formats with what each lacks."""
    sample = [row for _, row in rows[:DETECT_ROWS] if not isinstance(row, Unreadable)]
    if sample and isinstance(sample[0], list):
        columns = _columns(sample)
        tabular = [fmt for fmt in FORMATS.values() if fmt.columns == columns]
        if tabular:
            return tabular[0]
        known = " or ".join(f"{fmt.columns} ({fmt.name})" for fmt in FORMATS.values() if fmt.columns)
        raise UndetectedFormat(f"{path}: a tab-separated file with {columns} fields per line; "
                               f"the tab-separated formats have {known}")
    keys = pooled_keys(sample)
    dicts = [row for row in sample if isinstance(row, dict)]
    for fmt in FORMATS.values():
        if fmt.fits(keys, dicts):
            return fmt
    raise UndetectedFormat(f"{path}: no source format fits the fields {sorted(keys)}; "
                           f"nearest: {nearest_formats(keys)}")


def nearest_formats(keys: set[str]) -> str:
    """The JSON formats sharing the most identifying fields with ``keys``, each with what it lacks."""
    ranked = sorted((fmt for fmt in FORMATS.values() if fmt.groups and len(fmt.missing(keys)) < len(fmt.groups)),
                    key=lambda fmt: len(fmt.missing(keys)) / len(fmt.groups))
    if not ranked:
        return "none (no format reads any of these fields)"
    shown = []
    for fmt in ranked[:NEAREST]:
        lacks = fmt.missing(keys)
        why = "lacks " + "; ".join(_group_text(group) for group in lacks) if lacks else "its content check fails"
        shown.append(f"{fmt.name} ({why})")
    return ", ".join(shown)


def check_format(path: str, fmt: Format, rows: list[tuple[str, Any]]) -> None:
    """Refuse, once for the whole file, a named format the file's rows are not in."""
    sample = [row for _, row in rows[:DETECT_ROWS] if not isinstance(row, Unreadable)]
    if not sample:
        return
    if fmt.columns:
        columns = _columns(sample)
        if columns != fmt.columns:
            found = f"{columns} tab-separated fields per line" if columns else "JSON rows"
            raise DataError(f"{path}: the format {fmt.name} reads {fmt.columns} tab-separated fields per line; "
                            f"this file has {found}")
        return
    if isinstance(sample[0], list):
        raise DataError(f"{path}: the format {fmt.name} reads JSON rows; this file is tab-separated")
    keys = pooled_keys(sample)
    lacks = fmt.missing(keys)
    if lacks:
        raise DataError(f"{path}: the format {fmt.name} needs " + "; ".join(_group_text(group) for group in lacks)
                        + f", which no row has (the rows have {sorted(keys)})")


def unwrap(path: str, rows: list[tuple[str, Any]], fmt: Format | None, report: Report) -> list[tuple[str, Any]]:
    """The rows of a file whose single top-level object wraps them (``{"data": [...]}``); other
    files' rows as they are. An object that is itself a row of the format stays one row."""
    if len(rows) != 1 or not isinstance(rows[0][1], dict):
        return rows
    whole = rows[0][1]
    if fmt.fits(pooled_keys([whole]), [whole]) if fmt else any(f.fits(pooled_keys([whole]), [whole])
                                                             for f in FORMATS.values()):
        return rows
    lists = [key for key, value in whole.items()
             if isinstance(value, list) and value and all(isinstance(item, dict) for item in value)]
    key = next((k for k in WRAPPER_KEYS if k in lists), lists[0] if len(lists) == 1 else None)
    if key is None:
        return rows
    others = [k for k in whole if k != key]
    report.notes.append(f"{path}: read the {len(whole[key])} items of its top-level '{key}' list as rows"
                        + (f" (other top-level fields, not read: {', '.join(others)})" if others else ""))
    return [(f"{path}: {key}[{i}]", item) for i, item in enumerate(whole[key])]


def dataset_name(path: str) -> str:
    """The dataset a source file holds, from its name: ``aqua_train.tsv`` -> ``aqua``."""
    stem = os.path.basename(path).split(".")[0].lower()
    return re.sub(r"[_-](train|dev|test|valid|validation)$", "", stem)


def convert_file(path: str, format: str | None = None, *, seed: int = 42, plain: bool = False,
                 columns: dict[str, str] | None = None) -> tuple[list[dict], Report]:
    """Convert one source file. Rows that cannot become records are listed in ``Report.bad``
    (file:line and field), repairs in ``Report.repaired``; a file that no format fits, or not the
    named one, raises one DataError for the whole file. ``seed`` draws the CoT phrasings; ``plain``
    keeps questions and answers without a phrasing (evaluation prompts); ``columns`` (``--columns``) maps the
    rows' fields instead of a format."""
    report = Report(path)
    rows = list(iter_rows(path, report))
    named = mapped_format(columns) if columns else get_format(format) if format else None
    rows = unwrap(path, rows, named, report)
    fmt = named or detect_format(path, rows)
    if named:
        check_format(path, fmt, rows)
    if fmt.columns and rows and isinstance(rows[0][1], list) and {
            field.strip().lower() for field in rows[0][1]} <= HEADER_WORDS:
        report.notes.append(f"{rows[0][0]}: a header line ({', '.join(rows[0][1])}), skipped")
        rows = rows[1:]
    name = fmt.dataset or dataset_name(path)
    ctx = Context(name, seed, report, plain=plain)
    report.format = fmt.name
    records: list[dict] = []
    for where, row in rows:
        report.rows += 1
        if isinstance(row, Unreadable):
            continue
        ctx.where = where
        try:
            if isinstance(row, list) != bool(fmt.columns):
                raise BadRecord("row", f"is a {type(row).__name__}, which the {fmt.name} format does not read")
            converted = [validate_any(r, where, need_answer=fmt.trainable) for r in fmt.convert(row, ctx)]
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
    escaped = sum(map(literal_newline, records))
    if escaped:
        report.notes.append(f"{path}: {escaped} records hold the two characters '\\n' and no line break, "
                            "likely an escaped line break; kept as written")
    unanswered = sum(record_kind(record) == "sft" and not answered(record) for record in records)
    if records and unanswered == len(records):
        report.notes.append(f"{path}: instruction-only prompts without outputs: not trainable "
                            "(usable as prediction inputs)")
    elif unanswered:
        report.notes.append(f"{path}: {unanswered} of {len(records)} records are prompts without outputs: "
                            "the file is not trainable as it is")
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
