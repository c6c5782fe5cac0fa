"""--fsdp in 2 CPU processes (gloo) equals one process on the same global batch: LoRA, QLoRA and a full
fine-tune, saved gathered and loadable alone, and resumable from its checkpoints.

accelerate runs the Trainer's FSDP only on accelerator devices, so these runs go through
tests/fixtures/fsdp_on_cpu.py, which lifts that device gate (and ours) and nothing else; each rank then
reports the share of the parameters it holds, which tells FSDP from a silent DDP run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import peft
import pytest
import transformers

from tests.conftest import ROOT
from tests.fixtures.fsdp_on_cpu import SHARE_LINE
from tests.test_ddp import LAUNCHERS, assert_trained, finetune, lora_flags, max_weight_diff

HARNESS = os.path.join(ROOT, "tests", "fixtures", "fsdp_on_cpu.py")
SHARE_RE = re.compile(SHARE_LINE.replace("{rank}", r"(\d+)").replace("{local}", r"(\d+)")
                      .replace("{total}", r"(\d+)").replace("{sharded}", r"(\d+)").replace("{tensors}", r"(\d+)"))
# fp32 on CPU. FSDP2 reduce-scatters the gradients (another summation order than one process), and Adam
# turns last-bit differences of LoRA's small gradients into small update differences. Measured here: 6.9e-7
# (LoRA, weights up to 0.18), 1.0e-7 (QLoRA), 4.3e-8 (full fine-tune); 9.0e-6 for LoRA with 2 records per
# rank and step. The runs are deterministic: the same numbers every time.
ATOL = 1e-5

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="gloo under torchrun")]


def fsdp_finetune(out: str, *flags: str, fsdp: str | None = None) -> subprocess.CompletedProcess:
    """uniform_finetune.py --fsdp [fsdp] in 2 CPU processes through the harness; asserts success and that every
    rank held about half of the parameters (FSDP, not DDP) where it trained or evaluated."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    cmd = LAUNCHERS["torchrun"](2) + [HARNESS, *flags, "--fsdp", *([fsdp] if fsdp else []),
                                                    "--output_dir", out]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    shares = {int(m[0]): tuple(map(int, m[1:])) for m in SHARE_RE.findall(proc.stdout + proc.stderr)}
    assert sorted(shares) == [0, 1], proc.stdout[-3000:]
    for local, total, sharded, tensors in shares.values():
        assert sharded == tensors and local < 0.6 * total, shares
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["engine"] == "fsdp" and metrics["world_size"] == 2
    return proc


def _flags(model_dir: str, data_file: str, cache: str, *extra: str, **sizes: int | str) -> list[str]:
    return [*lora_flags(model_dir, data_file, cache, **sizes), "--logging_steps", "1", *extra]


def _log_history(run: str) -> list[dict]:
    """The per-step losses and gradient norms the Trainer logged (in the last checkpoint's state)."""
    last = max((d for d in os.listdir(run) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
    state = json.load(open(os.path.join(run, last, "trainer_state.json")))
    return [(h["step"], h["loss"], h["grad_norm"]) for h in state["log_history"] if "loss" in h]


# Global batch 4 both ways: 1 process x 2 records x 2 accumulation steps, and 2 processes x 1 x 2.
ONE = ("--per_gpu_train_batch_size", "2", "--gradient_accumulation_steps", "2")
TWO = ("--per_gpu_train_batch_size", "1", "--gradient_accumulation_steps", "2")


@pytest.mark.parametrize("kind", ["lora", "qlora", "full", "shard_grad_op"])
def test_fsdp_on_two_cpu_processes_equals_one_process(tmp_path, kind: str, tiny_model_dir: str,
                                                      tiny_data_file: str) -> None:
    """``shard_grad_op``: LoRA under the Trainer's word, each unit's gathered weights kept until the backward."""
    extra = {"lora": ("--save_steps", "2"), "qlora": ("--quantization_bit", "4"),
             "full": ("--peft_type", "full"), "shard_grad_op": ()}[kind]
    # The LoRA run is also the one resumed: 4 steps, and a validation split for the final evaluation's check.
    sizes = {"lora": {"max_steps": 4, "val_set_size": 8}, "full": {"learning_rate": "1e-3"}}.get(kind, {})
    flags = _flags(tiny_model_dir, tiny_data_file, str(tmp_path / "cache"), *extra, **sizes)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    finetune(one, *flags, *ONE)
    proc = fsdp_finetune(two, *flags, *TWO, fsdp="shard_grad_op" if kind == "shard_grad_op" else None)
    assert f"reshard_after_forward {kind != 'shard_grad_op'}" in proc.stdout  # as accelerate's plugin holds it
    for (step_a, loss_a, norm_a), (step_b, loss_b, norm_b) in zip(_log_history(one), _log_history(two), strict=True):
        # Every step's loss and gradient norm (a wrong loss normalisation would show here; Adam hides a scale)
        assert step_a == step_b and loss_b == pytest.approx(loss_a, rel=1e-6)
        assert norm_b == pytest.approx(norm_a, rel=1e-5)
    a, b = (json.load(open(os.path.join(run, "metrics.json"))) for run in (one, two))
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    assert b["effective_tokens"] == a["effective_tokens"]
    if kind == "full":
        assert max_weight_diff(one, two, "model.safetensors") < ATOL
        transformers.AutoModelForCausalLM.from_pretrained(two)  # the gathered model loads alone
        return
    assert_trained(one)
    assert max_weight_diff(one, two) < ATOL
    if kind == "lora":  # a checkpoint's adapter too (CountingTrainer.save_model gathers only the adapter)
        assert max_weight_diff(os.path.join(one, "checkpoint-2"), os.path.join(two, "checkpoint-2")) < ATOL
    peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir), two)
    if kind == "lora":
        for kept in ("checkpoint-2", "checkpoint-4"):  # killed after checkpoint-2, or during the final save
            _resumes_bit_identically(two, [*flags, *TWO], str(tmp_path / f"cut-{kept}"), kept)


def _resumes_bit_identically(whole: str, flags: list[str], cut: str, kept: str) -> None:
    """The FSDP run ``whole`` killed when only ``kept`` (accelerate's FSDP layout) was on disk, then resumed
    with the bare flag: the same adapter bit for bit, and metrics for the whole run."""
    shutil.copytree(whole, cut)
    for name in os.listdir(cut):  # the rest never made it
        if name not in (kept, "run.json"):  # a killed run keeps its marker, written before training
            path = os.path.join(cut, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    # From the final step's checkpoint nothing trains: the finished run is restored, and sharded only for its
    # final evaluation (the validation split), which must be the trained model's.
    proc = fsdp_finetune(cut, *flags, "--resume_from_checkpoint")
    assert f"resuming from {cut}/{kept}" in proc.stdout + proc.stderr
    assert max_weight_diff(whole, cut) == 0
    a, b = (json.load(open(os.path.join(run, "metrics.json"))) for run in (whole, cut))
    for key in ("train_loss", "effective_tokens", "steps"):
        assert b[key] == a[key], key
    assert abs(b["eval_loss_after"] - a["eval_loss_after"]) < 1e-4  # the trained model's, also when restored
