"""2-process DDP on CPU (gloo) through torchrun and torch.distributed.launch: ranks end identical."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from tests.conftest import PYTHON, ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHERS = {
    "torchrun": lambda port: [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              f"--master_port={port}"],
    "distributed.launch": lambda port: [PYTHON, "-m", "torch.distributed.launch", "--nproc_per_node", "2",
                                        "--nnodes=1", "--node_rank=0", "--master_addr=127.0.0.1",
                                        f"--master_port={port}"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_ddp_ends_with_identical_lora_weights(tmp_path, launcher: str, tiny_model_dir: str,
                                                          tiny_data_file: str) -> None:
    out = tmp_path / "out"
    cmd = LAUNCHERS[launcher](_free_port()) + [
        os.path.join(ROOT, "uniform_finetune.py"), "--model_type", "llama", "--model_name_or_path", tiny_model_dir,
        "--data", tiny_data_file, "--lora_target_modules", "q_proj", "v_proj", "--val_set_size", "8",
        "--per_gpu_train_batch_size", "4", "--max_steps", "3", "--compute_dtype", "fp32", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    assert metrics["replicas_in_sync"] is True
