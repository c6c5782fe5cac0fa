"""The main job's data: yes/no chain-of-thought training records, a held-out set of yes/no questions from
the same source (StrategyQA) to score the model on before and after fine-tuning, and yes/no sets from
sources training never sees (the out-of-set check).

Every yes/no record is asked and answered one way, so the model learns one answer phrasing and the
base model is told it too: the question, then ``ASK`` ("Think step by step, then end with "So the answer
is yes." or "So the answer is no.""); the answer, the rationale then "So the answer is yes." (or no).

Where the data comes from, first found first:
1. a mirror of the shared data folder (``$ALPACA_COT_SHARED``, default ``../shared``): FLAN's CoT files;
2. the original collection on the Hugging Face hub (dataset QingyiSi/Alpaca-CoT): ``cot``, fetched by
   ``data/collection.py download`` into ``data/``, where ``--data cot`` finds it too (its yes/no records,
   rephrased as above; the out-of-set sets need the mirror).
Offline and without a mirror it stops with one sentence saying what to do (exit status 2).

The held-out sets are drawn with a fixed seed before training and never reach it: training records sharing a
13-gram with any of them are dropped (``data/collection.py decontaminate``'s rule). Out-of-set sets, each a
yes/no claim about one row of a FLAN file the mix does not read:
- ``sensemaking_yesno``: 'Does this sentence make sense? "..."' about one of the two sentences (Sen-Making);
- ``qasc_yesno`` and ``ecqa_yesno``: a question with one proposed answer, the right option or a wrong one
  (QASC science questions, ECQA common-sense questions): "Is the proposed answer correct?".
Written atomically into OUT: train.json, heldout.json and (with the mirror) one file per out-of-set set.

Usage: python3 scripts/demo_data.py [--out .cache/demo] [--train 400] [--heldout 100] [--out_of_set 100]
"""

from __future__ import annotations

import json
import os
import random
import re
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # import the project's packages

from alpaca_cot.data.cot import split_cot  # noqa: E402
from alpaca_cot.data.records import DataError, read_records  # noqa: E402
from alpaca_cot.data.sources import DATA_DIR, HF_DATASET, resolve_data  # noqa: E402
from alpaca_cot.evaluation.answers import final_answer, options_of  # noqa: E402
from alpaca_cot.io import write_json_atomic  # noqa: E402
from data import catalog, curation  # noqa: E402
from data.converters import convert_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASK = 'Think step by step, then end with "So the answer is yes." or "So the answer is no."'
ANSWER = "{cot}\nSo the answer is {answer}."
MAIN = "strategyqa"  # trained on, and its held-out rows are the main set
OUT_OF_SET = ("sensemaking", "qasc")  # never trained on: each becomes <name>_yesno.json
CLAIMS = "ecqa"  # its rows, as proposed-answer claims, are the second part of the training mix
# The last sentence of a hub record's answer, where it states yes or no ("So, the final answer is yes.").
_LAST_SENTENCE = re.compile(r"(?s)^(?P<cot>.*?[.!?\n])\s*[^.!?\n]*\b(?:yes|no)\b[^.!?\n]*[.!]?\s*$", re.IGNORECASE)
_SENTENCES = re.compile(r'Sentence ([AB]): "(.*)"')


def mirror_dir() -> str:
    """The mirror's raw-data folder: $ALPACA_COT_SHARED/data/raw, default ../shared/data/raw."""
    shared = os.environ.get("ALPACA_COT_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")
    return os.path.join(shared, "data", "raw")


def yes_no(question: str, cot: str, answer: str) -> dict:
    """The record of a yes/no question, asked and answered in the main job's one phrasing."""
    cot = cot.strip()
    if not cot.endswith((".", "!", "?", '"')):
        cot += "."
    return {"instruction": f"{question.strip()}\n{ASK}", "input": "", "output": ANSWER.format(cot=cot, answer=answer)}


def content(record: dict) -> dict:
    """A record without the shared ``ASK`` line: what the 13-gram rule compares (every record carries that
    line, so it would make every record contaminated, as a shared phrasing of our converter would)."""
    return {**record, "instruction": record["instruction"].removesuffix(f"\n{ASK}")}


def flan_rows(raw: str, task: str) -> list[tuple[str, str, str]]:
    """(question, rationale, answer) of each row of a FLAN CoT file, read back from our converter's records."""
    records, _ = convert_file(os.path.join(raw, "flan_v2_cot", f"{task}_train.tsv"))
    return [split_cot(r) for r in records]


