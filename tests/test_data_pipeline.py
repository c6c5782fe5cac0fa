"""The data pipeline on ``datasets``: every kind of --data source gives exactly ``encode_records``' tokens,
in the split's order, from memory-mapped Arrow; hub loads, streaming and launchers behave as documented."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import textwrap
import time

import datasets
import pytest
from transformers import AutoTokenizer

from alpaca_cot.config import FinetuneArgs
from alpaca_cot.data import cache as cache_module
from alpaca_cot.data.encoding import encode_records
from alpaca_cot.data.prepared import prepare_splits, split_indices
from alpaca_cot.data.records import DataError
from alpaca_cot.data.templates import get_template
from alpaca_cot.errors import UserError
from tests.conftest import ROOT
from tests.data_helpers import count_trainable
from tests.fixtures.replicas import REPLICAS_LINE
from tests.test_ddp import LAUNCHERS

CUTOFF = 24  # short enough that records are cut, and the longest prompts leave no answer token (left out)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: str):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def records(tiny_data_file: str) -> list[dict]:
    data = json.load(open(tiny_data_file, encoding="utf-8"))
    # Prompts over 23 times their answer (of half the budget or more): at CUTOFF tokens the shared budget
    # leaves the answer nothing (LLaMA-Factory's rule), so these records are left out.
    answer = "red blue green yellow white black orange purple " * 2
    data[5] = {"instruction": "Repeat the colours. " * 150, "input": "", "output": answer}
    data[150] = {"instruction": "Name the colours. " * 150, "input": "red " * 20, "output": answer}
    return data


def _write(path, records: list[dict], jsonl: bool = False) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) if jsonl else json.dumps(records)
    path.write_text(text, encoding="utf-8")
    return str(path)


def _args(data: list[str], **kw) -> FinetuneArgs:
    base = {"model_name_or_path": "m", "data": data, "val_set_size": 16, "cutoff_len": CUTOFF}
    return FinetuneArgs(**{**base, **kw})


def _items(split) -> list[dict]:
    return [split[i] for i in range(len(split))]


def _expected(records: list[dict], args: FinetuneArgs, template, tok) -> tuple[dict, list[dict]]:
    """What the previous, in-memory implementation gave: encode_records over each split in its order."""
    splits, truncation = {}, []
    for name, order in zip(("train", "val"), split_indices(len(records), args.val_set_size, args.seed), strict=True):
        encoded = encode_records([records[i] for i in order], template, tok, args.cutoff_len, args.train_on_inputs)
        splits[name] = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded if count_trainable(e)]
        for index, e in zip(order, encoded, strict=True):
            action = "left out" if count_trainable(e) == 0 else "cut" if len(e.input_ids) < e.full_length else None
            if action:
                truncation.append({"split": name, "action": action, "index": index, "tokens": e.full_length,
                                   "kept_tokens": len(e.input_ids) if action == "cut" else 0})
    return splits, truncation


@pytest.mark.parametrize("template_name", ["alpaca", "chat"])
def test_splits_equal_encode_records_and_list_truncation(tmp_path, tok, records, template_name: str) -> None:
    data = _write(tmp_path / "d.json", records)
    args = _args([data])
    template = get_template(template_name, tok)
    train, val, info = prepare_splits(args, tok, template, cache_dir=str(tmp_path / "cache"))
    expected, truncation = _expected(records, args, template, tok)
    assert {e["action"] for e in truncation} == {"cut", "left out"}  # the test sees both kinds
    assert _items(train) == expected["train"] and _items(val) == expected["val"]
    assert train.lengths() == [len(x["input_ids"]) for x in expected["train"]]
    assert (info["train_records"], info["val_records"]) == (len(expected["train"]), len(expected["val"]))
    assert [{k: e[k] for k in truncation[0]} for e in info["truncation"]] == truncation
    assert all(e["file"] == data and e["index_in_file"] == e["index"] for e in info["truncation"])


def test_worker_processes_give_identical_tokens(tmp_path, tok, records) -> None:
    data = _write(tmp_path / "d.jsonl", records, jsonl=True)
    template = get_template("alpaca", tok)
    one = prepare_splits(_args([data]), tok, template, cache_dir=str(tmp_path / "c1"))
    two = prepare_splits(_args([data], preprocessing_num_workers=2), tok, template, cache_dir=str(tmp_path / "c2"))
    assert len(os.listdir(two[2]["cache_file"])) > len(os.listdir(one[2]["cache_file"]))  # one Arrow file per process
    assert _items(two[0]) == _items(one[0]) and _items(two[1]) == _items(one[1])
    assert two[2]["truncation"] == one[2]["truncation"]


def _age(path: str, seconds: float = 60) -> None:
    """Set the file's mtime ``seconds`` back: written long before it is read."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_cache_hit_reads_memory_mapped_arrow(tmp_path, monkeypatch, tok, records) -> None:
    data = _write(tmp_path / "d.jsonl", records, jsonl=True)
    _age(data)
    template, cache = get_template("alpaca", tok), str(tmp_path / "cache")
    train, _, info = prepare_splits(_args([data]), tok, template, cache_dir=cache)
    with monkeypatch.context() as m:  # a hit does not read an old data file again (its digest is remembered)
        m.setattr(cache_module, "_file_digest", lambda path: pytest.fail(f"{path} hashed again"))
        hit, _, hit_info = prepare_splits(_args([data]), tok, template, cache_dir=cache)
    assert (info["cache"], hit_info["cache"]) == ("miss", "hit") and hit_info["cache_file"] == info["cache_file"]
    # The build folder is gone: the entry and the remembered digests remain.
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(info["cache_file"]), "file_digests.json"])
    files = [f["filename"] for f in hit.tokens.cache_files]
    assert files and all(f.startswith(info["cache_file"]) for f in files)  # read from the cache, not memory
    assert _items(hit) == _items(train) and hit_info["truncation"] == info["truncation"]
    os.utime(data)  # touched, same bytes: still a hit
    assert prepare_splits(_args([data]), tok, template, cache_dir=cache)[2]["cache"] == "hit"
    _write(tmp_path / "d.jsonl", records[:-1], jsonl=True)
    assert prepare_splits(_args([data]), tok, template, cache_dir=cache)[2]["cache"] == "miss"


