"""The tokenized-data cache's key: the sources (``source_fingerprint``), the tokenizer's serialized pipeline,
the template, the options that shape the tokens and the splits, and the code that writes the cached bytes
(``code_digest``), so a code change never serves stale tokens. Also: who prepares first under a launcher,
and how many processes tokenize.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from dataclasses import asdict
from typing import Any

from alpaca_cot.data.pipeline import load_hub
from alpaca_cot.data.sources import DataSource
from alpaca_cot.data.templates import Template
from alpaca_cot.io import write_json_atomic

CODE_DIR = os.path.dirname(os.path.abspath(__file__))
# The modules that shape the cached tokens (validation, rendering, encoding, the map applying them) and
# the cache folder's content (split order, truncation report).
CODE_MODULES = ("records.py", "columns.py", "templates.py", "encoding.py", "pipeline.py", "prepared.py")
# The coarsest mtime step we may meet: FAT and exFAT store 2 s steps, ext3 and HFS+ whole seconds, and
# nanosecond filesystems (ext4, XFS) advance mtimes only at the kernel's clock tick. A file written again
# within that step of our read can keep its mtime (and size and inode); once its mtime is older than our
# read by more than a step, any later write moves the mtime, so the stamp proves the bytes unchanged.
MTIME_STEP_NS = 2_000_000_000
# A tokenizing process costs a fork and the pickled tokenizer (about a second): worth it from a few
# thousand records (the LLaMA-2 tokenizer encodes about 1,000 records/s per core).
RECORDS_PER_WORKER = 5_000
MAX_WORKERS = 8


def main_process_first() -> contextlib.AbstractContextManager:
    """Under a launcher (``WORLD_SIZE`` > 1) each node's main process runs the block first and the other ranks
    after it, so they load its cache instead of tokenizing again; without a launcher, nothing.

    Per node rather than globally: a cache on a node-local disk must be made on every node, and on a shared
    disk the second node's result is published atomically beside the first (same key, same content)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    import torch
    from accelerate import PartialState

    # The same device choice as the TrainingArguments built later (use_cpu without CUDA), which reuse this group.
    return PartialState(cpu=not torch.cuda.is_available()).local_main_process_first()


def default_workers(n_records: int, requested: int | None) -> int:
    """Tokenizing processes: ``requested``, else the usable cores (at most 8), one per RECORDS_PER_WORKER."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS, n_records // RECORDS_PER_WORKER))


class DigestMemo:
    """SHA-256 digests of files, remembered in a JSON file with each file's size, mtime and inode and when it
    was read, so a cache hit on a large corpus does not read it whole again."""

    def __init__(self, path: str):
        self.path, self.changed = path, False
        try:
            with open(path, encoding="utf-8") as f:
                self.entries: dict[str, dict] = json.load(f)
        except (OSError, ValueError):  # none yet, or unreadable: hashing again is always correct
            self.entries = {}

    def digest(self, file: str) -> str:
        """The file's SHA-256, remembered only while its size, mtime and inode are those it had when read, and
        that mtime was older than the read by more than MTIME_STEP_NS."""
        st = os.stat(file)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        key = os.path.realpath(file)
        entry = self.entries.get(key)
        if entry is None or entry["stamp"] != stamp or st.st_mtime_ns >= entry.get("read_ns", 0) - MTIME_STEP_NS:
            read_ns = time.time_ns()  # before reading: a write during the read leaves the stamp untrusted
            entry = self.entries[key] = {"stamp": stamp, "read_ns": read_ns, "sha256": _file_digest(file)}
            self.changed = True
        return entry["sha256"]

    def save(self) -> None:
        """Write the digests back (atomically) when some were computed."""
        if self.changed:
            write_json_atomic(self.path, self.entries)


def source_fingerprint(source: DataSource, data_files: list[str] | None, subset: str | None,
                       memo: DigestMemo) -> list:
    """What a source's records depend on: its ``columns`` mapping, and its files' bytes, a saved folder's state
    files (they carry the ``datasets`` fingerprint of its content), or a hub dataset's id, options and cached
    Arrow files."""
    if source.kind == "files":
        return [source.columns, [[path, memo.digest(path)] for path in source.files]]
    if source.kind == "disk":
        states = []
        for root, _, names in sorted(os.walk(source.name)):
            for name in sorted(n for n in names if n.endswith(".json")):
                states.append([os.path.relpath(os.path.join(root, name), source.name),
                               _file_digest(os.path.join(root, name))])
        return [source.columns, os.path.abspath(source.name), states]
    loaded = load_hub(source, data_files, subset, streaming=False)  # downloads once; later runs read its cache
    files = [[f["filename"], os.path.getsize(f["filename"])] for f in loaded.cache_files]
    return [source.columns, source.name, subset, data_files, files]


@functools.cache
def code_digest(folder: str = CODE_DIR) -> str:
    """A digest of the source of CODE_MODULES in ``folder`` (read once per process)."""
    return digest(*(_file_digest(os.path.join(folder, name)) for name in CODE_MODULES))


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return digest(type(tokenizer).__name__, pipeline.encode(), tokenizer.special_tokens_map,
                  getattr(tokenizer, "chat_template", None))


def cache_key(fingerprints: list, tokenizer: Any, template: Template, args: Any) -> str:
    """The cache key of one run's prepared data (``fingerprints``: the sources', from ``source_fingerprint``)."""
    return digest(code_digest(), fingerprints, _tokenizer_fingerprint(tokenizer), asdict(template), args.cutoff_len,
                  args.train_on_inputs, args.max_samples, args.val_set_size, args.seed)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (bytes taken as they are)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]
