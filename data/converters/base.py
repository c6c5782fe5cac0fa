"""What every converter shares: the error for a bad record, the per-file context, field helpers."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from alpaca_cot.data.columns import BadRecord
from data.converters.reading import Report

# Tool use inside multi-turn records: a call is an assistant turn, its result the next user turn.
TOOL_CALL = "<tool_call>\n{}\n</tool_call>"
TOOL_RESPONSE = "<tool_response>\n{}\n</tool_response>"


@dataclass
class Context:
    """Per-file state handed to converters: the dataset name (from the file name), the seed of the
    CoT phrasings, the report that collects repairs, the current location, and whether CoT
    questions stay plain."""

    name: str
    seed: int
    report: Report
    where: str = ""
    plain: bool = False  # CoT rows: the question alone as the instruction (evaluation prompts)

    def rng(self, content: str) -> random.Random:
        """A generator seeded by the seed, the dataset and a row's content: the same row always
        gets the same phrasing, wherever it stands in the file (so duplicates stay duplicates)."""
        return random.Random(f"{self.seed}:{self.name}:{content}")

    def repaired(self, what: str) -> None:
        """Record a repair made to the current row."""
        self.report.repaired.append(f"{self.where}: {what}")


def text(row: dict, key: str, *, empty_ok: bool = False) -> str:
    """The string at ``row[key]`` as it is; BadRecord when missing, not a string, or blank."""
    if key not in row:
        raise BadRecord(key, "is missing")
    value = row[key]
    if not isinstance(value, str):
        raise BadRecord(key, f"must be a string, got {type(value).__name__}")
    if not value.strip() and not empty_ok:
        raise BadRecord(key, "is empty")
    return value


def optional_text(row: dict, *keys: str) -> str:
    """The first of ``keys`` present and not None, or "" (real files omit ``input``)."""
    for key in keys:
        if row.get(key) is not None:
            return text(row, key, empty_ok=True)
    return ""


def listed(row: dict, key: str) -> list[Any]:
    """The non-empty list at ``row[key]``."""
    value = row.get(key)
    if not isinstance(value, list):
        raise BadRecord(key, "must be a list" if key in row else "is missing")
    if not value:
        raise BadRecord(key, "is an empty list")
    return value


def build_messages(turns: list[tuple[str, str, str]], ctx: Context, system: str = "") -> dict:
    """A multi-turn record from ``(role, content, source_field)`` turns of roles user/assistant.

    Turns must alternate starting with user. A final user turn without an answer is dropped (a
    repair, reported); a conversation without any answer, or whose last answer is empty, is bad.
    """
    expected = "user"
    for i, (role, _, source) in enumerate(turns):
        if role != expected:
            problem = "the conversation starts with it" if i == 0 else f"it follows another {role} turn"
            raise BadRecord(source, f"is {_a(role)} turn where {_a(expected)} turn was expected "
                                    f"({problem}; turns must alternate)")
        expected = "assistant" if role == "user" else "user"
    if turns and turns[-1][0] == "user":
        if len(turns) == 1:
            raise BadRecord(turns[0][2], "is a user turn that no assistant turn answers")
        ctx.repaired(f"dropped the final user turn '{turns[-1][2]}', which has no answer")
        turns = turns[:-1]
    if not turns:
        raise BadRecord("conversation", "has no turns")
    if not turns[-1][1].strip():
        raise BadRecord(turns[-1][2], "is empty, and it is the final answer")
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": role, "content": content} for role, content, _ in turns]
    return {"messages": messages}


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"
