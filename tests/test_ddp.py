"""2-process DDP on CPU (gloo) through torchrun and torch.distributed.launch: ranks end identical, and the
final adapter equals a single-process run on the same global batch (same records per optimizer step, loss
normalised over the global token count)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from safetensors.torch import load_file

from tests.conftest import PYTHON, ROOT, last_wins
from tests.fixtures.replicas import REPLICAS_LINE
from tests.fixtures.synthetic import synthetic_records

# fp32 training; the sums run in another order across ranks. Measured: 2e-7 over weights of about 0.18;
# the order of records per step before the global-batch sampler gave 0.037.
ADAPTER_ATOL = 1e-5


# --standalone: the launcher's rendezvous store binds a free port itself; a port picked here and bound later
# can be taken in between by another test's process (seen under pytest-xdist: EADDRINUSE).
LAUNCHERS = {
    "torchrun": lambda n=2: [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)],
    "distributed.launch": lambda n=2: [PYTHON, "-m", "torch.distributed.launch", "--standalone", "--nproc_per_node",
                                       str(n)],
}


def finetune(out: str, *flags: str, processes: int = 0) -> subprocess.CompletedProcess:
    """uniform_finetune.py alone (``processes`` 0) or under torchrun with that many processes; asserts success."""
    launcher = LAUNCHERS["torchrun"](processes) if processes else [PYTHON]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    argv = last_wins([*flags, "--output_dir", out])  # the script refuses a flag given twice
    proc = subprocess.run(launcher + [os.path.join(ROOT, "uniform_finetune.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def max_weight_diff(run_a: str, run_b: str, name: str = "adapter_model.safetensors") -> float:
    """The largest absolute difference between two runs' saved weights (same tensor names required)."""
    a, b = load_file(os.path.join(run_a, name)), load_file(os.path.join(run_b, name))
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_trained(run: str) -> None:
    """LoRA's B matrices start at zero: the run must have moved them far beyond the comparison's tolerance."""
    weights = load_file(os.path.join(run, "adapter_model.safetensors"))
    moved = max(float(w.abs().max()) for name, w in weights.items() if "lora_B" in name)
    assert moved > 100 * ADAPTER_ATOL, moved


def lora_flags(model_dir: str, data_file: str, cache_dir: str, max_steps: int = 3, val_set_size: int = 0,
               learning_rate: str = "1e-2") -> list[str]:
    """A short deterministic LoRA run: no dropout, fp32, a high learning rate so the steps move the weights
    (a flag is given once: the keywords change these values)."""
    return ["--model_type", "llama", "--model_name_or_path", model_dir, "--data", data_file,
            "--lora_target_modules", "q_proj", "v_proj", "--lora_dropout", "0", "--val_set_size", str(val_set_size),
            "--max_steps", str(max_steps), "--learning_rate", learning_rate, "--compute_dtype", "fp32", "--cache_dir",
            cache_dir]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_ddp_ends_with_identical_lora_weights(tmp_path, launcher: str, tiny_model_dir: str,
                                                          tiny_data_file: str) -> None:
    out = tmp_path / "out"
    # Through the harness that compares the ranks' trainable weights once the run has returned.
    cmd = LAUNCHERS[launcher]() + [
        os.path.join(ROOT, "tests", "fixtures", "replicas.py"), "--model_type", "llama", "--model_name_or_path",
        tiny_model_dir, "--data", tiny_data_file, "--lora_target_modules", "q_proj", "v_proj", "--val_set_size", "8",
        "--per_gpu_train_batch_size", "4", "--max_steps", "3", "--compute_dtype", "fp32", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["world_size"] == 2 and metrics["steps"] == 3 and metrics["engine"] == "ddp"
    assert REPLICAS_LINE.format(same=True) in proc.stdout, proc.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["True", "False"])
def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path, packing: str, tiny_model_dir: str
                                                                     ) -> None:
    # 800 records: transformers' length grouping draws mega-batches of 50 batches only from 200 x the batch
    # size on, so a sampler grouped per rank (batch 2) and one grouped per global batch (4) order them apart.
    data = tmp_path / "data800.json"
    data.write_text(json.dumps(synthetic_records(800), ensure_ascii=False), encoding="utf-8")
    flags = lora_flags(tiny_model_dir, str(data), str(tmp_path / "cache")) + ["--packing", packing]
    # Global batch 4 both ways: 1 process x 2 records x 2 accumulation steps, and 2 processes x 1 x 2, so the
    # ranks' micro-batches hold different token counts and a per-rank loss mean would differ.
    finetune(str(tmp_path / "one"), *flags, "--per_gpu_train_batch_size", "2", "--gradient_accumulation_steps", "2")
    finetune(str(tmp_path / "two"), *flags, "--per_gpu_train_batch_size", "1", "--gradient_accumulation_steps", "2",
             processes=2)
    assert json.load(open(tmp_path / "two" / "metrics.json"))["world_size"] == 2
    assert_trained(str(tmp_path / "one"))
    assert max_weight_diff(str(tmp_path / "one"), str(tmp_path / "two")) < ADAPTER_ATOL


@pytest.mark.slow
def test_two_process_resume_reports_the_whole_run(tmp_path, tiny_model_dir: str, tiny_data_file: str) -> None:
    flags = [*lora_flags(tiny_model_dir, tiny_data_file, str(tmp_path / "cache"), max_steps=4, val_set_size=8),
             "--save_steps", "2", "--per_gpu_train_batch_size", "2"]
    finetune(str(tmp_path / "whole"), *flags, processes=2)
    for kept in ("checkpoint-2", "checkpoint-4"):  # killed after checkpoint-2, or during the final save
        cut = tmp_path / f"cut-{kept}"
        shutil.copytree(tmp_path / "whole", cut)
        for name in os.listdir(cut):  # the rest never made it
            if name not in (kept, "run.json"):  # a killed run keeps its marker, written before training
                shutil.rmtree(cut / name) if (cut / name).is_dir() else (cut / name).unlink()
        proc = finetune(str(cut), *flags, "--resume_from_checkpoint", processes=2)
        assert f"resuming from {cut}/{kept}" in proc.stdout + proc.stderr
        assert max_weight_diff(str(tmp_path / "whole"), str(cut)) == 0
        whole, resumed = (json.load(open(run / "metrics.json")) for run in (tmp_path / "whole", cut))
        # Each rank restores the checkpoint's totals: they must be both ranks' (before, rank 1 restored rank 0's
        # and the resumed run reported another train_loss); the final evaluation is the trained model's.
        for key in ("train_loss", "effective_tokens", "steps"):
            assert resumed[key] == whole[key], key
        assert abs(resumed["eval_loss_after"] - whole["eval_loss_after"]) < 1e-4
