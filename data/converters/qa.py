"""Question-answer, multiple-choice and benchmark layouts: the shapes evaluation sets and many
task collections are published in. A row names its question and answer with one of several keys
(``QUESTION_KEYS``, ``ANSWER_KEYS``); answers that are numbers or lists are written as text the way
the source means them (``7``, not ``7.0``). Rows without an answer (benchmark prompt lists) become
instruction-only records: prediction and evaluation inputs, not training data.
"""

from __future__ import annotations

import string
from typing import Any

from alpaca_cot.data.columns import answer_text
from data.converters.base import BadRecord, Context, build_messages, listed, text

# Keys a question, an answer, a passage, or multiple-choice options go by in public sets, in order of preference.
QUESTION_KEYS = ("question", "Question", "query", "problem", "Problem", "input", "inputs", "prompt")
ANSWER_KEYS = ("answer", "Answer", "answers", "target", "targets", "label", "correct", "answerKey", "gold",
               "solution", "final_answer", "output", "outputs")
CONTEXT_KEYS = ("passage", "context", "Body")  # read before the question
OPTION_KEYS = ("options", "choices", "Options", "endings")
# Prompt-only benchmark rows: the prompt key; "text" only counts next to an id key (otherwise a raw text corpus).
PROMPT_KEYS = ("prompt", "question", "query", "turns", "text")
ID_KEYS = ("question_id", "task_id", "id", "idx", "key")
LETTERS = string.ascii_uppercase


def first_key(row: dict, keys: tuple[str, ...]) -> str | None:
    """The first of ``keys`` that ``row`` holds (with a value other than None)."""
    return next((key for key in keys if row.get(key) is not None), None)


def _question(row: dict) -> tuple[str, str]:
    """(question text, source field); a passage or body goes first (SVAMP's Body + Question)."""
    key = first_key(row, QUESTION_KEYS)
    if key is None:
        raise BadRecord(QUESTION_KEYS[0], f"is missing (looked for {', '.join(QUESTION_KEYS)})")
    question = row[key]
    if isinstance(question, dict) and "stem" in question:  # ARC's original {"stem", "choices"}
        question = question["stem"]
    question = text({key: question}, key).strip()
    context_key = first_key(row, CONTEXT_KEYS)
    if context_key:
        context = text(row, context_key, empty_ok=True).strip()
        question = f"{context}\n{question}" if context_key != "Body" else f"{context} {question}".strip()
    return question, key


def convert_qa(row: dict, ctx: Context) -> list[dict]:
    """Question and answer without a rationale: a question under one of question, Question, query,
    problem, input, prompt (after a passage, context or Body), and an answer under one of answer,
    Answer, answers, target, label, correct, answerKey, gold, solution, output; a number or a list is
    written as text."""
    question, _ = _question(row)
    key = first_key(row, ANSWER_KEYS)
    if key is None:
        raise BadRecord(ANSWER_KEYS[0], f"is missing (looked for {', '.join(ANSWER_KEYS)})")
    return [{"instruction": question, "input": "", "output": answer_text(row[key], key)}]


def convert_qa_tsv(row: list[str], ctx: Context) -> list[dict]:
    """Tab-separated question and answer, two fields per line (a header line naming them is skipped)."""
    if len(row) != 2:
        raise BadRecord("line", f"has {len(row)} tab-separated fields; expected 2 (question, answer)")
    question, answer = (value.replace("\\n", "\n").strip() for value in row)
    for name, value in (("question", question), ("answer", answer)):
        if not value:
            raise BadRecord(name, "is empty")
    return [{"instruction": question, "input": "", "output": answer}]


def _options(value: Any, field: str) -> list[tuple[str, str]]:
    """(label, text) pairs from a list of texts, a list of {label, text}, a {label: text} dict, or
    a {"label": [...], "text": [...]} dict (ARC on the Hugging Face hub)."""
    if isinstance(value, dict) and isinstance(value.get("text"), list):
        labels = value.get("label") or LETTERS[:len(value["text"])]
        return [(str(label), str(option)) for label, option in zip(labels, value["text"], strict=False)]
    if isinstance(value, dict):
        return [(str(label), answer_text(option, f"{field}.{label}")) for label, option in value.items()]
    if not isinstance(value, list) or not value:
        raise BadRecord(field, "must be a non-empty list or object of options")
    pairs = []
    for i, option in enumerate(value):
        if isinstance(option, dict) and "text" in option:
            pairs.append((str(option.get("label", LETTERS[i])), answer_text(option["text"], f"{field}[{i}].text")))
        else:
            pairs.append((LETTERS[i], answer_text(option, f"{field}[{i}]")))
    return pairs


def _render_choice(question: str, pairs: list[tuple[str, str]], correct: str) -> list[dict]:
    letters = LETTERS[:len(pairs)]
    options = "\n".join(f"({letter}) {option}" for letter, (_, option) in zip(letters, pairs, strict=True))
    return [{"instruction": f"{question}\nOptions:\n{options}", "input": "", "output": correct}]


