"""``--columns``: a file's own fields mapped onto the unified record, with LLaMA-Factory's names (the "columns"
and "tags" of its ``dataset_info.json``).

    prompt=F     the instruction                 query=F    its input (optional)
    response=F   the answer (none: prompts only) system=F   a system prompt (optional)
    history=F    earlier [prompt, response] pairs (optional); with a system or a history the record is multi-turn
    messages=F   a list of turns {role_tag: ROLE, content_tag: TEXT}, ROLE one of user_tag, assistant_tag,
                 system_tag (LLaMA-Factory's defaults from, value, human, gpt, system; OpenAI's role, content,
                 user, assistant are read too)

A field F is a key of the row, or ``outer.inner`` one level down. A number or a list of one item is that item
as text (``[42.0]`` -> "42", see ``answer_text``).
"""

from __future__ import annotations

from typing import Any

from alpaca_cot.data.records import DataError

FIELDS = ("prompt", "query", "response", "history", "system", "messages")
TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
EXAMPLE = "prompt=question,response=answer"


class BadRecord(ValueError):
    """A source row that cannot become a record; ``field`` names the offending source field."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"field '{field}' {why}")
        self.field, self.why = field, why


def parse_columns(value: Any, where: str = "--columns") -> dict[str, str] | None:
    """A mapping given as ``prompt=question,response=answer`` or as an object, checked; None for none."""
    if value is None or value in ("", {}):
        return None
    if isinstance(value, str):
        pairs = [item.partition("=") for item in value.split(",") if item.strip()]
        if any(not sep or not key.strip() or not field.strip() for key, sep, field in pairs):
            raise DataError(f"{where} {value!r}: expected NAME=FIELD pairs separated by commas, e.g. {EXAMPLE}")
        value = {key.strip(): field.strip() for key, _, field in pairs}
    if not isinstance(value, dict) or not all(isinstance(v, str) and v for v in value.values()):
        raise DataError(f"{where}: expected NAME=FIELD pairs (e.g. {EXAMPLE}), got {value!r}")
    unknown = [key for key in value if key not in FIELDS and key not in TAGS]
    if unknown:
        raise DataError(f"{where}: unknown name {unknown[0]!r}; the names are {', '.join((*FIELDS, *TAGS))}")
    if ("prompt" in value) == ("messages" in value):
        raise DataError(f"{where}: name either prompt (single-turn fields, e.g. {EXAMPLE}) or messages (a list of "
                        "turns)")
    stray = [key for key in value if key in (TAGS if "prompt" in value else ("query", "response", "history"))]
    if stray:
        raise DataError(f"{where}: {stray[0]} does not go with {'prompt' if 'prompt' in value else 'messages'}")
    return dict(value)


def row_fields(row: Any) -> list[str]:
    """The fields of a row a mapping can name: its keys, and ``outer.inner`` one level down."""
    if not isinstance(row, dict):
        return []
    return [*row, *(f"{key}.{inner}" for key, value in row.items() if isinstance(value, dict) for inner in value)]


def check_mapped(columns: dict[str, str], seen: Any, where: str) -> None:
    """Refuse a mapping that names a field absent from ``seen`` (a table's columns, or every field of a file)."""
    for name, field in columns.items():
        if name in FIELDS and field not in seen:
            raise DataError(f"{where}: --columns {name}={field}: no such field; the fields are "
                            f"{', '.join(sorted(seen))}")


def map_record(row: Any, columns: dict[str, str], where: str) -> dict:
    """The unified record that ``columns`` makes of a source row (not yet validated)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a {type(row).__name__}, not an object with fields")
    try:
        values = {name: _lookup(row, field) for name, field in columns.items() if name in FIELDS}
        for name in ("prompt", "messages"):
            if name in columns and values[name] is None:
                raise BadRecord(columns[name], f"is missing (the row has {', '.join(row_fields(row))})")
        system = _text(values.get("system"), columns.get("system", ""))
        if "messages" in columns:
            return _messages(values["messages"], columns, system)
        record = {"instruction": _text(values["prompt"], columns["prompt"]),
                  "input": _text(values.get("query"), columns.get("query", ""))}
        if values.get("response") is not None:
            record["output"] = _text(values["response"], columns["response"])
        if not values.get("history") and not system:
            return record
        return _with_history(record, values.get("history") or [], columns.get("history", ""), system)
    except BadRecord as e:
        raise DataError(f"{where}: {e}") from None


def _lookup(row: dict, field: str) -> Any:
    if field in row:
        return row[field]
    outer, _, inner = field.partition(".")
    return row[outer].get(inner) if isinstance(row.get(outer), dict) else None


def _text(value: Any, field: str) -> str:
    """A field's value as text: a string as it is, None as "", else ``answer_text``."""
    return "" if value is None else value if isinstance(value, str) else answer_text(value, field)


def _with_history(record: dict, history: Any, field: str, system: str) -> dict:
    """A multi-turn record: the system prompt, the history's pairs, then the record's own turn
    (instruction and input joined by a line break, as LLaMA-Factory does)."""
    if not isinstance(history, list):
        raise BadRecord(field, "must be a list of [prompt, response] pairs")
    turns = [{"role": "system", "content": system}] if system else []
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise BadRecord(f"{field}[{i}]", "must be a [prompt, response] pair")
        turns += [{"role": "user", "content": _text(pair[0], f"{field}[{i}][0]")},
                  {"role": "assistant", "content": _text(pair[1], f"{field}[{i}][1]")}]
    turns.append({"role": "user", "content": "\n".join(t for t in (record["instruction"], record["input"]) if t)})
    if "output" in record:
        turns.append({"role": "assistant", "content": record["output"]})
    return {"messages": turns}


def _messages(turns: Any, columns: dict[str, str], system: str) -> dict:
    field = columns["messages"]
    if not isinstance(turns, list) or not turns:
        raise BadRecord(field, "must be a non-empty list of turns")
    tags = {**TAGS, **{k: v for k, v in columns.items() if k in TAGS}}
    if not any(k in columns for k in OPENAI_TAGS) and isinstance(turns[0], dict) and tags["role_tag"] not in turns[0]:
        tags.update(OPENAI_TAGS)  # no tags named and the turns use OpenAI's keys: read those
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    out = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or tags["role_tag"] not in turn or tags["content_tag"] not in turn:
            raise BadRecord(f"{field}[{i}]", f"must be an object with the keys {tags['role_tag']} and "
                                             f"{tags['content_tag']} (role_tag, content_tag)")
        role = roles.get(turn[tags["role_tag"]])
        if role is None:
            raise BadRecord(f"{field}[{i}].{tags['role_tag']}", f"is {turn[tags['role_tag']]!r}; the roles are "
                            f"{', '.join(roles)} (user_tag, assistant_tag, system_tag)")
        out.append({"role": role, "content": _text(turn[tags["content_tag"]], f"{field}[{i}].{tags['content_tag']}")})
    return {"messages": out}


def answer_text(value: Any, field: str) -> str:
    """An answer as text, the way the source means it: ``7`` (not ``7.0``) for an integral float,
    ``2.5`` as written, yes/no for a boolean, a one-item list as its item, several items joined by ', '."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # JSON has one number type: 7.0 in a file means the integer 7; repr keeps every digit that matters.
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(field, "is empty")
        return value.strip()
    if isinstance(value, dict) and "text" in value:  # SQuAD-style {"text": [...], "answer_start": [...]}
        return answer_text(value["text"], f"{field}.text")
    if isinstance(value, list):
        if not value:
            raise BadRecord(field, "is an empty list")
        items = [answer_text(item, f"{field}[{i}]") for i, item in enumerate(value)]
        return items[0] if len(set(items)) == 1 else ", ".join(items)
    raise BadRecord(field, f"must be a string, number or list, got {type(value).__name__}")

