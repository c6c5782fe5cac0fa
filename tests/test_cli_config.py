"""--config FILE for every script, a flag given twice, and Ctrl-C as one line (alpaca_cot/cli.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from alpaca_cot.cli import check_argv, read_config, split_config, with_defaults
from alpaca_cot.errors import UserError
from tests.conftest import PYTHON, ROOT, run_script


def fake_main(*, lora_r: int = 8, data: list | None = None, fp16: bool = False) -> dict:
    return {"lora_r": lora_r, "data": data, "fp16": fp16}


def test_config_values_become_defaults_and_flags_override(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("lora_r: 32\ndata: [a.json, b.json]\n", encoding="utf-8")
    config, argv = split_config(["--config", str(path), "--fp16"])
    assert (config, argv) == (str(path), ["--fp16"])
    configured = with_defaults(fake_main, read_config(config, fake_main))
    assert configured() == {"lora_r": 32, "data": ["a.json", "b.json"], "fp16": False}
    assert configured(lora_r=4, fp16=True) == {"lora_r": 4, "data": ["a.json", "b.json"], "fp16": True}


@pytest.mark.parametrize("text, message", [
    ('{"lora_rank": 8}', "unknown key 'lora_rank' in --config"),
    ('[1, 2]', "must hold a mapping"),
    ('{"lora_r": ', "is not valid JSON"),
])
def test_bad_configs_are_one_line(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "run.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=message) as caught:
        read_config(str(path), fake_main)
    assert "\n" not in str(caught.value)
    if "unknown" in message:
        assert "did you mean --lora_r" in str(caught.value)


def test_a_flag_given_twice_is_refused() -> None:
    with pytest.raises(UserError, match="--lora_r is given twice"):
        check_argv(["--lora_r", "8", "--lora_r=16"], fake_main)
    with pytest.raises(UserError, match="--fp16 is given twice"):
        check_argv(["--fp16", "--nofp16"], fake_main)
    check_argv(["--lora_r", "8", "--fp16"], fake_main)


@pytest.mark.slow
def test_a_run_replayed_from_its_own_arguments_is_byte_identical(tmp_path, tiny_model_dir: str,
                                                                  tiny_data_file: str) -> None:
    first = tmp_path / "first"
    run_script("uniform_finetune.py", "--model_type", "llama", "--model_name_or_path", tiny_model_dir,
               "--data", tiny_data_file, "--val_set_size", "0", "--max_steps", "3", "--per_gpu_train_batch_size", "4",
               "--lora_target_modules", "q_proj,v_proj", "--compute_dtype", "fp32", "--output_dir", str(first))
    second = tmp_path / "second"
    run_script("uniform_finetune.py", "--config", str(first / "finetune_args.json"), "--output_dir", str(second))
    weights = "adapter_model.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    saved = json.loads((second / "finetune_args.json").read_text())
    assert saved["output_dir"] == str(second) and saved["max_steps"] == 3

    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: 8\n", encoding="utf-8")
    for script in ("uniform_finetune.py", "generate.py", "merge.py", "predict.py", "server.py", "web.py",
                   "evaluate.py"):
        done = run_script(script, "--config", str(bad), check=False)
        assert done.returncode == 2, (script, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: unknown key 'lora_rank' in --config {bad}; "), lines


@pytest.mark.slow
def test_ctrl_c_during_training_is_one_line(tmp_path, tiny_model_dir: str, tiny_data_file: str) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([PYTHON, os.path.join(ROOT, "uniform_finetune.py"), "--model_type", "llama",
                             "--model_name_or_path", tiny_model_dir, "--data", tiny_data_file, "--val_set_size", "0",
                             "--max_steps", "100000",
                             "--save_steps", "2", "--per_gpu_train_batch_size", "2", "--compute_dtype", "fp32",
                             "--output_dir", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not list(out.glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    said = [line for line in stderr.splitlines() if line.startswith("interrupted")]  # tqdm may redraw its bar after
    assert len(said) == 1 and "--resume_from_checkpoint" in said[0], stderr[-3000:]


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "configs", "examples"))))
def test_example_configs_are_valid_runs(name: str) -> None:
    import uniform_finetune
    from alpaca_cot.config import FinetuneArgs

    values = read_config(os.path.join(ROOT, "configs", "examples", name), uniform_finetune.main)
    args = FinetuneArgs(**values)
    assert args.data and args.model_type == values["model_type"]
