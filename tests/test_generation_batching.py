"""Generator.batch_streams: concurrent streams decode in one batch, each with its own settings, and a greedy
answer is the one generate gives alone; on the real stories260K model and a tiny model of every family."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from alpaca_cot.errors import UserError
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.generation.text import StopText
from alpaca_cot.models.loading import load_for_inference
from tests.conftest import shared_path
from tests.fixtures.tiny_models import NATIVE, write_tiny_model

GREEDY = SamplingParams(do_sample=False, max_new_tokens=32)


@pytest.fixture(scope="module")
def stories(stories_dir: str) -> Iterator[Generator]:
    """A Generator over the real stories260K model (fp32, one thread), batched from the start."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = Generator(*load_for_inference(None, model_type="llama", model_name_or_path=stories_dir,
                                              compute_dtype="fp32"))
    yield generator
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def records(alpaca_file: str) -> list[dict]:
    with open(alpaca_file, encoding="utf-8") as f:
        return json.load(f)[:10]


@contextmanager
def batch_rows(generator: Generator) -> Iterator[list[tuple[int, int]]]:
    """Yield the list of (rows, tokens per row) of the model's forward passes, in order: a prefill reads
    one row's prompt, a decoding step one token of every row."""
    sizes: list[tuple[int, int]] = []
    handle = generator.model.register_forward_hook(lambda module, args, kwargs, out: sizes.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


@contextmanager
def held(generator: Generator, streams: int) -> Iterator[None]:
    """Hold the model until ``streams`` streams were submitted to the decoder: they all wait at once, whatever
    the machine's load, and the decoder admits as many as fit the moment it gets the model."""
    submitted = threading.Semaphore(0)
    decoder = generator.decoder

    def submit(job: Any) -> None:
        type(decoder).submit(decoder, job)
        submitted.release()

    decoder.submit = submit
    try:
        with generator.lock:
            yield
            assert all(submitted.acquire(timeout=60) for _ in range(streams))
    finally:
        del decoder.submit


def concurrently(generator: Generator, jobs: list[tuple[dict, SamplingParams]], hold: bool = False,
                 stops: list[threading.Event] | None = None) -> list[str]:
    """Stream every (record, params) from its own thread (``hold``: all queued before the first token); the
    answers in order (a failed stream's: its exception)."""
    answers: list[Any] = [""] * len(jobs)

    def run(i: int) -> None:
        try:
            answers[i] = "".join(generator.stream(*jobs[i], stops[i] if stops else None))
        except Exception as e:
            answers[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    with held(generator, len(jobs)) if hold else contextlib.nullcontext():
        for thread in threads:
            thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


def alone(generator: Generator, record: dict, params: SamplingParams) -> str:
    """The answer of ``generate`` for ``record`` by itself (no batch, no decoder)."""
    decoder, generator.decoder = generator.decoder, None
    try:
        return generator.generate([record], params, batch_size=1)[0]
    finally:
        generator.decoder = decoder


def test_concurrent_greedy_streams_are_batched_and_equal_generate_alone(stories: Generator,
                                                                        records: list[dict]) -> None:
    assert stories.batch_streams(8)
    with batch_rows(stories) as sizes:
        answers = concurrently(stories, [(r, GREEDY) for r in records], hold=True)
    # All ten wait when the decoder starts: eight decode together, never more; the last two join the running
    # batch (a prefill of one row each) as rows finish.
    assert max(rows for rows, _ in sizes) == 8
    assert sum(tokens > 1 for _, tokens in sizes[sizes.index((8, 1)):]) == 2
    assert answers == [alone(stories, r, GREEDY) for r in records]
    assert all(answers)


def test_each_stream_keeps_its_own_settings(stories: Generator, records: list[dict]) -> None:
    settings = [GREEDY,
                dataclasses.replace(GREEDY, repetition_penalty=1.0, no_repeat_ngram_size=0),
                dataclasses.replace(GREEDY, max_new_tokens=5),
                SamplingParams(max_new_tokens=24, temperature=0.8, top_k=20, seed=7),
                SamplingParams(max_new_tokens=24, temperature=1.3, top_p=0.5, seed=8)]
    jobs = [(records[i], p) for i, p in enumerate(settings)]
    assert stories.batch_streams(8)
    together = concurrently(stories, jobs)
    for (record, params), answer in zip(jobs[:3], together[:3], strict=True):
        assert answer == alone(stories, record, params)
    assert len(set(together[:2])) == 2 and len(together[2]) < len(together[0])
    # A seeded request samples the same answer alone and in a batch: it has its own random generator.
    assert together[3:] == [concurrently(stories, [job])[0] for job in jobs[3:]]
    assert together[3:] == concurrently(stories, jobs[3:])
    assert together[3] != concurrently(stories, [(records[3], dataclasses.replace(settings[3], seed=9))])[0]


def test_template_stop_strings_cut_each_batched_stream(stories: Generator, records: list[dict]) -> None:
    cutting = Generator(stories.model, stories.tokenizer,
                        dataclasses.replace(stories.template, stop_strings=("said", "ing", " the ")))
    expected = cutting.generate(records, GREEDY)
    assert sum(a != b for a, b in zip(expected, cutting.generate(records, GREEDY, batch_size=1), strict=True)) == 0
    assert cutting.batch_streams(8)
    assert concurrently(cutting, [(r, GREEDY) for r in records]) == expected
    assert sum(a != b for a, b in zip(expected, concurrently(stories, [(r, GREEDY) for r in records]),
                                      strict=True)) >= 6  # the stop strings did cut


def test_streamed_text_is_cut_as_the_whole_text_would_be() -> None:
    """However an answer is split into pieces, what is sent is the whole text cut at its first stop string
    (for an answer's own ends: leading spaces dropped first, trailing ones last); nothing sent is taken back."""
    rng = random.Random(0)
    stops = ("### Response:", "### Human:", "ab")
    parts = ["#", "##", " ", "a", "b", "\n", "Res", "ponse:", "### ", "Human:", "x y"]
    for _ in range(2000):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        for strip in (False, True):
            stream, whole = StopText(stops, strip), text.lstrip() if strip else text
            hits = [whole.find(s) for s in stops if s in whole]
            whole = whole[:min(hits)] if hits else whole
            sent = ""
            for piece in pieces:
                sent += stream.feed(piece)
                if stream.done:  # as every reader does
                    break
            sent += stream.rest()
            assert sent == (whole.rstrip() if strip else whole), (pieces, strip)
            assert stream.done == bool(hits)


def test_a_stopped_stream_leaves_the_batch_and_a_waiting_one_never_starts(stories: Generator,
                                                                         records: list[dict]) -> None:
    long = SamplingParams(do_sample=False, max_new_tokens=200, repetition_penalty=1.0, no_repeat_ngram_size=0)
    assert stories.batch_streams(2)
    stops = [threading.Event() for _ in range(3)]
    stops[2].set()  # given up before its turn: the third waits behind two rows
    first_piece = threading.Event()
    seen: list[str] = []

    def consume() -> None:
        for piece in stories.stream(records[0], long, stops[0]):
            seen.append(piece)
            first_piece.set()
            stops[0].set()

    with batch_rows(stories) as sizes:
        stopper = threading.Thread(target=consume)
        stopper.start()
        first_piece.wait(timeout=60)
        answers = concurrently(stories, [(records[1], long), (records[2], long)], stops=[threading.Event(),
                                                                                         stops[2]])
        stopper.join(timeout=60)
    assert answers[1] == ""  # cancelled while waiting: no prefill, no tokens
    assert answers[0] == alone(stories, records[1], long)
    assert len(sizes) < 2 * 200  # the stopped stream did not run to its 200 tokens
    assert sizes.count((1, 1)) >= 150 and seen  # the other one decoded alone once the stopped row left


def test_sampling_params_refuse_what_torch_cannot_take() -> None:
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    for bad in ({"seed": 2**64}, {"seed": -(2**63) - 1}, {"temperature": float("inf")},
                {"repetition_penalty": float("nan")}, {"top_p": float("nan")}):
        with pytest.raises(UserError):
            SamplingParams(**bad)
    # top_k 0 means no cut; left out, generate would apply its default top-k of 50.
    assert SamplingParams(top_k=0).generation_kwargs()["top_k"] == 0


@pytest.mark.parametrize("model_type", sorted(NATIVE))
def test_every_family_batches_exactly(model_type: str, tmp_path: Any, records: list[dict]) -> None:
    tokenizer_dir = shared_path("models", "stories260K-hf")
    model_dir = write_tiny_model(str(tmp_path / model_type), model_type, tokenizer_dir)
    generator = Generator(*load_for_inference(None, model_type=model_type, model_name_or_path=model_dir,
                                              compute_dtype="fp32"))
    assert generator.batch_streams(4)
    params = dataclasses.replace(GREEDY, max_new_tokens=12)
    with batch_rows(generator) as sizes:
        answers = concurrently(generator, [(r, params) for r in records[:6]], hold=True)
    assert max(rows for rows, _ in sizes) == 4
    assert answers == [alone(generator, r, params) for r in records[:6]]


def test_a_failing_step_fails_its_requests_and_the_decoder_goes_on(stories: Generator, records: list[dict]) -> None:
    """Out of memory while choosing tokens, in a prefill and in a decoding step: those requests fail, the rest
    and every later request are answered as before."""
    params = dataclasses.replace(GREEDY, max_new_tokens=8)
    expected = [alone(stories, r, params) for r in records[:4]]
    assert stories.batch_streams(4)
    decoder, calls = stories.decoder, []

    def failing(jobs: list, *args: Any) -> torch.Tensor:
        calls.append(len(jobs))
        if len(calls) == 1 or (len(jobs) == 2 and calls.count(2) == 1):  # the first prefill; the first 2-row step
            raise torch.OutOfMemoryError("injected")
        return type(decoder)._choose(decoder, jobs, *args)

    decoder._choose = failing
    answers = concurrently(stories, [(r, params) for r in records[:3]], hold=True)
    assert calls.count(2) == 1 and all(isinstance(a, torch.OutOfMemoryError) for a in answers), (calls, answers)
    assert decoder._thread.is_alive() and not decoder._rows
    assert concurrently(stories, [(r, params) for r in records[:4]], hold=True) == expected
    assert "".join(stories.stream(records[0], params)) == expected[0]


READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy")


def test_a_decoding_step_reads_the_device_once(stories: Generator, records: list[dict],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The token choice is batched: over rows of three different settings, each step reads the device once
    (the chosen tokens), whatever the batch size; the model's forward and the streamer are not counted."""
    assert stories.batch_streams(8)
    decoder, counts, state = stories.decoder, [], threading.local()

    def counted(name: str) -> Any:
        method = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any) -> Any:
            if getattr(state, "phase", None) == "count":
                counts[-1][1] += 1
            return method(self, *args)
        return read

    def phase(name: str, fn: Any, label: str | None) -> Any:
        def wrapped(*args: Any) -> Any:
            outer = getattr(state, "phase", None)
            if label:
                counts.append([label, 0])
            state.phase = "count" if label else "skip"
            try:
                return fn(*args)
            finally:
                state.phase = outer
        return wrapped

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    for name, label in (("_step", "step"), ("_prefill", "prefill"), ("_forward", None), ("_emit", None)):
        setattr(decoder, name, phase(name, getattr(decoder, name), label))
    settings = [GREEDY, dataclasses.replace(GREEDY, repetition_penalty=1.0, no_repeat_ngram_size=0),
                SamplingParams(max_new_tokens=32, temperature=0.8, top_k=20, seed=7)]
    answers = concurrently(stories, [(r, settings[i % 3]) for i, r in enumerate(records[:6])], hold=True)
    assert all(isinstance(a, str) and a for a in answers)
    steps = [n for label, n in counts if label == "step"]
    assert len(steps) >= 20 and set(steps) == {1}
    assert {n for label, n in counts if label == "prefill"} == {1}
