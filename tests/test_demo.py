"""The main job's data (scripts/demo_data.py): the shared folder as a mirror, the hub's original collection
without it (huggingface_hub stand-ins serving real files), one sentence when neither is there, the out-of-set
yes/no claims and the closing table; and the CoT ablation's own measurements (scripts/cot_ablation.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import huggingface_hub
import pytest

from alpaca_cot.data import sources
from alpaca_cot.evaluation.answers import final_answer
from data import catalog, curation
from tests.conftest import ROOT, run_script, shared_path


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _demo_data():
    return _script("demo_data")


def _read(path) -> list[dict]:
    return json.loads(open(path, encoding="utf-8").read())


def _check_split(out, demo_data, train_count: int = 24, others: tuple[str, ...] = ()) -> tuple[list[dict], list[dict]]:
    train, held = _read(out / "train.json"), _read(out / "heldout.json")
    assert len(train) == train_count and len(held) == 6
    evaluated = held + [r for name in others for r in _read(out / f"{name}.json")]
    for record in train + evaluated:  # one phrasing: the question, the ASK line; the rationale, then the answer
        assert record["instruction"].endswith(f"\n{demo_data.ASK}")
        assert record["output"].endswith(("\nSo the answer is yes.", "\nSo the answer is no."))
        assert final_answer(record)[0] == "yesno"
    answers = [demo_data.answer_of(r) for r in train]
    assert answers.count("yes") == answers.count("no") == train_count // 2  # no answer prior to learn
    # no training record shares a 13-gram with an evaluated question or answer, the shared ASK line aside
    _, dropped = curation.decontaminate([demo_data.content(r) for r in train],
                                        [demo_data.content(r) for r in evaluated])
    assert not dropped
    _, dropped = curation.decontaminate(train, held)
    assert dropped  # the check above can fail: with the ASK line every record shares 13-grams
    return train, held


def test_the_mirror_is_used_first(tmp_path, monkeypatch) -> None:
    shared = os.path.dirname(os.path.dirname(shared_path("data", "raw")))
    monkeypatch.setenv("ALPACA_COT_SHARED", shared)
    demo_data = _demo_data()
    monkeypatch.setattr(catalog, "download", lambda name: pytest.fail("the hub was asked despite the mirror"))
    demo_data.main(out=str(tmp_path / "a"), train=24, train_claims=8, heldout=6, out_of_set_records=5)
    others = ("sensemaking_yesno", "qasc_yesno")
    train, held = _check_split(tmp_path / "a", demo_data, 32, others)
    assert all(len(_read(tmp_path / "a" / f"{name}.json")) == 5 for name in others)
    claims = [r for r in train if "\nProposed answer: " in r["instruction"]]
    assert len(claims) == 8 and sorted(map(demo_data.answer_of, claims)) == ["no"] * 4 + ["yes"] * 4
    demo_data.main(out=str(tmp_path / "b"), train=24, train_claims=8, heldout=6, out_of_set_records=5)
    assert (_read(tmp_path / "b" / "train.json"), _read(tmp_path / "b" / "heldout.json")) == (train, held)


def test_out_of_set_claims_from_real_rows() -> None:
    """A Sen-Making row asks which sentence is against common sense: that sentence makes no sense (no), the other
    does (yes). A multiple-choice row proposes its right option (yes) or a wrong one (no)."""
    raw = shared_path("data", "raw")
    demo_data = _demo_data()

    class Pick:  # a stand-in rng: chooses the given letter, then says "right option" or not
        def __init__(self, letter: str, right: bool):
            self.letter, self.right = letter, right

        def choice(self, options):
            return self.letter if options == "AB" else options[-1]

        def random(self) -> float:
            return 0.0 if self.right else 0.9

    row = demo_data.flan_rows(raw, "sensemaking")[0]
    assert row[2] == "Sentence A" and "orange juice" in row[0]
    nonsense = demo_data.sensemaking_claim(*row, Pick("A", True))
    assert nonsense["instruction"].startswith('Does this sentence make sense? "He poured orange juice on his cereal."')
    assert demo_data.answer_of(nonsense) == "no"
    assert demo_data.answer_of(demo_data.sensemaking_claim(*row, Pick("B", True))) == "yes"
    row = demo_data.flan_rows(raw, "qasc")[0]
    assert row[2] == "(D)"
    right, wrong = (demo_data.option_claim(*row, Pick("A", r)) for r in (True, False))
    assert "\nProposed answer: sex\n" in right["instruction"] and demo_data.answer_of(right) == "yes"
    assert "\nProposed answer: ovum\n" in wrong["instruction"] and demo_data.answer_of(wrong) == "no"
    assert "Options:" not in right["instruction"]


def test_closing_table_shows_each_score_of_evaluate(tmp_path) -> None:
    """The closing table takes accuracy, exact match, the stated share and the loss from evaluate.py's results."""
    shares = {"before": {"value": 0.5, "ci95": [0.15, 0.85]}, "after": {"value": 1.0, "ci95": [0.51, 1.0]}}
    for name, stated in shares.items():
        (tmp_path / name).mkdir()
        result = {"scored": 4, "accuracy": {"value": 0.25, "ci95": [0.05, 0.7]},
                  "exact_match": {"value": 0.75, "ci95": [0.3, 0.95]}, "stated": stated, "eval_loss": 1.5}
        (tmp_path / name / "results.json").write_text(json.dumps({"data": {"heldout": result}}))
    table = _demo_data().closing_table(str(tmp_path)).splitlines()
    assert table[2].endswith("| before fine-tuning, n=4 | 25% [5, 70] | 75% [30, 95] | 50% [15, 85] | 1.500 |")
    assert table[3].endswith("| 100% [51, 100] | 1.500 |")


