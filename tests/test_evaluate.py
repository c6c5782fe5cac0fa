"""evaluate.py: final answers read back from real CoT rows, scoring, Wilson intervals, few-shot prompts, the
eval loss, the resumable output folder, and lm-evaluation-harness on the shipped offline task config."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

from alpaca_cot.config import DEFAULT_TASK_DIR, EvaluateArgs
from alpaca_cot.errors import UserError
from alpaca_cot.evaluation.answers import final_answer, options_of, score_generation, statement
from alpaca_cot.evaluation.generative import answer_loss, build_items
from alpaca_cot.evaluation.run import prepare_output_dir
from alpaca_cot.evaluation.stats import wilson_interval
from alpaca_cot.models.loading import load_for_inference
from data.converters import convert_file
from tests.conftest import run_main, run_script, shared_path

# FLAN CoT files and the kind of answer each holds (../shared/data/raw/SOURCES.md: aqua and qasc
# "(A)".."(H)", strategyqa yes/no, gsm8k a number, ecqa the option text, sensemaking "Sentence A/B").
KINDS = {"aqua": "letter", "qasc": "letter", "strategyqa": "yesno", "gsm8k": "number", "ecqa": "text",
         "sensemaking": "text"}
ROWS = 300  # per file: every phrasing of every dataset occurs in this many rows


def _tsv_rows(name: str) -> list[tuple[str, str, str]]:
    path = shared_path("data", "raw", "flan_v2_cot", f"{name}_train.tsv")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[:ROWS]  # records end at \n only (gsm8k holds U+2028)
    return [tuple(field.replace("\\n", "\n").strip() for field in line.split("\t")) for line in lines]


def _expected(kind: str, answer: str) -> str:
    return {"letter": answer.strip("()"), "yesno": answer.lower()}.get(kind, answer)


def _converted(name: str, plain: bool) -> list[dict]:
    """The first ROWS rows of a FLAN CoT file, converted (phrased with seed 42, or plain)."""
    path = shared_path("data", "raw", "flan_v2_cot", f"{name}_train.tsv")
    with open(path, encoding="utf-8") as f:
        head = "\n".join(f.read().split("\n")[:ROWS]) + "\n"
    with tempfile.TemporaryDirectory() as folder:
        sample = os.path.join(folder, f"{name}_train.tsv")  # the file name names the dataset's phrasings
        with open(sample, "w", encoding="utf-8") as f:
            f.write(head)
        records, report = convert_file(sample, plain=plain)
    assert not report.bad
    return records


@pytest.mark.parametrize("name", sorted(KINDS))
@pytest.mark.parametrize("plain", [False, True], ids=["phrased", "plain"])
def test_final_answers_of_real_cot_rows(name: str, plain: bool) -> None:
    """Every converted row's final answer is the TSV's answer column, of the file's kind, whichever
    phrasing the converter drew (read back with split_cot) or as a plain question and answer."""
    rows = _tsv_rows(name)
    records = _converted(name, plain)
    assert len(records) == len(rows) == ROWS
    for (_, answer, _), record in zip(rows, records, strict=True):
        assert final_answer(record) == (KINDS[name], _expected(KINDS[name], answer)), record


@pytest.mark.parametrize("name", sorted(KINDS))
def test_the_reference_scores_right_and_a_wrong_answer_wrong(name: str) -> None:
    """A model that writes the reference is right, strictly; one that ends on another answer is wrong."""
    rows = _tsv_rows(name)
    answers = sorted({answer for _, answer, _ in rows})
    for record, (question, _, rationale) in zip(_converted(name, False), rows, strict=True):
        kind, expected = final_answer(record)
        scored = score_generation(record["output"], kind, expected, record["instruction"])
        assert scored["exact_match"] and scored["correct"], (record, scored)
        if statement(rationale, kind) is not None:
            continue  # its own rationale states an answer first ("Answer = D. 130 miles"): 5 aqua rows
        # another option of the question where it lists some, else another answer of the file
        choices = [f"({letter})" if letter else text for letter, text in options_of(question)] or answers
        wrong = next(a for a in choices if _expected(kind, a).lower() != expected.lower())
        scored = score_generation(f"{rationale}\nSo the answer is {wrong}.", kind, expected, question)
        assert not scored["correct"] and not scored["exact_match"], (record, wrong, scored)


@pytest.mark.parametrize(("generation", "kind", "answer", "question", "exact", "correct"), [
    ("yes", "yesno", "yes", "", True, True),
    ("Yes, because it has nine seats.", "yesno", "yes", "", False, True),  # found, not stated the data's way
    ("It has nine seats, so no.", "yesno", "yes", "", False, False),
    ("48 / 2 = 24 clips in May, 72 in all.", "number", "72", "", False, True),  # the last number
    ("The answer is $1,250.00.", "number", "1250", "", True, True),
    ("The answer is sex.", "letter", "D", "Q?\nOptions:\n- (A) DNA\n- (D) sex", True, True),  # the option's text
    ("Either (A) or (D).", "letter", "D", "Q?\nOptions:\n- (A) DNA\n- (D) sex", False, True),  # the last letter
    ("A bedroom, not roses.", "text", "roses", "Q?\nOptions:\n- bedroom\n- roses", False, True),  # the last option
    ("So the answer is Sentence A.", "text", "Sentence A",
     'Which?\nOptions:\n- Sentence A: "He drinks apple."\n- Sentence B: "He drinks milk."', True, True),
    ("Blah blah.", "text", "bookstore", "", False, False),
])
def test_strict_and_flexible_scores(generation: str, kind: str, answer: str, question: str, exact: bool,
                                    correct: bool) -> None:
    scored = score_generation(generation, kind, answer, question)
    assert (scored["exact_match"], scored["correct"]) == (exact, correct), scored


def test_options_are_read_from_the_question() -> None:
    assert options_of("What?\nOptions:\n- (A) DNA\n- (B) bird") == [("A", "DNA"), ("B", "bird")]
    assert options_of("Q\n(A)32400\n(B) 6000") == [("A", "32400"), ("B", "6000")]
    assert options_of("Q\nOptions:\n- bloody mess\n- cake") == [(None, "bloody mess"), (None, "cake")]


def test_wilson_interval() -> None:
    """Known values (Newcombe 1998, Table I): 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605; 0/20 -> 0-0.1611."""
    for (k, n), (low, high) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                                (0, 20): (0.0, 0.1611)}.items():
        got = wilson_interval(k, n)
        assert got == pytest.approx((low, high), abs=5e-5)


def test_few_shot_prompts() -> None:
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]
    zero = build_items(records, 3, 0, seed=0)
    assert zero == [{"index": i, "instruction": f"q{i}", "input": ""} for i in range(3)]  # no answer in the prompt
    items = build_items(records, 10, 3, seed=0)
    for item in items:
        turns = item["messages"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * 3 + ["user"]
        assert turns[-1]["content"] == f"q{item['index']}"
        shots = [t["content"] for t in turns[:-1:2]]
        assert f"q{item['index']}" not in shots and len(set(shots)) == 3  # never the record itself
        assert all(a["content"] == "a" + q["content"][1:] for q, a in zip(turns[:-1:2], turns[1::2], strict=True))
    assert build_items(records, 10, 3, seed=0) == items  # deterministic
    assert build_items(records, 10, 3, seed=1) != items
    with pytest.raises(UserError, match="--num_fewshot 10"):
        build_items(records, 10, 10, seed=0)


def test_eval_loss_is_the_masked_answer_loss(tiny_model_dir: str) -> None:
    """answer_loss equals the model's own loss over the answer tokens (prompt masked), record by record,
    and the token-weighted mean of two records whatever the batch size."""
    from alpaca_cot.data.encoding import IGNORE_INDEX, encode_records

    model, tokenizer, template = load_for_inference(model_name_or_path=tiny_model_dir, compute_dtype="fp32")
    records = [{"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. So the answer is 5."},
               {"instruction": "Is snow cold?", "input": "", "output": "yes"}]
    losses, counts = [], []
    for record in records:
        encoded = encode_records([record], template, tokenizer, 256)[0]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([encoded.input_ids]), labels=torch.tensor([encoded.labels]))
        losses.append(out.loss.item())
        counts.append(sum(label != IGNORE_INDEX for label in encoded.labels[1:]))
        assert answer_loss(model, tokenizer, template, [record], 256, 1) == pytest.approx(losses[-1], rel=1e-5)
    mean = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
    for batch_size in (1, 2):
        assert answer_loss(model, tokenizer, template, records, 256, batch_size) == pytest.approx(mean, rel=1e-5)


def test_the_output_folder_is_owned(tmp_path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        prepare_output_dir(str(foreign), {"a": 1}, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine" and len(os.listdir(foreign)) == 1
    ours = tmp_path / "ours"
    prepare_output_dir(str(ours), {"a": 1}, overwrite=False)
    prepare_output_dir(str(ours), {"a": 1}, overwrite=False)  # same settings: resumes
    with pytest.raises(UserError, match=r"other settings \(a\)"):
        prepare_output_dir(str(ours), {"a": 2}, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="existing file"):
        prepare_output_dir(str(tmp_path / "file"), {}, overwrite=False)
    with pytest.raises(UserError, match="--data .* or --tasks"):
        EvaluateArgs(output_dir=str(ours))
    with pytest.raises(UserError, match="--output_dir"):
        EvaluateArgs(data=["x.json"])


def _generations(record: dict, i: int) -> str:
    """One of six ways a model answers, by position: the reference; right then running on into a new
    question answered otherwise; wrong first and right after; the answer with a reason; the answer only
    inside the reasoning; nothing."""
    kind, answer = final_answer(record)
    wrong = {"yesno": "no" if answer == "yes" else "yes", "number": answer + "1", "letter": "(Z)"}.get(kind, "nothing")
    shown = f"({answer})" if kind == "letter" else answer
    return [record["output"],
            f"So the answer is {shown}.\n\nQuestion: something else?\nSo the answer is {wrong}.",
            f"So the answer is {wrong}.\n\nQuestion: something else?\nSo the answer is {shown}.",
            f"The answer is {shown}, because that is what the facts say.",
            f"Thinking of {shown} here, I am not sure.",
            ""][i % 6]


def test_predict_and_evaluate_score_the_same_generations_alike(tmp_path) -> None:
    """predict.py --metrics and evaluate.py's scoring, run on the same generations of real CoT rows, give
    the same exact match, accuracy and share of stated answers (and the first statement counts)."""
    from alpaca_cot.evaluation.generative import LazyModel, evaluate_data
    from alpaca_cot.outputs import write_marker
    from alpaca_cot.prediction import output_paths, run_file_path
    from tests.test_predict import load_script

    records = [r for name in ("strategyqa", "gsm8k", "aqua", "ecqa") for r in _converted(name, False)[:30]]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    generations = [_generations(record, i) for i, record in enumerate(records)]

    def written(result_dir, rows: list[dict]) -> None:  # as a finished run leaves it: nothing left to generate
        path = output_paths(str(result_dir))[0]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lines = [json.dumps({**row, "generate": g}) + "\n" for row, g in zip(rows, generations, strict=True)]
        open(path, "w").write("".join(lines))
        write_marker(run_file_path(str(result_dir)), "predict")

    written(tmp_path / "predict", records)
    load_script("predict.py").main(data=str(data), result_dir=str(tmp_path / "predict"), metrics=True,
                                   lora_dir="/nonexistent")
    predicted = json.loads((tmp_path / "predict" / "metrics.json").read_text())["exact_match"]
    out = tmp_path / "eval"
    written(out / "generations" / "mixed.jsonl", build_items(records, len(records), 0, 0))
    evaluated = evaluate_data(str(data), LazyModel({}), None, EvaluateArgs(data=[str(data)], output_dir=str(out),
                                                                          eval_loss=False))
    assert predicted["records"] == evaluated["scored"] == 120
    assert predicted["accuracy"] == evaluated["exact_match"]["value"] == 60 / 120  # the reference, right first, reason
    assert predicted["stated"] == evaluated["stated"]["value"] == 80 / 120  # and wrong first
    assert predicted["flexible_accuracy"] == evaluated["accuracy"]["value"] == 100 / 120  # all but the empty


@pytest.fixture(scope="module")
def strategyqa_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """12 real StrategyQA rows in our CoT phrasing (yes/no answers)."""
    path = tmp_path_factory.mktemp("eval-data") / "strategyqa12.json"
    path.write_text(json.dumps(_converted("strategyqa", False)[:12]), encoding="utf-8")
    return str(path)


def _run(*args: str, check: bool = True):
    return run_script("evaluate.py", *args, "--compute_dtype", "fp32", "--max_new_tokens", "24", check=check)


@pytest.mark.slow
def test_evaluate_writes_results_and_resumes(trained_adapter: str, strategyqa_file: str, tmp_path) -> None:
    out = tmp_path / "eval"
    args = ("--lora_dir", trained_adapter, "--data", strategyqa_file, "--output_dir", str(out), "--num_fewshot", "1",
            "--eval_batch_size", "4")
    first = _run(*args)
    results = json.loads((out / "results.json").read_text())
    r = results["data"]["strategyqa12"]
    assert r["records"] == r["scored"] == 12 and r["kinds"]["yesno"] == 12 and r["num_fewshot"] == 1
    for metric in ("accuracy", "exact_match", "stated"):
        p = r[metric]
        assert p["records"] == 12 and p["value"] == p["correct"] / 12
        assert tuple(p["ci95"]) == pytest.approx(wilson_interval(p["correct"], 12))
    assert r["exact_match"]["correct"] <= min(r["accuracy"]["correct"], r["stated"]["correct"])
    assert 0 < r["eval_loss"] < 20
    rows = [json.loads(line) for line in (out / "generations" / "strategyqa12.scored.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(12))
    assert sum(row["correct"] for row in rows) == r["accuracy"]["correct"]
    assert sum(row["stated"] for row in rows) == r["stated"]["correct"]
    assert all(row["answer"] in ("yes", "no") and len(row["prompt"]["messages"]) == 3 for row in rows)
    table = (out / "results.md").read_text()
    assert "| strategyqa12 | 12 |" in table and table in first.stdout

    # As if killed after the first batch: the rerun generates only the rest, greedy, and gets the same scores.
    generations = out / "generations" / "strategyqa12.jsonl"
    lines = generations.read_text().splitlines(keepends=True)
    generations.write_text("".join(lines[:4]))
    second = _run(*args)
    assert "4 of 12 records already generated; generating 8" in second.stdout
    resumed = json.loads((out / "results.json").read_text())["data"]["strategyqa12"]
    assert {**resumed, "seconds": None} == {**r, "seconds": None}
    assert [json.loads(line) for line in (out / "generations" / "strategyqa12.scored.jsonl").read_text()
            .splitlines()] == rows
    third = _run(*args)
    assert "generating" not in third.stdout and "Loading weights" not in third.stderr  # nothing left: no model

    changed = _run(*args[:-4], "--num_fewshot", "0", check=False)
    assert changed.returncode == 2 and changed.stderr.strip().splitlines()[-1].startswith("error: --output_dir")
    assert len(changed.stderr.strip().splitlines()) == 1


def test_bad_flags_are_one_line(tmp_path, strategyqa_file: str) -> None:
    for args, message in [(("--output_dir", str(tmp_path / "a")), "Pass --data"),
                          (("--data", "no-such-set", "--output_dir", str(tmp_path / "b")), "no-such-set"),
                          (("--data", strategyqa_file, "--output_dir", str(tmp_path / "c"), "--num_fewshot", "-1"),
                           "--num_fewshot"),
                          (("--tasks", "no_such_task_xyz", "--model_name_or_path", "x", "--output_dir",
                            str(tmp_path / "d")), "unknown lm-eval task no_such_task_xyz")]:
        code, _, err = run_main("evaluate.py", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert message in err
    assert not os.listdir(tmp_path)  # a refused evaluation leaves nothing behind (no OUT/run.json)


@pytest.mark.slow
def test_lm_eval_offline_task_with_the_adapter(trained_adapter: str, tiny_lm_dir: str, tmp_path) -> None:
    """The shipped task config reads its local JSONL with HF_HUB_OFFLINE=1; lm-eval's HF model gets
    pretrained=BASE,peft=ADAPTER, and the adapter changes its log-likelihoods (so it was applied)."""
    pytest.importorskip("lm_eval")
    assert os.path.isfile(os.path.join(DEFAULT_TASK_DIR, "alpaca_cot_yesno.yaml"))

    def run(name: str, *model: str) -> tuple[dict, list[dict]]:
        out = tmp_path / name
        run_script("evaluate.py", *model, "--tasks", "alpaca_cot_yesno", "--num_fewshot", "2", "--output_dir",
                   str(out), "--compute_dtype", "fp32", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        results = json.loads((out / "results.json").read_text())["lm_eval"]
        samples = [json.loads(line) for line in (out / "lm_eval" / "alpaca_cot_yesno.samples.jsonl").open()]
        return results, samples

    adapted, adapted_samples = run("adapted", "--lora_dir", trained_adapter)
    assert adapted["model_args"] == f"pretrained={tiny_lm_dir},peft={trained_adapter},dtype=float32"
    assert adapted["n_samples"]["alpaca_cot_yesno"]["effective"] == 16  # the test split of the shipped file
    assert 0 <= adapted["results"]["alpaca_cot_yesno"]["acc,none"] <= 1
    assert len(adapted_samples) == 16
    base, base_samples = run("base", "--model_name_or_path", tiny_lm_dir)
    assert base["model_args"] == f"pretrained={tiny_lm_dir},dtype=float32"
    assert [s["resps"] for s in adapted_samples] != [s["resps"] for s in base_samples]