def convert_choice(row: dict, ctx: Context) -> list[dict]:
    """Multiple choice: a question, options (options, choices or endings: a list, a list of {label,
    text}, or a {label: text} object) and the answer as a label, a 0-based index or the option's
    text. The options are listed as (A), (B), ...; the output is the correct letter."""
    question, _ = _question(row)
    question_value = row[first_key(row, QUESTION_KEYS)]
    option_key = first_key(row, OPTION_KEYS)
    if option_key is None and isinstance(question_value, dict):  # ARC's original nested choices
        pairs = _options(question_value.get("choices"), "question.choices")
    elif option_key is None:
        raise BadRecord(OPTION_KEYS[0], f"is missing (looked for {', '.join(OPTION_KEYS)})")
    else:
        pairs = _options(row[option_key], option_key)
    key = first_key(row, ANSWER_KEYS)
    if key is None:
        raise BadRecord(ANSWER_KEYS[0], f"is missing (looked for {', '.join(ANSWER_KEYS)})")
    answer = row[key]
    labels = [label for label, _ in pairs]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(pairs):
        index = answer
    elif isinstance(answer, str) and answer.strip().strip("()") in labels:
        index = labels.index(answer.strip().strip("()"))
    elif isinstance(answer, str) and answer.strip().isdigit() and int(answer) < len(pairs):
        index = int(answer)  # an index written as text (HellaSwag's "label": "2")
    elif isinstance(answer, str) and answer.strip() in [option for _, option in pairs]:
        index = [option for _, option in pairs].index(answer.strip())
    else:
        raise BadRecord(key, f"is {answer!r}, which is neither an option label ({', '.join(labels)}), "
                             f"a 0-based index below {len(pairs)}, nor an option's text")
    return _render_choice(question, pairs, LETTERS[index])


def convert_target_scores(row: dict, ctx: Context) -> list[dict]:
    """BIG-bench multiple choice ``{input, target_scores: {option: score}}``: the options in order,
    the output is the letter of the highest-scoring one."""
    question = text(row, "input").strip()
    scores = row.get("target_scores")
    if not isinstance(scores, dict) or not scores:
        raise BadRecord("target_scores", "must be a non-empty object of option: score")
    if not all(isinstance(score, (int, float)) for score in scores.values()):
        raise BadRecord("target_scores", "must map every option to a number")
    options = list(scores)
    best = max(range(len(options)), key=lambda i: scores[options[i]])
    return _render_choice(question, [(LETTERS[i], option) for i, option in enumerate(options)], LETTERS[best])


def convert_prompts(row: dict, ctx: Context) -> list[dict]:
    """Benchmark prompt lists without answers (Vicuna, IFEval, MT-bench, Arena-Hard): the prompt
    under prompt, question, query, text or turns. Instruction-only (not trainable); a multi-turn
    ``turns`` list with a ``reference`` answer per turn becomes a conversation, without one its
    first turn is the prompt and the later turns are kept in ``turns`` (they follow the model's own answers)."""
    key = first_key(row, PROMPT_KEYS)
    if key is None:
        raise BadRecord(PROMPT_KEYS[0], f"is missing (looked for {', '.join(PROMPT_KEYS)})")
    if key != "turns":
        return [{"instruction": text(row, key).strip(), "input": ""}]
    turns = []
    for i, turn in enumerate(listed(row, "turns")):
        content = turn.get("content") if isinstance(turn, dict) else turn
        if not isinstance(content, str) or not content.strip():
            raise BadRecord(f"turns[{i}]", "must be a non-empty string or an object with 'content'")
        turns.append(content.strip())
    references = row.get("reference")
    if isinstance(references, list) and len(references) == len(turns) and all(
            isinstance(r, str) and r.strip() for r in references):
        pairs = [(role, content, f"{field}[{i}]") for i, (turn, reference) in enumerate(zip(turns, references,
                                                                                            strict=True))
                 for role, content, field in (("user", turn, "turns"), ("assistant", reference, "reference"))]
        return [build_messages(pairs, ctx)]
    record = {"messages": [{"role": "user", "content": turns[0]}]}
    if len(turns) > 1:
        record["turns"] = turns
    return [record]


def convert_humaneval(row: dict, ctx: Context) -> list[dict]:
    """HumanEval-style code task ``{task_id, prompt, canonical_solution, test, entry_point}``: the
    prompt (a signature and docstring) is the instruction, the reference solution the output."""
    return [{"instruction": text(row, "prompt"), "input": "", "output": text(row, "canonical_solution")}]


def convert_mbpp(row: dict, ctx: Context) -> list[dict]:
    """MBPP-style code task ``{text, code, test_list}``: the task is the instruction, its tests the
    input (they name the function to write), the reference code the output."""
    tests = row.get("test_list") or []
    if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        raise BadRecord("test_list", "must be a list of strings")
    query = "Your code should pass these tests:\n" + "\n".join(tests) if tests else ""
    return [{"instruction": text(row, "text").strip(), "input": query, "output": text(row, "code")}]

