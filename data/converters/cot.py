"""Chain-of-thought sources: (question, answer, rationale) rows become instruction records.

Each row gets one phrasing, drawn with the file's seeded RNG from the phrasings of its dataset
(the dataset is named by the file: ``aqua_train.tsv`` -> ``aqua``). The phrasings live in the
package (``alpaca_cot/data/cot.py``), where evaluation reads them back.
"""

from __future__ import annotations

import re

from alpaca_cot.data.cot import phrasings
from data.converters.base import BadRecord, Context, text

_SENTENCE_END = tuple(".!?。！？\"')”")


def render_cot(question: str, answer: str, cot: str, ctx: Context) -> dict:
    """One instruction record from a CoT triple, with a phrasing drawn from the dataset's set by
    the seed and the row's content. With ``ctx.plain`` the record is the question and the final
    answer alone (what an evaluation set asks and expects, without our phrasing or the rationale)."""
    if ctx.plain:
        return {"instruction": question, "input": "", "output": answer}
    instruction, target = ctx.rng(f"{question}\t{answer}\t{cot}").choice(phrasings(ctx.name))
    if not cot.endswith(_SENTENCE_END):
        cot += "."  # the answer sentence follows the rationale, sometimes on the same line
    return {"instruction": instruction.format(question=question), "input": "",
            "output": target.format(cot=cot, answer=answer)}


def convert_flan_cot(row: list[str], ctx: Context) -> list[dict]:
    """FLAN v2 CoT TSV line: question, answer, chain_of_thought. Newlines inside fields are written
    as the two characters ``\\n``; as FLAN's own loader does, they become newlines."""
    if len(row) != 3:
        raise BadRecord("line", f"has {len(row)} tab-separated fields; expected 3 (question, answer, rationale)")
    question, answer, cot = (value.replace("\\n", "\n").strip() for value in row)
    for name, value in (("question", question), ("answer", answer), ("chain_of_thought", cot)):
        if not value:
            raise BadRecord(name, "is empty")
    return [render_cot(question, answer, cot, ctx)]


def convert_gsm8k(row: dict, ctx: Context) -> list[dict]:
    """GSM8K ``{question, answer}``: the answer holds the steps, with ``<<calc=result>>`` annotations
    (removed here), and a final ``#### N`` line that is the answer. The Socratic variant's
    ``sub-question ** step`` lines lose their ``**`` separator."""
    question = text(row, "question").strip()
    steps, marker, final = text(row, "answer").rpartition("####")
    if not marker or not final.strip() or not steps.strip():
        raise BadRecord("answer", "has no steps followed by a final '#### N' line")
    cot = re.sub(r"<<[^>]*>>", "", steps).strip()
    # GSM8K Socratic writes each step as "sub-question ** step": keep both, without the separator.
    cot = re.sub(r" \*\* ", " ", cot)
    return [render_cot(question, final.strip(), cot, ctx)]


_OPTION = re.compile(r"^\(?([A-Z])\)\s*(.*)$", re.DOTALL)


def convert_aqua(row: dict, ctx: Context) -> list[dict]:
    """AQuA-RAT ``{question, options: ["A)..", ...], rationale, correct}``, written like FLAN's aqua."""
    question, rationale, correct = (text(row, key).strip() for key in ("question", "rationale", "correct"))
    options = []
    for i, option in enumerate(row.get("options") or []):
        match = _OPTION.match(option.strip()) if isinstance(option, str) else None
        if not match:
            raise BadRecord(f"options[{i}]", f"is {option!r}; expected a letter and ')' such as 'A)12'")
        options.append(f"({match.group(1)}) {match.group(2).strip()}")
    if not options:
        raise BadRecord("options", "is missing or empty")
    if f"({correct})" not in (option[:3] for option in options):
        raise BadRecord("correct", f"is {correct!r}, which is not one of the option letters")
    question = question + "\nOptions:\n" + "\n".join(options)
    return [render_cot(question, f"({correct})", rationale, ctx)]

