"""The one answer extractor, used by ``evaluate.py`` and by ``predict.py --metrics``.

A record's *final answer* comes from its reference: our CoT phrasings read back with ``split_cot``;
else a last sentence that states one ("So the answer is 18.", "The final answer: (D).", "Answer:
yes", "#### 72", "答案是 B"); else a reference that is the answer alone (one short line that is
not a sentence: "yes", "(D)", "72", "bloody mess", "Sentence A"). Its kind is ``letter``,
``number``, ``yesno`` or ``text``. Each generation gets three verdicts:

- ``stated``: it states a final answer: the FIRST "the answer is X" / "Answer: X" / "#### X" (a
  model that runs on into a new question is read on its own answer), or it is an answer alone;
- ``exact_match`` (strict): that statement gives the reference answer;
- ``correct`` (flexible): strict, or else the answer found anywhere (the last number, the leading
  or last yes/no, an option letter or an option's text), as lm-evaluation-harness scores GSM8K.

Answers compare as option letters, as numbers (commas, currency and "13.0" vs "13" do not matter),
or as text (lower case, no punctuation, no leading article). References without a final answer
are scored by ROUGE-L F1 (longest common subsequence of words; CJK characters count as words).
"""

from __future__ import annotations

import re

from alpaca_cot.data.cot import split_cot

# A cue followed by the answer; "is", ":", "-" or "=" between them.
_CUE = (r"(?:\b(?:answer|option|choice)\b(?:\s+to\s+choose)?\s*(?:is|:|-|=)|\bfinal\s+number\s+is"
        r"|答案\s*(?:是|为|:|：))")
# In a reference the answer must be the text's last sentence (periods only as decimal points), so
# "the answer is that..." earlier in a free-text answer does not count.
_REFERENCE_ANSWER = re.compile(_CUE + r"\s*(?P<answer>(?:[^\n.!?。]|\.(?=\d)){1,100}?)[\s.!。]*$", re.IGNORECASE)
# In a generation the answer runs to the end of its sentence or line.
_STATEMENT = re.compile(_CUE + r"\s*(?P<answer>[^\n]*?)(?:\.(?:\s|$)|。|\n|$)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(?P<answer>[^\n]+)")
_LETTER = re.compile(r"\(?([A-Z])\)?:?|\(([A-Z])\)\s.*")  # "B", "(B)", "B:", "(B) the option's text"
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:\)|[.:,]|\s|$)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_SENTENCE = re.compile(r"(?:\S+\s+\S+\s+\S.*[.!?]|.*[。！？])$")  # three words or more, ended like a sentence
_SHORT_ANSWER = 100  # characters: the longest answer alone
# An option line: "- (A) text" (FLAN), "(A) text" (AQuA) or "- text" (ECQA).
_OPTION_LINE = re.compile(r"^[ \t]*(-[ \t]*)?(?:\(([A-Z])\)[ \t]*)?(\S.*?)[ \t]*$", re.MULTILINE)
_LABELLED = re.compile(r"^(\w+(?: \w+)?): \S")  # 'Sentence A: "He drinks milk."' is answered "Sentence A"
_LETTER_IN_TEXT = re.compile(r"\(([A-Z])\)")
_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")


# ---- records ---------------------------------------------------------------------------------
def reference_of(record: dict) -> str | None:
    """The reference answer of a unified record: ``output``, or the content of a final assistant turn."""
    if "messages" in record:
        last = record["messages"][-1]
        return last["content"] if last["role"] == "assistant" else None
    output = record.get("output")
    return output if isinstance(output, str) and output.strip() else None


def question_of(record: dict) -> str:
    """What a record asks: its instruction (and input), or the text of its last user turn."""
    if "messages" in record:
        users = [turn["content"] for turn in record["messages"] if turn["role"] == "user"]
        return users[-1] if users else ""
    return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")


