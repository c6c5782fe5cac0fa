"""A clean console: the two library notices are dropped at their source, every other warning still shows;
--report_to tensorboard writes its event files offline."""

from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
import warnings

import pytest
import transformers

from alpaca_cot.console import BNB_CPU_LOGGER, quiet_library_notices
from tests.conftest import PYTHON, ROOT, run_script

NOTICE = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
          "`pip install kernels` and the kernels >= 0.11.1")


class Recorder(logging.Handler):
    """Keeps the records that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_only_the_missing_kernels_notice_is_dropped() -> None:
    logger = logging.getLogger(BNB_CPU_LOGGER)
    recorder = Recorder()
    logger.addHandler(recorder)
    try:
        missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
        logger.warning(NOTICE, missing)  # exactly what bitsandbytes logs when `kernels` is not installed
        logger.warning(NOTICE, RuntimeError("the hub could not be reached"))  # kernels installed, but failing
        logger.warning(NOTICE, ModuleNotFoundError("No module named 'torch_xla'", name="torch_xla"))
        logger.warning("Some other bitsandbytes warning: %s", missing)
    finally:
        logger.removeHandler(recorder)
    assert [r.getMessage().split(":")[0] for r in recorder.records] == [
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "Some other bitsandbytes warning"]


def test_only_the_is_gradient_checkpointing_warning_is_dropped() -> None:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pytest's own filters (pyproject) would hide FutureWarnings here
        assert model.is_gradient_checkpointing is False
        assert [str(w.message)[:40] for w in caught] == ["`is_gradient_checkpointing` is deprecate"]  # the control
        caught.clear()
        quiet_library_notices()
        quiet_library_notices()  # installing twice adds nothing
        assert model.is_gradient_checkpointing is False
        warnings.warn("`is_gradient_checkpointing` is deprecated in my own code", FutureWarning, stacklevel=1)
        warnings.warn("another library deprecation", FutureWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["`is_gradient_checkpointing` is deprecated in my own code",
                                                    "another library deprecation"]
        assert sum("is_gradient_checkpointing" in str(f[1]) for f in warnings.filters if f[1]) == 1


def _stderr(code: str) -> str:
    proc = subprocess.run([PYTHON, "-W", "default", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


# Wrapping a model with peft, as training and every adapter load do.
PEFT_WRAP = ("import peft, transformers; peft.get_peft_model(transformers.LlamaForCausalLM(transformers.LlamaConfig("
             "vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)), "
             "peft.LoraConfig(target_modules=['q_proj'], task_type='CAUSAL_LM'))")


@pytest.mark.slow
def test_a_process_that_imports_alpaca_cot_first_starts_quietly() -> None:
    control = _stderr(PEFT_WRAP)
    assert "is_gradient_checkpointing" in control  # what every script printed before
    quiet = _stderr("import alpaca_cot; " + PEFT_WRAP)
    assert "is_gradient_checkpointing" not in quiet and "gemm_4bit_forward" not in quiet, quiet
    if "gemm_4bit_forward" not in control:
        pytest.skip("bitsandbytes prints its kernels notice only on CPUs with AVX-512 BF16; this one has none")


@pytest.fixture(scope="module")
def tensorboard_run(stories_dir: str, alpaca_file: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A short training run with --report_to tensorboard, offline."""
    pytest.importorskip("tensorboard", reason="tensorboard is a test dependency (requirements-dev.txt)")
    out = str(tmp_path_factory.mktemp("tb") / "run")
    proc = run_script("uniform_finetune.py", "--model_type", "llama", "--model_name_or_path", stories_dir, "--data",
                      alpaca_file, "--val_set_size", "8", "--max_steps", "4", "--logging_steps", "1",
                      "--per_gpu_train_batch_size", "4", "--output_dir", out, "--compute_dtype", "fp32",
                      "--report_to", "tensorboard", env={"HF_HUB_OFFLINE": "1"})
    assert "gemm_4bit_forward" not in proc.stderr and "is_gradient_checkpointing" not in proc.stderr, proc.stderr
    return out


@pytest.mark.slow
def test_report_to_tensorboard_logs_the_training_losses(tensorboard_run: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdirs = glob.glob(os.path.join(tensorboard_run, "runs", "*"))
    assert len(logdirs) == 1 and glob.glob(os.path.join(logdirs[0], "events.out.tfevents.*")), logdirs
    events = EventAccumulator(logdirs[0])  # every event file of the run (the final evaluation writes its own)
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    states = glob.glob(os.path.join(tensorboard_run, "checkpoint-*", "trainer_state.json"))
    with open(max(states, key=os.path.getmtime), encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    expected = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert sorted(logged) == sorted(expected) == [1, 2, 3, 4]
    assert all(abs(logged[s] - expected[s]) <= 1e-6 * abs(expected[s]) for s in expected)  # float32 in the events
    assert "eval/loss" in events.Tags()["scalars"]
