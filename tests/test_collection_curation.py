"""Curation that can be trusted, on constructed cases with known truth built from the real GSM8K
rows of ../shared: decontamination counts only what the evaluation asks and expects, dedup finds
duplicate source rows however they were phrased, and every error names only flags its verb takes."""

from __future__ import annotations

import inspect
import json
import random
import re

import pytest

from alpaca_cot.data.records import DataError
from data import collection, curation
from data.converters import convert_file
from data.storage import load_records, write_records
from tests.conftest import run_script, shared_path

N_TRAIN, N_EVAL = 3000, 50


@pytest.fixture(scope="module")
def gsm8k_lines() -> list[str]:
    with open(shared_path("data", "raw", "gsm8k", "train.jsonl"), encoding="utf-8") as f:
        return [line for line in f.read().split("\n") if line.strip()]


def _convert_lines(lines: list[str], path, seed: int = 42) -> list[dict]:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records, report = convert_file(str(path), seed=seed)
    assert not report.bad
    return records


def test_decontaminate_drops_exactly_the_records_sharing_eval_questions(gsm8k_lines, tmp_path):
    train_lines, eval_lines = gsm8k_lines[:N_TRAIN], gsm8k_lines[N_TRAIN:N_TRAIN + N_EVAL]
    rng = random.Random(0)
    mixed = train_lines + eval_lines
    rng.shuffle(mixed)  # the evaluation problems injected at random places
    train = tmp_path / "train.json"
    write_records(str(train), _convert_lines(mixed, tmp_path / "train_src.jsonl"))
    # The evaluation file is itself converted CoT data, phrased with other phrasings (seed 7).
    eval_file = tmp_path / "eval.json"
    write_records(str(eval_file), _convert_lines(eval_lines, tmp_path / "eval_src.jsonl", seed=7))
    # Known truth from the source rows alone: a training row is contaminated when its question
    # shares a 13-gram with an evaluation question (the injected rows, and any near-copies).
    eval_grams = curation.ngrams([json.loads(line)["question"] for line in eval_lines], 13)
    truth = [i for i, line in enumerate(mixed)
             if curation.contaminated({"instruction": json.loads(line)["question"]}, eval_grams, {13})]
    assert len(truth) >= N_EVAL
    out = tmp_path / "clean.json"
    proc = run_script("data/collection.py", "decontaminate", str(train), str(out), "--eval_file", str(eval_file))
    dropped = [int(i) for i in re.search(r"dropped record indices: (.*)", proc.stdout)[1].rstrip(" .").split(", ")]
    assert f"dropped {len(truth)} of {N_TRAIN + N_EVAL} records" in proc.stdout
    assert dropped == truth[:collection.LIST_LIMIT]
    assert len(load_records(str(out))) == N_TRAIN + N_EVAL - len(truth)


def test_decontaminate_fails_when_the_eval_side_yields_nothing(tmp_path):
    train = tmp_path / "train.json"
    write_records(str(train), [{"instruction": "a", "input": "", "output": "b"}])
    empty = tmp_path / "eval.jsonl"
    empty.write_text(json.dumps({"instruction": " ", "output": "x"}) + "\n", encoding="utf-8")
    proc = run_script("data/collection.py", "decontaminate", str(train), str(tmp_path / "out.json"),
                      "--eval_file", str(empty), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "yields no evaluation records, so nothing can be checked" in proc.stderr
    assert not (tmp_path / "out.json").exists()


def test_eval_side_counts_question_and_answer_not_phrasing():
    record = {"instruction": "Solve the math word problem below. Show your working, then state the result.\n"
                             "Tom has 3 apples.", "input": "", "output": "He has 3.\nThe answer is 3."}
    assert curation.question_and_answer(record) == ("Tom has 3 apples.", "3")
    assert curation.question_and_answer({"instruction": "Hi", "input": "there", "output": "yo"}) == ("Hi\nthere", "yo")


def test_dedup_removes_duplicate_source_rows_however_phrased(gsm8k_lines, tmp_path):
    rng = random.Random(1)
    lines = gsm8k_lines[:1000]
    copies = rng.sample(lines, 40)
    for line in copies:
        lines.insert(rng.randrange(len(lines) + 1), line)
    truth = len(lines) - len(set(lines))
    assert truth == 40
    converted = tmp_path / "converted.json"
    write_records(str(converted), _convert_lines(lines, tmp_path / "src.jsonl"))
    for mode in ("exact", "normalized"):
        proc = run_script("data/collection.py", "dedup", str(converted), str(tmp_path / f"{mode}.json"),
                          "--mode", mode)
        assert f"removed {truth} duplicates ({mode}) of 1040 records" in proc.stdout
    # The same rows phrased with another seed are duplicates too: dedup compares content.
    other = _convert_lines(lines[:100], tmp_path / "src2.jsonl", seed=3)
    first = load_records(str(converted))[:100]
    assert sum(a["instruction"] != b["instruction"] for a, b in zip(first, other, strict=True)) > 50
    assert curation.dedup(first + other) == curation.dedup(first)


def _flags_outside_commands(message: str) -> set[str]:
    """The --flags a message names, leaving out those inside a `quoted command` of another verb."""
    return set(re.findall(r"--(\w+)", re.sub(r"`[^`]*`", "", message)))


def test_messages_name_only_flags_their_verb_takes(tmp_path):
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"stem": "q", "choices": ["a"], "answer": "A"}) + "\n", encoding="utf-8")
    train = tmp_path / "train.json"
    write_records(str(train), [{"instruction": "a", "input": "", "output": "b"}])
    taken = tmp_path / "taken.json"
    taken.write_text("[]", encoding="utf-8")
    cases = [
        (collection.convert, (str(odd), str(tmp_path / "o1.json"))),
        (collection.decontaminate, (str(train), str(tmp_path / "o2.json"), str(odd))),
        (collection.dedup, (str(train), str(taken))),
        (collection.mix, (str(tmp_path / "o3.json"),)),
        (collection.convert, (str(odd), str(taken))),
    ]
    for verb, args in cases:
        with pytest.raises(DataError) as error:
            verb(*args)
        named = _flags_outside_commands(str(error.value))
        assert named <= set(inspect.signature(verb).parameters), (verb.__name__, str(error.value))
    with pytest.raises(DataError) as error:
        collection.decontaminate(str(train), str(tmp_path / "o4.json"), str(odd))
    assert "pass --format" not in str(error.value) and "no source format fits" in str(error.value)
