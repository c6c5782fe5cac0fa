"""The work of one streamed answer per generated token, batched decoder (a batch of one) against stock generate.

Usage:
  PYTHONPATH=. .venv/bin/python benchmarks/decode_work.py [--model_name_or_path ../shared/models/stories260K-hf]
      [--max_tokens 128] [--repeats 5]

Both paths decode the same greedy answer (the server's default settings) in this thread, into a text
streamer that nobody reads, so that only the decoding is counted: Python function calls and torch (aten)
operators per token, which do not depend on the machine's load, and this thread's CPU time per token (the
median of --repeats runs, the paths taking turns).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alpaca_cot.cli import run_cli
from alpaca_cot.generation.batching import BatchedDecoder, Job
from alpaca_cot.generation.generator import Generator, _Streamer
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.models.loading import load_for_inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Counted(_Streamer):
    """The server's text streamer (with a queue nobody reads), counting the tokens it is given."""

    puts = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        super().put(value)


class _Operators(TorchDispatchMode):
    """Counts the aten operators that run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def paths(generator: Generator, params: SamplingParams) -> dict[str, Callable[[], int]]:
    """Each path as a function that decodes the answer and returns its token count."""
    prompt = generator.prompt_ids({"messages": [{"role": "user", "content": "Tell me a story about a cat."}]})
    alone, batched = BatchedDecoder(generator, 1), BatchedDecoder(generator, 2)

    def job() -> Job:
        return Job(list(prompt), params, _Counted(generator.tokenizer, skip_prompt=True, skip_special_tokens=True),
                   threading.Event())

    @torch.inference_mode()
    def generate() -> int:
        one = job()
        alone._alone(one)
        return one.streamer.puts - 1  # the first put is the prompt

    @torch.inference_mode()
    def batch_of_one() -> int:
        one = job()
        batched._prefill(one)
        while batched._rows:
            batched._step()
        return one.streamer.puts - 1

    return {"generate": generate, "batched": batch_of_one}


def python_calls(run: Callable[[], int]) -> int:
    """How many Python and C functions ``run`` calls."""
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


def main(model_name_or_path: str = os.path.join(os.path.dirname(ROOT), "shared", "models", "stories260K-hf"),
         max_tokens: int = 128, repeats: int = 5) -> None:
    """Print Python calls, aten operators and CPU microseconds per token of both paths."""
    torch.set_num_threads(1)
    generator = Generator(*load_for_inference(None, model_type="llama", model_name_or_path=model_name_or_path,
                                              compute_dtype="fp32"))
    params = SamplingParams(max_new_tokens=int(max_tokens), temperature=0)  # the server's defaults, greedy
    runs = paths(generator, params)
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(int(repeats)):
        for name in list(runs) if repeat % 2 == 0 else list(reversed(runs)):
            start = time.thread_time()
            tokens = runs[name]()
            cpu[name].append((time.thread_time() - start) / tokens)
    print("| path | tokens | Python calls / token | aten operators / token | CPU us / token (median) |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        calls = python_calls(run)
        with _Operators() as operators:
            tokens = run()
        print(f"| {name} | {tokens} | {calls / tokens:.0f} | {operators.count / tokens:.0f} | "
              f"{statistics.median(cpu[name]) * 1e6:.0f} |")


if __name__ == "__main__":
    run_cli(main)