def test_ablation_measures_rationale_first_and_reads_loss_curves(tmp_path) -> None:
    ablation = _script("cot_ablation")
    log = ("  4%|4 | 2/50 [00:50<19:28]{'loss': '2.369', 'grad_norm': '0.8066', 'learning_rate': '0.0008', "
           "'epoch': '0.1'}\n 10%|# | 5/50\r{'loss': '1.97', 'grad_norm': '0.7', 'learning_rate': '0.0008', "
           "'epoch': '0.2'}\n{'train_runtime': '232.7', 'train_loss': '1.903', 'epoch': '1'}\n")
    assert ablation.loss_curve(log) == [[0.1, 2.369], [0.2, 1.97]]
    rows = [{"kind": "yesno", "generation": "Birds have wings and feathers, and most of them can fly far.\n"
                                            "So the answer is yes."},  # 12 words first: a rationale
            {"kind": "yesno", "generation": "The answer is yes. Birds have wings and feathers, so they fly."},
            {"kind": "letter", "generation": "Plants need light to grow and they make food from it; water "
                                             "helps too.\nSo the answer is (B).\nThe answer is (C)."},
            {"kind": "yesno", "generation": "Birds have wings and feathers, and most of them can fly far."}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rates = ablation.claim_rates(str(tmp_path / "s.jsonl"))
    assert (rates["stated"]["correct"], rates["rationale_first"]["correct"], rates["stated"]["records"]) == (3, 2, 4)


def test_without_a_mirror_the_hub_collection_is_downloaded_once(tmp_path, monkeypatch) -> None:
    """A stand-in serves a real file: Alpaca-CoT's own StrategyQA conversion as Chain-of-Thought/CoT_data.json,
    whose yes/no records are rephrased the main job's one way (no out-of-set sets without the mirror)."""
    served = {"Chain-of-Thought/CoT_data.json": shared_path("data", "raw", "alpaca_cot", "formatted_cot_data",
                                                            "strategyqa_train.json")}
    calls = []

    def hf_hub_download(repo_id: str, filename: str, *, repo_type: str, local_dir: str) -> str:
        calls.append((repo_id, filename, repo_type))
        target = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(served[filename], target)
        return target

    monkeypatch.setenv("ALPACA_COT_SHARED", str(tmp_path / "no-mirror"))
    monkeypatch.setattr(sources, "DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(catalog, "_require_hub", lambda name: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    (tmp_path / "data").mkdir()
    demo_data = _demo_data()
    demo_data.main(out=str(tmp_path / "a"), train=24, heldout=6)
    assert sorted(calls) == sorted((sources.HF_DATASET, name, "dataset") for name in served)
    assert sorted(os.listdir(tmp_path / "data")) == ["CoT_data.json"]  # where --data cot finds it
    train, held = _check_split(tmp_path / "a", demo_data)
    assert sorted(os.listdir(tmp_path / "a")) == ["heldout.json", "train.json"]
    originals = {r["instruction"].strip(): r["output"] for r in _read(served["Chain-of-Thought/CoT_data.json"])}
    for record in train + held:  # the rationale without the hub's own answer sentence ("So, the answer is no.")
        question = record["instruction"].removesuffix(f"\n{demo_data.ASK}")
        rationale = record["output"].rsplit("\nSo the answer is ", 1)[0].rstrip(".")
        assert originals[question].startswith(rationale)
        rest = originals[question][len(rationale):].lower()
        assert "answer" in rest and demo_data.answer_of(record) in rest and "answer" not in rationale.lower()
    demo_data.main(out=str(tmp_path / "b"), train=24, heldout=6)
    assert len(calls) == 1  # the second run reads what the first downloaded


def test_offline_without_a_mirror_says_what_to_do(tmp_path) -> None:
    try:
        sources.resolve_data(["cot"])
        pytest.skip("data/ already holds the hub's cot files, so nothing needs the hub")
    except sources.DataError:
        pass
    proc = run_script("scripts/demo_data.py", "--out", str(tmp_path / "out"), check=False,
                      env={"HF_HUB_OFFLINE": "1", "ALPACA_COT_SHARED": str(tmp_path / "none")})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ALPACA_COT_SHARED" in lines[0] and "online" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
