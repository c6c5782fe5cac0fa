"""--columns (LLaMA-Factory's column names) and Parquet/CSV files: an unseen layout converts and trains, a
one-item list is its item, a mapping naming a missing field is one line, the cache keys on the mapping."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from transformers import AutoTokenizer

from alpaca_cot.config import FinetuneArgs
from alpaca_cot.data import sources
from alpaca_cot.data.columns import map_record, parse_columns
from alpaca_cot.data.pipeline import file_rows, to_record
from alpaca_cot.data.prepared import prepare_splits
from alpaca_cot.data.records import DataError, read_records
from alpaca_cot.data.templates import get_template
from alpaca_cot.errors import UserError
from data import collection
from data.storage import check_file
from tests.conftest import run_script

MAPPING = "prompt=sQuestion,response=lSolutions"


def _math_rows(n: int = 24) -> list[dict]:
    """A math-word-problem layout no converter knows: a type-prefixed question key, the answer in a one-item list."""
    return [{"iIndex": i, "sQuestion": f"Tom has {i} apples and buys {i + 2} more. How many apples now?",
             "lSolutions": [float(2 * i + 2)], "lEquations": [f"x={i}+{i + 2}"]} for i in range(n)]


def _expected(rows: list[dict]) -> list[dict]:
    return [{"instruction": r["sQuestion"], "input": "", "output": str(int(r["lSolutions"][0]))} for r in rows]


def _write_json(path, rows: list[dict]) -> str:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: str):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_a_mapping_is_parsed_from_pairs_or_an_object_and_checked() -> None:
    assert parse_columns("prompt=q, response=a") == {"prompt": "q", "response": "a"} == parse_columns(
        {"prompt": "q", "response": "a"})
    assert FinetuneArgs(model_name_or_path="m", data=["x"], columns="prompt=q,response=a").columns == {
        "prompt": "q", "response": "a"}
    assert parse_columns(None) is None and parse_columns("") is None
    for bad, says in [("prompt", "expected NAME=FIELD pairs"), ("prompt=q,answer=a", "unknown name 'answer'"),
                      ("response=a", "name either prompt"), ("prompt=q,messages=m", "name either prompt"),
                      ("prompt=q,role_tag=r", "role_tag does not go with prompt")]:
        with pytest.raises(UserError, match=says) as e:
            FinetuneArgs(model_name_or_path="m", data=["x"], columns=bad)
        assert "\n" not in str(e.value)


def test_a_one_item_list_is_its_item_and_a_dotted_field_reaches_one_level_down() -> None:
    columns = {"prompt": "problem.text", "query": "context", "response": "answer"}
    row = {"problem": {"text": "What is 6 times 7?"}, "context": ["Multiply."], "answer": ["42"]}
    assert map_record(row, columns, "f:1") == {"instruction": "What is 6 times 7?", "input": "Multiply.",
                                               "output": "42"}
    assert map_record({**row, "answer": [42.0]}, columns, "f:1")["output"] == "42"
    assert map_record({**row, "answer": [2.5]}, columns, "f:1")["output"] == "2.5"
    assert map_record({**row, "answer": ["4", "2"]}, columns, "f:1")["output"] == "4, 2"  # several: joined


def test_history_and_system_make_a_conversation_and_tags_name_the_turns() -> None:
    columns = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
               "system": "system"}
    row = {"instruction": "And 3?", "input": "Be brief.", "output": "9", "system": "You square numbers.",
           "history": [["2?", "4"]]}
    assert map_record(row, columns, "f:1")["messages"] == [
        {"role": "system", "content": "You square numbers."}, {"role": "user", "content": "2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3?\nBe brief."},
        {"role": "assistant", "content": "9"}]
    alone = {"prompt": "instruction", "response": "output", "system": "system"}
    assert [t["role"] for t in map_record(row, alone, "f:1")["messages"]] == ["system", "user", "assistant"]
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello"}]}
    assert map_record(sharegpt, {"messages": "conversations"}, "f:1")["messages"] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]
    custom = {"chat": [{"who": "Q", "text": "Hi"}, {"who": "A", "text": "Hello"}]}
    tags = {"messages": "chat", "role_tag": "who", "content_tag": "text", "user_tag": "Q", "assistant_tag": "A"}
    assert [t["role"] for t in map_record(custom, tags, "f:1")["messages"]] == ["user", "assistant"]
    openai = {"m": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert map_record(openai, {"messages": "m"}, "f:1")["messages"] == openai["m"]
    with pytest.raises(DataError, match=r"f:1: field 'chat\[1\]\.who' is 'B'; the roles are Q, A, system"):
        map_record({"chat": [custom["chat"][0], {"who": "B", "text": "x"}]}, tags, "f:1")


def test_a_mapping_that_names_a_missing_field_is_one_line(tmp_path) -> None:
    path = _write_json(tmp_path / "mawps.json", _math_rows(3))
    for columns, says in [({"prompt": "sQuestoin", "response": "lSolutions"}, "field 'sQuestoin' is missing"),
                          ({"prompt": "sQuestion", "query": "sBody", "response": "lSolutions"},
                           "--columns query=sBody: no such field")]:
        with pytest.raises(DataError) as e:
            list(file_rows(path, columns))
        message = str(e.value)
        assert says in message and path in message and "sQuestion" in message and "lEquations" in message
        assert "\n" not in message
    with pytest.raises(DataError) as e:
        collection.convert(path, str(tmp_path / "out.json"), columns="prompt=sQuestion,response=answer")
    message = str(e.value)
    assert "needs answer, which no row has" in message and path in message and "lSolutions" in message
    assert "\n" not in message and not (tmp_path / "out.json").exists()


def test_convert_and_training_read_an_unseen_layout_alike(tmp_path) -> None:
    rows = _math_rows(5)
    path = _write_json(tmp_path / "mawps.json", rows)
    with pytest.raises(DataError, match="map its fields with --columns"):
        collection.convert(path, str(tmp_path / "refused.json"))
    out = tmp_path / "out.jsonl"
    collection.convert(path, str(out), columns=MAPPING)
    converted = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert converted == _expected(rows) == [to_record(r) for r in file_rows(path, parse_columns(MAPPING))]


def test_parquet_and_csv_files_read_as_json_does(tmp_path) -> None:
    rows = _math_rows(4)
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    # A CSV cell is text as written: "007" stays "007", an empty input is "".
    table = [{"question": r["sQuestion"], "input": "", "answer": f"00{i}"} for i, r in enumerate(rows)]
    pd.DataFrame(table).to_csv(tmp_path / "m.csv", index=False)
    assert [to_record(r) for r in file_rows(str(tmp_path / "m.parquet"), parse_columns(MAPPING))] == _expected(rows)
    csv_rows = [to_record(r) for r in file_rows(str(tmp_path / "m.csv"), parse_columns(
        "prompt=question,query=input,response=answer"))]
    assert csv_rows == [{"instruction": t["question"], "input": "", "output": t["answer"]} for t in table]
    unified = [{"instruction": r["sQuestion"], "input": "", "output": "x"} for r in rows]
    pd.DataFrame(unified).to_csv(tmp_path / "folder.csv", index=False)
    (tmp_path / "sub").mkdir()
    pd.DataFrame(unified).to_parquet(tmp_path / "sub" / "u.parquet")
    found = sources.resolve_data([str(tmp_path / "sub")])
    assert found == [str(tmp_path / "sub" / "u.parquet")]
    assert [to_record(r) for r in file_rows(found[0])] == unified  # no mapping: the columns are unified
    assert read_records(str(tmp_path / "folder.csv")) == unified  # as predict.py and evaluate.py read --data
    assert check_file(found[0]).errors == [] and check_file(found[0]).single == 4  # collection.py validate


def _args(data: list[str], **kw) -> FinetuneArgs:
    return FinetuneArgs(**{"model_name_or_path": "m", "data": data, "val_set_size": 0, "cutoff_len": 64, **kw})


def test_the_cache_keys_on_the_mapping(tmp_path, tok) -> None:
    rows = [{**r, "sBody": "Think."} for r in _math_rows(6)]
    path, cache, template = _write_json(tmp_path / "m.json", rows), str(tmp_path / "cache"), get_template("alpaca", tok)
    first = prepare_splits(_args([path], columns=MAPPING), tok, template, cache)
    again = prepare_splits(_args([path], columns=MAPPING), tok, template, cache)
    other = prepare_splits(_args([path], columns=MAPPING + ",query=sBody"), tok, template, cache)
    assert (first[2]["cache"], again[2]["cache"], other[2]["cache"]) == ("miss", "hit", "miss")
    assert first[0][0] == again[0][0] != other[0][0]


def test_a_registry_entry_with_columns(tmp_path, monkeypatch, tok) -> None:
    rows = _math_rows(6)
    _write_json(tmp_path / "mawps.json", rows)
    registry = {"mawps": {"files": ["mawps.json"], "columns": {"prompt": "sQuestion", "response": "lSolutions"}},
                "plain": {"files": ["plain.json"]}, "both": {"combine": ["mawps", "plain"]}}
    _write_json(tmp_path / "plain.json", _expected(rows)[:2])
    monkeypatch.setattr(sources, "DATA_DIR", str(tmp_path))
    monkeypatch.setattr(sources, "load_registry", lambda: registry)
    template = get_template("alpaca", tok)
    train, _, _ = prepare_splits(_args(["both"]), tok, template, str(tmp_path / "cache"))
    reference, _, _ = prepare_splits(_args([_write_json(tmp_path / "ref.json", _expected(rows) + _expected(rows)[:2])]),
                                     tok, template, str(tmp_path / "cache"))
    assert [train[i] for i in range(len(train))] == [reference[i] for i in range(len(reference))]
    with pytest.raises(DataError, match="--columns maps the fields of files, folders and hub datasets"):
        prepare_splits(_args(["mawps"], columns=MAPPING), tok, template, str(tmp_path / "cache"))
    registry["mawps"]["columns"] = {"prompt": "sQuestion", "answer": "lSolutions"}
    with pytest.raises(DataError, match=r"registry.json: mawps: columns: unknown name 'answer'"):
        prepare_splits(_args(["mawps"]), tok, template, str(tmp_path / "cache"))


def _train(tmp_path, model: str, *data: str, extra: tuple[str, ...] = ()) -> dict:
    out = tmp_path / "run"
    run_script("uniform_finetune.py", "--model_name_or_path", model, "--data", ",".join(data), *extra,
               "--val_set_size", "0", "--max_steps", "2", "--per_gpu_train_batch_size", "4", "--cutoff_len", "64",
               "--compute_dtype", "fp32", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out))
    assert (out / "adapter_model.safetensors").is_file()
    return json.load(open(out / "metrics.json", encoding="utf-8"))


@pytest.mark.slow
def test_an_unseen_layout_converts_and_trains_with_columns(tmp_path, tiny_model_dir: str) -> None:
    raw = _write_json(tmp_path / "mawps.json", _math_rows())
    converted = tmp_path / "converted.json"
    run_script("data/collection.py", "convert", raw, str(converted), "--columns", MAPPING)
    assert json.loads(converted.read_text(encoding="utf-8")) == _expected(_math_rows())
    metrics = _train(tmp_path, tiny_model_dir, raw, extra=("--columns", MAPPING))
    assert metrics["train_records"] == 24 and metrics["steps"] == 2
    saved = json.load(open(tmp_path / "run" / "finetune_args.json", encoding="utf-8"))
    assert saved["columns"] == {"prompt": "sQuestion", "response": "lSolutions"}


@pytest.mark.slow
def test_parquet_and_csv_files_train(tmp_path, tiny_model_dir: str) -> None:
    rows = _math_rows()
    pd.DataFrame([{"question": r["sQuestion"], "answer": r["lSolutions"]} for r in rows[:12]]).to_parquet(
        tmp_path / "a.parquet")
    pd.DataFrame([{"question": r["sQuestion"], "answer": str(int(r["lSolutions"][0]))} for r in rows[12:]]).to_csv(
        tmp_path / "b.csv", index=False)
    metrics = _train(tmp_path, tiny_model_dir, str(tmp_path / "a.parquet"), str(tmp_path / "b.csv"),
                     extra=("--columns", "prompt=question,response=answer"))
    assert metrics["train_records"] == 24 and metrics["steps"] == 2


def test_a_saved_dataset_and_a_stream_are_mapped_alike(tmp_path, tok) -> None:
    import datasets

    rows = _math_rows(6)
    saved = str(tmp_path / "saved")
    datasets.Dataset.from_list(rows).save_to_disk(saved)
    template, cache = get_template("alpaca", tok), str(tmp_path / "cache")
    reference, _, _ = prepare_splits(_args([_write_json(tmp_path / "u.json", _expected(rows))]), tok, template, cache)
    expected = [reference[i] for i in range(len(reference))]
    train, _, _ = prepare_splits(_args([saved], columns=MAPPING), tok, template, cache)
    assert [train[i] for i in range(len(train))] == expected
    stream, _, _ = prepare_splits(_args([saved], columns=MAPPING, streaming=True, max_steps=1), tok, template, cache)
    streamed = sorted(list(stream), key=expected.index)  # shuffled in its buffer: the same records
    assert streamed == expected
    with pytest.raises(DataError, match=r"saved: --columns prompt=question: no such field; the fields are iIndex"):
        prepare_splits(_args([saved], columns="prompt=question"), tok, template, cache)
