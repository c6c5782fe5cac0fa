"""The unified record format, and reading it from JSON / JSONL files with precise errors (and from Parquet
and CSV files, through ``datasets``).

A record is either single-turn::

    {"instruction": str, "input": str (optional, default ""), "output": str}

or multi-turn (a list of turns, optionally opened by one system turn)::

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}

where user and assistant turns alternate, starting with user. Training records end with an
assistant turn; prediction inputs may end with a user turn. Other keys are kept untouched
(predict.py copies them to its output).

A preference record is a prompt in either form, without an answer (``messages`` end with a user turn), and
replies, non-empty strings: a pair (DPO, ORPO, SimPO) ``{PROMPT, "chosen": str, "rejected": str}`` whose
replies differ, or a KTO record ``{PROMPT, "output": str, "label": bool}`` (true: a desirable reply).
``record_kind`` tells "sft", "pairs" and "kto" apart; ``require_kind`` refuses a file of another kind.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Iterator
from typing import Any

from alpaca_cot.errors import UserError

ROLES = ("system", "user", "assistant")
TABLES = {".parquet": "parquet", ".csv": "csv"}  # extension -> the ``datasets`` builder that reads it
REPLIES = {"pairs": ("chosen", "rejected"), "kto": ("output",)}  # a preference record's reply fields, by kind
KINDS = {"sft": "an SFT record (an 'output' or a final assistant turn)",
         "pairs": "a preference pair ('chosen' and 'rejected' replies)",
         "kto": "a KTO record (one 'output' with a boolean 'label')"}


class DataError(UserError):
    """A record or file that cannot be used; the message names the file, line/index and field."""


def validate_record(record: Any, where: str, *, need_answer: bool = True) -> dict:
    """Return the record normalised (missing ``input`` becomes ""), or raise DataError at ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty list of turns")
        expected = "user"
        for i, turn in enumerate(messages):
            field = f"messages[{i}]"
            if not isinstance(turn, dict):
                raise DataError(f"{where}: field '{field}' must be an object with role and content")
            role, content = turn.get("role"), turn.get("content")
            if role not in ROLES:
                raise DataError(f"{where}: field '{field}.role' is {role!r}; valid roles: {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise DataError(f"{where}: field '{field}.content' must be a string")
            if role == "system" and i == 0:
                continue
            if role != expected:
                raise DataError(f"{where}: field '{field}.role' is {role!r} but {expected!r} was expected "
                                "(user and assistant turns alternate, starting with user)")
            expected = "assistant" if role == "user" else "user"
        if need_answer and messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'messages' must end with an assistant turn")
        return record
    for key in ("instruction", "output") if need_answer else ("instruction",):
        if key not in record:
            raise DataError(f"{where}: missing field '{key}' (a record needs instruction, input, output "
                            "or a 'messages' list)")
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(record[key]).__name__}")
    if not record.get("input"):
        record = {**record, "input": ""}
    return record


def record_kind(record: Any) -> str:
    """"pairs" for a record with 'chosen' or 'rejected', "kto" for one with a boolean 'label', else "sft"."""
    if isinstance(record, dict) and ("chosen" in record or "rejected" in record):
        return "pairs"
    return "kto" if isinstance(record, dict) and isinstance(record.get("label"), bool) else "sft"


def validate_preference(record: Any, where: str) -> dict:
    """Return a pair or KTO record normalised (see the module docstring), or raise DataError at ``where``."""
    kind = record_kind(record)
    if kind == "sft":
        validate_record(record, where, need_answer=False)  # not an object, or not even a valid prompt: that error
        raise DataError(f"{where}: {KINDS['sft']}, not {KINDS['pairs']} or {KINDS['kto']}")
    replies = REPLIES[kind]
    prompt = validate_record({k: v for k, v in record.items() if k not in (*replies, "label")}, where,
                             need_answer=False)
    if answered(prompt):
        field, why = ("messages", "must end with a user turn") if "messages" in prompt else ("output", "is not read")
        raise DataError(f"{where}: field '{field}' {why} in {KINDS[kind]}")
    for key in replies:
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(record.get(key)).__name__}"
                            if key in record else f"{where}: missing field '{key}' ({KINDS[kind]})")
        if not record[key].strip():
            raise DataError(f"{where}: field '{key}' is empty")
    if kind == "pairs" and record["chosen"].strip() == record["rejected"].strip():
        raise DataError(f"{where}: field 'rejected' is identical to 'chosen' (a pair needs two different replies)")
    return {**record, **prompt}


def require_kind(path: str, kind: str, hint: str = "") -> None:
    """Raise DataError at the first row of ``path`` that is not of ``kind`` ("sft", "pairs" or "kto");
    ``hint`` (e.g. "--stage dpo trains on pairs") ends the message."""
    for where, obj in iter_records(path):
        found = record_kind(obj)
        if found != kind:
            raise DataError(f"{where}: {KINDS[found]} where {KINDS[kind]} was expected" + (f"; {hint}" if hint else ""))


