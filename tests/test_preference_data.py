"""Preference data (issue 23, item 1): the pair and KTO records, their kinds, the layouts `convert` reads
(hh-rlhf on the real file of ../shared, the others on rows shaped like the published files), and the
collection verbs on pairs."""

from __future__ import annotations

import json

import pytest

from alpaca_cot.data.records import (
    DataError,
    read_records,
    record_kind,
    require_kind,
    validate_preference,
)
from data import curation
from data.collection import convert, decontaminate, dedup, stats, validate
from data.converters import convert_file
from data.storage import check_file, load_records, write_records
from tests.conftest import shared_path

USER = {"role": "user", "content": "Name a colour."}
PAIR = {"messages": [USER], "chosen": "Blue.", "rejected": "I will not."}
LONG = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat all day"


def _write(tmp_path, name: str, rows: list) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# name -> (source rows, detected format, the first record converted)
LAYOUTS = {
    "ultrafeedback": ([{"prompt": "Name a colour.", "prompt_id": "x1", "score_chosen": 9.0, "score_rejected": 2.0,
                        "chosen": [USER, {"role": "assistant", "content": "Blue."}],
                        "rejected": [USER, {"role": "assistant", "content": "I will not."}],
                        "messages": [USER, {"role": "assistant", "content": "Blue."}]}], "ultrafeedback", PAIR),
    "trl strings": ([{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I will not."}], "ultrafeedback",
                    {"instruction": "Name a colour.", "input": "", "chosen": "Blue.", "rejected": "I will not."}),
    "trl conversational": ([{"prompt": [USER], "chosen": [{"role": "assistant", "content": "Blue."}],
                             "rejected": [{"role": "assistant", "content": "I will not."}]}], "ultrafeedback", PAIR),
    "llama-factory sharegpt": ([{"conversations": [{"from": "human", "value": "Name a colour."}],
                                 "chosen": {"from": "gpt", "value": "Blue."},
                                 "rejected": {"from": "gpt", "value": "I will not."}, "system": "Be brief."}],
                               "sharegpt_pairs",
                               {**PAIR, "messages": [{"role": "system", "content": "Be brief."}, USER]}),
    "llama-factory alpaca": ([{"instruction": "Name a colour.", "chosen": "Blue.", "rejected": "I will not."}], "pairs",
                             {"instruction": "Name a colour.", "input": "", "chosen": "Blue.",
                              "rejected": "I will not."}),
    "llama-factory alpaca with history": ([{"instruction": "And another?", "history": [["Name a colour.", "Blue."]],
                                            "chosen": "Red.", "rejected": "No."}], "pairs",
                                          {"messages": [USER, {"role": "assistant", "content": "Blue."},
                                                        {"role": "user", "content": "And another?"}],
                                           "chosen": "Red.", "rejected": "No."}),
    "our pairs": ([PAIR], "pairs", PAIR),
    "kto messages": ([{"messages": [USER, {"role": "assistant", "content": "Blue."}], "label": True},
                      {"messages": [USER, {"role": "assistant", "content": "Purple cows."}], "label": False}], "kto",
                     {"messages": [USER], "output": "Blue.", "label": True}),
    "our kto": ([{"instruction": "Name a colour.", "output": "Blue.", "label": False}], "kto",
                {"instruction": "Name a colour.", "output": "Blue.", "label": False, "input": ""}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_layout_converts_and_round_trips(tmp_path, name):
    rows, fmt, first = LAYOUTS[name]
    records, report = convert_file(_write(tmp_path, "src.jsonl", rows))
    assert report.format == fmt and not report.bad and not report.notes and records[0] == first
    kind = "kto" if fmt == "kto" else "pairs"
    out = str(tmp_path / "out.jsonl")
    convert(str(tmp_path / "src.jsonl"), out)
    assert read_records(out, kind=kind) == records and convert_file(out)[0] == records  # unified: converts to itself


def test_hh_rlhf_real_file_becomes_pairs(capsys):
    path = shared_path("data", "raw", "hh_rlhf", "harmless-base", "test.jsonl.gz")
    records, report = convert_file(path)
    assert report.format == "hh_rlhf_pairs" and len(records) == 2299 and len(report.bad) == 13
    first = records[0]
    assert [t["role"] for t in first["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert first["messages"][-1]["content"] == "okay some of these do not have anything to do with pens"
    assert first["chosen"].startswith("No, sorry!  All of these involve a pen")
    assert first["rejected"].startswith("There are lots of funny things you can do with pens")
    assert f"{path}:1951: field 'rejected' differs from 'chosen' before the reply (at turn 2)" in report.bad[10]
    assert {record_kind(record) for record in records} == {"pairs"}
    sft, _ = convert_file(path, "hh_rlhf")  # the SFT form stays, by name: the chosen transcript
    assert sft[0]["messages"][:-1] == first["messages"] and sft[0]["messages"][-1]["content"] == first["chosen"]


def test_wrong_pairs_are_refused_with_their_line(tmp_path):
    ok = {"instruction": "Name a colour.", "chosen": "Blue.", "rejected": "Red."}
    path = _write(tmp_path, "alpaca.jsonl", [ok, {**ok, "rejected": " Blue. "}])
    assert convert_file(path)[1].bad == [
        f"{path}:2: field 'rejected' is identical to 'chosen' (a pair needs two different replies)"]
    other = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "No."}]
    row = LAYOUTS["ultrafeedback"][0][0]
    uf = _write(tmp_path, "uf.jsonl", [row, {**row, "rejected": other}])
    assert convert_file(uf)[1].bad == [f"{uf}:2: field 'rejected' differs from 'chosen' before the reply (at turn 1): "
                                       "the two replies must answer the same prompt"]
    hh = _write(tmp_path, "hh.jsonl", [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
                                        "rejected": "\n\nHuman: Hey\n\nAssistant: Go away."}])
    assert "hh.jsonl:1: field 'rejected' differs from 'chosen'" in convert_file(hh)[1].bad[0]
    gpt = _write(tmp_path, "sg.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}],
                                         "chosen": {"from": "human", "value": "Hello"},
                                         "rejected": {"from": "gpt", "value": "x"}}])
    assert convert_file(gpt)[1].bad == [f"{gpt}:1: field 'chosen.from' is 'human', not an assistant's reply (gpt)"]
    kto = _write(tmp_path, "kto.jsonl", [{"messages": [USER], "label": True}])
    assert convert_file(kto)[1].bad == [
        f"{kto}:1: field 'messages[0]' must be the assistant's reply that 'label' judges"]
    with pytest.raises(DataError, match=r"alpaca.jsonl:2: field 'rejected' is identical"):
        convert(path, str(tmp_path / "out.jsonl"))


@pytest.mark.parametrize("record, error", [
    ({**PAIR, "rejected": "Blue."}, "field 'rejected' is identical to 'chosen'"),
    ({**PAIR, "messages": [USER, {"role": "assistant", "content": "Blue."}]},
     "field 'messages' must end with a user turn in a preference pair"),
    ({"instruction": "Hi", "output": "Hello", "chosen": "a", "rejected": "b"}, "field 'output' is not read"),
    ({"instruction": "Hi", "chosen": "a"}, "missing field 'rejected'"),
    ({"instruction": "Hi", "chosen": "a", "rejected": 3}, "field 'rejected' must be a string, got int"),
    ({"instruction": "Hi", "chosen": " ", "rejected": "b"}, "field 'chosen' is empty"),
    ({"messages": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "field 'messages[0].role'"),
    ({"messages": [USER], "output": "", "label": True}, "field 'output' is empty"),
    ({"instruction": "Hi", "output": "Hello"}, "an SFT record"),
])
def test_validation_names_the_field(record, error):
    with pytest.raises(DataError, match=r"^f.jsonl:7: ") as raised:
        validate_preference(record, "f.jsonl:7")
    assert error in str(raised.value)


def test_record_kind_and_the_file_level_check(tmp_path):
    assert record_kind({"instruction": "a", "output": "b"}) == "sft"
    assert record_kind({"instruction": "a", "output": "b", "label": "positive"}) == "sft"  # a dataset's own label
    assert record_kind(PAIR) == "pairs" and record_kind({"instruction": "a", "rejected": "b"}) == "pairs"
    assert record_kind({"messages": [USER], "output": "b", "label": False}) == "kto"
    sft = _write(tmp_path, "sft.jsonl", [{"instruction": "a", "output": "b"}])
    pairs = _write(tmp_path, "pairs.jsonl", [PAIR, PAIR, {"instruction": "a", "output": "b"}])
    require_kind(sft, "sft")
    with pytest.raises(DataError) as error:
        require_kind(sft, "pairs", "--stage dpo trains on pairs")
    assert str(error.value) == (f"{sft}:1: an SFT record (an 'output' or a final assistant turn) where a preference "
                                "pair ('chosen' and 'rejected' replies) was expected; --stage dpo trains on pairs")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: a preference pair .* where an SFT record"):
        require_kind(pairs, "sft")
    with pytest.raises(DataError, match=r"pairs.jsonl:3: an SFT record"):
        read_records(pairs, kind="pairs")
    with pytest.raises(DataError, match=r"mix kinds \(2 preference pairs, 1 SFT records\)"):
        write_records(str(tmp_path / "mixed.jsonl"), load_records(pairs, need_answer=False))


def test_validate_and_stats_on_pairs(tmp_path, capsys):
    rows = [PAIR, {**PAIR, "chosen": "Dark blue.", "rejected": "No."}, {**PAIR, "rejected": "Blue."}, {"chosen": "x"}]
    path = _write(tmp_path, "pairs.jsonl", rows)
    check = check_file(path)
    assert check.kinds == {"pairs": 2} and check.identical == 1 and len(check.errors) == 2
    lines = check.lines()
    assert lines[:3] == [f"{path}: 2 valid records (0 single-turn, 2 multi-turn)",
                         "  preference pairs: 2 (mean length: chosen 8, rejected 7 characters)",
                         "  1 pairs have identical replies (invalid records, below)"]
    with pytest.raises(DataError, match="1 of 1 files have invalid records"):
        validate(path)
    assert f"{path}:4: missing field 'instruction'" in capsys.readouterr().out
    kto = _write(tmp_path, "kto.jsonl", [{"instruction": "a", "output": "b", "label": True},
                                         {"instruction": "a", "output": "c", "label": False}])
    assert "  KTO records: 2 (1 desirable, 1 undesirable)" in check_file(kto).lines()
    stats(path, kto)
    table = capsys.readouterr().out.splitlines()
    assert table[2:] == [f"| {path} | 0 | 2 | 0 | 8 | 7 | 1 | 2 |", f"| {kto} | 0 | 0 | 2 |  |  | 0 | 0 |"]


def test_dedup_and_decontaminate_pairs(tmp_path, capsys):
    rows = [PAIR, {**PAIR, "chosen": "BLUE!"}, {**PAIR, "rejected": "Something else."},
            {**PAIR, "messages": [{"role": "user", "content": "Name a fruit."}]}]
    path = _write(tmp_path, "pairs.jsonl", rows)
    dedup(path, str(tmp_path / "exact.jsonl"), mode="exact")
    assert len(read_records(str(tmp_path / "exact.jsonl"), kind="pairs")) == 4
    dedup(path, str(tmp_path / "norm.jsonl"))  # "BLUE!" is "Blue." normalized: prompt, chosen and rejected equal
    assert read_records(str(tmp_path / "norm.jsonl"), kind="pairs") == [rows[0], rows[2], rows[3]]
    kto = [{"instruction": "a", "output": "b", "label": True}, {"instruction": "a", "output": "b", "label": False}]
    assert curation.dedup(kto + kto) == kto
    dirty = [{**PAIR, "chosen": f"Well, {LONG}."}, {**PAIR, "messages": [{"role": "user", "content": LONG}]}, PAIR]
    src = _write(tmp_path, "dirty.jsonl", dirty)
    evals = _write(tmp_path, "eval.jsonl", [{"instruction": "Describe it.", "output": LONG}])
    decontaminate(src, str(tmp_path / "clean.jsonl"), eval_file=evals)
    assert read_records(str(tmp_path / "clean.jsonl"), kind="pairs") == [PAIR]  # a reply's and a prompt's 13-gram
    assert "dropped record indices: 0, 1" in capsys.readouterr().out
    pair_eval = _write(tmp_path, "pair_eval.jsonl", [{"instruction": "Describe.", "chosen": "No.", "rejected": LONG}])
    assert curation.decontaminate(dirty, load_records(pair_eval), 13)[1] == [0, 1]  # a pairs file as the eval set
