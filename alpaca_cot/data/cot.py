"""Our chain-of-thought phrasings, (instruction, target) pairs with the placeholders ``{question}``, ``{cot}``
(the rationale) and ``{answer}``, reasoning before the answer as in FLAN's CoT templates. The collection
tool's converters write them (``data/converters/cot.py``); ``split_cot`` reads a record back into its parts
for evaluation, de-duplication and decontamination.
"""

from __future__ import annotations

import re

# Targets shared by every dataset: reasoning first, then the answer.
_TARGETS = (
    "{cot}\nSo the answer is {answer}.",
    "{cot} The final answer: {answer}.",
    "Reasoning: {cot}\nAnswer: {answer}",
    "{cot}\nHence the answer is {answer}.",
)

# Instructions per dataset, each paired with a target. Datasets not listed use "generic".
PHRASINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "generic": (
        ("{question}\nThink it through step by step before answering.", _TARGETS[0]),
        ("Work out the answer to the question below, showing your reasoning first.\n{question}", _TARGETS[1]),
        ("{question}\nExplain your reasoning, then give the final answer.", _TARGETS[2]),
        ("Question: {question}\nReason about it carefully, then answer.", _TARGETS[3]),
        ("Solve this, reasoning one step at a time:\n{question}", _TARGETS[0]),
        ("{question}\nWalk me through how you reach the answer.", _TARGETS[1]),
    ),
    "aqua": (
        ("{question}\nPick the correct option and show your calculation.", "{cot}\nThe correct option is {answer}."),
        ("Answer this multiple-choice math question. Work it out first, then give the option.\n{question}",
         _TARGETS[0]),
        ("{question}\nWhich option is right? Calculate before you choose.", _TARGETS[2]),
        ("Here is a quantitative reasoning problem with five options.\n{question}\nShow your working.",
         _TARGETS[3]),
        ("Solve the problem and select an option.\n{question}", "{cot} So the option to choose is {answer}."),
        ("{question}\nLet us do the math step by step and then pick an answer.", _TARGETS[1]),
    ),
    "ecqa": (
        ("{question}\nUse common sense to choose an option, and explain why.",
         "{cot}\nSo the best option is {answer}."),
        ("Choose the most sensible answer and justify the choice.\n{question}", _TARGETS[0]),
        ("{question}\nThink about what each option means before answering.", _TARGETS[2]),
        ("Common-sense question: {question}\nGive your reasoning, then the option.", _TARGETS[3]),
        ("{question}\nExplain which option fits and why.", "{cot} That is why the answer is {answer}."),
        ("Read the question and the options, reason briefly, then answer.\n{question}", _TARGETS[1]),
    ),
    "gsm8k": (
        ("Solve the math word problem below. Show your working, then state the result.\n{question}",
         "{cot}\nThe answer is {answer}."),
        ("{question}\nCalculate the answer step by step.", _TARGETS[0]),
        ("A student asks: {question}\nWork through the arithmetic and give the final number.",
         "{cot} So the final number is {answer}."),
        ("Here is a grade-school math problem.\n{question}\nShow each step.", _TARGETS[2]),
        ("{question} Let us work it out one step at a time.", _TARGETS[3]),
        ("Answer the question with a short calculation first.\n{question}", _TARGETS[1]),
    ),
    "qasc": (
        ("{question}\nCombine the relevant facts step by step, then choose.", _TARGETS[0]),
        ("Answer the science question below. First state the facts you rely on.\n{question}",
         "{cot}\nSo the answer is {answer}."),
        ("{question}\nWhich option follows from what you know? Reason first.", _TARGETS[2]),
        ("Use two facts that chain together to answer this.\n{question}", "{cot} Therefore the option is {answer}."),
        ("Science quiz: {question}\nExplain, then answer.", _TARGETS[3]),
        ("{question}\nGive the chain of facts that leads to your choice.", _TARGETS[1]),
    ),
    "sensemaking": (
        ("{question}\nExplain your choice before giving it.", _TARGETS[0]),
        ("Read both sentences and decide.\n{question}\nGive your reasoning first.", _TARGETS[2]),
        ("{question}\nThink about how the world usually works, then answer.", _TARGETS[3]),
        ("Use everyday knowledge to answer the question below.\n{question}", "{cot}\nSo the answer is {answer}."),
        ("Common-sense check: {question}\nJustify your pick.", _TARGETS[1]),
    ),
    "strategyqa": (
        ("{question}\nAnswer yes or no, reasoning it out first.", _TARGETS[0]),
        ("Think about the facts involved, then answer yes or no: {question}", "{cot} So the answer is {answer}."),
        ("{question} Reason step by step before you answer.", _TARGETS[2]),
        ("Question that needs a few facts put together: {question}\nExplain, then answer.", _TARGETS[3]),
        ("Is it true? {question}\nGive the facts you use and then a yes or no.", _TARGETS[1]),
    ),
    "creak": (
        ("{question}\nCheck the claim against what you know, then answer.", _TARGETS[0]),
        ("Decide whether the claim below holds, explaining why.\n{question}", _TARGETS[2]),
        ("{question}\nReason about the facts before answering.", _TARGETS[3]),
        ("Fact check: {question}", "{cot}\nSo the answer is {answer}."),
    ),
    "esnli": (
        ("{question}\nExplain how the premise relates to the hypothesis, then answer.", _TARGETS[0]),
        ("Natural language inference. Reason first, then answer.\n{question}", _TARGETS[2]),
        ("{question}\nDoes the premise support the hypothesis? Explain.", _TARGETS[3]),
        ("Read the premise and the hypothesis carefully.\n{question}", "{cot}\nSo the answer is {answer}."),
    ),
    "qed": (
        ("{question}\nFind the relevant part of the passage, then answer.", _TARGETS[0]),
        ("Answer the question from the passage, explaining where the answer comes from.\n{question}",
         _TARGETS[2]),
        ("{question}\nQuote what supports your answer before giving it.", _TARGETS[3]),
        ("Reading comprehension: {question}", "{cot}\nSo the answer is {answer}."),
    ),
}


def phrasings(dataset: str) -> tuple[tuple[str, str], ...]:
    """The (instruction, target) phrasings of a dataset (``generic`` for datasets not listed)."""
    return PHRASINGS.get(dataset, PHRASINGS["generic"])


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(question|cot|answer)\}", template)
    regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>.+?)" for i, part in enumerate(parts))
    return re.compile(regex, re.DOTALL)


# Every phrasing as a pair of patterns, to read a converted record back into its parts.
_PATTERNS = [(_pattern(instruction), _pattern(target)) for pairs in PHRASINGS.values() for instruction, target in pairs]


def split_cot(record: dict) -> tuple[str, str, str] | None:
    """(question, rationale, answer) of a single-turn record that one of our phrasings wrote, or
    None: lets dedup and decontaminate compare content, not phrasing."""
    instruction, output = record.get("instruction"), record.get("output")
    if not isinstance(output, str) or record.get("input"):
        return None
    for instruction_pattern, target_pattern in _PATTERNS:
        asked = instruction_pattern.fullmatch(instruction)
        answered = asked and target_pattern.fullmatch(output)
        if answered:
            return asked["question"], answered["cot"], answered["answer"]
    return None
