"""Offline lm-eval tasks over local JSONL files: ``custom_dataset: !function local_files.load_jsonl``.

A task YAML in this folder names its file in ``dataset_kwargs: {data_file: NAME.jsonl}`` (relative
to this folder, or absolute); each line is one document, and its ``split`` field (default ``test``)
says which split it belongs to. No network: the file is read with ``datasets.Dataset.from_list``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any


def load_jsonl(data_file: str, **_: Any) -> Any:
    """The documents of ``data_file`` as a ``datasets.DatasetDict`` keyed by each line's ``split``."""
    import datasets

    path = data_file if os.path.isabs(data_file) else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                   data_file)
    splits: dict[str, list[dict]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
                splits[doc.pop("split", "test")].append(doc)
    return datasets.DatasetDict({name: datasets.Dataset.from_list(docs) for name, docs in splits.items()})
