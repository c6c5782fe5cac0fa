"""predict.py: scoring, the resumable JSONL output, and a run killed mid-way and resumed."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from alpaca_cot.errors import UserError
from alpaca_cot.evaluation.answers import (
    answers_match,
    final_answer,
    lcs_length,
    reference_answer,
    rouge_l,
    score_generation,
    score_predictions,
    stated_answer,
    words,
)
from alpaca_cot.outputs import write_marker
from alpaca_cot.prediction import PredictionRun, output_paths, read_predictions, run_file_path
from tests.conftest import PYTHON, ROOT

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def load_script(name: str):
    """A top-level script as a module (to call its main in-process)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Final-answer sentences as they appear in real CoT data: the original Alpaca-CoT's formatted files
# (../shared/data/raw/alpaca_cot/formatted_cot_data), GSM8K, and our converters' phrasings.
REFERENCES = [
    ("Sex is the process by which living things give rise to offspring. So the final answer is (D).", ("letter", "D")),
    ("Reproduction is the process by which living things produce children. The answer: (H).", ("letter", "H")),
    ("Genghis Khan had sixteen children. Therefore, the final answer is yes.", ("yesno", "yes")),
    ("Only law enforcement officers can perform lawful arrests. So, the answer is no.", ("yesno", "no")),
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72", ("number", "72")),
    ("Books are sold in a bookstore.\nSo the best option is bookstore.", ("text", "bookstore")),
    ("She earned 0.2 x 50 = 10. The final answer: 1,250.", ("number", "1,250")),
    ("Reasoning: 12 / 60 = 0.2 per minute.\nAnswer: 10.5", ("number", "10.5")),
    ("900 km/h = 540 miles/h = 9 miles per minute.\nThe correct option is C.", ("letter", "C")),
    ("D", ("letter", "D")),
    ("(B)", ("letter", "B")),
    ("因为两数之和为十，所以答案是 B。", ("letter", "B")),
    ("bloody mess", ("text", "bloody mess")),  # a short line that is not a sentence is the answer alone
    ("91-33=58", ("text", "91-33=58")),
    # free text: no final answer, scored by ROUGE-L
    ("The three primary colors are red, blue, and yellow.", None),
    ("The answer is that it depends on the weather. Pack an umbrella.", None),
]


@pytest.mark.parametrize(("reference", "expected"), REFERENCES)
def test_reference_final_answers(reference: str, expected: tuple[str, str] | None) -> None:
    assert reference_answer(reference) == expected


def test_generations_are_read_the_way_their_reference_needs() -> None:
    assert stated_answer("3 + 4 = 7. So the answer is 7. Next, a new question", "number") == "7"
    assert stated_answer("The answer is $1,250.00.", "number") == "1,250.00"
    assert stated_answer("(D) sex", "letter") == "D"
    assert stated_answer("Facts first. So the answer is (B). Then rambling", "letter") == "B"
    assert stated_answer("Yes", "yesno") == "yes" and stated_answer("Yes", "number") is None
    assert stated_answer("We get 12 and then 15", "number") is None  # no statement: found only flexibly
    assert score_generation("We get 12 and then 15", "number", "15") == {
        "extracted": "15", "stated": False, "exact_match": False, "correct": True}
    assert answers_match("number", "1,250", "1250.00")
    assert answers_match("number", "13", "13.0") and not answers_match("number", "13", "14")
    assert answers_match("text", "bookstore", "the Bookstore!")
    assert not answers_match("letter", "A", None)


def test_the_first_statement_is_the_answer() -> None:
    """A model that runs on into a new question is scored on its own (first) answer, whichever comes last."""
    right_first = "So the answer is 7.\n\nQuestion: What is 2 + 3?\nSo the answer is 5."
    wrong_first = "So the answer is 5.\n\nQuestion: What is 3 + 4?\nSo the answer is 7."
    assert stated_answer(right_first, "number") == "7" and stated_answer(wrong_first, "number") == "5"
    assert score_generation(right_first, "number", "7")["exact_match"]
    assert not score_generation(wrong_first, "number", "7")["exact_match"]
    assert stated_answer("#### 3\nThe answer is 4.", "number") == "3"  # "####" and cues alike: the first
    assert stated_answer("The answer is no.\nQ: Is it? The answer is yes.", "yesno") == "no"


