"""Curating unified records: weighted mixing, de-duplication, and decontamination against an
evaluation set by shared n-grams."""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections.abc import Iterable

from alpaca_cot.data.cot import split_cot
from alpaca_cot.data.records import DataError, record_kind
from data.storage import record_texts

# Word tokens for decontamination: a CJK character is a token by itself, other scripts split on
# non-word characters; everything is case-folded.
_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+")


def parse_source(spec: str) -> tuple[str, float]:
    """``NAME_OR_PATH[:WEIGHT]`` -> (source, weight); the weight defaults to 1."""
    source, sep, weight = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        value = float(weight)
    except ValueError:
        return spec, 1.0  # a ':' inside a path, not a weight
    if value < 0:
        raise DataError(f"mix source {spec!r}: the weight must not be negative")
    return source, value


def mix_counts(sizes: list[int], weights: list[float], total: int | None) -> list[int]:
    """How many records to take from each source.

    Without ``total`` a weight scales its source (0.5 = half of it, 2 = every record twice). With
    ``total`` the weights are proportions of ``total``, rounded so the counts add up exactly."""
    if total is None:
        return [round(size * weight) for size, weight in zip(sizes, weights, strict=True)]
    if sum(weights) <= 0:
        raise DataError("mix: the weights must not all be zero")
    shares = [total * weight / sum(weights) for weight in weights]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: shares[i] - counts[i], reverse=True)
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def sample(records: list[dict], count: int, rng: random.Random) -> list[dict]:
    """``count`` records: whole copies of ``records`` first, the remainder drawn without replacement."""
    if count and not records:
        raise DataError("mix: cannot sample from a source without records")
    copies, remainder = divmod(count, len(records)) if records else (0, 0)
    return records * copies + rng.sample(records, remainder)


def normalize(text: str) -> str:
    """Text compared by normalized de-duplication: NFKC, case-folded, punctuation and spacing removed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(c if c.isalnum() else " " for c in text).split())


def content_texts(record: dict) -> list[str]:
    """The texts that make a record what it is: question, rationale and answer for a record one of
    our CoT phrasings wrote (so two phrasings of one source row compare equal), else every text."""
    parts = split_cot(record)
    return list(parts) if parts else record_texts(record)


def dedup(records: list[dict], mode: str = "normalized") -> list[dict]:
    """The records with duplicates removed, first occurrence kept, compared on their content (see
    ``content_texts``; a pair's prompt, chosen and rejected). ``exact`` compares the texts as they are;
    ``normalized`` after ``normalize``."""
    if mode not in ("exact", "normalized"):
        raise DataError(f"dedup: --mode is {mode!r}; use exact or normalized")
    seen, kept = set(), []
    for record in records:
        texts = content_texts(record)
        texts = texts if mode == "exact" else [normalize(t) for t in texts]
        key = json.dumps([texts, record_kind(record) == "kto" and record["label"]], ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept


def question_and_answer(record: dict) -> tuple[str, str]:
    """What an evaluation record asks and expects, without any phrasing of ours: the question and
    final answer of a CoT record, instruction and input with the output, or the user turns with
    the assistant turns; a preference record's replies are answers too."""
    parts = split_cot(record)
    if parts:
        return parts[0], parts[2]
    replies = [record[key] for key in ("output", "chosen", "rejected") if key in record]
    if "messages" in record:
        turns = record["messages"]
        return ("\n".join(t["content"] for t in turns if t["role"] == "user"),
                "\n".join([t["content"] for t in turns if t["role"] == "assistant"] + replies))
    return "\n".join(part for part in (record["instruction"], record.get("input", "")) if part), "\n".join(replies)


def tokens(text: str) -> list[str]:
    """Tokens for n-gram overlap (see ``_TOKEN``)."""
    return _TOKEN.findall(text.casefold())


def ngrams(texts: Iterable[str], n: int, *, whole: bool = True) -> set[tuple[str, ...]]:
    """The n-grams of the texts; with ``whole`` a text shorter than ``n`` tokens counts whole."""
    grams = set()
    for text in texts:
        words = tokens(text)
        if whole and 0 < len(words) < n:
            grams.add(tuple(words))
        grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return grams


def contaminated(record: dict, grams: set[tuple[str, ...]], lengths: set[int]) -> bool:
    """Whether any text of the record contains one of ``grams`` (of the given lengths)."""
    for text in record_texts(record):
        words = tokens(text)
        for n in lengths:
            if any(tuple(words[i:i + n]) in grams for i in range(len(words) - n + 1)):
                return True
    return False


def eval_ngrams(records: list[dict], n: int) -> set[tuple[str, ...]]:
    """The n-grams of evaluation records' questions and answers (``question_and_answer``). A
    question shorter than ``n`` tokens counts whole; a short answer ("7", "yes") does not count alone."""
    pairs = [question_and_answer(record) for record in records]
    return ngrams([q for q, _ in pairs], n) | ngrams([a for _, a in pairs], n, whole=False)


def decontaminate(records: list[dict], eval_records: list[dict], n: int = 13) -> tuple[list[dict], list[int]]:
    """The records that share no n-gram with the evaluation records' questions and answers, and
    the indices of those dropped."""
    if n < 1:
        raise DataError(f"decontaminate: --n is {n}; it must be at least 1")
    grams = eval_ngrams(eval_records, n)
    lengths = {len(gram) for gram in grams}
    kept, dropped = [], []
    for i, record in enumerate(records):
        if contaminated(record, grams, lengths):
            dropped.append(i)
        else:
            kept.append(record)
    return kept, dropped