def options_of(question: str) -> list[tuple[str | None, str]]:
    """The options a question lists, as (letter or None, text): ``- (A) text`` (FLAN), ``(A) text`` (AQuA) or,
    below an ``Options:`` line, ``- text`` (ECQA)."""
    head, marker, listed = question.rpartition("Options:")
    options = []
    for dash, letter, text in _OPTION_LINE.findall(listed if marker else question):
        if letter or (dash and marker):  # "- text" lines are options only below "Options:"
            label = _LABELLED.match(text)
            options.append((letter or None, label.group(1) if label and not letter else text))
    return options


# ---- final answers ---------------------------------------------------------------------------
def kind_of(answer: str) -> tuple[str, str]:
    """``(kind, answer as compared)``: letter ("(B)", "B", "(B) text" -> "B"), yesno (lower case), number
    (as written) or text."""
    text = answer.strip().rstrip(".").strip()
    letter = _LETTER.fullmatch(text)
    if letter:
        return "letter", letter.group(1) or letter.group(2)
    if text.lower() in ("yes", "no"):
        return "yesno", text.lower()
    if _parse_number(text) is not None and not re.search(r"[^\d\s,.$%-]", text):
        return "number", text
    return "text", text


def _alone(text: str) -> bool:
    """Whether a text can be an answer alone: one short line, not a sentence."""
    return bool(text) and len(text) <= _SHORT_ANSWER and "\n" not in text and not _SENTENCE.match(text)


def reference_answer(reference: str) -> tuple[str, str] | None:
    """``(kind, answer)`` that a reference's last sentence states ("So the answer is 18.", "#### 72"), or that
    a reference which is the answer alone gives; None for free text."""
    text = reference.strip()
    found = _HASHES.search(text) or _REFERENCE_ANSWER.search(text)
    if found is not None:
        return kind_of(found.group("answer"))
    return kind_of(text) if _alone(text) else None


def final_answer(record: dict) -> tuple[str, str] | None:
    """``(kind, answer)`` a record's reference gives; None without one (nothing to match exactly)."""
    split = split_cot(record) if "messages" not in record else None
    if split is not None:
        return kind_of(split[2])
    reference = reference_of(record)
    return reference_answer(reference) if reference is not None else None


# ---- generations -----------------------------------------------------------------------------
def first_statement(generation: str) -> re.Match | None:
    """A generation's first final-answer statement ("the answer is X" / "#### X"), or None."""
    found = [m for pattern in (_HASHES, _STATEMENT) if (m := pattern.search(generation))]
    return min(found, key=lambda m: m.start()) if found else None


def statement(generation: str, kind: str) -> str | None:
    """What a generation states as its final answer: its first "the answer is X" / "#### X", or the
    generation itself when it is an answer of ``kind`` alone; None if it states none."""
    found = first_statement(generation)
    if found:
        return found.group("answer").strip() or None
    alone = generation.strip()
    return alone if _alone(alone) and kind_of(alone)[0] == kind else None


def stated_answer(generation: str, kind: str) -> str | None:
    """The answer a generation states, read as ``kind`` (strict): its leading letter or yes/no, its first
    number, its text up to a comma; None if it states none of that kind."""
    answer = statement(generation, kind)
    if answer is None:
        return None
    if kind == "letter":
        letter = _LEADING_LETTER.match(answer)
        return letter.group(1) if letter else None
    if kind == "yesno":
        word = _YES_NO.match(answer)
        return word.group(1).lower() if word else None
    if kind == "number":
        number = _NUMBER.search(answer)
        return number.group() if number else None
    return re.split(r"[,;]\s", answer)[0].rstrip(".").strip()  # "stress, because ..." answers "stress"


