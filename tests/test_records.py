"""Data files that cannot be decoded or are shaped wrongly: one line naming the file, the line and the byte."""

from __future__ import annotations

import json

import pytest

from alpaca_cot.data.records import DataError, read_records
from tests.conftest import run_script

ROW = json.dumps({"instruction": "Name a colour.", "output": "Blue"})


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_invalid_utf8_names_file_line_and_byte(tmp_path, suffix: str) -> None:
    # "café" in Latin-1 (0xE9) on the third line, as a file saved by an old editor would hold it.
    good = ROW.encode() + b"\n" + ROW.encode() + b"\n"
    bad = b'{"instruction": "caf\xe9", "output": "x"}\n'
    data = (b"[" + good.replace(b"}\n", b"},\n") + bad + b"]\n") if suffix == ".json" else good + bad
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(DataError) as caught:
        read_records(str(path))
    assert str(caught.value) == (f"{path}:3: invalid UTF-8 at byte offset {offset} (byte 0xe9); "
                                 "save the file as UTF-8")


def test_a_byte_order_mark_is_not_counted_as_an_error(tmp_path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + ROW.encode() + b"\n")
    assert read_records(str(path))[0]["output"] == "Blue"


def test_a_single_json_object_is_named_as_such(tmp_path) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}: holds a single JSON object, not a list of records; "
                                        r"wrap it in \[ \] or write one record per line \(JSON Lines\)$"):
        read_records(str(path))
    # One record on one line is a valid JSON Lines file.
    path.write_text(ROW, encoding="utf-8")
    assert read_records(str(path))[0]["instruction"] == "Name a colour."
    # A broken JSON Lines file is still reported at its line.
    path.write_text(ROW + "\n{broken\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON"):
        read_records(str(path))


@pytest.mark.slow
def test_predict_reports_invalid_utf8_in_one_line(tmp_path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"instruction": "\xff"}\n')
    proc = run_script("predict.py", "--data", str(path), "--result_dir", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == f"error: {path}:1: invalid UTF-8 at byte offset 17 (byte 0xff); save the file as UTF-8\n"
    assert not (tmp_path / "out").exists()
