"""Nothing a user has is ever deleted (issue 22): every script pointed at its own inputs, or at a folder it did not
write, refuses in one line before any work, whatever the flags, and every file is left as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_main, run_script

TRAIN = ("--model_type", "llama", "--max_steps", "2", "--per_gpu_train_batch_size", "4", "--compute_dtype", "fp32",
         "--lora_target_modules", "q_proj", "--val_set_size", "0")


def _hashes(*roots: str | Path) -> dict[str, str]:
    """Every file under ``roots`` (or the file itself) by its SHA-256."""
    out = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


def _refused(script: str, *args: str, says: str) -> None:
    """Exit status 2, one line saying ``says``, nothing tokenized (in-process: these refusals come before any work)."""
    code, out, err = run_main(script, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert says in lines[0], lines[0]
    assert "data:" not in out  # refused before tokenizing


def test_finetune_never_replaces_its_inputs(tiny_lm_dir: str, tiny_data_file: str, tmp_path) -> None:
    model = tmp_path / "modelcopy"
    shutil.copytree(tiny_lm_dir, model)
    proj = tmp_path / "userproj"
    proj.mkdir()
    shutil.copy(tiny_data_file, proj / "train.json")
    (proj / "notes.md").write_text("n\n")
    config = tmp_path / "cfg"
    config.mkdir()
    (config / "run.yaml").write_text("seed: 3\n")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.md").write_text("mine\n")
    before = _hashes(tmp_path)
    for flags in ((), ("--overwrite_output_dir",), ("--resume_from_checkpoint",)):
        _refused("uniform_finetune.py", *TRAIN, "--model_name_or_path", str(model), "--data", tiny_data_file,
                 "--output_dir", str(model), *flags, says="is a --model_name_or_path folder")
        _refused("uniform_finetune.py", *TRAIN, "--model_name_or_path", str(model), "--data", str(proj / "train.json"),
                 "--output_dir", str(proj), *flags, says=f"holds the --data file {proj / 'train.json'}")
        _refused("uniform_finetune.py", *TRAIN, "--model_name_or_path", str(model), "--data", tiny_data_file,
                 "--output_dir", str(config), "--config", str(config / "run.yaml"), *flags,
                 says="holds the --config file")
        _refused("uniform_finetune.py", *TRAIN, "--model_name_or_path", str(model), "--data", tiny_data_file,
                 "--output_dir", str(foreign), *flags, says="was not written by uniform_finetune.py")
    assert _hashes(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["cfg", "foreign", "modelcopy", "userproj"]


def test_merge_predict_evaluate_never_replace_their_inputs(trained_adapter: str, tiny_lm_dir: str,
                                                           tiny_data_file: str, tmp_path) -> None:
    adapter = tmp_path / "run"
    shutil.copytree(trained_adapter, adapter)
    model = tmp_path / "base"
    shutil.copytree(tiny_lm_dir, model)
    data = tmp_path / "d" / "test.json"
    data.parent.mkdir()
    shutil.copy(tiny_data_file, data)
    lora = ("--lora_dir", str(adapter), "--model_name_or_path", str(model), "--compute_dtype", "fp32")
    before = _hashes(tmp_path)
    for flags in ((), ("--overwrite",)):
        _refused("merge.py", *lora, "--merged_dir", str(adapter), *flags, says="is a --lora_dir folder")
        _refused("merge.py", *lora, "--merged_dir", str(model), *flags, says="is a --model_name_or_path folder")
        _refused("merge.py", *lora, "--merged_dir", str(tmp_path), *flags, says="holds the --lora_dir folder")
        for out, says in ((adapter, "is a --lora_dir folder"), (model, "is a --model_name_or_path folder"),
                          (data.parent, "holds the --data file")):
            _refused("predict.py", *lora, "--data", str(data), "--result_dir", str(out), *flags, says=says)
            _refused("evaluate.py", *lora, "--data", str(data), "--output_dir", str(out), *flags, says=says)
    assert _hashes(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["base", "d", "run"]


@pytest.mark.slow
def test_convert_never_replaces_its_input(tmp_path) -> None:
    data = tmp_path / "in.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    before = _hashes(tmp_path)
    for command in (("convert", str(data), str(data)), ("dedup", str(data), str(data))):
        proc = run_script("data/collection.py", *command, "--overwrite", check=False)
        assert proc.returncode != 0 and "is a source file, and an output never replaces its input" in proc.stderr
    assert _hashes(tmp_path) == before and os.listdir(tmp_path) == ["in.json"]


def test_late_refusals_come_first(tiny_lm_dir: str, tiny_data_file: str, tmp_path) -> None:
    """A LoRA target the model lacks is refused before tokenizing, naming the ones it has; an empty model folder
    is one line. Nothing is written."""
    out = tmp_path / "out"
    _refused("uniform_finetune.py", *TRAIN, "--model_name_or_path", tiny_lm_dir, "--data", tiny_data_file,
             "--output_dir", str(out), "--lora_target_modules", "does_not_exist",
             says="'does_not_exist' is not a linear layer of this model; its linear layers are: ")
    (tmp_path / "empty").mkdir()
    _refused("uniform_finetune.py", *TRAIN, "--model_name_or_path", str(tmp_path / "empty"), "--data", tiny_data_file,
             "--output_dir", str(out), says=f"{tmp_path / 'empty'} (it holds nothing)")
    assert not out.exists()


def test_a_run_that_clearly_does_not_fit_is_refused(tmp_path, monkeypatch) -> None:
    import torch

    from alpaca_cot import outputs
    from alpaca_cot.config import FinetuneArgs
    from alpaca_cot.errors import UserError
    from alpaca_cot.training.report import check_space

    model = torch.nn.Linear(256, 256)  # 65,792 trained weights: about 2.5 MiB of checkpoints and outputs
    args = FinetuneArgs(model_name_or_path="m", data=["d.json"], output_dir=str(tmp_path / "new" / "run"))
    check_space(args, model)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 2**20))
    with pytest.raises(UserError, match=r"need about 2.5 MiB and its disk has 1.0 MiB free"):
        check_space(args, model)
    assert not (tmp_path / "new").exists()


class _FullDiskTrainer:
    """A Trainer whose checkpoint-3 fills the disk half-way through its tokenizer."""

    def __init__(self, out: Path) -> None:
        self.args = type("Args", (), {"output_dir": str(out), "deepspeed": None})()
        self.state = type("State", (), {"global_step": 3})()

    def is_world_process_zero(self) -> bool:
        return True

    def train(self, resume_from_checkpoint: str | None = None) -> None:
        torn = Path(self.args.output_dir) / "checkpoint-3"
        torn.mkdir()
        (torn / "tokenizer.json").write_text('{"trunc')
        raise OSError(28, "No space left on device", str(torn / "tokenizer.json"))


def test_a_full_disk_while_training_is_one_line_and_leaves_no_torn_checkpoint(tmp_path) -> None:
    from alpaca_cot.errors import UserError
    from alpaca_cot.training.checkpoints import run_training

    out = tmp_path / "run.staging"
    out.mkdir()
    (out / "run.json").write_text('{"written_by": "alpaca_cot uniform_finetune.py"}')
    (out / "checkpoint-1").mkdir()  # an earlier checkpoint: kept (complete or not, it is not the torn one)
    with pytest.raises(UserError, match=f"^the disk of {out} filled up while training .*run the same command"):
        run_training(_FullDiskTrainer(out), None)
    assert sorted(os.listdir(out)) == ["run.json"]  # checkpoint-1 is incomplete here, so it went too


def test_a_full_disk_is_one_line_in_every_script(capsys, monkeypatch) -> None:
    from alpaca_cot.cli import run_cli

    def main() -> None:
        """A command whose output fills the disk."""
        raise OSError(28, "No space left on device", "out/model.safetensors")

    monkeypatch.setattr("sys.argv", ["script.py"])
    with pytest.raises(SystemExit) as ended:
        run_cli(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert ended.value.code == 2 and len(err) == 1 and "the disk is full writing out/model.safetensors" in err[0]
