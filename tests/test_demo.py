"""The main job's data (scripts/demo_data.py): the shared folder as a mirror, the hub's original collection
without it (huggingface_hub stand-ins serving real files), and one sentence when neither is there."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import huggingface_hub
import pytest

from alpaca_cot.data import sources
from alpaca_cot.data.cot import split_cot
from alpaca_cot.evaluation.answers import final_answer
from data import catalog, curation
from tests.conftest import ROOT, run_script, shared_path


def _demo_data():
    spec = importlib.util.spec_from_file_location("demo_data", os.path.join(ROOT, "scripts", "demo_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(path) -> list[dict]:
    return json.loads(open(path, encoding="utf-8").read())


def _check_split(out) -> tuple[list[dict], list[dict]]:
    train, held = _read(out / "train.json"), _read(out / "heldout.json")
    assert len(train) == 24 and len(held) == 6
    assert all(final_answer(r)[0] == "yesno" for r in held)
    _, dropped = curation.decontaminate(train, held)
    assert not dropped  # no training record shares a 13-gram with a held-out question or answer
    return train, held


def test_the_mirror_is_used_first(tmp_path, monkeypatch) -> None:
    shared = os.path.dirname(os.path.dirname(shared_path("data", "raw")))
    monkeypatch.setenv("ALPACA_COT_SHARED", shared)
    demo_data = _demo_data()
    monkeypatch.setattr(catalog, "download", lambda name: pytest.fail("the hub was asked despite the mirror"))
    demo_data.main(out=str(tmp_path / "a"), train=24, heldout=6)
    train, held = _check_split(tmp_path / "a")
    assert sum(split_cot(r) is not None for r in train) == 12  # half of the mix is chain-of-thought
    demo_data.main(out=str(tmp_path / "b"), train=24, heldout=6)
    assert (_read(tmp_path / "b" / "train.json"), _read(tmp_path / "b" / "heldout.json")) == (train, held)


def test_without_a_mirror_the_hub_collection_is_downloaded_once(tmp_path, monkeypatch) -> None:
    """Stand-ins serve real files: the original Stanford Alpaca rows as alpaca/alpaca_data_cleaned.json, and
    Alpaca-CoT's own StrategyQA conversion as Chain-of-Thought/CoT_data.json."""
    served = {"alpaca/alpaca_data_cleaned.json": shared_path("data", "raw", "alpaca_chinese_dataset",
                                                             "alpaca_data-0-3252-英文.json"),
              "Chain-of-Thought/CoT_data.json": shared_path("data", "raw", "alpaca_cot", "formatted_cot_data",
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
    assert sorted(os.listdir(tmp_path / "data")) == ["CoT_data.json", "alpaca_data_cleaned.json"]  # --data NAME
    _check_split(tmp_path / "a")
    demo_data.main(out=str(tmp_path / "b"), train=24, heldout=6)
    assert len(calls) == 2  # the second run reads what the first downloaded


def test_offline_without_a_mirror_says_what_to_do(tmp_path) -> None:
    try:
        sources.resolve_data(["alpaca"])
        pytest.skip("data/ already holds the hub's alpaca files, so nothing needs the hub")
    except sources.DataError:
        pass
    proc = run_script("scripts/demo_data.py", "--out", str(tmp_path / "out"), check=False,
                      env={"HF_HUB_OFFLINE": "1", "ALPACA_COT_SHARED": str(tmp_path / "none")})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ALPACA_COT_SHARED" in lines[0] and "online" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
