"""``--data`` resolution: short dataset names (through ``data/registry.json``) or file paths."""

from __future__ import annotations

import json
import os
from functools import cache

from alpaca_cot.records import DataError, read_records

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
REGISTRY_PATH = os.path.join(DATA_DIR, "registry.json")
HF_DATASET = "QingyiSi/Alpaca-CoT"


@cache
def load_registry() -> dict[str, dict]:
    """The dataset registry: name -> {"files": [...]} or {"combine": [names]} plus table columns."""
    with open(REGISTRY_PATH, encoding="utf-8") as f:
        return json.load(f)


def resolve_data(sources: list[str]) -> list[str]:
    """Turn ``--data`` entries (names or paths) into a list of existing file paths."""
    registry = load_registry()
    paths: list[str] = []
    for source in sources:
        if os.path.exists(source):
            paths.extend(_expand_path(source))
        elif source in registry:
            paths.extend(_files_of(source, registry))
        else:
            known = ", ".join(sorted(registry))
            raise DataError(f"--data {source!r} is neither an existing file nor a known dataset name. "
                            f"Known names: {known}")
    return paths


def _expand_path(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".json", ".jsonl")))
        if not files:
            raise DataError(f"{path}: the folder holds no .json or .jsonl files")
        return files
    return [path]


def _files_of(name: str, registry: dict[str, dict]) -> list[str]:
    entry = registry[name]
    if "combine" in entry:
        return [p for part in entry["combine"] for p in _files_of(part, registry)]
    paths = [os.path.join(DATA_DIR, f) for f in entry.get("files", [])]
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        where = ", ".join(missing) or "(no local file is registered)"
        raise DataError(f"Dataset {name!r} needs {where}, which is not here: run "
                        f"`python3 data/collection.py download {name}` while online (it fetches from the "
                        f"Hugging Face dataset {HF_DATASET}), or pass the path of a unified-format file to --data.")
    return paths


def load_data(sources: list[str]) -> list[dict]:
    """All records of all ``--data`` sources, concatenated in order (each file validated)."""
    records: list[dict] = []
    for path in resolve_data(sources):
        records.extend(read_records(path))
    return records
