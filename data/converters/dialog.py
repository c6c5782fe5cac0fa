"""Multi-turn sources: ShareGPT / FastChat (with LLaMA-Factory's tool calls), Firefly, hh-rlhf
transcripts and MOSS conversations. Each becomes one multi-turn record, never a flattened string.

Tool use is written into the turns: a call is an assistant turn ``<tool_call>...</tool_call>``, its
result the next user turn ``<tool_response>...</tool_response>``, and the tool schemas go into the
system turn.
"""

from __future__ import annotations

import json
import re

from data.converters.base import TOOL_CALL, TOOL_RESPONSE, BadRecord, Context, build_messages, listed, text

TOOLS_SYSTEM = ("You can call the functions described by these JSON schemas. To call one, answer with its "
                "name and arguments as JSON inside <tool_call></tool_call>; the result comes back inside "
                "<tool_response></tool_response>.\n{tools}")

# ShareGPT speaker names -> (role, how the content is written).
SHAREGPT_ROLES = {
    "human": ("user", "{}"), "user": ("user", "{}"),
    "gpt": ("assistant", "{}"), "assistant": ("assistant", "{}"), "chatgpt": ("assistant", "{}"),
    "bard": ("assistant", "{}"), "bing": ("assistant", "{}"), "model": ("assistant", "{}"),
    "function_call": ("assistant", TOOL_CALL), "observation": ("user", TOOL_RESPONSE),
}


def convert_sharegpt(row: dict, ctx: Context) -> list[dict]:
    """ShareGPT / FastChat ``{conversations: [{from, value}]}`` with from = human | gpt (| system
    first). LLaMA-Factory's tool files add from = function_call | observation and a ``tools`` JSON string."""
    turns, system = sharegpt_turns(row)
    return [build_messages(turns, ctx, system)]


def sharegpt_turns(row: dict) -> tuple[list[tuple[str, str, str]], str]:
    """The ``(role, content, source_field)`` turns of a ShareGPT row, and its system prompt (with the tools)."""
    system = row.get("system") or ""
    turns = []
    for i, turn in enumerate(listed(row, "conversations")):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord(where, "must be an object with 'from' and 'value'")
        speaker, value = turn.get("from"), turn.get("value")
        if not isinstance(value, str):
            raise BadRecord(f"{where}.value", "must be a string")
        if speaker == "system" and i == 0:
            system = value
            continue
        if speaker not in SHAREGPT_ROLES:
            raise BadRecord(f"{where}.from", f"is {speaker!r}; known speakers: {', '.join(SHAREGPT_ROLES)}")
        role, form = SHAREGPT_ROLES[speaker]
        turns.append((role, form.format(value), f"{where}.value"))
    tools = row.get("tools")
    if tools and tools != "[]":
        tools = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        system = "\n\n".join(part for part in (system, TOOLS_SYSTEM.format(tools=tools)) if part)
    return turns, system


def convert_firefly(row: dict, ctx: Context) -> list[dict]:
    """Firefly ``{conversation: [{human, assistant}, ...]}``."""
    turns = []
    for i, pair in enumerate(listed(row, "conversation")):
        if not isinstance(pair, dict):
            raise BadRecord(f"conversation[{i}]", "must be an object with 'human' and 'assistant'")
        for key, role in (("human", "user"), ("assistant", "assistant")):
            try:
                turns.append((role, text(pair, key, empty_ok=True), f"conversation[{i}].{key}"))
            except BadRecord as e:
                raise BadRecord(f"conversation[{i}].{e.field}", e.why) from None
    return [build_messages(turns, ctx)]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def convert_hh_rlhf(row: dict, ctx: Context) -> list[dict]:
    """hh-rlhf ``{chosen, rejected}``, for SFT (only with --format hh_rlhf; detection reads such files as
    pairs, hh_rlhf_pairs): the ``chosen`` transcript ``\\n\\nHuman: ...\\n\\nAssistant: ...`` becomes the
    conversation, ``rejected`` is unused."""
    return [build_messages(hh_turns(row, "chosen"), ctx)]


def hh_turns(row: dict, key: str) -> list[tuple[str, str, str]]:
    """The ``(role, content, source_field)`` turns of the hh-rlhf transcript ``row[key]``."""
    parts = _HH_TURN.split(text(row, key))
    if parts[0].strip():
        raise BadRecord(key, "does not start with '\\n\\nHuman:'")
    return [("user" if speaker == "Human" else "assistant", content.strip(), f"{key} (turn {j + 1})")
            for j, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2], strict=True))]


def convert_moss(row: dict, ctx: Context) -> list[dict]:
    """MOSS ``{meta_instruction, chat: {turn_N: {Human, Inner Thoughts, Commands, Tool Responses,
    MOSS}}}`` with role tags inside the values (``<|Human|>: ...<eoh>``). The meta instruction is the
    system turn; a command other than None becomes a tool call and its result. Inner thoughts are
    not kept (the unified format has no place for them)."""
    chat = row.get("chat")
    if not isinstance(chat, dict) or not chat:
        raise BadRecord("chat", "must be a non-empty object of turn_N entries")
    numbers = {}
    for key in chat:
        match = re.fullmatch(r"turn_(\d+)", key)
        if not match or not isinstance(chat[key], dict):
            raise BadRecord(f"chat.{key}", "is not a turn_N object")
        numbers[key] = int(match.group(1))
    turns = []
    for key in sorted(chat, key=numbers.get):
        turn, where = chat[key], f"chat.{key}"
        turns.append(("user", _untag(turn, "Human", "Human", "<eoh>", where), f"{where}.Human"))
        command = _untag(turn, "Commands", "Commands", "<eoc>", where) if "Commands" in turn else "None"
        if command != "None":
            result = _untag(turn, "Tool Responses", "Results", "<eor>", where)
            turns.append(("assistant", TOOL_CALL.format(command), f"{where}.Commands"))
            turns.append(("user", TOOL_RESPONSE.format(result), f"{where}.Tool Responses"))
        turns.append(("assistant", _untag(turn, "MOSS", "MOSS", "<eom>", where), f"{where}.MOSS"))
    system = row.get("meta_instruction") or ""
    return [build_messages(turns, ctx, system.strip() if isinstance(system, str) else "")]


def _untag(turn: dict, key: str, tag: str, end: str, where: str) -> str:
    value = turn.get(key)
    match = re.fullmatch(rf"\s*<\|{tag}\|>:(.*?){re.escape(end)}\s*", value, re.DOTALL) \
        if isinstance(value, str) else None
    if not match:
        raise BadRecord(f"{where}.{key}", f"is not of the form '<|{tag}|>: ...{end}'")
    return match.group(1).strip()
