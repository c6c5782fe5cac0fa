"""Time to first token of generate.py and server.py (and of the Generator they share).

Usage:
  PYTHONPATH=. .venv/bin/python benchmarks/first_token.py --lora_dir RUN [--n_messages 5] [--threads 1]

Measures, with the default sampling settings:
- in-process: the prefill plus one token (``generate`` with max_new_tokens=1), and the first piece
  ``Generator.stream`` yields (later by the few tokens held back until they cannot start a stop
  string such as "### Instruction:");
- server.py as a user runs it (stdin/stdout pipes): from launch to the first "User: " prompt, and
  from each message sent to the first character of its answer;
- generate.py --instruction: from launch to the first character of the answer (model load included).
Medians over --n_messages; the machine's load average is printed, since a busy machine skews timings.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from alpaca_cot.cli import run_cli
from alpaca_cot.generation.generator import Generator
from alpaca_cot.generation.sampling import SamplingParams
from alpaca_cot.models.loading import load_for_inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGES = ["Tell me about alpacas.", "Give three tips for staying healthy.", "What are the three primary colors?",
            "Write a haiku about the sea.", "Describe a sunny day.", "Name a famous scientist.",
            "How do plants grow?", "Tell me a joke."]


def _read_until(stream, text: str) -> None:
    seen = b""
    while not seen.endswith(text.encode()):
        byte = stream.read(1)
        if not byte:
            raise RuntimeError(f"the script exited before printing {text!r}")
        seen += byte


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def main(lora_dir: str, n_messages: int = 5, max_new_tokens: int = 32, threads: int = 1) -> None:
    """Print time-to-first-token measurements for the model of --lora_dir as JSON."""
    torch.set_num_threads(int(threads))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    n = min(int(n_messages), len(MESSAGES))
    generator = Generator(*load_for_inference(lora_dir))
    params = SamplingParams(max_new_tokens=max_new_tokens)
    one = SamplingParams(max_new_tokens=1)
    generator.generate([{"instruction": "warm up", "input": ""}], one)
    prefill, first_piece = [], []
    for message in MESSAGES[:n]:
        record = {"instruction": message, "input": ""}
        start = time.perf_counter()
        generator.generate([record], one)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        pieces = generator.stream(record, params)
        next(pieces, None)
        first_piece.append(time.perf_counter() - start)
        pieces.close()

    launch = time.perf_counter()
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "server.py"), "--lora_dir", lora_dir,
                               "--max_new_tokens", str(max_new_tokens)], cwd=ROOT, env=env, bufsize=0,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    _read_until(server.stdout, "User: ")
    server_ready = time.perf_counter() - launch
    server_first = []
    for message in MESSAGES[:n]:
        server.stdin.write(message.encode() + b"\n")
        start = time.perf_counter()
        _read_until(server.stdout, "Assistant: ")
        server.stdout.read(1)
        server_first.append(time.perf_counter() - start)
        _read_until(server.stdout, "User: ")
    server.stdin.write(b"stop\n")
    server.wait(timeout=60)

    one_shot = []
    for message in MESSAGES[:min(n, 3)]:
        launch = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "generate.py"), "--lora_dir", lora_dir,
                                 "--instruction", message, "--max_new_tokens", str(max_new_tokens)],
                                cwd=ROOT, env=env, bufsize=0, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        proc.stdout.read(1)
        one_shot.append(time.perf_counter() - launch)
        proc.wait(timeout=120)

    print(json.dumps({
        "model": lora_dir, "threads": int(threads), "load_average_1min": round(os.getloadavg()[0], 2),
        "median_seconds": {
            "prefill_plus_one_token": _median(prefill),
            "stream_first_piece": _median(first_piece),
            "server_launch_to_prompt": round(server_ready, 2),
            "server_message_to_first_char": _median(server_first),
            "generate_one_shot_launch_to_first_char": _median(one_shot),
        },
    }, indent=2))


if __name__ == "__main__":
    run_cli(main)
