"""Nothing a run has is lost: incomplete checkpoints are skipped on resume, and --overwrite_output_dir
replaces the old run only once the new one has finished."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from alpaca_cot.errors import UserError
from alpaca_cot.outputs import STAGING_SUFFIX
from alpaca_cot.training.checkpoints import checkpoint_problem, choose_checkpoint, model_files, trainer_saves_scheduler
from tests.conftest import run_script


def _fake_checkpoint(folder: Path, step: int) -> Path:
    """The files the Trainer writes for a LoRA run, trainer_state.json last."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (path / name).write_bytes(b"x")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}), encoding="utf-8")
    return path


def test_resume_takes_the_latest_complete_checkpoint_and_names_the_rest(tmp_path) -> None:
    _fake_checkpoint(tmp_path, 2)
    four = _fake_checkpoint(tmp_path, 4)
    six = _fake_checkpoint(tmp_path, 6)  # killed just after the adapter: empty optimizer, no state
    (six / "optimizer.pt").write_bytes(b"")
    (six / "trainer_state.json").unlink()
    (tmp_path / "checkpoint-8").mkdir()  # killed as soon as the folder appeared
    ten = _fake_checkpoint(tmp_path, 10)
    (ten / "trainer_state.json").write_text('{"global_step": 1', encoding="utf-8")  # killed mid-write
    (tmp_path / "checkpoint-12.tmp").mkdir()  # not a checkpoint name
    assert checkpoint_problem(str(six)) == "no trainer_state.json"
    assert checkpoint_problem(str(ten)) == "trainer_state.json is torn"
    path, notes = choose_checkpoint(str(tmp_path), True, remove_incomplete=False)
    assert path == str(four) and notes[0] == f"resuming from {four}, the latest complete checkpoint"
    assert [note.split(":")[0] for note in notes[1:]] == [f"skipped {tmp_path}/checkpoint-{n}" for n in (10, 8, 6)]
    assert "(no trainer_state.json)" in notes[3]
    with pytest.raises(UserError, match=r"checkpoint-6 is incomplete \(no trainer_state.json"):
        choose_checkpoint(str(tmp_path), str(six), remove_incomplete=False)
    assert choose_checkpoint(str(tmp_path), str(four), remove_incomplete=False)[0] == str(four)
    choose_checkpoint(str(tmp_path), True, remove_incomplete=True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-12.tmp", "checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize(("damage", "problem"), [
    ("optimizer.pt", "empty optimizer.pt"),  # a machine crash can bring back unflushed files empty
    ("-optimizer.pt", "no optimizer state"),  # deleted mid-way (rotation of old checkpoints)
    ("-adapter_model.safetensors", "no model weights"),
    ("-rng_state.pth", "no rng_state.pth"),
])
def test_every_file_a_resume_needs_is_checked(tmp_path, damage: str, problem: str) -> None:
    path = _fake_checkpoint(tmp_path, 3)
    if damage.startswith("-"):
        (path / damage[1:]).unlink()
    else:
        (path / damage).write_bytes(b"")
    assert checkpoint_problem(str(path)) == problem
    with pytest.raises(UserError, match=rf"holds no complete checkpoint-\* folder to resume from; incomplete: "
                                        rf"checkpoint-3 \({problem}\)"):
        choose_checkpoint(str(tmp_path), True, remove_incomplete=False)


# The layouts of the engines' checkpoints (transformers 5.24, accelerate 1.15, DeepSpeed 0.19), besides the
# scheduler, RNG and trainer state: what a complete one holds, and the problem named when one file is gone.
ENGINE_LAYOUTS = {
    "deepspeed": (["adapter_model.safetensors", "latest:global_step4", "global_step4/mp_rank_00_model_states.pt",
                   "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                   "global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt"],
                  [("-global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    "-global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt", "no optimizer state"),
                   ("latest:global_step2", "no optimizer state"),  # names a step folder that is not there
                   ("global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt:",
                    "empty global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt")]),
    "deepspeed zero3 full": (["latest:global_step4", "global_step4/zero_pp_rank_0_mp_rank_00_model_states.pt",
                              "global_step4/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"],
                             [("-global_step4/zero_pp_rank_0_mp_rank_00_model_states.pt", "no model weights"),
                              ("-latest", "no model weights, optimizer state")]),
    "fsdp full state dict": (["adapter_model.safetensors", "pytorch_model_fsdp.bin", "optimizer.bin"],
                             [("-optimizer.bin", "no optimizer state"), ("optimizer.bin:", "empty optimizer.bin")]),
    "fsdp sharded": (["pytorch_model_fsdp_0/__0_0.distcp", "optimizer_0/__0_0.distcp", "optimizer_0/__1_0.distcp"],
                     [("-pytorch_model_fsdp_0/__0_0.distcp", "no model weights"),
                      ("optimizer_0/__1_0.distcp:", "empty optimizer_0/__1_0.distcp")]),
}


def _write(path: Path, spec: str) -> None:
    """``name`` (a one-byte file), ``name:text`` (a file holding text; empty after the colon) or ``-name``."""
    if spec.startswith("-"):
        (path / spec[1:]).unlink()
        return
    name, _, text = spec.partition(":")
    (path / name).parent.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(text if ":" in spec else "x", encoding="utf-8")


@pytest.mark.parametrize("engine", sorted(ENGINE_LAYOUTS))
def test_each_engines_checkpoint_layout_is_known(tmp_path, engine: str) -> None:
    files, damages = ENGINE_LAYOUTS[engine]
    for damage in damages:
        path = tmp_path / str(len(os.listdir(tmp_path))) / "checkpoint-4"
        path.mkdir(parents=True)
        for spec in [*files, "scheduler.pt", "rng_state_0.pth"]:
            _write(path, spec)
        (path / "trainer_state.json").write_text(json.dumps({"global_step": 4}), encoding="utf-8")
        assert checkpoint_problem(str(path)) is None  # complete: before this, every one read "no optimizer.pt"
        for spec in damage[:-1]:
            _write(path, spec)
        assert checkpoint_problem(str(path)) == damage[-1]


def test_deepspeeds_own_schedule_needs_no_scheduler_file(tmp_path) -> None:
    """A DeepSpeed config with a "scheduler" or "optimizer" section: DeepSpeed builds the schedule and keeps it in
    its own states, and the Trainer writes no scheduler.pt (the resume is tested in tests/test_engines.py)."""
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupDecayLR"}}))
    assert [trainer_saves_scheduler(v) for v in (None, "zero2", "zero3", "zero2_offload", "zero3_offload", str(own))] \
        == [True, True, True, False, False, False]
    path = tmp_path / "run" / "checkpoint-4"
    path.mkdir(parents=True)
    for spec in [*ENGINE_LAYOUTS["deepspeed"][0], "rng_state_0.pth"]:
        _write(path, spec)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 4}), encoding="utf-8")
    assert checkpoint_problem(str(path)) == checkpoint_problem(str(path), deepspeed="zero3") == "no scheduler.pt"
    assert checkpoint_problem(str(path), deepspeed=str(own)) is None
    assert checkpoint_problem(str(path), deepspeed="zero2_offload") is None
    assert choose_checkpoint(str(tmp_path / "run"), True, remove_incomplete=False, deepspeed=str(own))[0] == str(path)
    (path / "rng_state_0.pth").unlink()  # the rest is still checked
    assert checkpoint_problem(str(path), deepspeed=str(own)) == "no rng_state.pth"


