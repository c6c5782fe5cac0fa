"""Preference sources -> preference pairs ``{prompt, chosen, rejected}`` and KTO records ``{prompt, output,
label}`` (``alpaca_cot/data/records.py``): hh-rlhf transcripts, LLaMA-Factory's ShareGPT- and Alpaca-style
pairs, UltraFeedback-binarized (and TRL's ``{prompt, chosen, rejected}``), and KTO rows.

Where a source writes the prompt twice (two transcripts, two message lists), the two copies must agree.
"""

from __future__ import annotations

from alpaca_cot.data.columns import map_record
from data.converters.base import BadRecord, Context, build_messages, listed, text
from data.converters.dialog import SHAREGPT_ROLES, hh_turns, sharegpt_turns

Turn = tuple[str, str, str]  # (role, content, source field)
_ALPACA = {"prompt": "instruction", "query": "input", "system": "system", "history": "history"}


def convert_hh_pairs(row: dict, ctx: Context) -> list[dict]:
    """hh-rlhf ``{chosen, rejected}`` transcripts ``\\n\\nHuman: ...\\n\\nAssistant: ...`` as a pair: the
    conversation both share up to their last Assistant reply is the prompt, the last replies the pair."""
    chosen, rejected = hh_turns(row, "chosen"), hh_turns(row, "rejected")
    return [_pair(chosen, rejected, ctx)]


def convert_sharegpt_pairs(row: dict, ctx: Context) -> list[dict]:
    """LLaMA-Factory's ShareGPT-style pairs: ``conversations`` ending with a human turn, and the replies
    ``chosen`` and ``rejected`` as turns ``{from: gpt, value}``."""
    turns, system = sharegpt_turns(row)
    replies = []
    for key in ("chosen", "rejected"):
        turn = row.get(key)
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadRecord(key, "must be a turn {from, value} with a string value")
        role, form = SHAREGPT_ROLES.get(turn.get("from"), ("", ""))
        if role != "assistant":
            raise BadRecord(f"{key}.from", f"is {turn.get('from')!r}, not an assistant's reply (gpt)")
        replies.append([*turns, (role, form.format(turn["value"]), f"{key}.value")])
    return [_pair(*replies, ctx, system)]


def convert_alpaca_pairs(row: dict, ctx: Context) -> list[dict]:
    """LLaMA-Factory's Alpaca-style pairs ``{instruction, input, chosen, rejected}`` (optional ``system``
    and ``history``), and our own pairs, whose prompt may be ``messages``."""
    if "messages" in row:
        return [row]  # already unified: validated as it is
    prompt = map_record(row, {k: v for k, v in _ALPACA.items() if v in row}, ctx.where)
    return [{**prompt, "chosen": text(row, "chosen", empty_ok=True), "rejected": text(row, "rejected", empty_ok=True)}]


def convert_ultrafeedback(row: dict, ctx: Context) -> list[dict]:
    """UltraFeedback-binarized ``{prompt, chosen, rejected}`` where ``chosen`` and ``rejected`` are message
    lists ``[{role, content}]`` ending with the reply, their earlier turns (the prompt) equal; when they hold
    only the reply, the prompt is ``prompt`` (a string or a message list). TRL's string form too."""
    if isinstance(row.get("chosen"), str):
        return [{"instruction": text(row, "prompt"), "input": "", "chosen": row["chosen"],
                 "rejected": text(row, "rejected", empty_ok=True)}]
    chosen, rejected = _role_turns(row, "chosen"), _role_turns(row, "rejected")
    if len(chosen) == 1 and len(rejected) == 1:  # the replies alone: the prompt is its own field
        prompt = _role_turns(row, "prompt") if isinstance(row.get("prompt"), list) else \
            [("user", text(row, "prompt"), "prompt")]
        chosen, rejected = prompt + chosen, prompt + rejected
    system = ""
    if chosen[0][0] == "system" and rejected[0][0] == "system":
        system, chosen, rejected = chosen[0][1], chosen[1:], rejected[1:]
    return [_pair(chosen, rejected, ctx, system)]


def convert_kto(row: dict, ctx: Context) -> list[dict]:
    """KTO rows: ``messages`` ending with the assistant's reply, and a boolean ``label`` (true: desirable).
    Our own KTO records (a prompt, ``output`` and ``label``) are kept as they are."""
    if not isinstance(row.get("label"), bool):
        raise BadRecord("label", f"must be true or false, got {row.get('label')!r}")
    if "output" in row or "messages" not in row:
        return [row]  # already unified: validated as it is
    messages = map_record(row, {"messages": "messages"}, ctx.where)["messages"]
    if messages[-1]["role"] != "assistant":
        raise BadRecord(f"messages[{len(messages) - 1}]", "must be the assistant's reply that 'label' judges")
    return [{"messages": messages[:-1], "output": messages[-1]["content"], "label": row["label"]}]


def _pair(chosen: list[Turn], rejected: list[Turn], ctx: Context, system: str = "") -> dict:
    """A pair from two conversations that end with their replies and share every turn before them."""
    for turns in (chosen, rejected):
        if turns[-1][0] != "assistant":
            raise BadRecord(turns[-1][2], "must be the assistant's reply (the last turn)")
    first, second = ([(role, content.strip()) for role, content, _ in turns[:-1]] for turns in (chosen, rejected))
    if first != second:
        turn = next((i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b),
                    min(len(first), len(second)))
        raise BadRecord("rejected", f"differs from 'chosen' before the reply (at turn {turn + 1}): "
                                    "the two replies must answer the same prompt")
    messages = build_messages(chosen, ctx, system)["messages"]  # checks the turns alternate, the reply is not empty
    return {"messages": messages[:-1], "chosen": messages[-1]["content"], "rejected": rejected[-1][1]}


def _role_turns(row: dict, key: str) -> list[Turn]:
    """The turns of the message list ``row[key]`` (``[{role, content}]``)."""
    turns = []
    for i, turn in enumerate(listed(row, key)):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            raise BadRecord(where, "must be a turn {role: system | user | assistant, content}")
        turns.append((turn["role"], text(turn, "content", empty_ok=True), f"{where}.content"))
    return turns