def test_a_stated_answer_with_a_reason_is_exact() -> None:
    """Issue 18: "The answer is yes, because birds fly." against "So the answer is yes." is right for both scripts."""
    record = {"instruction": "Can birds fly?", "input": "", "output": "So the answer is yes."}
    generation = "The answer is yes, because birds fly."
    assert score_generation(generation, *final_answer(record))["exact_match"]
    assert score_predictions([{**record, "generate": generation}])["exact_match"]["accuracy"] == 1.0


def test_rouge_l_is_the_lcs_f1() -> None:
    # LCS of "the cat sat on the mat" / "the cat is on the mat" is "the cat on the mat": P = R = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("", "anything") == 0.0 and rouge_l("Same words.", "same words") == 1.0
    assert words("今天 天气好, OK 2") == ["今", "天", "天", "气", "好", "ok", "2"]
    rng = random.Random(0)
    for _ in range(300):  # the bit-parallel LCS against the textbook dynamic programme
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 40))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        assert lcs_length(a, b) == table[-1][-1]


def test_score_summary() -> None:
    rows = [
        {"instruction": "q", "output": "So the answer is 7.", "generate": "The answer is 7."},
        {"instruction": "q", "output": "#### 10", "generate": "I think 10."},  # found, but not stated
        {"instruction": "q", "output": "The cat sat on the mat.", "generate": "the cat is on the mat"},  # ROUGE-L
        {"instruction": "q", "input": "", "generate": "no reference"},
        {"messages": [{"role": "user", "content": "Pick one"}, {"role": "assistant", "content": "B"}],
         "generate": "(B) because"},
        {"instruction": "Is 7 prime?", "output": "So the answer is yes.",
         "generate": "So the answer is yes.\nQuestion: Is 8 prime? So the answer is no."},
    ]
    assert score_predictions(rows) == {
        "records": 6, "exact_match": {"records": 4, "accuracy": 3 / 4, "flexible_accuracy": 1.0, "stated": 3 / 4},
        "rouge_l": {"records": 1, "f1": pytest.approx(5 / 6)}, "without_reference": 1}


def test_output_paths() -> None:
    assert output_paths("out/run.jsonl") == ("out/run.jsonl", "out/run.metrics.json")
    assert output_paths("saved_result.txt") == ("saved_result.txt", "saved_result.metrics.json")
    assert output_paths("results") == (os.path.join("results", "predictions.jsonl"),
                                       os.path.join("results", "metrics.json"))


def _mark_as_ours(result_dir) -> None:
    """The sidecar predict.py writes before its first prediction (as if an earlier run was killed)."""
    write_marker(run_file_path(str(result_dir)), "predict")


def test_torn_last_line_is_cut_and_foreign_predictions_refused(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    done = {"instruction": "a", "input": "", "generate": "x"}
    path.write_text(json.dumps(done) + "\n" + '{"instruction": "b", "inp', encoding="utf-8")
    _mark_as_ours(path)
    assert read_predictions(str(path)) == [done]
    assert path.read_text(encoding="utf-8") == json.dumps(done) + "\n"
    run = PredictionRun([{"instruction": "b", "input": ""}, {"instruction": "a", "input": ""}], str(path), sources=[])
    assert run.todo == [0]
    with pytest.raises(UserError, match="predictions of 1 records that are not in --data"):
        PredictionRun([{"instruction": "c", "input": ""}], str(path), sources=[])
    assert PredictionRun([{"instruction": "c", "input": ""}], str(path), sources=[], overwrite=True).todo == [0]
    path.write_text("not json\n", encoding="utf-8")
    with pytest.raises(UserError, match="p.jsonl:1: not a prediction line"):
        read_predictions(str(path))


def test_a_complete_file_is_put_in_input_order(tmp_path) -> None:
    # As if killed after the last batch (batches are written longest prompt first) but before the reorder.
    records = [{"instruction": "short", "input": ""}, {"instruction": "a longer one", "input": ""}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({**r, "generate": "x"}) + "\n" for r in reversed(records)), encoding="utf-8")
    _mark_as_ours(path)
    run = PredictionRun(records, str(path), sources=[])
    assert run.todo == []
    assert [r["instruction"] for r in run.finish()] == ["short", "a longer one"]
    assert [r["instruction"] for r in _lines(str(path))] == ["short", "a longer one"]