def test_a_change_to_the_code_that_shapes_tokens_prepares_anew(tmp_path, monkeypatch, tok, records) -> None:
    data = _write(tmp_path / "d.jsonl", records, jsonl=True)
    template, cache = get_template("alpaca", tok), str(tmp_path / "cache")
    first = prepare_splits(_args([data]), tok, template, cache_dir=cache)[2]
    monkeypatch.setattr(cache_module, "code_digest", lambda: "the encoding as edited")
    edited = prepare_splits(_args([data]), tok, template, cache_dir=cache)[2]
    assert (first["cache"], edited["cache"]) == ("miss", "miss") and edited["cache_file"] != first["cache_file"]


def test_code_digest_covers_the_token_shaping_modules(tmp_path) -> None:
    assert {"encoding.py", "templates.py", "records.py", "pipeline.py"} <= set(cache_module.CODE_MODULES)
    copies = []
    for name in ("same", "edited"):
        copies.append(tmp_path / name)
        shutil.copytree(cache_module.CODE_DIR, copies[-1], ignore=shutil.ignore_patterns("__pycache__"))
    with open(copies[1] / "encoding.py", "a", encoding="utf-8") as f:
        f.write("\nIGNORE_INDEX = -1\n")
    assert cache_module.code_digest(str(copies[0])) == cache_module.code_digest()
    assert cache_module.code_digest(str(copies[1])) != cache_module.code_digest()


def test_a_file_rewritten_within_the_mtime_step_is_hashed_again(tmp_path, monkeypatch) -> None:
    path, memo = tmp_path / "d.jsonl", cache_module.DigestMemo(str(tmp_path / "digests.json"))
    path.write_bytes(b"first\n")
    memo.digest(str(path))
    stamp = os.stat(path)
    with open(path, "r+b") as f:  # the same inode and size
        f.write(b"again\n")
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # the same mtime, as a coarse clock gives
    assert memo.digest(str(path)) == hashlib.sha256(b"again\n").hexdigest()
    _age(str(path))
    memo.digest(str(path))  # read well after its mtime: the stamp is trusted from now on
    monkeypatch.setattr(cache_module, "_file_digest", lambda p: pytest.fail(f"{p} hashed again"))
    memo.save()
    assert cache_module.DigestMemo(memo.path).digest(str(path)) == hashlib.sha256(b"again\n").hexdigest()


