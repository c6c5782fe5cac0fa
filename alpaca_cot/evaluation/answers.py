"""Scoring predictions: exact match on final answers, ROUGE-L on free text.

A reference has a *final answer* when its last sentence states one ("So the answer is 18.",
"The final answer: (D).", "Answer: yes", "#### 72", "答案是 B") or when it is an option letter alone
("B", "(B)"). Such records are scored by exact match of the answer found in the prediction, compared
as option letters, as numbers (commas, currency and "13.0" vs "13" do not matter) or as text
(lower-cased, punctuation and articles dropped). Every other record with a reference is scored by
ROUGE-L F1 (longest common subsequence of words; CJK characters count as words).
"""

from __future__ import annotations

import re
import string

# A cue followed by the answer; "is", ":", "-" or "=" between them.
_CUE = (r"(?:\b(?:answer|option|number|choice)\b(?:\s+to\s+choose)?\s*(?:is|:|-|=)"
        r"|答案\s*(?:是|为|:|：))")
# In a reference the answer must be the text's last sentence (periods only as decimal points), so
# "the answer is that..." earlier in a free-text answer does not count.
_REFERENCE_ANSWER = re.compile(_CUE + r"\s*(?P<answer>(?:[^\n.!?。]|\.(?=\d)){1,100}?)[\s.!。]*$", re.IGNORECASE)
# In a prediction, the last cue wins; its answer runs to the end of the sentence or line.
_PREDICTION_ANSWER = re.compile(_CUE + r"\s*(?P<answer>[^\n]*?)(?:\.(?:\s|$)|。|\n|$)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(?P<answer>[^\n]+)")
_LETTER = re.compile(r"^\(?([A-Z])\)?[.:]?$")
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:\)|[.:,]|\s|$)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def _parse_number(text: str) -> float | None:
    match = _NUMBER.search(text.replace("$", ""))
    if match is None:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def _normalize_text(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation + "。，、！？：；“”‘’（）"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def reference_answer(reference: str) -> tuple[str, str] | None:
    """``(kind, answer)`` of a reference with a final answer, kind being letter, number or text; else None."""
    text = reference.strip()
    letter = _LETTER.match(text)
    if letter:
        return "letter", letter.group(1)
    hashes = _HASHES.search(text)
    found = hashes or _REFERENCE_ANSWER.search(text)
    if found is None:
        return None
    answer = found.group("answer").strip().rstrip(".").strip()
    letter = _LETTER.match(answer) or _LEADING_LETTER.match(answer)
    if letter and (answer.startswith("(") or len(answer) == 1):
        return "letter", letter.group(1)
    if _parse_number(answer) is not None and not re.search(r"[^\d\s,.$%-]", answer):
        return "number", answer
    return "text", answer


def prediction_answer(prediction: str, kind: str) -> str | None:
    """The answer a prediction gives, read the way its reference's ``kind`` needs; None if it gives none."""
    found = list(_HASHES.finditer(prediction)) or list(_PREDICTION_ANSWER.finditer(prediction))
    answer = found[-1].group("answer").strip() if found else None
    if kind == "letter":
        letter = _LEADING_LETTER.match((answer if answer is not None else prediction).strip())
        return letter.group(1) if letter else None
    if kind == "number" and answer is None:
        numbers = _NUMBER.findall(prediction)  # no stated answer: the last number, as for GSM8K
        return numbers[-1] if numbers else None
    return answer if answer is not None else prediction.strip()


def answers_match(kind: str, reference: str, predicted: str | None) -> bool:
    """Whether a predicted answer equals the reference answer of that kind."""
    if predicted is None:
        return False
    if kind == "letter":
        return predicted.upper() == reference.upper()
    if kind == "number":
        ref, pred = _parse_number(reference), _parse_number(predicted)
        return ref is not None and pred is not None and abs(ref - pred) <= 1e-6 * max(1.0, abs(ref))
    return _normalize_text(predicted) == _normalize_text(reference)


def words(text: str) -> list[str]:
    """ROUGE tokens: lower-cased words and numbers, each CJK character on its own."""
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists.

    Bit-parallel (Allison and Dix 1986; Hyyro 2004): the DP row is one integer whose bits are the
    row's steps, so each token of ``b`` costs a few big-integer operations instead of ``len(a)``.
    """
    if not a or not b:
        return 0
    matches: dict[str, int] = {}
    for i, token in enumerate(a):
        matches[token] = matches.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for token in b:
        hit = row & matches.get(token, 0)
        row = ((row + hit) | (row - hit)) & full
    return len(a) - row.bit_count()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two texts (0.0 when either is empty)."""
    pred, ref = words(prediction), words(reference)
    lcs = lcs_length(ref, pred)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def reference_of(record: dict) -> str | None:
    """The reference answer of a unified record: ``output``, or the content of a final assistant turn."""
    if "messages" in record:
        last = record["messages"][-1]
        return last["content"] if last["role"] == "assistant" else None
    output = record.get("output")
    return output if isinstance(output, str) and output.strip() else None


def score_predictions(records: list[dict], field: str = "generate") -> dict:
    """Summary over records that hold a prediction in ``field``: exact-match accuracy and mean ROUGE-L."""
    exact: list[bool] = []
    rouge: list[float] = []
    unscored = 0
    for record in records:
        reference = reference_of(record)
        if reference is None:
            unscored += 1
            continue
        prediction = record[field]
        final = reference_answer(reference)
        if final is not None:
            kind, answer = final
            exact.append(answers_match(kind, answer, prediction_answer(prediction, kind)))
        else:
            rouge.append(rouge_l(prediction, reference))
    return {
        "records": len(records),
        "exact_match": {"records": len(exact), "accuracy": sum(exact) / len(exact) if exact else None},
        "rouge_l": {"records": len(rouge), "f1": sum(rouge) / len(rouge) if rouge else None},
        "without_reference": unscored,
    }
