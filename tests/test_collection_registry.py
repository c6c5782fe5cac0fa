"""Every registry name trains by name: ``download NAME`` puts the files where ``--data NAME`` finds
them. The Hub cannot be reached from the tests, so huggingface_hub's download functions are
replaced by stand-ins that write small unified files of the right layout (a file, or a folder with
nested .json and .jsonl parts) into the folder they are given; everything else is the real path."""

from __future__ import annotations

import json
import os

import huggingface_hub
import pytest

from alpaca_cot.data import sources
from alpaca_cot.data.records import DataError
from alpaca_cot.data.sources import HF_DATASET, load_registry, resolve_data
from data import catalog
from data.collection import download
from tests.data_helpers import load_data

REGISTRY = load_registry()
RECORD = {"instruction": "Name a prime number.", "input": "", "output": "7"}


class FakeHub:
    """Stand-ins for ``hf_hub_download`` and ``snapshot_download`` that record their calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def hf_hub_download(self, repo_id: str, filename: str, *, repo_type: str, local_dir: str) -> str:
        self.calls.append(("file", repo_id, repo_type, filename))
        path = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump([RECORD, {**RECORD, "output": "11"}], f)
        return path

    def snapshot_download(self, repo_id: str, *, repo_type: str, allow_patterns: str, local_dir: str) -> str:
        self.calls.append(("folder", repo_id, repo_type, allow_patterns))
        folder = os.path.join(local_dir, allow_patterns.removesuffix("**"))
        os.makedirs(os.path.join(folder, "part2"), exist_ok=True)
        with open(os.path.join(folder, "part1.json"), "w", encoding="utf-8") as f:
            json.dump([RECORD], f)
        with open(os.path.join(folder, "part2", "rows.jsonl"), "w", encoding="utf-8") as f:
            f.write(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "output": "13"}) + "\n")
        return local_dir


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    """An empty data folder and the stand-in Hub (reachable)."""
    fake = FakeHub()
    monkeypatch.setattr(sources, "DATA_DIR", str(tmp_path))
    monkeypatch.setattr(catalog, "_require_hub", lambda name: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def _hf_files(name: str) -> list[str]:
    entry = REGISTRY[name]
    if "combine" in entry:
        return [f for part in entry["combine"] for f in _hf_files(part)]
    return entry["hf_files"]


DOWNLOADABLE = [name for name in REGISTRY if _hf_files(name)]


def test_every_name_with_hub_files_has_local_files():
    assert len(DOWNLOADABLE) == len(REGISTRY) - 1  # stackllama is not in the Hugging Face dataset
    for name, entry in REGISTRY.items():
        if "files" in entry and entry["hf_files"]:
            assert len(entry["files"]) == len(entry["hf_files"]), name
            for local, remote in zip(entry["files"], entry["hf_files"], strict=True):
                assert local.endswith("/") == remote.endswith("/"), name


@pytest.mark.parametrize("name", DOWNLOADABLE)
def test_download_then_data_name_resolves(name, hub, capsys):
    with pytest.raises(DataError) as missing:
        resolve_data([name])
    assert f"data/collection.py download {name}`" in str(missing.value)
    download(name)  # the step that error advises
    hf_files = list(dict.fromkeys(_hf_files(name)))
    assert [call[3].removesuffix("**") for call in hub.calls] == hf_files
    assert all(call[1:3] == (HF_DATASET, "dataset") for call in hub.calls)
    records = load_data([name])
    # a file stand-in holds 2 records, a folder stand-in 3 (one .json, one nested .jsonl)
    assert len(records) == sum(3 if f.endswith("/") else 2 for f in hf_files)
    assert {r["output"] for r in records} <= {"7", "11", "13"}
    assert f"downloaded {len(resolve_data([name]))} files" in capsys.readouterr().out


def test_name_outside_the_hub_does_not_advise_download(hub):
    with pytest.raises(DataError) as error:
        resolve_data(["stackllama"])
    message = str(error.value)
    assert "download" not in message and "status: planned" in message and "convert SOURCE OUT.json" in message
    with pytest.raises(DataError, match="has no file in the Hugging Face dataset"):
        download("stackllama")


def test_folder_without_unified_files_advises_convert_not_download(hub, tmp_path):
    (tmp_path / "CSL").mkdir()
    (tmp_path / "CSL" / "csl.tsv").write_text("title\tabstract\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        resolve_data(["csl"])
    message = str(error.value)
    assert "holds no .json/.jsonl/.parquet/.csv files (it holds csl.tsv)" in message
    assert "download" not in message and "data/collection.py convert" in message
