"""The Generator (batched, streamed) and generate.py, on an adapter trained on the tiny Llama (built in
code); one real-model check on stories260K when ../shared is there."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
import time

import pytest

from alpaca_cot.errors import UserError
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.models.loading import load_for_inference
from alpaca_cot.runs import find_run
from tests.conftest import PYTHON, ROOT, run_script

GREEDY = SamplingParams(do_sample=False, max_new_tokens=24)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a tiny model runs fastest on one thread, and the test machine is shared


@pytest.fixture(scope="module")
def records(tiny_data_file: str) -> list[dict]:
    """11 single-turn records (CoT, Chinese, stories) and one multi-turn chat."""
    with open(tiny_data_file, encoding="utf-8") as f:
        rows = json.load(f)
    chats = [r for r in rows if "messages" in r]
    return rows[:11] + chats[:1]


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
    lengths = [len(generator.prompt_ids(r)) for r in records]
    first, last = [[lengths[i] for i, _ in b] for b in (batches[0], batches[-1])]
    assert min(first) >= max(last)  # longest prompts first
    batched = generator.generate(records, GREEDY, batch_size=4)
    assert batched == generator.generate(records, GREEDY, batch_size=1)  # left padding changes nothing
    assert all(batched)


def test_real_model_on_real_rows_batches_like_one_at_a_time(stories_dir: str, alpaca_file: str) -> None:
    # The real stories260K Llama (its SentencePiece-style tokenizer pads with <unk>) on real Alpaca rows.
    with open(alpaca_file, encoding="utf-8") as f:
        rows = json.load(f)[:8]
    real = Generator(*load_for_inference(model_name_or_path=stories_dir, model_type="llama", compute_dtype="fp32"))
    batched = real.generate(rows, GREEDY, batch_size=4)
    assert batched == real.generate(rows, GREEDY, batch_size=1) and all(batched)


def test_stream_gives_the_generated_answer(generator: Generator, records: list[dict]) -> None:
    for record in records[:3]:
        assert "".join(generator.stream(record, GREEDY)) == generator.generate([record], GREEDY)[0]
    # Stop strings that this model writes (three characters from the middle of its answers): the stream
    # is cut where generate's answer is. They cannot overlap: cut_response cuts at one stop after
    # another, so of "wer" and "r i" in "answer is" it would keep "answe".
    full = generator.generate(records, GREEDY)
    stops: list[str] = []
    for answer in full:
        stop = answer[len(answer) // 2:len(answer) // 2 + 3]
        if len(answer) >= 8 and not any(_overlap(stop, other) for other in stops):
            stops.append(stop)
    cutting = Generator(generator.model, generator.tokenizer, dataclasses.replace(generator.template,
                                                                                  stop_strings=tuple(stops)))
    cut = cutting.generate(records, GREEDY)
    assert sum(len(a) < len(b) for a, b in zip(cut, full, strict=True)) >= len(records) // 2
    assert all(b.startswith(a) for a, b in zip(cut, full, strict=True))
    assert ["".join(cutting.stream(r, GREEDY)) for r in records] == cut
    beams = SamplingParams(do_sample=False, max_new_tokens=16, num_beams=2)  # beam search cannot stream
    assert list(generator.stream(records[0], beams)) == generator.generate([records[0]], beams)


def _overlap(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` can overlap in a text (one inside the other, or an end of one opens the other)."""
    return a in b or b in a or any(a.endswith(b[:k]) or b.endswith(a[:k]) for k in range(1, min(len(a), len(b))))


def test_stop_event_ends_a_stream_early(generator: Generator, records: list[dict]) -> None:
    long = SamplingParams(do_sample=False, max_new_tokens=400, repetition_penalty=1.0, no_repeat_ngram_size=0)
    stop = threading.Event()
    forwards: list[int] = []

    def hook(*args: object) -> None:  # set from the decoding thread after 4 tokens: no race with the consumer
        forwards.append(1)
        if len(forwards) == 4:
            stop.set()

    handle = generator.model.get_base_model().register_forward_hook(hook)
    try:
        partial = "".join(generator.stream(records[0], long, stop))
    finally:
        handle.remove()
    full = "".join(generator.stream(records[0], long))
    assert partial and len(forwards) == 4 and len(partial) < len(full) / 4
    assert full.startswith(partial.strip())


@pytest.mark.slow
def test_one_shot_prints_the_streamed_answer(trained_adapter: str, generator: Generator) -> None:
    record = {"instruction": "Write a short story about a cat.", "input": "A cat named Tom."}
    proc = run_script("generate.py", "--lora_dir", trained_adapter, "--instruction", record["instruction"],
                      "--input", record["input"], "--do_sample", "False", "--max_new_tokens", "24",
                      "--compute_dtype", "fp32", env=ONE_THREAD)
    assert proc.stdout == generator.generate([record], GREEDY)[0] + "\n"


@pytest.mark.slow
def test_seed_command_finds_the_run_by_its_data_and_loops(trained_adapter: str, tiny_data_file: str,
                                                         tmp_path) -> None:
    # The seed ran `generate.py --data alpaca-belle-cot --model_type llama` from the project folder,
    # with the run under saved_models/; here the run is trained on tiny200.json. Sampling is on (the
    # seed's default), so --seed makes the answers the same on every run.
    runs = tmp_path / "saved_models" / "tiny-lm_tiny200_0.003"
    runs.mkdir(parents=True)
    os.symlink(trained_adapter, runs / "lora")
    name = os.path.splitext(os.path.basename(tiny_data_file))[0]
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "generate.py"), "--data", name, "--model_type", "llama",
                           "--max_new_tokens", "16", "--seed", "0"], cwd=tmp_path,
                          input="Write a short story.\n\nAdd the two numbers.\n",
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
