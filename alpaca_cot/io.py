"""Atomic writes: a temp file in the target's folder, then a rename, so readers never see halves."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from alpaca_cot.errors import UserError


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON atomically."""
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def read_json_object(path: str, label: str, what: str, error: type[UserError] = UserError) -> dict:
    """The JSON object in ``path``; malformed JSON, or JSON that is not an object, is one ``error`` line
    starting with ``label`` and saying ``what`` the object should hold."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{label} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise error(f"{label} holds a JSON {type(value).__name__}, not an object of {what}")
    return value
