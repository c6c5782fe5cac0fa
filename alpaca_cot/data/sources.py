"""``--data`` resolution: short dataset names (through ``data/registry.json``), file paths, folders
written by ``datasets``' ``save_to_disk`` and Hugging Face hub dataset ids (``org/name``).

A registry entry's ``files`` are paths under ``data/``: a file, a folder ending in ``/`` (every
.json/.jsonl/.parquet/.csv file below it) or a glob (``X/*.json``); ``download NAME`` puts the files there.
Its ``columns`` (and ``tags``), as ``--columns`` takes them, map its files' fields onto unified records.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from functools import cache

from alpaca_cot.data.columns import parse_columns
from alpaca_cot.data.records import DataError

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data")
REGISTRY_PATH = os.path.join(DATA_DIR, "registry.json")
HF_DATASET = "QingyiSi/Alpaca-CoT"
RECORD_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")
COLLECTION = "python3 data/collection.py"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the hub spells dataset ids
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what Dataset(Dict).save_to_disk writes into its folder


@dataclass(frozen=True)
class DataSource:
    """One ``--data`` entry: ``files``, a ``save_to_disk`` folder ("disk") or a hub id ("hub"), with the
    ``columns`` mapping its fields onto unified records (None: they are unified records)."""

    kind: str
    name: str
    files: tuple[str, ...] = ()
    columns: dict[str, str] | None = None


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


def resolve_sources(sources: list[str], columns: dict[str, str] | None = None) -> list[DataSource]:
    """Classify the ``--data`` entries for training: an existing path (a ``save_to_disk`` folder, else
    files), a registry name (one source per part, with the part's own ``columns``), else a hub dataset id
    (``org/name``). ``columns`` (``--columns``) maps the fields of paths and hub datasets."""
    registry = load_registry()
    out = []
    for source in sources:
        if os.path.isdir(source) and any(os.path.isfile(os.path.join(source, m)) for m in SAVED_MARKERS):
            out.append(DataSource("disk", source, columns=columns))
        elif os.path.exists(source):
            out.append(DataSource("files", source, tuple(_expand_path(source)), columns))
        elif source in registry:
            out += [DataSource("files", part, tuple(_files_of(part, registry, source)), entry_columns(part))
                    for part in _parts(source, registry)]
        elif HUB_ID.fullmatch(source):
            out.append(DataSource("hub", source, columns=columns))
        else:
            known = ", ".join(sorted(registry))
            raise DataError(f"--data {source!r} is neither an existing file or folder, a known dataset name nor a "
                            f"Hugging Face dataset id (org/name). Known names: {known}")
    if columns and all(source in registry and not os.path.exists(source) for source in sources):
        raise DataError("--columns maps the fields of files, folders and hub datasets, and --data names none; a "
                        f"registered dataset's mapping is its \"columns\" in {REGISTRY_PATH}")
    return out


def entry_columns(name: str) -> dict[str, str] | None:
    """A registry entry's ``columns`` and ``tags`` (LLaMA-Factory keeps them apart) as one checked mapping."""
    entry = load_registry()[name]
    mapping = {**entry.get("columns", {}), **entry.get("tags", {})}
    return parse_columns(mapping, f"{REGISTRY_PATH}: {name}: columns")


def _parts(name: str, registry: dict[str, dict]) -> list[str]:
    """The entries a name stands for: itself, or the parts of a combination, recursively."""
    return [p for part in registry[name]["combine"] for p in _parts(part, registry)] if "combine" in registry[name] \
        else [name]


def folder_files(folder: str) -> list[str]:
    """The .json/.jsonl/.parquet/.csv files below a folder, recursively and sorted; hidden files and folders
    (such as a download in progress) are left out."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(root, n) for n in names if n.endswith(RECORD_EXTENSIONS) and not n.startswith(".")]
    return sorted(files)


def _expand_path(path: str) -> list[str]:
    if os.path.isdir(path):
        files = folder_files(path)
        if not files:
            raise DataError(f"{path}: the folder holds no {'/'.join(RECORD_EXTENSIONS)} files; "
                            f"convert its files first with `{COLLECTION} convert {path} OUT.json`")
        return files
    return [path]


def registered_files(entry: dict) -> tuple[list[str], list[str]]:
    """(the files an entry's ``files`` stand for now, the ``files`` items that match nothing)."""
    found, missing = [], []
    for item in entry.get("files", []):
        path = os.path.join(DATA_DIR, item)
        if item.endswith("/"):
            matched = folder_files(path) if os.path.isdir(path) else []
        elif glob.has_magic(item):
            matched = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        else:
            matched = [path] if os.path.isfile(path) else []
        found += matched
        if not matched:
            missing.append(path)
    return found, missing


def _files_of(name: str, registry: dict[str, dict], asked: str = "") -> list[str]:
    """The files of a name (``asked``: the name the user gave, which a combination's parts are named after)."""
    entry, asked = registry[name], asked or name
    if "combine" in entry:
        return [p for part in entry["combine"] for p in _files_of(part, registry, asked)]
    found, missing = registered_files(entry)
    if found and not missing:
        return found
    alternative = "or pass the path of a unified-format file to --data"
    if not entry.get("files") or not entry.get("hf_files"):
        # Downloading would not help: say where the data can come from instead.
        raise DataError(f"Dataset {name!r} has no file in the Hugging Face dataset {HF_DATASET} "
                        f"(status: {entry.get('status', 'unknown')}): convert its source with `{COLLECTION} "
                        f"convert SOURCE OUT.json` and pass OUT.json to --data.")
    present = [p for p in missing if os.path.isdir(p)]
    if present:
        # The folder is there but holds no unified files (an archive, CSV...): downloading again changes nothing.
        others = sorted(os.listdir(present[0]))[:5]
        raise DataError(f"Dataset {name!r}: {present[0]} holds no {'/'.join(RECORD_EXTENSIONS)} files (it holds "
                        f"{', '.join(others) or 'nothing'}); convert them with `{COLLECTION} convert {present[0]} "
                        f"OUT.json --skip_bad` {alternative}.")
    part = f" (its part {name!r})" if asked != name else ""
    raise DataError(f"Dataset {asked!r} needs {', '.join(missing)}{part}, which is not here: run "
                    f"`{COLLECTION} download {asked}` while online (it fetches from the "
                    f"Hugging Face dataset {HF_DATASET}), {alternative}.")