def test_every_source_kind_gives_the_same_tokens(tmp_path, monkeypatch, tok, records) -> None:
    template = get_template("chat", tok)
    reference = prepare_splits(_args([_write(tmp_path / "d.json", records)]), tok, template,
                               cache_dir=str(tmp_path / "c0"))
    features = datasets.Features({"instruction": datasets.Value("string"), "input": datasets.Value("string"),
                                  "output": datasets.Value("string"),
                                  "messages": datasets.List({"role": datasets.Value("string"),
                                                             "content": datasets.Value("string")})})
    rows = [{k: r.get(k) for k in features} for r in records]
    saved = str(tmp_path / "saved")
    datasets.Dataset.from_list(rows, features=features).save_to_disk(saved)
    saved_dict = str(tmp_path / "saved_dict")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows, features=features)}).save_to_disk(saved_dict)
    # A script-free dataset folder stands in for the hub repository: the real load_dataset reads it.
    repo = tmp_path / "repo"
    (repo / "part").mkdir(parents=True)
    _write(repo / "part" / "a.jsonl", records[:120], jsonl=True)
    _write(repo / "part" / "b.jsonl", records[120:], jsonl=True)
    _write(repo / "other.jsonl", [{"instruction": "not this file", "output": "x"}], jsonl=True)
    real, asked = datasets.load_dataset, []

    def hub(path: str, **kwargs):
        asked.append((path, kwargs))
        return real(str(repo), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    saved_files = sorted(os.listdir(saved))
    for i, (data, extra) in enumerate([([saved], {}), ([saved_dict], {}),
                                       (["org/name"], {"data_files": ["part/*.jsonl"]}),
                                       ([_write(tmp_path / "d.jsonl", records, jsonl=True)], {})]):
        train, val, info = prepare_splits(_args(data, **extra), tok, template, cache_dir=str(tmp_path / f"c{i + 1}"))
        assert _items(train) == _items(reference[0]) and _items(val) == _items(reference[1]), data
        assert [e["index"] for e in info["truncation"]] == [e["index"] for e in reference[2]["truncation"]]
    assert sorted(os.listdir(saved)) == saved_files  # no cache files left in the user's folder
    assert asked[0] == ("org/name", {"name": None, "data_files": ["part/*.jsonl"], "streaming": False})


def test_mixed_sources_keep_order_and_name_each_origin(tmp_path, tok, records) -> None:
    a = _write(tmp_path / "a.jsonl", records[:100], jsonl=True)
    features = datasets.Features({"instruction": datasets.Value("string"), "input": datasets.Value("string"),
                                  "output": datasets.Value("string")})
    tail = [r for r in records[100:] if "messages" not in r]
    saved = str(tmp_path / "saved")
    datasets.Dataset.from_list([{k: r[k] for k in features} for r in tail], features=features).save_to_disk(saved)
    args = _args([a, saved], val_set_size=0)
    template = get_template("alpaca", tok)
    train, _, info = prepare_splits(args, tok, template, cache_dir=str(tmp_path / "cache"))
    expected, _ = _expected(records[:100] + tail, args, template, tok)
    assert _items(train) == expected["train"]
    origins = {(e["file"], e["index"] - e["index_in_file"]) for e in info["truncation"]}
    assert origins == {(a, 0), (saved, 100)}


def test_file_errors_name_the_file_line_and_field(tmp_path, tok, records) -> None:
    template, cache = get_template("alpaca", tok), str(tmp_path / "cache")
    bad = _write(tmp_path / "bad.jsonl", [records[0], records[1], {"instruction": 3, "output": "x"}], jsonl=True)
    with pytest.raises(DataError, match=r"bad\.jsonl:3: field 'instruction' must be a string, got int"):
        prepare_splits(_args([bad], val_set_size=0), tok, template, cache_dir=cache)
    partly = _write(tmp_path / "partly.jsonl", [records[0], {"instruction": "no answer"}, records[1]], jsonl=True)
    with pytest.raises(DataError) as e:
        prepare_splits(_args([partly], val_set_size=0), tok, template, cache_dir=cache)
    assert str(e.value) == (f"{partly}: not trainable as it is: 1 of 3 records have no answer; the first: {partly}:2: "
                            "missing field 'output' (a record needs instruction, input, output or a 'messages' list)")
    assert os.listdir(cache) == ["file_digests.json"]  # nothing half-built is left


@pytest.mark.slow
def test_hub_failure_is_one_sentence(tmp_path, tok) -> None:
    with pytest.raises(DataError) as e:
        prepare_splits(_args(["no-such-org-x7/no-such-data"]), tok, get_template("alpaca", tok),
                       cache_dir=str(tmp_path))
    message = str(e.value)
    assert message.startswith("--data no-such-org-x7/no-such-data: the Hugging Face dataset could not be loaded")
    assert "check the id, --subset and --data_files" in message and "\n" not in message


def test_hub_options_without_a_hub_id_and_unknown_sources_are_refused(tmp_path, tok, tiny_data_file: str) -> None:
    template = get_template("alpaca", tok)
    with pytest.raises(UserError, match="--data_files applies to Hugging Face dataset ids"):
        prepare_splits(_args([tiny_data_file], data_files=["x.json"]), tok, template, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"nor a Hugging Face dataset id \(org/name\). Known names: .*alpaca"):
        prepare_splits(_args(["no such thing"]), tok, template, cache_dir=str(tmp_path))


def test_streaming_needs_max_steps_and_a_count(tmp_path, tok, tiny_data_file: str) -> None:
    template = get_template("alpaca", tok)
    with pytest.raises(UserError, match="^--streaming needs --max_steps"):
        prepare_splits(_args([tiny_data_file], streaming=True), tok, template)
    with pytest.raises(UserError, match="--val_set_size as a count of records"):
        prepare_splits(_args([tiny_data_file], streaming=True, max_steps=2, val_set_size=0.1), tok, template)


def test_streaming_tokenizes_the_same_records(tmp_path, tok, records) -> None:
    data = _write(tmp_path / "d.jsonl", records, jsonl=True)
    template = get_template("alpaca", tok)
    args = _args([data], streaming=True, max_steps=2, val_set_size=16)
    train, val, info = prepare_splits(args, tok, template)
    encoded = encode_records(records, template, tok, CUTOFF)
    kept = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded if count_trainable(e)]
    n_val = sum(count_trainable(e) > 0 for e in encoded[:16])
    assert _items(val) == kept[:n_val] and info["val_records"] == n_val and info["train_records"] is None
    assert not train.lengths()
    streamed = list(train)
    key = lambda x: (x["input_ids"], x["labels"])  # noqa: E731
    assert sorted(streamed, key=key) == sorted(kept[n_val:], key=key)  # all of them, each once
    assert streamed != kept[n_val:]  # shuffled (in a buffer)
    assert train.lengths() == [len(x["input_ids"]) for x in streamed]


