"""Reading raw source files as they are published: JSON arrays, JSON Lines (whatever the file is
called), TSV, gzip, Parquet and CSV (through ``datasets``). Unambiguous defects are repaired and
reported; rows that cannot be read are reported as bad, with their file and line."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from alpaca_cot.data.records import DataError, is_table, iter_records

_WHITESPACE = re.compile(r"[ \t\n\r]*")
# A JSON escape is a backslash followed by one of these; anything else after a backslash is invalid.
_ESCAPE = re.compile(r'\\(["\\/bfnrt]|u[0-9a-fA-F]{4})?')
JOIN_LIMIT = 20  # lines a record broken by raw line breaks may span before the break is not repaired


@dataclass
class Report:
    """What converting one source file did: counts, repairs, bad rows and fields left unused."""

    path: str
    format: str = ""
    rows: int = 0
    records: int = 0
    repaired: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ignored_fields: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        """One line: where, how many rows became how many records, and with which converter."""
        line = f"{self.path}: {self.rows} rows -> {self.records} records ({self.format})"
        if self.bad:
            line += f", {len(self.bad)} bad"
        if self.ignored_fields:
            line += "; unused fields: " + ", ".join(f"{k} ({n})" for k, n in sorted(self.ignored_fields.items()))
        return line


@dataclass(frozen=True)
class Unreadable:
    """A row that is not valid JSON even after repairs (it is reported in ``Report.bad``)."""

    reason: str


def read_text(path: str) -> str:
    """The decoded text of a file, gunzipped when it is gzip whatever its name."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def iter_rows(path: str, report: Report) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, row)``: a JSON value per array item or line, a field list per TSV line,
    or the whole object of a file that holds one JSON object. Unreadable lines come as ``Unreadable``."""
    if is_table(path):
        yield from iter_records(path)
        return
    text = read_text(path)
    head = text.lstrip()[:1]
    if head == "[":
        yield from _iter_array(path, text, report)
    elif head == "{":
        whole = _single_object(text)
        if whole is not None:
            yield f"{path}:1", whole
        else:
            yield from _iter_lines(path, text, report)
    elif "\t" in text.split("\n", 1)[0]:
        # TSV: split records on \n only, since real files carry U+2028 inside fields.
        for lineno, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                yield f"{path}:{lineno}", line.rstrip("\r").split("\t")
    elif head:
        raise DataError(f"{path}: neither JSON, JSON Lines nor TSV (it starts with {text.lstrip()[:20]!r})")


def _single_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _iter_lines(path: str, text: str, report: Report) -> Iterator[tuple[str, Any]]:
    # JSON Lines: split on \n only, since real files carry U+2028 inside strings.
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line, lineno = lines[i], i + 1
        i += 1
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
            continue
        except json.JSONDecodeError as e:
            error = e
        invalid = sorted({m.group(0) + line[m.end():m.end() + 1] for m in _ESCAPE.finditer(line) if not m.group(1)})
        if error.msg.startswith("Invalid \\escape") and invalid:
            try:
                value = json.loads(_ESCAPE.sub(lambda m: m.group(0) if m.group(1) else "\\\\", line))
            except json.JSONDecodeError:
                pass
            else:
                report.repaired.append(f"{where}: invalid JSON escape {', '.join(invalid)} read as a literal backslash")
                yield where, value
                continue
        if error.msg.startswith("Unterminated string"):
            joined = _join_broken(lines, i - 1)
            if joined:
                value, end = joined
                report.repaired.append(f"{where}: lines {lineno}-{end} are one record broken by raw line breaks "
                                       "inside a string; joined and read")
                yield where, value
                i = end
                continue
        reason = f"invalid JSON ({error.msg}, column {error.colno})"
        report.bad.append(f"{where}: {reason}")
        yield where, Unreadable(reason)


def _join_broken(lines: list[str], start: int) -> tuple[Any, int] | None:
    """A record that a raw line break inside a string split over lines ``start``.. (0-based): the
    value read from the joined lines (a line break kept inside the string) and the last line number
    (1-based), or None when joining up to ``JOIN_LIMIT`` lines gives no JSON value."""
    for end in range(start + 1, min(start + JOIN_LIMIT, len(lines))):
        joined = "\n".join(lines[start:end + 1])
        try:
            # strict=False accepts the control character (the line break) inside the string.
            return json.loads(joined, strict=False), end + 1
        except json.JSONDecodeError as e:
            # Still open at the end: read one more line. Any other error: not a broken record.
            if not e.msg.startswith("Unterminated string") and e.pos < len(joined.rstrip()):
                return None
    return None


def _iter_array(path: str, text: str, report: Report) -> Iterator[tuple[str, Any]]:
    """Items of a JSON array with the line each starts on; a trailing comma before ']' is repaired."""
    decoder = json.JSONDecoder()
    pos = _skip(text, text.index("[") + 1)
    line, counted, index = 1, 0, 0
    while pos < len(text) and text[pos] != "]":
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        line += text.count("\n", counted, pos)
        counted = pos
        yield f"{path}:{line} (record {index})", item
        index += 1
        pos = _skip(text, end)
        if text.startswith(",", pos):
            comma = pos
            pos = _skip(text, pos + 1)
            if text.startswith("]", pos):
                lineno = line + text.count("\n", counted, comma)
                report.repaired.append(f"{path}:{lineno}: removed the trailing comma before the closing ']'")
        elif not text.startswith("]", pos):
            lineno = line + text.count("\n", counted, pos)
            raise DataError(f"{path}:{lineno}: invalid JSON (expected ',' or ']' after record {index - 1})")
    if pos >= len(text):
        raise DataError(f"{path}: invalid JSON (the array is never closed with ']')")
    if text[pos + 1:].strip():
        raise DataError(f"{path}: invalid JSON (text after the closing ']')")


def _skip(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()