def test_a_finished_runs_weights_are_its_final_checkpoints_model_files(tmp_path) -> None:
    lora = _fake_checkpoint(tmp_path / "lora", 4)
    assert model_files(str(lora)) == ["adapter_config.json", "adapter_model.safetensors"]
    full = tmp_path / "full" / "checkpoint-4"
    full.mkdir(parents=True)
    names = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    for name in [*names, "tokenizer.json", "optimizer.bin", "pytorch_model_fsdp.bin", "rng_state_1.pth", "latest"]:
        (full / name).write_bytes(b"x")
    assert model_files(str(full)) == names
    for name in names[2:]:  # ZeRO-3 without stage3_gather_16bit_weights_on_model_save: partitions only
        (full / name).unlink()
    with pytest.raises(UserError, match="holds no whole adapter or model weights .* zero_to_fp32.py"):
        model_files(str(full))


def _train(stories_dir: str, data: str, out: Path, *flags: str, check: bool = True):
    return run_script("uniform_finetune.py", "--model_type", "llama", "--model_name_or_path", stories_dir,
                      "--data", data, "--val_set_size", "0", "--per_gpu_train_batch_size", "4", "--save_steps", "2",
                      "--logging_steps", "1", "--compute_dtype", "fp32", "--packing", "False", "--output_dir", str(out),
                      *flags, check=check)