def _predict(data: str, result_dir: str, **flags) -> None:
    """predict.py's main in-process; a model is never needed since every case here stops before loading one."""
    load_script("predict.py").main(data=data, result_dir=result_dir, lora_dir="/nonexistent", **flags)


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_predict_did_not_write_is_refused_untouched(tmp_path, overwrite: bool) -> None:
    data = tmp_path / "in.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}]), encoding="utf-8")
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"my notes, without a final newline")
    with pytest.raises(UserError, match=rf"^--result_dir {notes}: {notes} exists and was not written by predict.py"):
        _predict(str(data), str(notes), overwrite=overwrite)
    assert notes.read_bytes() == b"my notes, without a final newline"
    # A result folder holding someone else's files, or a metrics file beside a new predictions file.
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "summary.md").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="summary.md exists and was not written by predict.py"):
        _predict(str(data), str(folder), overwrite=overwrite)
    (tmp_path / "new.metrics.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="new.metrics.json exists and was not written by predict.py"):
        _predict(str(data), str(tmp_path / "new.jsonl"), overwrite=overwrite)
    assert sorted(os.listdir(tmp_path)) == ["in.json", "new.metrics.json", "notes.txt", "results"]
    assert os.listdir(folder) == ["summary.md"]


def test_the_data_file_is_never_the_result(tmp_path) -> None:
    data = tmp_path / "test.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}], indent=1), encoding="utf-8")
    before = data.read_bytes()
    for flags in ({}, {"overwrite": True}):
        with pytest.raises(UserError, match=rf"^--result_dir {data}: {data} is a --data file"):
            _predict(str(data), str(data), **flags)
    # Also when it is predict.py's own predictions file, given back as --data.
    _mark_as_ours(data)
    with pytest.raises(UserError, match="is a --data file"):
        _predict(str(data), str(data))
    assert data.read_bytes() == before


def _lines(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_predict_resumes_after_being_killed(trained_adapter: str, alpaca_file: str, tmp_path) -> None:
    out = str(tmp_path / "yyy.txt")
    # The seed's command line, plus a small batch and sample count to have a run to kill.
    cmd = [PYTHON, os.path.join(ROOT, "predict.py"), "--model_type", "chatglm", "--size", "6b", "--data", alpaca_file,
           "--lora_dir", trained_adapter, "--result_dir", out, "--max_samples", "24", "--predict_batch_size", "2",
           "--max_new_tokens", "48", "--metrics"]
    env = {**os.environ, **ONE_THREAD}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if os.path.exists(out) and len(read_predictions(out)) >= 2:
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert first.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    killed = _lines(out)
    assert 2 <= len(killed) < 24 and len(killed) % 2 == 0  # whole batches only
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"instruction": "a line torn by the ki')  # as if the kill came mid-write

    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(killed)} of 24 records are already in {out}; predicting {24 - len(killed)}" in proc.stdout
    final = _lines(out)
    with open(alpaca_file, encoding="utf-8") as f:
        inputs = json.load(f)[:24]
    assert [{k: v for k, v in r.items() if k != "generate"} for r in final] == inputs  # input order
    assert all(row in final for row in killed)  # what the killed run wrote is kept as it was
    with open(out.replace(".txt", ".metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    assert metrics["records"] == 24 and metrics["rouge_l"]["records"] + metrics["exact_match"]["records"] == 24

    # A third run finds everything done and loads no model.
    before = Path(out).read_bytes()
    load_script("predict.py").main(data=alpaca_file, result_dir=out, max_samples=24, lora_dir="/nonexistent")
    assert Path(out).read_bytes() == before
