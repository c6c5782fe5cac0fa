"""Records -> token ids and labels: the prompt is masked with -100 unless ``train_on_inputs``.

Inputs ``<bos> prompt answer <eos>``; labels ``-100 ... -100 answer <eos>``. The whole text is
tokenized at once (so ids equal what the tokenizer gives the joined text, and what
``apply_chat_template`` gives for chat templates); segment boundaries are the token counts of
the text's prefixes.

Truncation to ``cutoff_len`` never teaches the wrong thing: a record too long keeps its leading
whole turns (each answer ends with its real EOS or end marker) and drops the trailing ones; when
not even the first turn fits, prompt and answer share the budget (as LLaMA-Factory's
``infer_seqlen``): an answer that fits in half the budget is kept whole and the prompt loses its
middle, keeping its start (BOS, system text) and its end (the marker the model answers after). A
cut answer does not end in EOS, so the model never learns to stop mid-answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from alpaca_cot.data.templates import Template

IGNORE_INDEX = -100
BATCH = 512  # records per tokenizer call: big enough for the Rust tokenizer's own parallelism


@dataclass
class Encoded:
    """Token ids of one record with its labels; ``full_length`` is its length before truncation."""

    input_ids: list[int]
    labels: list[int]
    full_length: int


@dataclass
class _Turn:
    prompt: list[int]  # the text before an answer (non-trainable segments)
    answer: list[int]  # the answer, with its EOS where the template appends one


def encode_records(records: list[dict], template: Template, tokenizer: Any, cutoff_len: int,
                   train_on_inputs: bool = False) -> list[Encoded]:
    """Encode records in batches; the result is aligned with ``records``."""
    out: list[Encoded] = []
    for start in range(0, len(records), BATCH):
        out.extend(_encode_batch(records[start:start + BATCH], template, tokenizer, cutoff_len, train_on_inputs))
    return out


def _encode_batch(records: list[dict], template: Template, tokenizer: Any, cutoff_len: int,
                  train_on_inputs: bool) -> list[Encoded]:
    rendered = [template.render(r, tokenizer) for r in records]
    texts, prefixes = [], []
    for segments in rendered:
        texts.append("".join(t for t, _ in segments))
        ends = list(accumulate(len(t) for t, _ in segments))
        prefixes.extend(texts[-1][:e] for e in ends[:-1])
    special = template.add_special_tokens
    full_ids = tokenizer(texts, add_special_tokens=special)["input_ids"]
    prefix_lens = iter(len(ids) for ids in tokenizer(prefixes, add_special_tokens=special)["input_ids"]) \
        if prefixes else iter(())
    eos = tokenizer.eos_token_id if template.appends_eos else None
    out = []
    for segments, ids in zip(rendered, full_ids, strict=True):
        bounds = [next(prefix_lens) for _ in segments[:-1]] + [len(ids)]
        turns, tail = _turns(segments, bounds, ids, eos)
        out.append(_assemble(turns, tail, cutoff_len, train_on_inputs))
    return out


def _turns(segments: list[tuple[str, bool]], bounds: list[int], ids: list[int],
           eos: int | None) -> tuple[list[_Turn], list[int]]:
    """Token ids grouped as (prompt, answer) turns, and the non-trainable ids after the last answer."""
    turns: list[_Turn] = []
    pending: list[int] = []
    begin = 0
    for (_, trainable), end in zip(segments, bounds, strict=True):
        piece = ids[begin:end]
        begin = end
        if trainable:
            turns.append(_Turn(pending, piece + ([eos] if eos is not None else [])))
            pending = []
        else:
            pending = pending + piece
    return turns, pending


def _assemble(turns: list[_Turn], tail: list[int], cutoff_len: int, train_on_inputs: bool) -> Encoded:
    full_length = sum(len(t.prompt) + len(t.answer) for t in turns) + len(tail)
    kept: list[_Turn] = []
    used = 0
    for turn in turns:
        size = len(turn.prompt) + len(turn.answer)
        if used + size > cutoff_len:
            break
        kept.append(turn)
        used += size
    if kept and len(kept) == len(turns) and used + len(tail) <= cutoff_len:
        ending = tail
    elif kept:  # leading whole turns; the trailing ones (and the template's closing text) are left out
        ending = []
    elif turns:  # not even the first turn fits: prompt and answer share the budget
        first = turns[0]
        n_prompt, n_answer = share_budget(len(first.prompt), len(first.answer), cutoff_len)
        head = (n_prompt + 1) // 2
        prompt = first.prompt[:head] + first.prompt[len(first.prompt) - (n_prompt - head):]
        kept, ending = [_Turn(prompt, first.answer[:n_answer])], []
    else:  # nothing to learn from (no answer): the caller leaves it out
        kept, ending = [], tail[:cutoff_len]
    input_ids: list[int] = []
    labels: list[int] = []
    for turn in kept:
        input_ids += turn.prompt + turn.answer
        labels += (turn.prompt if train_on_inputs else [IGNORE_INDEX] * len(turn.prompt)) + turn.answer
    input_ids += ending
    labels += ending if train_on_inputs else [IGNORE_INDEX] * len(ending)
    return Encoded(input_ids, labels, full_length)


def share_budget(prompt_len: int, answer_len: int, cutoff_len: int) -> tuple[int, int]:
    """(prompt, answer) token counts that fit ``cutoff_len``: an answer shorter than half the budget is
    kept whole, a short prompt is kept whole, else both shrink in proportion (LLaMA-Factory's rule)."""
    if answer_len * 2 < cutoff_len:
        max_answer = cutoff_len
    elif prompt_len * 2 < cutoff_len:
        max_answer = cutoff_len - prompt_len
    else:
        max_answer = int(cutoff_len * answer_len / (prompt_len + answer_len))
    n_answer = min(max_answer, answer_len)
    n_prompt = min(max(cutoff_len - n_answer, 0), prompt_len)
    return n_prompt, n_answer
