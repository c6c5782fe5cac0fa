"""Tokenized training data in memory-mapped Arrow, cached on disk under a key of everything it depends on
(``alpaca_cot.data.cache``).

A cache folder holds the tokenized rows (``Dataset.map``'s Arrow files, in ``--data`` order), each split's
row order and the truncation report; a hit memory-maps them, so memory does not grow with the data. With
``--streaming`` nothing is cached: records are tokenized as the Trainer reads them (``stream_splits``).
"""

from __future__ import annotations

import array
import glob
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch

from alpaca_cot.data.cache import DigestMemo, cache_key, default_workers, main_process_first, source_fingerprint
from alpaca_cot.data.pipeline import load_unified, stream_unified, tokenize
from alpaca_cot.data.sources import resolve_sources
from alpaca_cot.data.templates import Template
from alpaca_cot.errors import UserError
from alpaca_cot.io import write_json_atomic

TOKENS = "tokens.arrow"  # with several processes: tokens_00000_of_0000N.arrow, ...
INFO = "info.json"  # the cache entry's report; the whole folder is published by one rename
DIGESTS = "file_digests.json"  # in the cache folder: data files' SHA-256 by size, mtime and inode
SHUFFLE_BUFFER = 10_000  # --streaming: records shuffled together (a stream cannot be shuffled whole)


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/alpaca_cot/tokenized`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "alpaca_cot", "tokenized")


class TokenizedSplit:
    """A split's records, read from tokenized Arrow rows in the split's order; item i is
    ``{"input_ids": [...], "labels": [...]}``."""

    def __init__(self, tokens: datasets.Dataset, rows: np.ndarray):
        self.tokens = tokens.select_columns(["input_ids", "labels"])
        self.rows = rows
        self._lengths = tokens.data.column("length").to_numpy()[rows] if len(rows) else np.zeros(0, np.int32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.tokens[int(self.rows[i])]

    def lengths(self) -> list[int]:
        """Token count of every record (for length-grouped sampling)."""
        return self._lengths.tolist()


class StreamTruncation:
    """--streaming: the records cut to --cutoff_len or left out, as they are read (validation records first,
    then training records as the Trainer reads them, each once). Kept in arrays, 18 bytes a record, since a
    stream can be long; iterating gives the entries of the non-streaming report (``index``: the position in
    the stream, after --max_samples)."""

    def __init__(self) -> None:
        self.train, self.cut = array.array("b"), array.array("b")
        self.index, self.tokens, self.kept = array.array("q"), array.array("i"), array.array("i")

    def add(self, split: str, index: int, row: dict) -> None:
        """Note ``row`` (TOKEN_FEATURES) if it was cut or left out."""
        left_out = row["trainable"] == 0
        if left_out or row["length"] < row["full_length"]:
            self.train.append(split == "train")
            self.cut.append(not left_out)
            self.index.append(index)
            self.tokens.append(row["full_length"])
            self.kept.append(0 if left_out else row["length"])

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[dict]:
        for train, cut, index, tokens, kept in zip(self.train, self.cut, self.index, self.tokens, self.kept,
                                                   strict=True):
            yield {"split": "train" if train else "val", "action": "cut" if cut else "left out", "index": index,
                   "file": None, "index_in_file": None, "tokens": tokens, "kept_tokens": kept}


class StreamingSplit(torch.utils.data.IterableDataset):
    """--streaming: tokenized training records as the Trainer reads them (an IterableDataset, so the Trainer
    draws no sampler and needs --max_steps); ``lengths()`` are those of the records read so far. Records
    without answer tokens are skipped here, and the first pass notes what was cut or left out."""

    def __init__(self, stream: datasets.IterableDataset, truncation: StreamTruncation):
        super().__init__()
        self.stream, self.truncation = stream, truncation
        self.seen = array.array("i")  # 4 bytes a record read: a long stream would not fit as a Python list
        self.first_pass = True

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for row in self.stream:
            if self.first_pass:  # later passes read the same records again
                self.truncation.add("train", row["index"], row)
            if row["trainable"] == 0:
                continue
            self.seen.append(row["length"])
            yield {"input_ids": row["input_ids"], "labels": row["labels"]}
        self.first_pass = False

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each pass: a new shuffle order."""
        self.stream.set_epoch(epoch)

    def lengths(self) -> list[int]:
        """Token count of every record read so far."""
        return self.seen.tolist()


def split_indices(n: int, val_set_size: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) indices of ``n`` records shuffled with ``seed``; ``val_set_size`` is a count, or a
    fraction when below 1."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = int(round(val_set_size * n)) if 0 < val_set_size < 1 else int(val_set_size)
    if n_val >= n:
        raise UserError(f"--val_set_size {val_set_size:g} leaves no training records out of {n}; "
                        "pass a smaller count, a fraction such as 0.05, or 0 for no evaluation.")
    return order[n_val:], order[:n_val]


def prepare_splits(args: Any, tokenizer: Any, template: Template, cache_dir: str | None = None
                   ) -> tuple[TokenizedSplit | StreamingSplit, TokenizedSplit, dict]:
    """(train, validation, info): from the cache when the key matches, else tokenized and cached.

    ``info`` says whether the cache was hit, and lists under "truncation" every record cut to
    ``cutoff_len`` or left out (no answer token left), by its index in ``--data`` and in its file.
    Under a launcher, each node's main process prepares and the other ranks load its cache. With
    ``--streaming`` the training split is a ``StreamingSplit`` and nothing is cached (``stream_splits``).
    """
    if args.streaming:
        return stream_splits(args, tokenizer, template)
    sources = resolve_sources(args.data, getattr(args, "columns", None))
    check_hub_flags(args, sources)
    cache_dir = cache_dir or default_cache_dir()
    with main_process_first():
        memo = DigestMemo(os.path.join(cache_dir, DIGESTS))
        fingerprints = [source_fingerprint(s, args.data_files, args.subset, memo) for s in sources]
        memo.save()
        path = os.path.join(cache_dir, cache_key(fingerprints, tokenizer, template, args))
        if os.path.isfile(os.path.join(path, INFO)):
            return _load(path, "hit")
        _build(sources, args, tokenizer, template, path)
        return _load(path, "miss")


def check_hub_flags(args: Any, sources: list) -> None:
    """--data_files and --subset choose within hub datasets: refuse them without one."""
    if any(s.kind == "hub" for s in sources):
        return
    for name in ("data_files", "subset"):
        if getattr(args, name):
            raise UserError(f"--{name} applies to Hugging Face dataset ids (org/name) in --data, and --data names "
                            "none; drop it or add the hub dataset")


def _load(path: str, outcome: str) -> tuple[TokenizedSplit, TokenizedSplit, dict]:
    files = sorted(glob.glob(os.path.join(path, "tokens*.arrow")))
    tokens = datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
    with open(os.path.join(path, INFO), encoding="utf-8") as f:
        info = json.load(f)
    splits = [TokenizedSplit(tokens, np.load(os.path.join(path, f"{name}_rows.npy"))) for name in ("train", "val")]
    return splits[0], splits[1], {**info, "cache": outcome, "cache_file": path}


def _build(sources: list, args: Any, tokenizer: Any, template: Template, path: str) -> None:
    """Tokenize into a private folder beside ``path``, then publish it there with one rename."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    build = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    try:
        parts = [part for s in sources for part in load_unified(s, build, args.data_files, args.subset)]
        unified = datasets.concatenate_datasets([ds for _, ds in parts])
        if args.max_samples:
            unified = unified.select(range(min(len(unified), int(args.max_samples))))
        out = os.path.join(build, "out")
        os.makedirs(out)
        tokens = tokenize(unified, tokenizer, template, args.cutoff_len, args.train_on_inputs,
                          default_workers(len(unified), args.preprocessing_num_workers),
                          os.path.join(out, TOKENS), os.path.basename(path))
        columns = {k: tokens.data.column(k).to_numpy() for k in ("length", "full_length", "trainable")}
        starts = np.cumsum([0] + [len(ds) for _, ds in parts])
        info: dict[str, Any] = {"truncation": []}
        for name, order in zip(("train", "val"), split_indices(len(unified), args.val_set_size, args.seed),
                               strict=True):
            rows = np.asarray(order, dtype=np.int64)
            left_out = columns["trainable"][rows] == 0
            cut = ~left_out & (columns["length"][rows] < columns["full_length"][rows])
            for index in rows[left_out | cut].tolist():
                part = int(np.searchsorted(starts, index, side="right")) - 1
                action = "left out" if columns["trainable"][index] == 0 else "cut"
                info["truncation"].append({"split": name, "action": action, "index": index, "file": parts[part][0],
                                           "index_in_file": index - int(starts[part]),
                                           "tokens": int(columns["full_length"][index]),
                                           "kept_tokens": int(columns["length"][index]) if action == "cut" else 0})
            np.save(os.path.join(out, f"{name}_rows.npy"), rows[~left_out])
            info[f"{name}_records"] = int((~left_out).sum())
        write_json_atomic(os.path.join(out, INFO), info)
        try:
            os.rename(out, path)
        except OSError:  # another process published the same key first: its result is the same
            if not os.path.isfile(os.path.join(path, INFO)):
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)


def stream_splits(args: Any, tokenizer: Any, template: Template) -> tuple[StreamingSplit, TokenizedSplit, dict]:
    """--streaming: the first --val_set_size records (a count) tokenized now as the validation split; the
    rest tokenized as the Trainer reads them, shuffled in a buffer of SHUFFLE_BUFFER records with --seed."""
    if args.max_steps <= 0:
        raise UserError("--streaming needs --max_steps: a stream has no length to count --epochs in")
    if 0 < args.val_set_size < 1:
        raise UserError(f"--streaming needs --val_set_size as a count of records (got the fraction "
                        f"{args.val_set_size:g}): a stream has no length to take a fraction of")
    sources = resolve_sources(args.data, getattr(args, "columns", None))
    check_hub_flags(args, sources)
    stream = stream_unified(sources, args.data_files, args.subset)
    if args.max_samples:
        stream = stream.take(int(args.max_samples))
    n_val = int(args.val_set_size)
    tokens = tokenize(stream, tokenizer, template, args.cutoff_len, args.train_on_inputs)
    val_rows = datasets.Dataset.from_list(list(tokens.take(n_val)), features=tokens.features) if n_val \
        else datasets.Dataset.from_dict({k: [] for k in tokens.features}, features=tokens.features)
    trainable = val_rows.data.column("trainable").to_numpy()
    truncation = StreamTruncation()
    for index, row in enumerate(val_rows):
        truncation.add("val", index, row)
    info: dict[str, Any] = {"truncation": truncation, "train_records": None, "val_records": int((trainable > 0).sum()),
                            "cache": "none (--streaming)", "cache_file": "tokenized as the Trainer reads"}
    rest = tokens.skip(n_val)
    if next(iter(rest.filter(lambda row: row["trainable"] > 0)), None) is None:
        raise UserError(f"--data {' '.join(args.data)}: the stream holds no training record with answer tokens "
                        f"within --cutoff_len {args.cutoff_len} (after {n_val} validation records)")
    # Numbered before the shuffle, so the report names each record's position in the stream.
    train = rest.map(lambda _, i: {"index": n_val + i}, with_indices=True)
    train = train.shuffle(seed=args.seed, buffer_size=SHUFFLE_BUFFER)
    return StreamingSplit(train, truncation), TokenizedSplit(val_rows, np.flatnonzero(trainable > 0)), info