def test_streaming_lists_the_records_it_cut_or_left_out(tmp_path, tok, records) -> None:
    data = _write(tmp_path / "d.jsonl", records, jsonl=True)
    template = get_template("alpaca", tok)
    train, _, info = prepare_splits(_args([data], streaming=True, max_steps=2, val_set_size=16), tok, template)
    assert {e["split"] for e in info["truncation"]} == {"val"}  # training records are noted as they are read
    first = list(train)
    assert len(list(train)) == len(first)  # a second pass notes nothing again
    _, _, whole = prepare_splits(_args([data], val_set_size=0), tok, template, cache_dir=str(tmp_path / "c"))
    fields = ("index", "action", "tokens", "kept_tokens")
    expected = sorted(tuple(e[k] for k in fields) for e in whole["truncation"])
    assert {e["action"] for e in whole["truncation"]} == {"cut", "left out"}
    assert sorted(tuple(e[k] for k in fields) for e in info["truncation"]) == expected  # each once, by position
    assert [e["split"] for e in info["truncation"]] == sorted(["val" if e[0] < 16 else "train" for e in expected],
                                                               key=lambda s: s != "val")


def test_streaming_run_trains_max_steps(tmp_path, tiny_model_dir: str, records) -> None:
    from alpaca_cot.training.run import run_finetune

    data = _write(tmp_path / "d.jsonl", records, jsonl=True)
    metrics, _ = run_finetune(FinetuneArgs(
        model_name_or_path=tiny_model_dir, data=[data], streaming=True, max_steps=3, val_set_size=8,
        per_gpu_train_batch_size=4, lora_target_modules=["q_proj"], compute_dtype="fp32",
        output_dir=str(tmp_path / "out"), cutoff_len=64))
    assert metrics["steps"] == 3 and metrics["train_records"] is None and metrics["validation_records"] == 8
    assert metrics["effective_tokens"] > 0 and metrics["flops_per_token"] > 0
    listed = [json.loads(line) for line in open(tmp_path / "out" / "truncated_records.jsonl", encoding="utf-8")]
    assert {e["split"] for e in listed} == {"val", "train"}  # the training records read, cut at 64 tokens


