"""The instruction-data collection (data/): converters on the real raw files of ../shared/data/raw,
the collection.py verbs, and the registry's statistics table."""

from __future__ import annotations

import json
import os
import re

import pytest

from alpaca_cot.data import sources
from alpaca_cot.data.cot import split_cot
from alpaca_cot.data.records import DataError, read_records
from data import catalog, curation
from data.collection import convert, stats
from data.converters import FORMATS, convert_file, source_files
from data.storage import check_file, load_records, write_records
from tests.conftest import run_script, shared_path
from tests.data_helpers import load_data

# The original Alpaca-CoT statistics table: Dataset, Nums, Lang, Task, Gen.
ORIGINAL_TABLE = [
    ("Chain of Thought", "74771", "EN/CN", "MT", "HG"), ("GPT4all", "806199", "EN", "MT", "COL"),
    ("GPTeacher", "29013", "EN", "MT", "SI"), ("Guanaco", "534610", "ML", "MT", "SI"),
    ("HC3", "37175", "EN/CN", "TS", "MIX"), ("alpaca", "52002", "EN", "MT", "SI"),
    ("Natural Instructions", "5040134", "ML", "MT", "COL"), ("belle_cn", "1079517", "CN", "TS/MT", "SI"),
    ("instinwild", "52191", "EN/CN", "MT", "SI"), ("prosocial dialog", "165681", "EN", "TS", "MIX"),
    ("finance_en", "68912", "EN", "TS", "COL"), ("xP3", "78883588", "ML", "MT", "COL"),
    ("firefly", "1649398", "CN", "MT", "COL"), ("instruct", "888969", "EN", "MT", "COL"),
    ("Code Alpaca", "20022", "EN", "TS", "SI"), ("Alpaca_GPT4", "52002", "EN/CN", "MT", "SI"),
    ("webGPT", "18994", "EN", "TS", "MIX"), ("dolly 2.0", "15015", "EN", "TS", "HG"),
    ("baize", "653699", "EN", "MT", "COL"), ("hh-rlhf", "284517", "EN", "TS", "MIX"),
    ("OIG(part)", "49237", "EN", "MT", "COL"), ("GAOKAO", "2785", "CN", "MT", "COL"),
    ("camel", "760620", "EN", "MT", "SI"), ("FLAN-Muffin", "1764800", "EN", "MT", "COL"),
    ("COIG(FlagInstruct)", "298428", "CN", "MT", "COL"), ("GPT4Tools", "71446", "EN", "MT", "SI"),
    ("ShareChat", "1663241", "EN", "MT", "MIX"), ("Auto CoT", "5816", "EN", "MT", "COL"),
    ("MOSS", "1583595", "EN/CN", "TS", "SI"), ("ultrachat", "28247446", "EN", "", ""),
    ("Chinese-medical", "792099", "CN", "TS", "COL"), ("CSL", "396206", "CN", "MT", "COL"),
    ("pCLUE", "1200705", "CN", "MT", "COL"), ("news_commentary", "252776", "CN", "TS", "COL"),
    ("StackLLaMA", "todo", "EN", "", ""),
]
SEED_NAMES = ("alpaca", "belle", "cot", "belle1.5m", "finance", "multiturn_chat", "CoT_Chinese_data", "gpt4all",
              "alpaca-belle", "alpaca-cot", "alpaca-belle-cot")