def sensemaking_claim(question: str, cot: str, answer: str, rng: random.Random) -> dict | None:
    """'Does this sentence make sense?' about one of a Sen-Making row's two sentences (drawn by ``rng``)."""
    sentences = dict(_SENTENCES.findall(question))
    if len(sentences) != 2 or answer not in ("Sentence A", "Sentence B"):
        return None
    letter = rng.choice("AB")
    verdict = "no" if answer.endswith(letter) else "yes"  # the row's answer is the sentence against common sense
    return yes_no(f'Does this sentence make sense? "{sentences[letter]}"', cot, verdict)


def option_claim(question: str, cot: str, answer: str, rng: random.Random) -> dict | None:
    """A multiple-choice row as a yes/no claim: the question with one proposed answer, right or wrong (drawn)."""
    options = options_of(question)
    stem = question.split("\nOptions:")[0].strip()
    right = [text for letter, text in options if (f"({letter})" if letter else text) == answer]
    wrong = [text for letter, text in options if (f"({letter})" if letter else text) != answer]
    if len(right) != 1 or not wrong:
        return None
    correct = rng.random() < 0.5
    proposed = right[0] if correct else rng.choice(wrong)
    return yes_no(f"Question: {stem}\nProposed answer: {proposed}\nIs the proposed answer correct?", cot,
                  "yes" if correct else "no")


def out_of_set(raw: str, count: int, seed: int) -> dict[str, list[dict]]:
    """``count`` yes/no claims from each out-of-set file, drawn with ``seed``."""
    sets = {}
    for task in OUT_OF_SET:
        rng = random.Random(f"{seed}:{task}")
        rows = flan_rows(raw, task)
        rng.shuffle(rows)
        claim = sensemaking_claim if task == "sensemaking" else option_claim
        made = [c for c in (claim(*row, rng) for row in rows[:2 * count]) if c is not None]
        sets[f"{task}_yesno"] = made[:count]
    return sets


def from_mirror(raw: str) -> list[dict]:
    """The main source's yes/no records, from the mirror's FLAN file."""
    return [yes_no(*row) for row in flan_rows(raw, MAIN)]


def claims(raw: str, count: int, avoid: list[dict], seed: int) -> list[dict]:
    """``count`` proposed-answer claims from ECQA rows (half right, half wrong), sharing no 13-gram with ``avoid``."""
    rng = random.Random(f"{seed}:{CLAIMS}")
    rows = flan_rows(raw, CLAIMS)
    rng.shuffle(rows)
    made = [c for c in (option_claim(*row, rng) for row in rows[:2 * count]) if c is not None]
    return balanced(decontaminated(made, avoid), count)


def answer_of(record: dict) -> str:
    """yes or no: the last word of a record's answer."""
    return record["output"].rstrip(".").rsplit(" ", 1)[-1]


def balanced(records: list[dict], count: int) -> list[dict]:
    """The first ``count`` records with as many yes as no answers (an even share: no answer prior to learn)."""
    picked = {"yes": [], "no": []}
    for record in records:
        bucket = picked[answer_of(record)]
        if len(bucket) < count // 2:
            bucket.append(record)
    if len(picked["yes"]) + len(picked["no"]) < count // 2 * 2:
        raise DataError(f"only {len(picked['yes'])} yes and {len(picked['no'])} no records are left; {count} needed")
    return [r for r in records if any(r is p for p in picked["yes"] + picked["no"])]


def decontaminated(records: list[dict], avoid: list[dict]) -> list[dict]:
    """``records`` without those that share a 13-gram with ``avoid`` (compared without the ``ASK`` line)."""
    _, dropped = curation.decontaminate([content(r) for r in records], [content(r) for r in avoid])
    gone = set(dropped)
    return [r for i, r in enumerate(records) if i not in gone]


def from_hub() -> list[dict]:
    """The yes/no records of the hub's ``cot`` collection (downloaded once into data/), rephrased our way."""
    try:
        paths = resolve_data(["cot"])
    except DataError:  # not downloaded yet
        paths = catalog.download("cot")
    records = []
    for record in (r for path in paths for r in read_records(path)):
        final = final_answer(record) if "messages" not in record and not record.get("input") else None
        found = _LAST_SENTENCE.match(record["output"]) if final and final[0] == "yesno" else None
        if found:
            records.append(yes_no(record["instruction"], found["cot"], final[1]))
    return records


