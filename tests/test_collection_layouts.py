"""Layouts of public instruction and evaluation sets beyond ../shared's sources: each on a small
fixture written here in that layout (rows shaped like the published files), converted by the real
``convert`` code; the ``LAYOUTS`` table is also what the closing note's table is measured from."""

from __future__ import annotations

import json
import os

import pytest

from alpaca_cot.data.records import DataError, read_records
from data.collection import convert
from data.converters import convert_file
from data.storage import check_file
from tests.conftest import run_script, shared_path
from tests.data_helpers import load_data


def _jsonl(rows: list) -> str:
    return "\n".join(json.dumps(row) for row in rows) + "\n"


# name -> (file name, file text, format, records, bad, first record's output (None: instruction-only))
LAYOUTS = {
    "wrapped examples (BIG-bench task.json)": ("task.json", json.dumps({
        "name": "arith", "description": "two-digit sums", "keywords": ["arithmetic"],
        "examples": [{"input": "What is 12 plus 30?", "target": "42"}, {"input": "What is 7 plus 8?", "target": 15}],
    }), "qa", 2, 0, "42"),
    "wrapped data": ("wrapped.json", json.dumps({"version": "1.0", "data": [
        {"instruction": "Name a colour.", "output": "Blue"}, {"instruction": "Name a fruit.", "output": "Pear"}]}),
        "alpaca", 2, 0, "Blue"),
    "wrapped instances": ("instances.json", json.dumps({"Definition": ["Answer the question."], "Instances": [
        {"input": "Is water wet?", "output": ["yes"]}, {"input": "Is ice hot?", "output": ["no"]}]}),
        "qa", 2, 0, "yes"),
    "2-column TSV with header": ("pairs.tsv", "question\tanswer\nWhat is 3 times 4?\t12\nCapital of Peru?\tLima\n",
                                 "qa_tsv", 2, 0, "12"),
    "2-column TSV": ("pairs2.tsv", "How many legs has a spider?\t8\nWhat colour is snow?\twhite\n",
                     "qa_tsv", 2, 0, "8"),
    "number answer (int, float, decimal)": ("numbers.jsonl", _jsonl([
        {"question": "How many days are in a week?", "answer": 7},
        {"question": "How many wheels has a tricycle?", "answer": 3.0},
        {"question": "What is half of 5?", "answer": 2.5}]), "qa", 3, 0, "7"),
    "list answer": ("lists.jsonl", _jsonl([
        {"question": "Where is the Louvre?", "answers": ["Paris", "Paris"]},
        {"question": "Name two primary colours.", "answers": ["red", "blue"]}]), "qa", 2, 0, "Paris"),
    "SQuAD answers object": ("squad.jsonl", _jsonl([
        {"id": "1", "context": "The cat sat on the mat.", "question": "Where did the cat sit?",
         "answers": {"text": ["on the mat"], "answer_start": [12]}}]), "qa", 1, 0, "on the mat"),
    "Answer key": ("Answer.jsonl", _jsonl([{"Question": "What is 9 minus 4?", "Answer": "5"}]), "qa", 1, 0, "5"),
    "target key": ("target.jsonl", _jsonl([{"input": "Translate 'gato' to English.", "target": "cat"}]),
                   "qa", 1, 0, "cat"),
    "label key (BoolQ)": ("boolq.jsonl", _jsonl([
        {"question": "is the sun a star", "passage": "The Sun is the star at the centre of the Solar System.",
         "label": True}]), "qa", 1, 0, "yes"),
    "Body + Question (SVAMP)": ("svamp.json", json.dumps([
        {"ID": "chal-1", "Body": "Each pack of dvds costs 76 dollars. There is a discount of 25 dollars on each pack.",
         "Question": "How much do you have to pay to buy each pack?", "Equation": "( 76.0 - 25.0 )",
         "Answer": 51.0, "Type": "Subtraction"}]), "qa", 1, 0, "51"),
    "options list + index answer (MMLU)": ("mmlu.jsonl", _jsonl([
        {"question": "Which gas do plants take in?", "subject": "biology",
         "choices": ["Oxygen", "Carbon dioxide", "Helium", "Neon"], "answer": 1}]), "choice", 1, 0, "B"),
    "options label/text lists + letter (ARC on the hub)": ("arc.jsonl", _jsonl([
        {"id": "Mercury_1", "question": "Which is a mammal?",
         "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]}, "answerKey": "B"}]),
        "choice", 1, 0, "B"),
    "nested stem + choices (ARC, CommonsenseQA originals)": ("csqa.jsonl", _jsonl([
        {"id": "q1", "question": {"stem": "Where do you keep milk cold?", "choices": [
            {"label": "A", "text": "oven"}, {"label": "B", "text": "fridge"}]}, "answerKey": "B"}]),
        "choice", 1, 0, "B"),
    "options dict + letter": ("dict_options.jsonl", _jsonl([
        {"question": "2 + 2 =", "options": {"A": "3", "B": "4", "C": "5"}, "answer": "B"}]), "choice", 1, 0, "B"),
    "options + answer text": ("text_answer.jsonl", _jsonl([
        {"question": "Largest planet?", "options": ["Mars", "Jupiter"], "answer": "Jupiter"}]), "choice", 1, 0, "B"),
    "target_scores (BIG-bench multiple choice)": ("scores.json", json.dumps({"examples": [
        {"input": "Is fire cold?", "target_scores": {"yes": 0, "no": 1}}]}), "target_scores", 1, 0, "B"),
    "prompt list (Vicuna questions)": ("vicuna.jsonl", _jsonl([
        {"question_id": 1, "text": "How can I improve my time management skills?", "category": "generic"}]),
        "prompts", 1, 0, None),
    "prompt list (IFEval)": ("ifeval.jsonl", _jsonl([
        {"key": 1000, "prompt": "Write a 300+ word summary of the wikipedia page.",
         "instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"num_words": 300}]}]),
        "prompts", 1, 0, None),
    "multi-turn prompts (MT-bench)": ("mtbench.jsonl", _jsonl([
        {"question_id": 81, "category": "writing", "turns": ["Compose a travel blog post about Hawaii.",
                                                              "Rewrite it starting every sentence with A."]}]),
        "prompts", 1, 0, None),
    "multi-turn prompts with references (MT-bench math)": ("mtbench_ref.jsonl", _jsonl([
        {"question_id": 111, "category": "math", "turns": ["What is 3 squared?", "And its double?"],
         "reference": ["9", "18"]}]), "prompts", 1, 0, "18"),
    "code task with reference (HumanEval)": ("humaneval.jsonl", _jsonl([
        {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
         "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
         "entry_point": "add"}]), "humaneval", 1, 0, "    return a + b\n"),
    "code task with tests (MBPP)": ("mbpp.jsonl", _jsonl([
        {"task_id": 2, "text": "Write a function to find the shared elements of two lists.",
         "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
         "test_list": ["assert similar_elements((3, 4), (4, 5)) == (4,)"], "test_setup_code": "",
         "challenge_test_list": []}]), "mbpp", 1, 0, "def similar_elements(a, b):\n    return tuple(set(a) & set(b))"),
    "GSM8K Socratic": ("socratic.jsonl", _jsonl([
        {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
         "answer": "How many clips did Natalia sell in May? ** Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                   "How many clips did Natalia sell altogether? ** She sold 48+24 = <<48+24=72>>72 clips.\n#### 72"}]),
        "gsm8k", 1, 0, None),
    "JSONL broken by a raw line break": ("broken.jsonl",
                                         '{"instruction": "Write two lines.", "output": "first line\nsecond line"}\n'
                                         '{"instruction": "Say yes.", "output": "yes"}\n',
                                         "alpaca", 2, 0, "first line\nsecond line"),
    "bad row among good (answer object)": ("one_bad.jsonl", _jsonl([
        {"question": "Ok?", "answer": "yes"}, {"question": "Bad?", "answer": {"value": 1}}]), "qa", 1, 1, "yes"),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Every fixture written and converted once: name -> (path, records, report)."""
    folder = tmp_path_factory.mktemp("layouts")
    out = {}
    for name, (file_name, text, *_) in LAYOUTS.items():
        path = folder / file_name
        path.write_text(text, encoding="utf-8")
        out[name] = (str(path), *convert_file(str(path)))
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_converts(name, layouts):
    _, _, fmt, count, bad, output = LAYOUTS[name]
    path, records, report = layouts[name]
    assert (report.format, len(records), len(report.bad)) == (fmt, count, bad), report.summary()
    first = records[0]
    if "messages" in first and output is not None:
        assert first["messages"][-1] == {"role": "assistant", "content": output}
    elif fmt != "gsm8k":
        assert first.get("output") == output
    assert check_file_ok(path, records, tmp_dir=os.path.dirname(path))


def check_file_ok(path: str, records: list[dict], tmp_dir: str) -> bool:
    """The records written and validated as unified records, trainable exactly when they have outputs."""
    out = os.path.join(tmp_dir, os.path.basename(path) + ".out.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        f.write(_jsonl(records))
    check = check_file(out)
    answered = all("output" in r or r.get("messages", [{}])[-1].get("role") == "assistant" for r in records)
    report = "\n".join(check.lines())
    return not check.errors and (("trainable: every record has an answer" in report) == answered)


def test_numbers_are_written_as_the_source_means_them(layouts):
    _, records, _ = layouts["number answer (int, float, decimal)"]
    assert [r["output"] for r in records] == ["7", "3", "2.5"]
    _, records, _ = layouts["list answer"]
    assert [r["output"] for r in records] == ["Paris", "red, blue"]
    _, records, _ = layouts["wrapped examples (BIG-bench task.json)"]
    assert [r["output"] for r in records] == ["42", "15"]


def test_question_parts_and_options_are_kept(layouts):
    svamp = layouts["Body + Question (SVAMP)"][1][0]["instruction"]
    assert svamp.startswith("Each pack of dvds") and svamp.endswith("to buy each pack?")
    boolq = layouts["label key (BoolQ)"][1][0]["instruction"]
    assert boolq == "The Sun is the star at the centre of the Solar System.\nis the sun a star"
    mmlu = layouts["options list + index answer (MMLU)"][1][0]["instruction"]
    assert mmlu == "Which gas do plants take in?\nOptions:\n(A) Oxygen\n(B) Carbon dioxide\n(C) Helium\n(D) Neon"
    assert "(B) fridge" in layouts["nested stem + choices (ARC, CommonsenseQA originals)"][1][0]["instruction"]
    mbpp = layouts["code task with tests (MBPP)"][1][0]
    assert mbpp["input"].endswith("assert similar_elements((3, 4), (4, 5)) == (4,)")


def test_wrapped_lists_are_noted(layouts):
    _, _, report = layouts["wrapped examples (BIG-bench task.json)"]
    assert report.notes[0].endswith("read the 2 items of its top-level 'examples' list as rows "
                                    "(other top-level fields, not read: name, description, keywords)")


def test_wrapped_list_with_named_format(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(LAYOUTS["wrapped data"][1], encoding="utf-8")
    records, report = convert_file(str(path), "alpaca")
    assert [r["output"] for r in records] == ["Blue", "Pear"] and report.rows == 2


def test_prompt_lists_are_instruction_only_and_not_trainable(layouts, tmp_path):
    path, records, report = layouts["multi-turn prompts (MT-bench)"]
    assert records[0]["messages"] == [{"role": "user", "content": "Compose a travel blog post about Hawaii."}]
    assert records[0]["turns"][1] == "Rewrite it starting every sentence with A."
    assert "not trainable" in report.notes[-1]
    out = tmp_path / "vicuna.jsonl"
    convert(layouts["prompt list (Vicuna questions)"][0], str(out))
    assert "not trainable: instruction-only" in "\n".join(check_file(str(out)).lines())
    with pytest.raises(DataError, match=r"vicuna.jsonl: not trainable: the file is instruction-only \(none of its 1 "):
        load_data([str(out)])
    reference = layouts["multi-turn prompts with references (MT-bench math)"][1][0]["messages"]
    assert [t["role"] for t in reference] == ["user", "assistant", "user", "assistant"]


def test_partly_answered_file_is_not_trainable_and_says_where(tmp_path):
    path = tmp_path / "half.jsonl"
    path.write_text(_jsonl([{"instruction": "a", "output": "b"}, {"instruction": "c"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"not trainable as it is: 1 of 2 records have no answer; the first: .*half"
                                        r"\.jsonl:2: missing field 'output'"):
        load_data([str(path)])


def test_socratic_separators_are_removed(layouts):
    output = layouts["GSM8K Socratic"][1][0]["output"]
    assert "**" not in output and "<<" not in output
    assert "How many clips did Natalia sell in May? Natalia sold 48/2 = 24 clips in May." in output
    assert output.rstrip(".").endswith("72")


def test_broken_jsonl_is_repaired_and_reported(layouts):
    path, records, report = layouts["JSONL broken by a raw line break"]
    assert report.repaired == [f"{path}:1: lines 1-2 are one record broken by raw line breaks inside a string; "
                               "joined and read"]
    assert report.rows == 2 and not report.bad


def test_undetectable_file_names_nearest_formats_and_keys_once(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(_jsonl([{"stem": "q", "choices": ["a", "b"], "answer": "A"}] * 250), encoding="utf-8")
    proc = run_script("data/collection.py", "convert", str(path), str(tmp_path / "out.json"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"{path}: no source format fits the fields ['answer', 'choices', 'stem']; nearest: choice (lacks one of " \
           "question, Question, query, problem, ...), gsm8k (lacks question)" in proc.stderr
    assert "name one with --format" in proc.stderr


def test_named_format_that_does_not_fit_is_refused_once(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"What is {i} plus {i}?\t{2 * i}\n" for i in range(250)), encoding="utf-8")
    with pytest.raises(DataError) as error:
        convert(str(tsv), str(tmp_path / "out.json"), format="flan_cot")
    assert str(error.value) == (f"{tsv}: the format flan_cot reads 3 tab-separated fields per line; "
                                "this file has 2 tab-separated fields per line")
    records, _ = convert_file(str(tsv))  # detected: two fields per line are question and answer
    assert len(records) == 250 and records[3] == {"instruction": "What is 3 plus 3?", "input": "", "output": "6"}
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text(_jsonl([{"question": "q", "answer": "a"}] * 250), encoding="utf-8")
    with pytest.raises(DataError, match=r"^[^\n]*the format gsm8k needs|^[^\n]*the format alpaca needs instruction"):
        convert(str(jsonl), str(tmp_path / "out2.json"), format="alpaca")


def test_folder_conversion_skips_and_lists_undetectable_files(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text(_jsonl([{"question": "q1", "answer": 1}]), encoding="utf-8")
    (folder / "b.jsonl").write_text(_jsonl([{"foo": 1}]), encoding="utf-8")
    (folder / "c.json").write_text(json.dumps([{"instruction": "i", "output": "o"}]), encoding="utf-8")
    out = tmp_path / "out.json"
    with pytest.raises(DataError, match=r"b\.jsonl: no source format fits the fields \['foo'\]"):
        convert(str(folder), str(out))
    assert not out.exists()
    convert(str(folder), str(out), skip_bad=True)
    printed = capsys.readouterr().out
    assert f"skipped 1 files:\n  {folder / 'b.jsonl'}: no source format fits" in printed
    assert [r["output"] for r in read_records(str(out))] == ["1", "o"]


def test_literal_backslash_n_is_noted_by_convert_and_validate(tmp_path, capsys):
    src = tmp_path / "escaped.json"
    src.write_text(json.dumps([{"instruction": "List two things.\\nBe brief.", "output": "a\\nb"},
                               {"instruction": "Code", "output": "print('a\\nb')\nprint(1)"}]), encoding="utf-8")
    out = tmp_path / "out.json"
    convert(str(src), str(out))
    assert "1 records hold the two characters '\\n' and no line break" in capsys.readouterr().out
    lines = check_file(str(out)).lines()
    assert any(line.startswith("  warning: 1 records hold the two characters '\\n'") for line in lines)


def test_real_cot_conversion_has_no_debris(tmp_path):
    """Our CoT conversion of the real FLAN files stays free of literal \\n (the original kept it)."""
    src = shared_path("data", "raw", "flan_v2_cot")
    for name in sorted(os.listdir(src)):
        records, report = convert_file(os.path.join(src, name))
        assert not any("\\n" in r["instruction"] + r["output"] for r in records), name
        assert not any("literal" in note or "'\\n'" in note for note in report.notes), name
