"""Training data on Hugging Face ``datasets``: ``--data`` sources -> unified records -> token ids, in Arrow.

Two stages, each a batched ``datasets`` call, so data larger than memory flows through:

1. ``load_unified`` / ``stream_unified``: each source as a (Iterable)Dataset of unified records
   (``UNIFIED_FEATURES``), their fields mapped by the source's ``columns`` (``--columns``) when it has them.
   JSON, JSON Lines, Parquet and CSV files go through our validating reader (errors name the file, line
   and field); ``save_to_disk`` folders and hub ids are validated row by row.
2. ``tokenize``: ``Dataset.map(batched=True, num_proc=N)`` over ``encoding.encode_records`` into
   memory-mapped Arrow. Each row keeps ``input_ids``, ``labels``, ``length``, ``full_length`` (before
   truncation) and ``trainable`` (label tokens that carry loss), for the splits and the truncation report.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import datasets
from datasets import Features, List, Value

from alpaca_cot.data.columns import check_mapped, map_record, row_fields
from alpaca_cot.data.encoding import BATCH, IGNORE_INDEX, encode_records
from alpaca_cot.data.records import DataError, answer_error, iter_records, untrainable_error, validate_record
from alpaca_cot.data.sources import COLLECTION, DataSource
from alpaca_cot.data.templates import Template
from alpaca_cot.errors import UserError

UNIFIED_FEATURES = Features({
    "instruction": Value("string"), "input": Value("string"), "output": Value("string"),
    "messages": List({"role": Value("string"), "content": Value("string")}),
})  # single-turn rows have messages None; multi-turn rows have the other three None
TOKEN_FEATURES = Features({
    "input_ids": List(Value("int32")), "labels": List(Value("int32")),
    "length": Value("int32"), "full_length": Value("int32"), "trainable": Value("int32"),
})


def from_record(record: dict) -> dict:
    """A validated unified record as a row of UNIFIED_FEATURES."""
    if "messages" in record:
        turns = [{"role": t["role"], "content": t["content"]} for t in record["messages"]]
        return {"instruction": None, "input": None, "output": None, "messages": turns}
    return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record.get("output"),
            "messages": None}


def to_record(row: dict) -> dict:
    """A UNIFIED_FEATURES row as the record ``Template.render`` takes."""
    if row["messages"] is not None:
        return {"messages": row["messages"]}
    return {"instruction": row["instruction"], "input": row["input"] or "", "output": row["output"]}


def file_rows(path: str, columns: dict[str, str] | None = None) -> Iterator[dict]:
    """The rows of one file, mapped by ``columns`` and validated; a file with unanswered records is refused as
    not trainable, saying why, and a mapping that names a field no row has, naming it. Read row by row."""
    total = unanswered = 0
    first, seen = "", set()
    for where, obj in iter_records(path):
        if columns:
            seen.update(row_fields(obj))
            obj = map_record(obj, columns, where)
        record = validate_record(obj, where, need_answer=False)
        total += 1
        error = answer_error(record, where)
        if not error:
            yield from_record(record)
            continue
        unanswered += 1
        first = first or error
    if not total:
        raise DataError(f"{path}: the file holds no records")
    if columns:
        check_mapped(columns, seen, path)
    refused = untrainable_error(path, total, unanswered, first)
    if refused:
        raise refused


def _unify_batch(batch: dict[str, list], indices: list[int], name: str,
                 columns: dict[str, str] | None) -> dict[str, list]:
    """Rows of a ``save_to_disk`` or hub dataset, mapped by ``columns`` and validated, as UNIFIED_FEATURES columns."""
    out: dict[str, list] = {key: [] for key in UNIFIED_FEATURES}
    for i, index in enumerate(indices):
        # Arrow gives None for a column a row lacks (single- and multi-turn rows in one table).
        record = {key: values[i] for key, values in batch.items() if values[i] is not None}
        where = f"{name}: row {index}"
        record = validate_record(map_record(record, columns, where) if columns else record, where, need_answer=False)
        error = answer_error(record, where)
        if error:
            raise DataError(f"{name}: not trainable as it is: {error}")
        for key, value in from_record(record).items():
            out[key].append(value)
    return out


def _unify(ds: datasets.Dataset | datasets.IterableDataset, source: DataSource,
           cache_file: str | None = None) -> datasets.Dataset | datasets.IterableDataset:
    columns, name = ds.column_names, source.name
    if columns is not None and source.columns:
        check_mapped(source.columns, row_fields(dict(ds.features)), name)
    elif columns is not None and "instruction" not in columns and "messages" not in columns:
        raise DataError(f"{name}: its columns are {', '.join(columns)}; training needs unified records "
                        "(instruction, input, output, or messages): map them with --columns (e.g. "
                        f"prompt=question,response=answer) or convert them with `{COLLECTION} convert SOURCE OUT.json`")
    kwargs: dict[str, Any] = {"batched": True, "batch_size": BATCH, "with_indices": True, "features": UNIFIED_FEATURES,
                              "remove_columns": columns, "fn_kwargs": {"name": name, "columns": source.columns}}
    if isinstance(ds, datasets.Dataset):
        # Written in our build folder: a map would otherwise leave cache files in a save_to_disk folder.
        kwargs.update(cache_file_name=cache_file, desc=f"validating {name}")
    unified = ds.map(_unify_batch, **kwargs)
    return unified if columns is not None else unified.select_columns(list(UNIFIED_FEATURES))


def _one_split(loaded: Any, name: str) -> Any:
    """The "train" split of a DatasetDict (or its only split); a Dataset as it is."""
    if not isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return loaded
    if "train" in loaded:
        return loaded["train"]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise DataError(f"{name}: holds the splits {', '.join(loaded)} and no 'train' split; pass a single split's "
                    "folder or files (--data_files)")


def load_hub(source: DataSource, data_files: list[str] | None, subset: str | None, streaming: bool) -> Any:
    """A hub dataset (its train split) through ``datasets.load_dataset``; a failure is one sentence."""
    try:
        loaded = datasets.load_dataset(source.name, name=subset, data_files=data_files, streaming=streaming)
    except Exception as e:  # offline, no such repository, no file matching --data_files...: all end the run alike
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        offline = " (HF_HUB_OFFLINE is set: only datasets already in the local cache load)" \
            if datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(f"--data {source.name}: the Hugging Face dataset could not be loaded{offline}: {reason}; "
                        "check the id, --subset and --data_files") from None
    return _one_split(loaded, source.name)


def load_unified(source: DataSource, build_dir: str, data_files: list[str] | None,
                 subset: str | None) -> list[tuple[str, datasets.Dataset]]:
    """(origin, Dataset of unified rows) for each file of a source, or once for a folder or hub dataset;
    intermediate Arrow files go to ``build_dir``."""
    slug = hashlib.sha256(repr((source.name, source.columns)).encode()).hexdigest()[:16]
    if source.kind == "files":
        return [(path, _generate(path, source.columns, os.path.join(build_dir, "raw", f"{slug}-{i}")))
                for i, path in enumerate(source.files)]
    loaded = _one_split(datasets.load_from_disk(source.name), source.name) if source.kind == "disk" \
        else load_hub(source, data_files, subset, streaming=False)
    return [(source.name, _unify(loaded, source, os.path.join(build_dir, f"unified-{slug}.arrow")))]


def _generate(path: str, columns: dict[str, str] | None, cache_dir: str) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_generator(file_rows, features=UNIFIED_FEATURES,
                                               gen_kwargs={"path": path, "columns": columns}, cache_dir=cache_dir)
    except Exception as e:
        raise _user_error(e) from None


def _user_error(e: BaseException) -> BaseException:
    """The UserError that ``datasets`` wrapped (DatasetGenerationError), else ``e`` itself."""
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, UserError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return e


def stream_unified(sources: list[DataSource], data_files: list[str] | None,
                   subset: str | None) -> datasets.IterableDataset:
    """All sources as one IterableDataset of unified rows, read lazily in order."""
    parts = []
    for source in sources:
        if source.kind == "files":
            parts += [datasets.IterableDataset.from_generator(
                file_rows, features=UNIFIED_FEATURES, gen_kwargs={"path": path, "columns": source.columns})
                for path in source.files]
        elif source.kind == "disk":
            loaded = _one_split(datasets.load_from_disk(source.name), source.name)
            parts.append(_unify(loaded.to_iterable_dataset(), source))
        else:
            parts.append(_unify(load_hub(source, data_files, subset, streaming=True), source))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def tokenize_batch(batch: dict[str, list], template: Template, tokenizer: Any, cutoff_len: int,
                   train_on_inputs: bool) -> dict[str, list]:
    """One batch of UNIFIED_FEATURES rows -> TOKEN_FEATURES columns (``encode_records``' rules)."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    encoded = encode_records([to_record(r) for r in rows], template, tokenizer, cutoff_len, train_on_inputs)
    return {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded],
            "length": [len(e.input_ids) for e in encoded], "full_length": [e.full_length for e in encoded],
            # label tokens that carry loss, counted in C: the labels are most of the tokens of a large corpus
            "trainable": [len(e.labels) - e.labels.count(IGNORE_INDEX) for e in encoded]}


def tokenize(unified: datasets.Dataset | datasets.IterableDataset, tokenizer: Any, template: Template,
             cutoff_len: int, train_on_inputs: bool, num_proc: int = 1, cache_file: str | None = None,
             fingerprint: str | None = None) -> datasets.Dataset | datasets.IterableDataset:
    """Token ids of every row (TOKEN_FEATURES), in order; a Dataset is written to ``cache_file`` (with
    ``num_proc`` > 1, one file per process, suffixed ``_0000i_of_0000n``) under ``fingerprint``."""
    kwargs: dict[str, Any] = {
        "batched": True, "batch_size": BATCH, "remove_columns": list(UNIFIED_FEATURES), "features": TOKEN_FEATURES,
        "fn_kwargs": {"template": template, "tokenizer": tokenizer, "cutoff_len": cutoff_len,
                      "train_on_inputs": train_on_inputs}}
    if isinstance(unified, datasets.Dataset):
        kwargs.update(num_proc=num_proc if num_proc > 1 else None, cache_file_name=cache_file,
                      new_fingerprint=fingerprint, desc="tokenizing")
    return unified.map(tokenize_batch, **kwargs)