def split(pool: list[dict], train: int, heldout: int, avoid: list[dict], seed: int = 0) -> tuple[list, list]:
    """(training records, held-out records): ``heldout`` drawn with ``seed`` first, then ``train`` records of the
    rest sharing no 13-gram with the held-out records or ``avoid`` (the out-of-set sets)."""
    rng = random.Random(seed)
    if len(pool) < heldout + train:
        raise DataError(f"only {len(pool)} yes/no chain-of-thought records were found; {heldout + train} are needed")
    order = list(range(len(pool)))
    rng.shuffle(order)
    held = [pool[i] for i in sorted(order[:heldout])]
    # candidates first (1.5x what is needed), so the n-gram check reads a few hundred records, not the collection
    candidates = [pool[i] for i in order[heldout:heldout + train * 3 // 2]]
    return balanced(decontaminated(candidates, held + avoid), train), held


def _pct(p: dict) -> str:
    return f"{100 * p['value']:.0f}% [{100 * p['ci95'][0]:.0f}, {100 * p['ci95'][1]:.0f}]"


def closing_table(eval_dir: str) -> str:
    """The main job's before/after table from EVAL_DIR/{before,after}/results.json: per evaluation set, accuracy,
    exact match and answers stated with 95% intervals, and the answer loss."""
    runs = {}
    for name in ("before", "after"):
        with open(os.path.join(eval_dir, name, "results.json"), encoding="utf-8") as f:
            runs[name] = json.load(f)["data"]
    lines = ["| held-out set | model | accuracy [95% CI] | exact match [95% CI] | states a final answer [95% CI] "
             "| answer loss |", "|---|---|---|---|---|---|"]
    for key in runs["before"]:
        title = "StrategyQA (same source as training)" if key == "heldout" else f"{key} (never trained on)"
        for name, data in runs.items():
            r = data[key]
            lines.append(f"| {title if name == 'before' else ''} | {name} fine-tuning, n={r['scored']} "
                         f"| {_pct(r['accuracy'])} | {_pct(r['exact_match'])} "
                         f"| {_pct(r['stated'])} | {r['eval_loss']:.3f} |")
    return "\n".join(lines)


def main(out: str = ".cache/demo", train: int = 400, train_claims: int = 0, heldout: int = 100,
         out_of_set_records: int = 100, seed: int = 0, report: str | None = None) -> None:
    """Write OUT/train.json, OUT/heldout.json and the out-of-set files from the mirror, else the hub; with
    ``--report EVAL_DIR``, print the closing table of the evaluations in EVAL_DIR/before and EVAL_DIR/after."""
    if report:
        print(closing_table(report))
        return
    raw = mirror_dir()
    others: dict[str, list[dict]] = {}
    if os.path.isdir(raw):
        print(f"data: the mirror {raw}")
        pool = from_mirror(raw)
        if out_of_set_records:
            others = out_of_set(raw, out_of_set_records, seed)
    else:
        print(f"data: no mirror at {raw}; the Hugging Face dataset {HF_DATASET} (cached in {DATA_DIR}); "
              "no out-of-set sets without the mirror")
        try:
            pool = from_hub()
        except DataError:
            why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else "unreachable"
            print(f"error: the main job has no data: there is no mirror at {raw} and the Hugging Face hub cannot serve "
                  f"{HF_DATASET} ({why}), so run it once online or set ALPACA_COT_SHARED to a folder that holds "
                  "data/raw of the shared data.", file=sys.stderr)
            sys.exit(2)
    avoid = [r for records in others.values() for r in records]
    mix, held = split(pool, train, heldout, avoid, seed)
    if train_claims:
        mix += claims(raw, train_claims, held + avoid, seed)
        random.Random(seed).shuffle(mix)
    write_json_atomic(os.path.join(out, "train.json"), mix)
    write_json_atomic(os.path.join(out, "heldout.json"), held)
    for name, records in others.items():
        write_json_atomic(os.path.join(out, f"{name}.json"), records)
    print(f"wrote {len(mix)} training records, {len(held)} held-out yes/no questions"
          + "".join(f", {len(r)} {name}" for name, r in others.items()) + f" to {out}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
