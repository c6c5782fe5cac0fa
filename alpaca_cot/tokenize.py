"""Records -> token ids and labels: the prompt is masked with -100 unless ``train_on_inputs``.

Inputs ``<bos> prompt answer <eos>``; labels ``-100 ... -100 answer <eos>``. The whole text is
tokenized at once (so ids equal what the tokenizer gives the joined text, and what
``apply_chat_template`` gives for chat templates); segment boundaries are the token counts of
the text's prefixes. EOS survives truncation to ``cutoff_len``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alpaca_cot.templates import Template

IGNORE_INDEX = -100
BATCH = 512  # records per tokenizer call: big enough for the Rust tokenizer's own parallelism


@dataclass
class Encoded:
    """Token ids of one record with its labels."""

    input_ids: list[int]
    labels: list[int]


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
        ends = _cumulative([len(t) for t, _ in segments])
        prefixes.extend(texts[-1][:e] for e in ends[:-1])
    special = template.add_special_tokens
    full_ids = tokenizer(texts, add_special_tokens=special)["input_ids"]
    prefix_lens = iter(len(ids) for ids in tokenizer(prefixes, add_special_tokens=special)["input_ids"]) \
        if prefixes else iter(())
    eos = tokenizer.eos_token_id
    out = []
    for segments, ids in zip(rendered, full_ids, strict=True):
        bounds = [next(prefix_lens) for _ in segments[:-1]] + [len(ids)]
        input_ids: list[int] = []
        labels: list[int] = []
        begin = 0
        for (_, trainable), end in zip(segments, bounds, strict=True):
            piece = ids[begin:end]
            input_ids += piece
            labels += piece if (trainable or train_on_inputs) else [IGNORE_INDEX] * len(piece)
            if trainable and template.appends_eos:
                input_ids.append(eos)
                labels.append(eos)
            begin = end
        if len(input_ids) > cutoff_len:
            # Keep the end-of-sequence signal: the last kept position becomes EOS.
            input_ids = input_ids[:cutoff_len - 1] + [eos]
            labels = labels[:cutoff_len - 1] + [eos if any(x != IGNORE_INDEX for x in labels[:cutoff_len - 1])
                                                else IGNORE_INDEX]
        out.append(Encoded(input_ids, labels))
    return out


def _cumulative(lengths: list[int]) -> list[int]:
    total, out = 0, []
    for n in lengths:
        total += n
        out.append(total)
    return out


def count_trainable(encoded: Encoded) -> int:
    """Number of label positions that carry loss."""
    return sum(1 for x in encoded.labels if x != IGNORE_INDEX)