def answered(record: dict) -> bool:
    """Whether a validated record has an answer to train on (an 'output' or a final assistant turn)."""
    if "messages" in record:
        return record["messages"][-1]["role"] == "assistant"
    return "output" in record


def answer_error(record: dict, where: str) -> str:
    """"" for a validated record that is ``answered``, else why it cannot be trained on (its validation error)."""
    if answered(record):
        return ""
    try:
        validate_record(record, where)
    except DataError as e:
        return str(e)
    return ""


def untrainable_error(where: str, total: int, unanswered: int, first: str) -> DataError | None:
    """The error for a file (or dataset) of ``total`` records of which ``unanswered`` lack an answer, ``first``
    being the first one's ``answer_error``; None when every record has one."""
    if not unanswered:
        return None
    if unanswered == total:
        return DataError(f"{where}: not trainable: the file is instruction-only (none of its {unanswered} records "
                         "has an answer, i.e. an 'output' field or a final assistant turn), such as a "
                         "benchmark's prompts; use it as prediction input (predict.py), or train on a file "
                         "with answers")
    return DataError(f"{where}: not trainable as it is: {unanswered} of {total} records have no answer; "
                     f"the first: {first}")


def read_text(path: str) -> str:
    """The file decoded as UTF-8 (a byte-order mark is dropped); invalid bytes are reported by line and offset."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # e.start counts from after a byte-order mark, which utf-8-sig drops before decoding.
        offset = e.start + (3 if data.startswith(codecs.BOM_UTF8) else 0)
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte offset {offset} (byte 0x{data[offset]:02x}); "
                        "save the file as UTF-8") from None


def iter_json_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, raw_object)`` from a JSON array or a JSON Lines file (any extension).

    JSON Lines files are read line by line, so a file larger than memory streams through; a JSON
    array is parsed whole."""
    if _first_char(path) == b"[":
        text = read_text(path)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        for i, item in enumerate(items):
            yield f"{path}: record {i}", item
        return
    # Binary lines split on b"\n" only, since real files carry U+2028 inside strings.
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            skip = len(codecs.BOM_UTF8) if lineno == 1 and raw.startswith(codecs.BOM_UTF8) else 0
            try:
                line = raw[skip:].decode("utf-8")
            except UnicodeDecodeError as e:
                at = start + skip + e.start
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte offset {at} (byte 0x{raw[at - start]:02x}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                if _first_char(path) == b"{" and _is_one_object(read_text(path)):
                    raise DataError(f"{path}: holds a single JSON object, not a list of records; wrap it in [ ] or "
                                    "write one record per line (JSON Lines)") from None
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None


def iter_records(path: str) -> Iterator[tuple[str, Any]]:
    """``iter_json_records``, or for a Parquet or CSV file its rows (empty cells left out), streamed."""
    if not is_table(path):
        yield from iter_json_records(path)
        return
    import datasets

    builder = TABLES[os.path.splitext(path)[1].lower()]
    text = {}
    if builder == "csv":  # a cell is text as written ("7.0" stays "7.0", "NA" stays "NA"), not what pandas guesses
        with open(path, encoding="utf-8-sig", newline="") as f:
            names = next(csv.reader(f), [])
        text = {"features": datasets.Features(dict.fromkeys(names, datasets.Value("string"))),
                "keep_default_na": False}
    try:
        table = datasets.load_dataset(builder, data_files=path, split="train", streaming=True, **text)
        rows = (zip(batch, values, strict=True) for batch in table.iter(batch_size=1000)  # 7x faster than by row
                for values in zip(*batch.values(), strict=True))
        for i, row in enumerate(rows):
            yield f"{path}: row {i}", {key: value for key, value in row if value is not None}
    except Exception as e:  # a damaged file: one line, not the builder's traceback
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: cannot be read as {builder}: {reason}") from None


def is_table(path: str) -> bool:
    """Whether ``path`` is a Parquet or CSV file."""
    return os.path.splitext(path)[1].lower() in TABLES


def _first_char(path: str) -> bytes:
    """The file's first byte that is not whitespace (after a byte-order mark), or b"" when there is none."""
    with open(path, "rb") as f:
        data = f.read(len(codecs.BOM_UTF8))
        data = data[len(codecs.BOM_UTF8):] if data == codecs.BOM_UTF8 else data
        while True:
            stripped = data.lstrip()
            if stripped:
                return stripped[:1]
            data = f.read(1 << 16)
            if not data:
                return b""


def _is_one_object(text: str) -> bool:
    """Whether ``text`` is one JSON object spread over several lines (a JSON Lines reader fails on it)."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def read_records(path: str, *, need_answer: bool = True, kind: str = "sft") -> list[dict]:
    """Read and validate every record of one unified-format file; ``kind`` "pairs" or "kto" reads preference
    records, refusing the file at its first row of another kind."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if kind != "sft":
        require_kind(path, kind)  # a first pass, so that the error names the first row of another kind
    records = [validate_record(obj, where, need_answer=need_answer) if kind == "sft" else
               validate_preference(obj, where) for where, obj in iter_records(path)]
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records