# Every raw record that cannot become a training record, and why (file, line -> words of the reason).
EMPTY_OUTPUT = "field 'output' is empty"
TWO_ANSWERS = "it follows another assistant turn"
EMPTY_ANSWER = "is empty, and it is the final answer"
OTHER_PROMPT = "field 'rejected' differs from 'chosen' before the reply"
ALPACA_ZH = "alpaca_chinese_dataset/alpaca_data-{}-中文-{}.json"
KNOWN_BAD = {
    **{(ALPACA_ZH.format("0-3252", "已完成"), n): EMPTY_OUTPUT for n in (1422, 6117, 6737, 8682)},
    **{("alpaca_chinese_dataset/alpaca_data-0-3252-英文.json", n): EMPTY_OUTPUT for n in (1422, 6113, 6733, 8678)},
    **{(ALPACA_ZH.format("9407-12345", "未完成"), n): EMPTY_OUTPUT for n in (9602, 10177)},
    **{("alpaca_chinese_dataset/alpaca_data-9407-12345-英文.json", n): EMPTY_OUTPUT for n in (9282, 9742, 10322)},
    **{("codealpaca/code_alpaca_2k.json", n): EMPTY_OUTPUT for n in (1187, 9297)},
    **{("hh_rlhf/harmless-base/test.jsonl.gz", n): EMPTY_ANSWER for n in (87, 517, 926, 1104)},
    # hh-rlhf is read as preference pairs: the transcripts must agree up to their last replies.
    **{("hh_rlhf/harmless-base/test.jsonl.gz", n): TWO_ANSWERS for n in (668, 764, 1320, 1850)},
    **{("hh_rlhf/harmless-base/test.jsonl.gz", n): OTHER_PROMPT for n in (1255, 1689, 1951, 1953, 2037)},
    ("medicalgpt/sharegpt_zh_1K_format.jsonl", 781): "is a user turn that no assistant turn answers",
}
KNOWN_REPAIRS = {
    (ALPACA_ZH.format("9407-12345", "未完成"), 14006): "trailing comma",
    ("instructionwild/user_2.jsonl", 134): "invalid JSON escape",
    ("instructionwild/user_2.jsonl", 168): "invalid JSON escape \\d",
    **{("medicalgpt/sharegpt_zh_1K_format.jsonl", n): "dropped the final user turn"
       for n in (119, 341, 587, 708, 917, 986)},
}
LOCATION = re.compile(r"^(?P<path>.*?):(?P<line>\d+)(?: \(record \d+\))?: (?P<what>.*)$", re.DOTALL)


@pytest.fixture(scope="module")
def raw() -> str:
    return shared_path("data", "raw")


@pytest.fixture(scope="module")
def converted(raw: str) -> dict[str, tuple]:
    """Every raw file converted once: relative path -> (records, report)."""
    return {os.path.relpath(path, raw): convert_file(path) for path in source_files(raw)}


def sources_table(raw: str) -> dict[str, int]:
    """SOURCES.md's per-file table: relative path -> records (the leading number of the cell)."""
    counts = {}
    with open(os.path.join(raw, "SOURCES.md"), encoding="utf-8") as f:
        for line in f:
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            if len(cells) == 11 and cells[0].startswith("`"):
                counts[cells[0].strip("`")] = int(cells[5].split()[0])
    return counts


def located(lines: list[str]) -> dict[tuple[str, int], str]:
    out = {}
    for line in lines:
        match = LOCATION.match(line)
        assert match, line
        out[(match["path"], int(match["line"]))] = match["what"]
    return out


def test_every_raw_file_converts_and_counts_agree_with_sources(raw, converted):
    expected = sources_table(raw)
    assert len(expected) == 383 and sum(expected.values()) == 85657
    assert sorted(converted) == sorted(expected)
    for path, (records, report) in converted.items():
        assert len(records) + len(report.bad) == expected[path], report.summary()
        assert report.rows == expected[path] or report.format == "seed_tasks", report.summary()


def test_bad_records_and_repairs_are_the_known_real_file_defects(raw, converted):
    bad = located([line for _, report in converted.values() for line in report.bad])
    assert {(os.path.relpath(p, raw), n) for p, n in bad} == set(KNOWN_BAD)
    for (path, line), why in bad.items():
        assert KNOWN_BAD[(os.path.relpath(path, raw), line)] in why
    repaired = located([line for _, report in converted.values() for line in report.repaired])
    assert {(os.path.relpath(p, raw), n) for p, n in repaired} == set(KNOWN_REPAIRS)
    for (path, line), what in repaired.items():
        assert KNOWN_REPAIRS[(os.path.relpath(path, raw), line)] in what
    assert sum(len(records) for records, _ in converted.values()) == 85657 - len(KNOWN_BAD)


def test_every_source_format_is_met_in_the_raw_files(converted):
    met = {report.format for _, report in converted.values()}
    # "messages" is the unified multi-turn format itself; the round trip below reads it back. The
    # layouts of evaluation sets and task collections are absent from ../shared: test_collection_layouts.py
    # tests each on a fixture of its own, test_preference_data.py the preference layouts. hh_rlhf (SFT) is
    # only chosen by --format: detection reads hh-rlhf as pairs.
    assert met == set(FORMATS) - {"messages", "qa", "qa_tsv", "choice", "target_scores", "prompts", "humaneval",
                                  "mbpp", "ultrafeedback", "sharegpt_pairs", "pairs", "kto", "hh_rlhf"}


