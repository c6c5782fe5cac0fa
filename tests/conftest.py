"""Shared fixtures: a tiny tokenizer, model and data set built in code (they run anywhere), a small
adapter trained on them, and paths into ../shared for the real-data tests (skipped cleanly when absent)."""

from __future__ import annotations

import io
import json
import os
import runpy
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

from tests.fixtures.synthetic import synthetic_records
from tests.fixtures.tiny_models import write_tiny_lm, write_tiny_model
from tests.fixtures.tiny_tokenizer import write_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("ALPACA_COT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
PYTHON = sys.executable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread is faster than two (no synchronisation), and far faster
# when the machine is busy. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def shared_path(*parts: str) -> str:
    """A path under ../shared, or skip the test with the reason."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (the shared data and models folder is not beside the project)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny byte-level BPE tokenizer (ChatML-like chat template), trained in code."""
    return write_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny-tokenizer")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random tiny Llama (hidden 32, 2 layers) with the tiny tokenizer, built from its config."""
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")), "llama")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama pretrained in code on synthetic text (it writes words), with the tiny tokenizer."""
    return write_tiny_lm(str(tmp_path_factory.mktemp("tiny-lm")))


@pytest.fixture(scope="session")
def tiny_data_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """200 synthetic records in the unified format: Alpaca-style tasks with CoT answers, Chinese ones,
    and 10 multi-turn chats."""
    path = tmp_path_factory.mktemp("tiny-data") / "tiny200.json"
    path.write_text(json.dumps(synthetic_records(200), ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def stories_dir() -> str:
    """The real 260K-parameter Llama (TinyStories) in HF format."""
    return shared_path("models", "stories260K-hf")


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """200 real English Alpaca records (the original Stanford data) in the unified format."""
    src = shared_path("data", "raw", "alpaca_chinese_dataset", "alpaca_data-0-3252-英文.json")
    with open(src, encoding="utf-8") as f:
        records = json.load(f)[:200]
    path = tmp_path_factory.mktemp("data") / "alpaca200.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)


def last_wins(args: tuple[str, ...] | list[str]) -> list[str]:
    """``args`` with each flag once, at its first place with its last value: tests build common flags and
    then override some, while the scripts refuse a flag given twice."""
    words: dict[str, list[str]] = {"": []}  # "": words before the first flag (a sub-command)
    current = words[""]
    for arg in args:
        if arg.startswith("--") and arg != "--":
            current = words[arg.partition("=")[0]] = [arg]
        else:
            current.append(arg)
    return [word for values in words.values() for word in values]


def run_script(script: str, *args: str, timeout: int = 600, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run a top-level script as a user would, from the project root (each flag once: ``last_wins``)."""
    proc = subprocess.run([PYTHON, os.path.join(ROOT, script), *last_wins(args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_main(script: str, *args: str) -> tuple[int, str, str]:
    """A top-level script's own ``__main__`` on this command line, in this process: (exit status, stdout, stderr).
    For refusals that come before any work, where an interpreter start per case would cost most of the test."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = [os.path.join(ROOT, script), *last_wins(args)]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1  # as the interpreter maps it
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def trained_adapter(tiny_lm_dir: str, tiny_data_file: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LoRA adapter trained by uniform_finetune.py on the pretrained tiny Llama and the synthetic records."""
    out = tmp_path_factory.mktemp("adapter") / "run"
    run_script("uniform_finetune.py", "--model_type", "llama", "--model_name_or_path", tiny_lm_dir,
               "--data", tiny_data_file, "--val_set_size", "16", "--epochs", "1", "--per_gpu_train_batch_size", "8",
               "--learning_rate", "3e-3", "--lora_target_modules", "q_proj", "v_proj", "--output_dir", str(out),
               "--compute_dtype", "fp32")
    return str(out)


@pytest.fixture(scope="module")
def generator(trained_adapter: str):
    """A Generator over the trained tiny adapter, in fp32, on one thread."""
    import torch

    from alpaca_cot.generation.generator import Generator
    from alpaca_cot.models.loading import load_for_inference

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Generator(*load_for_inference(trained_adapter, compute_dtype="fp32"))
    torch.set_num_threads(threads)
