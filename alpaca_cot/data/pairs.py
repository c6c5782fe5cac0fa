"""Preference records -> token ids, as TRL's trainers take them pre-tokenized: the one place where a pair
(DPO, ORPO, SimPO) or a KTO record meets our template.

The prompt is rendered by the template the SFT stage uses (``Template.render`` on the record with the reply
as its answer), so a preference run on top of an SFT run of ours sees the same markers; earlier turns of a
conversation, answers included, are prompt. A reply is the last answer's tokens with the template's end of
reply (the EOS id the Alpaca text appends, or the chat template's end marker). Tokens are counted as in
``alpaca_cot.data.encoding``: each whole text is tokenized at once, and the prompt is the leading tokens of it.

Truncation follows the SFT rules for a single turn (``share_budget``), with one budget for a pair: the prompt
and the longer reply share ``cutoff_len``, the prompt loses its middle (keeping its start and the marker the
model answers after) identically for both replies, and a reply cut to fit loses its end, so it never ends in
EOS.
"""

from __future__ import annotations

import os
from typing import Any

from alpaca_cot.data.encoding import IGNORE_INDEX, encode_records, share_budget
from alpaca_cot.data.records import KINDS, DataError, iter_records, read_records, record_kind, require_kind
from alpaca_cot.data.sources import resolve_data
from alpaca_cot.data.templates import Template

STAGE_KINDS = {"sft": "sft", "dpo": "pairs", "orpo": "pairs", "simpo": "pairs", "kto": "kto"}  # what each trains on


def encode_pair(record: dict, template: Template, tokenizer: Any, cutoff_len: int) -> dict:
    """A validated pair record as ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (TRL's DPO columns; the
    replies end in the end of reply unless cut), ``truncated``: whether ``cutoff_len`` cut anything, and
    ``full_length``: the prompt and the longer reply before it."""
    prompt, (chosen, rejected) = _encode(record, (record["chosen"], record["rejected"]), template, tokenizer)
    prompt_ids, (chosen_ids, rejected_ids), truncated = _fit(prompt, [chosen, rejected], cutoff_len)
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "truncated": truncated,
            "full_length": len(prompt) + max(len(chosen), len(rejected))}


def encode_kto(record: dict, template: Template, tokenizer: Any, cutoff_len: int) -> dict:
    """A validated KTO record as ``prompt_ids``, ``completion_ids`` (TRL's KTO columns), ``label`` (True: a
    desirable reply), ``truncated`` and ``full_length``."""
    prompt, (completion,) = _encode(record, (record["output"],), template, tokenizer)
    prompt_ids, (completion_ids,), truncated = _fit(prompt, [completion], cutoff_len)
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": record["label"],
            "truncated": truncated, "full_length": len(prompt) + len(completion)}


def read_preference_data(data: list[str], kind: str, hint: str) -> list[tuple[str, list[dict]]]:
    """``(path, records)`` of each --data file (names or paths) read as ``kind`` ("pairs" or "kto"); a file of
    another kind is refused at its first such row, with ``hint``."""
    out = []
    for path in resolve_data(data):
        require_kind(path, kind, hint)
        out.append((path, read_records(path, kind=kind)))
    return out


def refuse_preference_files(data: list[str]) -> None:
    """--stage sft: a --data file whose first record is a pair or a KTO record is refused in one line (the SFT
    reader would only find its 'output' missing)."""
    for path in resolve_data([entry for entry in data if os.path.exists(entry)]):
        first = next(iter_records(path), None)
        if first is not None and record_kind(first[1]) != "sft":
            raise DataError(f"{first[0]}: {KINDS[record_kind(first[1])]} where {KINDS['sft']} was expected; "
                            "--stage dpo, orpo or simpo trains on pairs, --stage kto on KTO records")


def encode_preference(records: list[dict], kind: str, template: Template, tokenizer: Any,
                      cutoff_len: int) -> list[dict]:
    """``encode_pair`` ("pairs") or ``encode_kto`` ("kto") of each record (one record at a time: measured faster
    than one ``encode_records`` call for a file's records, 1.7 s against 2.1 s for 2,200 pairs)."""
    encode = encode_pair if kind == "pairs" else encode_kto
    return [encode(record, template, tokenizer, cutoff_len) for record in records]


def with_answer(record: dict, reply: str) -> dict:
    """The SFT record whose (last) answer is ``reply``: the prompt fields, and the reply as output or final turn."""
    if "messages" in record:
        return {"messages": [*record["messages"], {"role": "assistant", "content": reply}]}
    return {"instruction": record["instruction"], "input": record.get("input", ""), "output": reply}


def _encode(record: dict, replies: tuple[str, ...], template: Template,
            tokenizer: Any) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids (the same for every reply) and each reply's ids with its end of reply: the SFT encoding of
    the record with that reply as its last answer, whole, split where the last answer begins."""
    encoded = encode_records([with_answer(record, reply) for reply in replies], template, tokenizer, cutoff_len=2**62)
    split = []
    for e in encoded:
        end = max(i for i, label in enumerate(e.labels) if label != IGNORE_INDEX) + 1
        start = end
        while start > 0 and e.labels[start - 1] != IGNORE_INDEX:
            start -= 1
        # Earlier answers of a conversation (each with its end of reply) are prompt here; what follows the last
        # one (a chat template's closing newline) carries no loss in SFT either, and is left out.
        split.append((e.input_ids[:start], e.input_ids[start:end]))
    # The prompt is the same text for every reply, so the same count of tokens (encoding counts prefixes).
    return split[0][0], [reply for _, reply in split]


def _fit(prompt: list[int], replies: list[list[int]], cutoff_len: int) -> tuple[list[int], list[list[int]], bool]:
    """The prompt and replies cut to ``cutoff_len`` as one budget (see the module docstring), and whether cut."""
    n_prompt, n_reply = share_budget(len(prompt), max(map(len, replies)), cutoff_len)
    head = (n_prompt + 1) // 2
    cut_prompt = prompt[:head] + prompt[len(prompt) - (n_prompt - head):]
    truncated = n_prompt < len(prompt) or any(len(r) > n_reply for r in replies)
    return cut_prompt, [r[:n_reply] for r in replies], truncated