@pytest.mark.slow
def test_convert_then_validate_round_trips(converted, tmp_path):
    multi_turn = set()
    for i, (path, (records, report)) in enumerate(converted.items()):
        if not records:
            continue
        out = str(tmp_path / f"{i}.jsonl")
        write_records(out, records)
        trainable, kind = FORMATS[report.format].trainable, FORMATS[report.format].kind
        assert read_records(out, need_answer=trainable, kind=kind) == records, path
        if not trainable:
            with pytest.raises(DataError, match="missing field 'output'"):
                read_records(out)
        again, again_report = convert_file(out)  # a unified file converts to itself
        assert again == records and not again_report.bad, path
        if any("messages" in record for record in records):
            multi_turn.add(report.format)
    assert multi_turn == {"sharegpt", "firefly", "hh_rlhf_pairs", "moss"}
    assert check_file(out).lines()[1] == "  trainable: every record has an answer"


def test_multi_turn_sources_become_turns_and_tool_calls(raw, converted):
    fastchat = converted["fastchat/dummy_conversation.json"][0][0]["messages"]
    assert [t["role"] for t in fastchat] == ["user", "assistant", "user", "assistant"]
    assert fastchat[0]["content"] == "Who are you?"
    tools = converted["llama_factory/glaive_toolcall_en_demo.json"][0][0]["messages"]
    assert tools[0]["role"] == "system" and "search_recipes" in tools[0]["content"]
    assert tools[4]["content"].startswith("<tool_call>\n{\"name\": \"search_recipes\"")
    assert tools[5]["role"] == "user" and tools[5]["content"].startswith("<tool_response>")
    moss = converted["moss/conversation_with_plugins/calculator/calculator_plugin_conversation_1.json"][0][0]
    roles = [t["role"] for t in moss["messages"]]
    assert roles[:3] == ["system", "user", "assistant"] and "MOSS" in moss["messages"][0]["content"]
    assert not any("<|" in t["content"] or "<eo" in t["content"] for t in moss["messages"][1:])
    hh = converted["hh_rlhf/harmless-base/test.jsonl.gz"][0][0]["messages"]
    assert hh[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    firefly = converted["firefly/dummy_data.jsonl"][0][0]["messages"]
    assert len(firefly) == 10 and firefly[2] == {"role": "user", "content": "如何应对突发紧急情况？"}


def test_single_turn_quirks(converted):
    code = converted["alpaca_chinese_dataset/代码问题.json"][0]
    assert len(code) == 9057 and all(r["input"] == "" or "history" not in r for r in code)
    assert sum(1 for r in code if r["input"] == "") >= 8084  # the input key is missing in 8084 records
    gpteacher = converted["gpteacher/codegen-instruct.json"][0][0]
    assert set(gpteacher) == {"instruction", "input", "output"}
    completion = converted["self_instruct/ag_news_classify.jsonl"][0][0]
    assert completion["output"] == "Business"
    wild = converted["instructionwild/user_2.jsonl"][0]
    assert "[01]?\\d" in wild[167]["instruction"]  # \d repaired as a literal backslash
    assert "output" not in wild[0]
    seeds = converted["belle/zh_seed_tasks.json"][0]
    assert seeds[0] == {"instruction": "请以下面词语为主题写一首诗", "input": "夏天",
                        "output": "不但春妍夏亦佳，随缘花草是生涯。\n鹿葱解插纤长柄，金凤仍开最小花。"}
    assert converted["alpaca_cot/mmcu_test.json"][0][0]["output"] == "D"
    coig = converted["alpaca_chinese_dataset/COIG-CQIA-sample.json"][0]
    assert all(set(r) == {"instruction", "input", "output"} for r in coig)  # empty system and history


def test_cot_rows_use_seeded_phrasings_of_their_dataset(raw, converted):
    path = os.path.join(raw, "flan_v2_cot", "strategyqa_train.tsv")
    first, _ = convert_file(path, seed=42)
    assert first == converted["flan_v2_cot/strategyqa_train.tsv"][0] == convert_file(path, seed=42)[0]
    assert convert_file(path, seed=7)[0] != first
    question = "Are more people today related to Genghis Khan than Julius Caesar?"
    assert question in first[0]["instruction"] and first[0]["output"].rstrip(".").endswith("yes")
    phrasings = {r["instruction"].replace(q, "") for r, q in zip(first[:300], _questions(path)[:300], strict=True)}
    assert len(phrasings) >= 4
    aqua = converted["flan_v2_cot/aqua_train.tsv"][0]
    assert all("\\n" not in r["instruction"] + r["output"] for r in aqua)  # FLAN's \n became newlines
    assert "\nOptions:\n(A) 300\n" in aqua[0]["instruction"] and aqua[0]["output"].endswith("(C).")


def _questions(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.split("\t")[0].replace("\\n", "\n").strip() for line in f.read().split("\n") if line.strip()]


def test_flan_cot_reads_the_rows_alpaca_cot_formatted(raw, converted):
    """Alpaca-CoT's own conversion of qasc has the same rows in the same order."""
    with open(os.path.join(raw, "alpaca_cot", "formatted_cot_data", "qasc_train.json"), encoding="utf-8") as f:
        reference = json.load(f)
    ours = converted["flan_v2_cot/qasc_train.tsv"][0]
    assert len(ours) == len(reference) == 1084
    for mine, theirs, question in zip(ours, reference, _questions(os.path.join(raw, "flan_v2_cot", "qasc_train.tsv")),
                                      strict=True):
        assert question in mine["instruction"] and question in theirs["instruction"].replace("\\n", "\n")
        assert theirs["output"].rstrip(".").split()[-1] in mine["output"]


def test_gsm8k_jsonl_and_flan_tsv_hold_the_same_answers(converted):
    jsonl = converted["gsm8k/train.jsonl"][0]
    tsv = converted["flan_v2_cot/gsm8k_train.tsv"][0]
    assert len(jsonl) == len(tsv) == 7473  # U+2028 inside fields does not split records
    assert not any("<<" in r["output"] for r in jsonl)
    same = sum(split_cot(a)[2].replace(",", "") == split_cot(b)[2].replace(",", "")
               for a, b in zip(jsonl, tsv, strict=True))
    assert same == 7473


@pytest.mark.slow
def test_cli_builds_cot_and_data_cot_resolves(raw, tmp_path, monkeypatch):
    out = tmp_path / "CoT_data.json"
    proc = run_script("data/collection.py", "convert", os.path.join(raw, "flan_v2_cot"), str(out))
    assert "wrote 26528 records" in proc.stdout
    assert "trainable: every record has an answer" in run_script("data/collection.py", "validate", str(out)).stdout
    monkeypatch.setattr(sources, "DATA_DIR", str(tmp_path))
    records = load_data(["cot"])
    assert len(records) == 26528 and records == read_records(str(out))
    assert catalog.local_count("cot", sources.load_registry()) == 26528
    refused = run_script("data/collection.py", "convert", os.path.join(raw, "flan_v2_cot"), str(out), check=False)
    assert refused.returncode == 2 and "already exists; pass --overwrite" in refused.stderr


def test_bad_records_stop_conversion_unless_skipped(raw, tmp_path, capsys):
    src, out = os.path.join(raw, "hh_rlhf"), str(tmp_path / "hh.jsonl")
    with pytest.raises(DataError, match=r"13 records cannot be converted") as error:
        convert(src, out)
    assert "test.jsonl.gz:668: field 'chosen (turn 5)'" in str(error.value) and not os.path.exists(out)
    assert "test.jsonl.gz:1951: field 'rejected' differs from 'chosen'" in str(error.value)
    convert(src, out, skip_bad=True)
    assert "skipped 13 bad records" in capsys.readouterr().out
    assert len(read_records(out, kind="pairs")) == 2299
    convert(src, out, format="hh_rlhf", skip_bad=True, overwrite=True)  # SFT: the chosen transcripts
    assert "skipped 12 bad records" in capsys.readouterr().out and len(read_records(out)) == 2300


def test_bad_record_names_file_line_and_field(tmp_path):
    src = tmp_path / "broken.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": 3}\n', encoding="utf-8")
    records, report = convert_file(str(src))
    assert len(records) == 1 and report.bad == [f"{src}:3: field 'output' must be a string, got int"]


