"""The Generator (batched, streamed) and generate.py, on an adapter trained on stories260K."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
import time

import pytest

from alpaca_cot.errors import UserError
from alpaca_cot.generation import Generator, SamplingParams
from alpaca_cot.runs import find_run
from tests.conftest import PYTHON, ROOT, run_script

GREEDY = SamplingParams(do_sample=False, max_new_tokens=24)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a 260K model runs fastest on one thread, and the test machine is shared



@pytest.fixture(scope="module")
def records(alpaca_file: str) -> list[dict]:
    with open(alpaca_file, encoding="utf-8") as f:
        return json.load(f)[:12]


def test_sampling_params_coerce_fire_values_and_reject_bad_ones() -> None:
    params = SamplingParams(max_new_tokens="32", temperature="0.7", top_p=1, do_sample="false", seed="3")
    assert (params.max_new_tokens, params.temperature, params.top_p, params.do_sample, params.seed) == (
        32, 0.7, 1.0, False, 3)
    assert "temperature" not in params.generation_kwargs()  # greedy: no sampling knobs
    defaults = SamplingParams()  # the original's documented settings
    assert (defaults.top_p, defaults.temperature, defaults.do_sample, defaults.no_repeat_ngram_size,
            defaults.repetition_penalty) == (0.9, 1.0, True, 6, 1.8)
    for bad in ({"top_p": 0}, {"top_p": 1.5}, {"max_new_tokens": 0}, {"temperature": -1}, {"num_beams": 0},
                {"repetition_penalty": 0}, {"top_k": "many"}):
        with pytest.raises(UserError):
            SamplingParams(**bad)


def test_batches_are_length_sorted_and_equal_one_at_a_time(generator: Generator, records: list[dict]) -> None:
    batches = list(generator.generate_batches(records, GREEDY, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 4]
    assert sorted(i for b in batches for i, _ in b) == list(range(len(records)))
    lengths = [generator.prompt_length(r) for r in records]
    first, last = [[lengths[i] for i, _ in b] for b in (batches[0], batches[-1])]
    assert min(first) >= max(last)  # longest prompts first
    batched = generator.generate(records, GREEDY, batch_size=4)
    assert batched == generator.generate(records, GREEDY, batch_size=1)  # left padding changes nothing
    assert all(batched)


def test_stream_gives_the_generated_answer(generator: Generator, records: list[dict]) -> None:
    for record in records[:3]:
        assert "".join(generator.stream(record, GREEDY)) == generator.generate([record], GREEDY)[0]
    # Stop strings that this model writes: the stream is cut where generate's answer is.
    cutting = Generator(generator.model, generator.tokenizer,
                        dataclasses.replace(generator.template, stop_strings=("said", "ing", " the ")))
    cut = cutting.generate(records, GREEDY)
    assert sum(a != b for a, b in zip(cut, generator.generate(records, GREEDY), strict=True)) >= 6
    assert ["".join(cutting.stream(r, GREEDY)) for r in records] == cut
    beams = SamplingParams(do_sample=False, max_new_tokens=16, num_beams=2)  # beam search cannot stream
    assert list(generator.stream(records[0], beams)) == generator.generate([records[0]], beams)


def test_stop_event_ends_a_stream_early(generator: Generator, records: list[dict]) -> None:
    long = SamplingParams(do_sample=False, max_new_tokens=400, repetition_penalty=1.0, no_repeat_ngram_size=0)
    stop = threading.Event()
    pieces = []
    for piece in generator.stream(records[0], long, stop):
        pieces.append(piece)
        stop.set()
    full = "".join(generator.stream(records[0], long))
    partial = "".join(pieces)
    assert partial and len(partial) < len(full) / 4
    assert full.startswith(partial.strip())


def test_one_shot_prints_the_streamed_answer(trained_adapter: str, generator: Generator) -> None:
    record = {"instruction": "Write a short story about a cat.", "input": "A cat named Tom."}
    proc = run_script("generate.py", "--lora_dir", trained_adapter, "--instruction", record["instruction"],
                      "--input", record["input"], "--do_sample", "False", "--max_new_tokens", "24",
                      "--compute_dtype", "fp32", env=ONE_THREAD)
    assert proc.stdout == generator.generate([record], GREEDY)[0] + "\n"


def test_seed_command_finds_the_run_by_its_data_and_loops(trained_adapter: str, alpaca_file: str,
                                                         tmp_path) -> None:
    # The seed ran `generate.py --data alpaca-belle-cot --model_type llama` from the project folder,
    # with the run under saved_models/; here the run is trained on alpaca200.json.
    runs = tmp_path / "saved_models" / "stories260K-hf_alpaca200_0.003"
    runs.mkdir(parents=True)
    os.symlink(trained_adapter, runs / "lora")
    name = os.path.splitext(os.path.basename(alpaca_file))[0]
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "generate.py"), "--data", name, "--model_type", "llama",
                           "--max_new_tokens", "16"], cwd=tmp_path, input="Tell me a story.\n\nName a color.\n",
                          capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Using the run in {os.path.join('saved_models', runs.name, 'lora')}" in proc.stdout
    answers = proc.stdout.split("Instruction: Response: ")
    assert len(answers) == 3 and all(a.strip() for a in answers[1:])  # the blank line asked nothing


def test_find_run_takes_the_newest_run_on_that_data(tmp_path) -> None:
    for name, data, age in (("old", ["data/alpaca.json"], 100), ("new", ["alpaca"], 0), ("other", ["belle"], 0)):
        (tmp_path / name).mkdir()
        args = tmp_path / name / "finetune_args.json"
        args.write_text(json.dumps({"data": data}))
        os.utime(args, (time.time() - age, time.time() - age))
    assert find_run("alpaca", str(tmp_path)) == str(tmp_path / "new")
    assert find_run("data/alpaca.json", str(tmp_path)) == str(tmp_path / "new")  # matched by file stem too
    with pytest.raises(UserError, match="pass --lora_dir"):
        find_run("guanaco", str(tmp_path))