@pytest.mark.slow
def test_bare_resume_skips_checkpoints_killed_mid_write(tmp_path, stories_dir: str, alpaca_file: str) -> None:
    out = tmp_path / "run"
    _train(stories_dir, alpaca_file, out, "--max_steps", "4")
    # The two kills of the issue: just after the adapter was written, and as soon as the folder appeared.
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-6")
    (out / "checkpoint-6" / "trainer_state.json").unlink()
    (out / "checkpoint-6" / "optimizer.pt").write_bytes(b"")
    (out / "checkpoint-8").mkdir()
    # A mark in checkpoint-4's state: the resumed run carries its log history on, which proves it started there.
    state_path = out / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_path.read_text(encoding="utf-8"))
    state["log_history"].append({"step": 4, "mark": 1.0})
    state_path.write_text(json.dumps(state), encoding="utf-8")

    resumed = _train(stories_dir, alpaca_file, out, "--max_steps", "6", "--resume_from_checkpoint")
    assert f"resuming from {out}/checkpoint-4, the latest complete checkpoint" in resumed.stdout
    assert f"skipped {out}/checkpoint-8: incomplete (no trainer_state.json)" in resumed.stdout
    assert f"skipped {out}/checkpoint-6: incomplete (no trainer_state.json)" in resumed.stdout
    final_state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text(encoding="utf-8"))
    assert {"step": 4, "mark": 1.0} in final_state["log_history"] and final_state["global_step"] == 6
    assert [h["step"] for h in final_state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["steps"] == 6
    assert not (out / "checkpoint-8").exists()


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_overwrite_replaces_the_old_run_only_when_the_new_one_finished(tmp_path, stories_dir: str,
                                                                       alpaca_file: str) -> None:
    out = tmp_path / "run"
    staging = Path(str(out) + STAGING_SUFFIX)
    _train(stories_dir, alpaca_file, out, "--max_steps", "6")
    (out / "notes.txt").write_text("kept with the old run until it is replaced", encoding="utf-8")
    old = _listing(out)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')

    # A replacement run that fails on its data: one line, the old run untouched, nothing left behind.
    failed = _train(stories_dir, str(bad), out, "--max_steps", "6", "--overwrite_output_dir", check=False)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1] == \
        f"error: {bad}:1: invalid UTF-8 at byte offset 20 (byte 0xe9); save the file as UTF-8"
    assert _listing(out) == old and not staging.exists()
    fresh = tmp_path / "fresh"
    assert _train(stories_dir, str(bad), fresh, "--max_steps", "2", check=False).returncode == 2
    assert not fresh.exists()

    # A replacement run killed after its checkpoint-4: it waits beside the old run, which is untouched.
    shutil.copytree(out / "checkpoint-4", staging / "checkpoint-4")
    shutil.copy(out / "run.json", staging / "run.json")  # marked as ours before its first checkpoint
    again = _train(stories_dir, alpaca_file, out, "--max_steps", "6", "--overwrite_output_dir", check=False)
    assert again.returncode == 2
    assert f"{staging} holds checkpoints of an unfinished --overwrite_output_dir run" in again.stderr
    assert _listing(out) == old

    resumed = _train(stories_dir, alpaca_file, out, "--max_steps", "6", "--overwrite_output_dir",
                     "--resume_from_checkpoint")
    assert f"resuming from {staging}/checkpoint-4, the latest complete checkpoint" in resumed.stdout
    assert not staging.exists() and not Path(str(out) + ".replaced").exists()
    assert not (out / "notes.txt").exists()  # the old folder is gone as a whole
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["steps"] == 6
    assert json.loads((out / "finetune_args.json").read_text(encoding="utf-8"))["output_dir"] == str(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    # Resumed from the old run's checkpoint-4 with the same settings: the same adapter, bit for bit.
    assert _listing(out)["adapter_model.safetensors"] == old["adapter_model.safetensors"]