def test_fill_and_instruction_only_are_reported(raw, tmp_path, capsys):
    out = str(tmp_path / "identity.json")
    convert(os.path.join(raw, "llama_factory", "identity.json"), out, fill="name=Alpaca-CoT,author=us")
    assert "85 records contain template placeholders" in capsys.readouterr().out
    assert not check_file(out).placeholders and "Alpaca-CoT" in read_records(out)[0]["output"]
    prompts = str(tmp_path / "wild.jsonl")
    convert(os.path.join(raw, "instructionwild"), prompts)
    check = check_file(prompts)
    assert check.unanswered == 1535 and "not trainable: instruction-only" in "\n".join(check.lines())


def test_stats_reproduce_the_original_table(tmp_path, capsys):
    stats(out_dir=str(tmp_path))
    mark, table = (tmp_path / "statistics.md").read_text(encoding="utf-8").split("\n", 1)
    assert mark == catalog.STATS_MARK
    assert table == capsys.readouterr().out.split("wrote")[0].rstrip("\n") + "\n"
    rows = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table.splitlines()[2:]]
    got = [(re.match(r"\[(.*)\]\(", row[0])[1], *row[1:5]) for row in rows]
    assert got == ORIGINAL_TABLE
    assert (tmp_path / "relative_size.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "statistics.md").write_text("stale", encoding="utf-8")
    with pytest.raises(DataError, match="statistics.md already exists; pass --overwrite"):
        stats(out_dir=str(tmp_path))  # not a file stats wrote: kept


@pytest.mark.slow
def test_stats_regenerates_its_own_files(tmp_path):
    stats(out_dir=str(tmp_path))
    first = (tmp_path / "statistics.md").read_text(encoding="utf-8")
    assert catalog.generated_by_stats(str(tmp_path / "relative_size.png"))
    (tmp_path / "relative_size.png").write_bytes((tmp_path / "relative_size.png").read_bytes() + b"old")
    proc = run_script("data/collection.py", "stats", "--out_dir", str(tmp_path))  # no --overwrite needed
    assert proc.returncode == 0 and (tmp_path / "statistics.md").read_text(encoding="utf-8") == first
    assert not (tmp_path / "relative_size.png").read_bytes().endswith(b"old")


def test_registry_schema_and_names():
    registry = sources.load_registry()
    assert all(name in registry for name in SEED_NAMES)
    rows = catalog.table_rows(registry)
    assert len(rows) == len(ORIGINAL_TABLE)
    assert {name for name, e in rows.items() if e["status"] == "planned"} == {
        "sharegpt", "auto-cot", "stackllama", "moss", "ultrachat"}
    for name, entry in registry.items():
        assert ("files" in entry) != ("combine" in entry), name
        assert all(part in registry for part in entry.get("combine", [])), name
        if "combine" in entry:
            union = [f for part in entry["combine"] for f in registry[part]["hf_files"]]
            assert entry["hf_files"] == list(dict.fromkeys(union)), name
        elif entry["files"]:
            assert len(entry["files"]) == len(entry["hf_files"]), name
        if "row" in entry:
            assert {"records", "lang", "task", "gen", "type", "source", "url", "source_format"} <= set(entry)
            assert entry["source_format"] in FORMATS or " " in entry["source_format"], name


@pytest.mark.slow
def test_mix_dedup_decontaminate(raw, tmp_path, capsys):
    sqa = str(tmp_path / "sqa.jsonl")
    write_records(sqa, convert_file(os.path.join(raw, "flan_v2_cot", "strategyqa_train.tsv"))[0])
    run_mix = run_script("data/collection.py", "mix", str(tmp_path / "mix.json"), f"{sqa}:0.5", f"{sqa}:2")
    assert "wrote 5152 records" in run_mix.stdout  # 1030 + 4122
    mixed = load_records(str(tmp_path / "mix.json"))
    assert curation.mix_counts([2061, 10], [1, 3], total=100) == [25, 75]
    assert len(curation.dedup(mixed, "exact")) == len(curation.dedup(mixed)) == 2060  # one duplicate upstream
    assert curation.normalize("Ｈｅｌｌｏ,  World!") == curation.normalize("hello world")
    eval_file = tmp_path / "eval.jsonl"
    rows = [json.loads(line) for line in open(os.path.join(raw, "gsm8k", "train.jsonl"), encoding="utf-8")][:3]
    eval_file.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    gsm = str(tmp_path / "gsm.json")
    write_records(gsm, convert_file(os.path.join(raw, "flan_v2_cot", "gsm8k_train.tsv"))[0])
    run_script("data/collection.py", "decontaminate", gsm, str(tmp_path / "clean.json"), "--eval_file", str(eval_file))
    assert len(load_records(str(tmp_path / "clean.json"))) == 7473 - 3


def test_download_offline_says_one_sentence(tmp_path):
    proc = run_script("data/collection.py", "download", "alpaca", check=False, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Cannot download 'alpaca'" in proc.stderr
    with pytest.raises(DataError, match="has no file in the Hugging Face dataset"):
        catalog.download("stackllama")
