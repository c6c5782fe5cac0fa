"""The registry as a catalogue: the statistics table, the relative-size chart, and downloads from
the Hugging Face dataset.

Registry entries (``data/registry.json``) have ``files`` (paths under ``data/``) or ``combine``
(names), and ``hf_files`` (paths in the Hugging Face dataset; one ending in ``/`` is a folder).
Entries with ``row`` are rows of the original statistics table and carry its columns.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from urllib.parse import urlparse

from alpaca_cot import datasets
from alpaca_cot.datasets import HF_DATASET, load_registry
from alpaca_cot.records import DataError
from data.storage import check_writable

HF_TREE = f"https://huggingface.co/datasets/{HF_DATASET}/tree/main"
TABLE_HEADER = ("Dataset", "Nums", "Lang", "Task", "Gen", "Type", "Src", "Url", "Format", "Status", "Local")
LANG_COLORS = {"EN": "tab:blue", "CN": "tab:red", "EN/CN": "tab:purple", "ML": "tab:green"}


def table_rows(registry: dict[str, dict] | None = None) -> dict[str, dict]:
    """The entries that are rows of the statistics table, in registry order."""
    registry = load_registry() if registry is None else registry
    return {name: entry for name, entry in registry.items() if "row" in entry}


def entry_files(name: str, registry: dict[str, dict]) -> list[str]:
    """The local paths (under ``data/``) an entry stands for, following ``combine``."""
    entry = registry[name]
    if "combine" in entry:
        return [path for part in entry["combine"] for path in entry_files(part, registry)]
    return [os.path.join(datasets.DATA_DIR, path) for path in entry.get("files", [])]


def count_records(path: str) -> int:
    """Records in a unified file: array items, or non-empty lines of JSON Lines."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return len(json.loads(text))
    return sum(1 for line in text.split("\n") if line.strip())


def local_count(name: str, registry: dict[str, dict]) -> int | None:
    """Records of an entry present under ``data/``; None when any of its files is missing."""
    paths = entry_files(name, registry)
    if not paths or not all(os.path.isfile(p) for p in paths):
        return None
    return sum(count_records(p) for p in paths)


def render_table(registry: dict[str, dict] | None = None) -> str:
    """The statistics table in Markdown: the original columns, then the source format, the
    status and the records present locally."""
    registry = load_registry() if registry is None else registry
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for name, entry in table_rows(registry).items():
        files = entry.get("hf_files", [])
        link = f"[download]({HF_TREE}/{_top_folder(files)})" if files else ""
        local = local_count(name, registry)
        cells = (f"[{entry['row']}]({entry['url']})", _nums(entry), entry["lang"], entry["task"], entry["gen"],
                 entry["type"], entry["source"], link, entry["source_format"], entry["status"],
                 "" if local is None else str(local))
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _nums(entry: dict) -> str:
    return "todo" if entry["records"] is None else str(entry["records"])


def _top_folder(hf_files: list[str]) -> str:
    # The original table links each dataset's top folder in the Hugging Face dataset.
    return hf_files[0].split("/")[0] if "/" in hf_files[0] else ""


def render_chart(path: str, registry: dict[str, dict] | None = None) -> None:
    """A horizontal bar chart of the table's record counts (log scale), coloured by language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((e for e in table_rows(registry).values() if e["records"]), key=lambda e: e["records"])
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2))
    ax.barh([e["row"] for e in rows], [e["records"] for e in rows],
            color=[LANG_COLORS.get(e["lang"], "tab:gray") for e in rows])
    ax.set_xscale("log")
    ax.set_xlabel("records (log scale)")
    ax.set_title("Relative size of the collected datasets")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in LANG_COLORS.values()],
              labels=list(LANG_COLORS), loc="lower right")
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def download(name: str, *, overwrite: bool = False) -> list[str]:
    """Fetch an entry's files from the Hugging Face dataset into ``data/``; returns the local paths.

    A file in ``hf_files`` lands at the ``files`` path with the same index; a folder ``X/`` lands
    in ``data/X/``. Offline, this fails at once with one sentence."""
    registry = load_registry()
    if name not in registry:
        raise DataError(f"Unknown dataset {name!r}. Known names: {', '.join(sorted(registry))}")
    entry = registry[name]
    if "combine" in entry:
        return [path for part in entry["combine"] for path in download(part, overwrite=overwrite)]
    hf_files, files = entry.get("hf_files", []), entry.get("files", [])
    if not hf_files:
        raise DataError(f"{name!r} has no file in the Hugging Face dataset {HF_DATASET} yet "
                        f"(status: {entry.get('status', 'unknown')}).")
    targets = [os.path.join(datasets.DATA_DIR, files[i] if len(files) == len(hf_files) else hf.rstrip("/"))
               for i, hf in enumerate(hf_files)]
    for target, hf in zip(targets, hf_files, strict=True):
        if not hf.endswith("/"):
            check_writable(target, overwrite)
    _require_hub(name)
    fetched = []
    for target, hf in zip(targets, hf_files, strict=True):
        fetched += _fetch(name, hf, target, overwrite)
    return fetched


def _require_hub(name: str) -> None:
    """Fail fast and in one sentence when the Hub cannot be reached (no retries, no waiting)."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        if constants.HF_HUB_OFFLINE:
            raise OSError("HF_HUB_OFFLINE is set")
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise DataError(f"Cannot download {name!r}: the Hugging Face Hub ({host}) is not reachable from here "
                        f"({e}), so fetch it on a machine that is online, or build the data locally with "
                        "`python3 data/collection.py convert`.") from None


def _fetch(name: str, hf_path: str, target: str, overwrite: bool) -> list[str]:
    from huggingface_hub import hf_hub_download, snapshot_download

    with tempfile.TemporaryDirectory(dir=datasets.DATA_DIR, prefix=".download-") as tmp:
        try:
            if hf_path.endswith("/"):
                snapshot_download(HF_DATASET, repo_type="dataset", allow_patterns=f"{hf_path}**", local_dir=tmp)
            else:
                hf_hub_download(HF_DATASET, hf_path, repo_type="dataset", local_dir=tmp)
        except Exception as e:  # network and Hub errors of every kind end in the same sentence
            raise DataError(f"Cannot download {hf_path} of {name!r} from the Hugging Face dataset {HF_DATASET}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}.") from None
        if not hf_path.endswith("/"):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(tmp, hf_path), target)
            return [target]
        fetched = []
        for root, _, names in os.walk(os.path.join(tmp, hf_path)):
            for file_name in names:
                source = os.path.join(root, file_name)
                dest = os.path.join(target, os.path.relpath(source, os.path.join(tmp, hf_path)))
                check_writable(dest, overwrite)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.move(source, dest)
                fetched.append(dest)
        return fetched