def loose_answer(generation: str, kind: str, options: list[tuple[str | None, str]]) -> str | None:
    """The answer found anywhere in a generation (flexible): the last number; the leading, else the
    last, yes/no; the last option letter "(B)"; else the option whose text comes last (its letter, or
    its text for options without letters); None when there is none."""
    if kind == "number":
        numbers = _NUMBER.findall(generation)
        return numbers[-1] if numbers else None
    if kind == "yesno":
        leading = _YES_NO.match(generation.strip())
        found = _YES_NO.findall(generation)
        return (leading.group(1) if leading else found[-1]).lower() if found else None
    if kind == "letter":
        letters = _LETTER_IN_TEXT.findall(generation)
        if letters:
            return letters[-1]
    text = f" {text_key(generation)} "
    best, where = None, -1
    for letter, option in options:
        at = text.rfind(f" {text_key(option)} ")
        if at > where:
            best, where = letter or option, at
    return best


def score_generation(generation: str, kind: str, answer: str, question: str = "") -> dict:
    """``{"extracted", "stated", "exact_match", "correct"}`` of one generation against the reference answer."""
    options = options_of(question)
    strict = stated_answer(generation, kind)
    if kind == "letter" and strict is None:  # "the answer is sex" for option (D) sex
        stated = stated_answer(generation, "text")
        named = [letter for letter, text in options if stated is not None and text_key(text) == text_key(stated)]
        strict = named[0] if len(named) == 1 else None
    verdict = {"extracted": strict, "stated": strict is not None or statement(generation, kind) is not None}
    if answers_match(kind, answer, strict):
        return {**verdict, "exact_match": True, "correct": True}
    if kind == "text" and not options:
        # free text: right when the reference answer appears in the generation as a phrase
        phrase = text_key(answer)
        found = bool(phrase) and f" {phrase} " in f" {text_key(generation)} "
        return {**verdict, "exact_match": False, "correct": found}
    loose = loose_answer(generation, kind, options)
    return {**verdict, "extracted": loose if loose is not None else strict, "exact_match": False,
            "correct": answers_match(kind, answer, loose)}


def score_record(record: dict, generation: str) -> dict | None:
    """``{"kind", "answer", ...score_generation}`` of a generation for a record; None without a final answer."""
    final = final_answer(record)
    if final is None:
        return None
    kind, answer = final
    return {"kind": kind, "answer": answer, **score_generation(generation, kind, answer, question_of(record))}


# ---- comparing -------------------------------------------------------------------------------
def _parse_number(text: str) -> float | None:
    match = _NUMBER.search(text.replace("$", ""))
    if match is None:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def text_key(text: str) -> str:
    """A text answer as compared: lower case, no punctuation, single spaces, no leading article.
    Articles stay inside ("Sentence A" and "Sentence B" differ)."""
    found = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(found[1:] if len(found) > 1 and found[0] in ("a", "an", "the") else found)


def answers_match(kind: str, reference: str, predicted: str | None) -> bool:
    """Whether a predicted answer equals the reference answer of that kind."""
    if predicted is None:
        return False
    if kind in ("letter", "yesno"):
        return predicted.lower() == reference.lower()
    if kind == "number":
        ref, pred = _parse_number(reference), _parse_number(predicted)
        return ref is not None and pred is not None and abs(ref - pred) <= 1e-6 * max(1.0, abs(ref))
    return text_key(predicted) == text_key(reference)


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


# ---- predict.py --metrics --------------------------------------------------------------------
def score_predictions(records: list[dict], field: str = "generate") -> dict:
    """predict.py's summary: records with a final answer scored as evaluate.py scores them (the share
    exactly matched, flexibly correct and stating an answer), other references by mean ROUGE-L."""
    scored = [s for r in records if (s := score_record(r, r[field])) is not None]
    rouge = [rouge_l(r[field], ref) for r in records if final_answer(r) is None and (ref := reference_of(r))]

    def share(key: str) -> float | None:
        return sum(s[key] for s in scored) / len(scored) if scored else None

    return {
        "records": len(records),
        "exact_match": {"records": len(scored), "accuracy": share("exact_match"),
                        "flexible_accuracy": share("correct"), "stated": share("stated")},
        "rouge_l": {"records": len(rouge), "f1": sum(rouge) / len(rouge) if rouge else None},
        "without_reference": len(records) - len(scored) - len(rouge),
    }