@pytest.mark.slow
def test_under_torchrun_the_main_process_prepares_and_the_other_loads(tmp_path, tiny_tokenizer_dir: str,
                                                                        tiny_data_file: str) -> None:
    script = tmp_path / "prepare.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, json
        sys.path.insert(0, {ROOT!r})
        from transformers import AutoTokenizer
        from alpaca_cot.config import FinetuneArgs
        from alpaca_cot.data.prepared import prepare_splits
        from alpaca_cot.data.templates import get_template
        tok = AutoTokenizer.from_pretrained({tiny_tokenizer_dir!r})
        args = FinetuneArgs(model_name_or_path="m", data=[{tiny_data_file!r}], val_set_size=8)
        train, _, info = prepare_splits(args, tok, get_template("alpaca", tok), cache_dir={str(tmp_path / "c")!r})
        print(json.dumps({{"rank": int(os.environ["RANK"]), "cache": info["cache"], "n": len(train)}}))
        """), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([*LAUNCHERS["torchrun"](2), str(script)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                   key=lambda x: x["rank"])
    assert [(x["rank"], x["cache"]) for x in lines] == [(0, "miss"), (1, "hit")]
    assert lines[0]["n"] == lines[1]["n"] == 192


@pytest.mark.slow
def test_streaming_under_torchrun_trains_in_sync(tmp_path, tiny_model_dir: str, records) -> None:
    data = _write(tmp_path / "d.jsonl", records, jsonl=True)
    out = tmp_path / "out"
    cmd = [*LAUNCHERS["torchrun"](2), os.path.join(ROOT, "tests", "fixtures", "replicas.py"), "--model_name_or_path",
           tiny_model_dir, "--data", data, "--streaming", "--max_steps", "3", "--val_set_size", "8",
           "--per_gpu_train_batch_size", "4", "--lora_target_modules", "q_proj", "--compute_dtype", "fp32",
           "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    assert REPLICAS_LINE.format(same=True) in proc.stdout, proc.stdout[-3000:]  # the harness compared the ranks
    assert metrics["train_records"] is None and metrics["validation_records"] == 8


@pytest.mark.slow
def test_streaming_without_max_steps_is_one_line(tmp_path, tiny_model_dir: str, tiny_data_file: str) -> None:
    from tests.conftest import run_script

    proc = run_script("uniform_finetune.py", "--model_name_or_path", tiny_model_dir, "--data", tiny_data_file,
                      "--streaming", "--output_dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("--streaming needs --max_steps: a stream has no length "
                                                         "to count --epochs in")


def test_default_workers_follow_the_data_size_and_the_cores() -> None:
    from alpaca_cot.data.cache import MAX_WORKERS, RECORDS_PER_WORKER, default_workers

    cores = len(os.sched_getaffinity(0))
    assert default_workers(RECORDS_PER_WORKER - 1, None) == 1  # a small set: no process to start
    assert default_workers(10**7, None) == min(cores, MAX_WORKERS)
    assert default_workers(10, 3) == 3  # --preprocessing_num_workers as given
