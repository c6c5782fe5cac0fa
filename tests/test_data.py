"""Reading unified-format data: names, paths, and errors that say where and what."""

from __future__ import annotations

import json

import pytest

from alpaca_cot.data.records import DataError, read_records
from alpaca_cot.data.sources import load_registry, resolve_data
from tests.conftest import shared_path
from tests.data_helpers import load_data


def test_json_and_jsonl_read_alike(tmp_path) -> None:
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    (tmp_path / "x.json").write_text(json.dumps(rows))
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_records(str(tmp_path / "x.json")) == read_records(str(tmp_path / "x.jsonl"))
    assert read_records(str(tmp_path / "x.json"))[0]["input"] == ""


def test_bad_json_line_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": }\n')
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        read_records(str(path))


def test_missing_field_names_index_and_field(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "response": "b"}]))
    with pytest.raises(DataError, match=rf"{path}: record 1: missing field 'output'"):
        read_records(str(path))


def test_wrong_type_and_bad_turns_are_named(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "a", "output": 3}]))
    with pytest.raises(DataError, match="record 0: field 'output' must be a string"):
        read_records(str(path))
    path.write_text(json.dumps([{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}]))
    with pytest.raises(DataError, match=r"field 'messages\[1\].role' is 'user' but 'assistant' was expected"):
        read_records(str(path))


def test_real_trailing_comma_file_is_reported_with_its_line() -> None:
    path = shared_path("data", "raw", "alpaca_chinese_dataset", "alpaca_data-9407-12345-中文-未完成.json")
    with pytest.raises(DataError, match=r"未完成\.json:14007: invalid JSON"):
        read_records(path)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(DataError, match="Known names: .*alpaca-belle-cot"):
        resolve_data(["no-such-data"])


def test_registered_name_without_file_says_which_file_and_how_to_get_it() -> None:
    registry = load_registry()
    assert {"alpaca", "belle", "alpaca-belle", "cot", "alpaca-cot", "alpaca-belle-cot", "belle1.5m", "finance",
            "multiturn_chat", "CoT_Chinese_data", "gpt4all"} <= set(registry)
    with pytest.raises(DataError) as e:
        resolve_data(["belle1.5m"])
    message = str(e.value)
    assert "belle_data1.5M_cn.json" in message and "data/collection.py download belle1.5m" in message


def test_several_sources_mix_in_order(tmp_path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.jsonl"
    a.write_text(json.dumps([{"instruction": "1", "output": "x"}]))
    b.write_text(json.dumps({"instruction": "2", "output": "y"}) + "\n")
    assert [r["instruction"] for r in load_data([str(a), str(b)])] == ["1", "2"]
