"""Tokenized training data, cached on disk keyed by everything it depends on.

The key hashes the data files' bytes, the tokenizer (its full serialized pipeline), the template,
``cutoff_len``, ``train_on_inputs``, ``max_samples`` and the validation split, so a change to any
of them prepares the data anew; a hit loads flat int32 arrays in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict
from typing import Any

import numpy as np

from alpaca_cot.datasets import load_data, resolve_data
from alpaca_cot.errors import UserError
from alpaca_cot.templates import Template
from alpaca_cot.tokenize import count_trainable, encode_records

FORMAT_VERSION = "2"  # bump when the encoding itself changes


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/alpaca_cot/tokenized`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "alpaca_cot", "tokenized")


class TokenizedSplit:
    """Records as flat arrays; item i is ``{"input_ids": [...], "labels": [...]}``."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray):
        self.ids, self.labels, self.offsets = ids, labels, offsets

    @classmethod
    def from_lists(cls, items: list[dict]) -> TokenizedSplit:
        lengths = np.fromiter((len(x["input_ids"]) for x in items), dtype=np.int64, count=len(items))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = lambda key: np.fromiter((t for x in items for t in x[key]), dtype=np.int32,  # noqa: E731
                                       count=int(offsets[-1]))
        return cls(flat("input_ids"), flat("labels"), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return {"input_ids": self.ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}

    def lengths(self) -> list[int]:
        """Token count of every record (for length-grouped sampling)."""
        return np.diff(self.offsets).tolist()


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return _digest(type(tokenizer).__name__, pipeline.encode(), tokenizer.special_tokens_map,
                   getattr(tokenizer, "chat_template", None))


def cache_key(paths: list[str], tokenizer: Any, template: Template, args: Any) -> str:
    """The cache key of one run's prepared data."""
    files = []
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        files.append(h.hexdigest())
    return _digest(FORMAT_VERSION, files, _tokenizer_fingerprint(tokenizer), asdict(template), args.cutoff_len,
                   args.train_on_inputs, args.max_samples, args.val_set_size, args.seed)


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


def prepare_splits(args: Any, tokenizer: Any, template: Template,
                   cache_dir: str | None = None) -> tuple[TokenizedSplit, TokenizedSplit, dict]:
    """(train, validation, info): from the cache when the key matches, else tokenized and cached.

    ``info`` says whether the cache was hit, and lists under "truncation" every record cut to
    ``cutoff_len`` or left out (no answer token left), by its index in ``--data`` and in its file.
    """
    cache_dir = cache_dir or default_cache_dir()
    paths = resolve_data(args.data)
    key = cache_key(paths, tokenizer, template, args)
    path = os.path.join(cache_dir, f"{key}.npz")
    if os.path.isfile(path):
        with np.load(path) as z:
            splits = [TokenizedSplit(z[f"{s}_ids"], z[f"{s}_labels"], z[f"{s}_offsets"]) for s in ("train", "val")]
            info = json.loads(str(z["info"]))
        return splits[0], splits[1], {**info, "cache": "hit", "cache_file": path}
    records: list[dict] = []
    origin: list[tuple[str, int]] = []  # (file, index in that file) of every record
    for file in paths:
        part = load_data([file])
        records += part
        origin += [(file, i) for i in range(len(part))]
    if args.max_samples:
        records = records[: int(args.max_samples)]
    info: dict[str, Any] = {"truncation": []}
    splits = []
    for name, indices in zip(("train", "val"), split_indices(len(records), args.val_set_size, args.seed),
                             strict=True):
        encoded = encode_records([records[i] for i in indices], template, tokenizer, args.cutoff_len,
                                 args.train_on_inputs)
        kept = []
        for index, e in zip(indices, encoded, strict=True):
            action = "left out" if count_trainable(e) == 0 else "cut" if e.cut else None
            if action != "left out":
                kept.append({"input_ids": e.input_ids, "labels": e.labels})
            if action:
                file, in_file = origin[index]
                info["truncation"].append({"split": name, "action": action, "index": index, "file": file,
                                           "index_in_file": in_file, "tokens": e.full_length,
                                           "kept_tokens": len(e.input_ids) if action == "cut" else 0})
        info[f"{name}_records"] = len(kept)
        splits.append(TokenizedSplit.from_lists(kept))
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    arrays = {f"{s}_{k}": getattr(t, k) for s, t in zip(("train", "val"), splits, strict=True)
              for k in ("ids", "labels", "offsets")}
    np.savez(tmp, info=json.dumps(info), **arrays)
    os.replace(tmp, path)
    return splits[0], splits[1], {**info, "cache": "miss", "cache_file": path}
