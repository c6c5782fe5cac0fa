"""Checkpoints are complete or not used: nothing a killed run half-wrote is taken for whole.

The HF Trainer (transformers 5) writes ``checkpoint-N/`` in place: the model (adapter) weights, the optimizer
(DeepSpeed and FSDP have their own layouts), scheduler, scaler and RNG states, last ``trainer_state.json``, and
only then deletes older checkpoints. A folder killed mid-write lacks ``trainer_state.json``, holds a torn one,
or (after a machine crash) empty files. The Trainer's ``get_last_checkpoint`` takes the highest step whatever
its state, and resuming from it fails or silently skips a missing optimizer: we pick the folder ourselves.
Where a DeepSpeed config brings its own scheduler or optimizer, DeepSpeed keeps the schedule in its own checkpoint
and the Trainer writes no ``scheduler.pt`` (``trainer_saves_scheduler``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from transformers import utils as names
from transformers.trainer import FSDP_MODEL_NAME, OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from alpaca_cot.errors import UserError, disk_full
from alpaca_cot.outputs import MARKER, folder_size
from alpaca_cot.training.engines import read_deepspeed_config, resolve_deepspeed_config

CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
FSDP_SHARDED = re.compile(r"^optimizer_\d+$")  # accelerate's sharded FSDP optimizer state folders
SHARDED_WEIGHTS = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")
MODEL_CONFIG_FILES = (names.ADAPTER_CONFIG_NAME, names.CONFIG_NAME, names.GENERATION_CONFIG_NAME)
DEEPSPEED_LATEST = "latest"  # DeepSpeed's pointer to the step folder it finished writing
WEIGHT_FILES = (names.ADAPTER_SAFE_WEIGHTS_NAME, names.ADAPTER_WEIGHTS_NAME, names.SAFE_WEIGHTS_NAME,
                names.SAFE_WEIGHTS_INDEX_NAME, names.WEIGHTS_NAME, names.WEIGHTS_INDEX_NAME)


def trainer_saves_scheduler(deepspeed: str | None) -> bool:
    """Whether the Trainer writes ``scheduler.pt`` in the checkpoints of a run with this ``--deepspeed``: not where
    the config has a "scheduler" or an "optimizer" section (DeepSpeed then builds the schedule, transformers'
    ``deepspeed_optim_sched``, and saves and restores it with its own states)."""
    if deepspeed is None:
        return True
    return not {"scheduler", "optimizer"} & read_deepspeed_config(resolve_deepspeed_config(deepspeed)).keys()


def checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-N`` folder in ``output_dir``, by step."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return sorted(found)


def _state_files(path: str, names: list[str]) -> tuple[list[str], list[str]]:
    """The model-weight and optimizer files of a checkpoint, wherever its engine puts them (relative paths): the
    Trainer alone (and DDP) ``optimizer.pt`` beside the weights; FSDP the gathered ``pytorch_model_fsdp.bin`` and
    ``optimizer.bin``, or sharded ``pytorch_model_fsdp_N/`` and ``optimizer_N/``; DeepSpeed every rank's
    ``*model_states.pt`` and ``*optim_states.pt`` in the folder ``latest`` names, written after them."""
    weights = [n for n in names if n in WEIGHT_FILES or n == f"{FSDP_MODEL_NAME}.bin"]
    optimizer = [n for n in names if n in (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN)]
    for name in names:
        folder = os.path.join(path, name)
        if os.path.isdir(folder) and (FSDP_SHARDED.match(name) or name.startswith(f"{FSDP_MODEL_NAME}_")):
            (optimizer if FSDP_SHARDED.match(name) else weights).extend(
                os.path.join(name, f) for f in os.listdir(folder))
    if DEEPSPEED_LATEST in names:
        with open(os.path.join(path, DEEPSPEED_LATEST), encoding="utf-8") as f:
            tag = f.read().strip()
        folder = os.path.join(path, tag)
        found = [os.path.join(tag, f) for f in os.listdir(folder)] if tag and os.path.isdir(folder) else []
        weights += [f for f in found if f.endswith("model_states.pt")]
        optimizer += [f for f in found if f.endswith("optim_states.pt")]
    return weights, optimizer


def model_files(checkpoint: str) -> list[str]:
    """The adapter or model files of a checkpoint folder (what ``save_pretrained`` writes, without the
    tokenizer), or a UserError where it holds no whole weights (a ZeRO-3 config that does not gather them)."""
    names = sorted(n for n in os.listdir(checkpoint) if n in MODEL_CONFIG_FILES or n in WEIGHT_FILES
                   or SHARDED_WEIGHTS.match(n))
    if not any(n in WEIGHT_FILES or SHARDED_WEIGHTS.match(n) for n in names):
        raise UserError(f"{checkpoint} holds no whole adapter or model weights (a DeepSpeed ZeRO-3 config without "
                        "stage3_gather_16bit_weights_on_model_save keeps only its partitions): rebuild them with "
                        "the zero_to_fp32.py script in that folder")
    return names


def checkpoint_problem(path: str, *, deepspeed: str | None = None) -> str | None:
    """Why the checkpoint folder at ``path`` cannot be resumed from, or None when it is complete; ``deepspeed``:
    the run's ``--deepspeed``, which decides whether ``scheduler.pt`` is due (``trainer_saves_scheduler``)."""
    state_path = os.path.join(path, TRAINER_STATE_NAME)
    if not os.path.isfile(state_path):
        return f"no {TRAINER_STATE_NAME}"
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        names = os.listdir(path)
        # Every file, in the engines' sub-folders too: a machine crash can bring back unflushed files empty.
        empty = sorted(os.path.relpath(os.path.join(root, n), path) for root, _, files in os.walk(path)
                       for n in files if not os.path.getsize(os.path.join(root, n)))
        weights, optimizer = _state_files(path, names)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE_NAME} is torn"
    except FileNotFoundError:  # another process is deleting it (an older checkpoint, or an incomplete one)
        return "being deleted"
    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    step = state.get("global_step") if isinstance(state, dict) else None
    if match and step != int(match.group(1)):
        return f"{TRAINER_STATE_NAME} is for step {step}"
    if empty:
        return f"empty {', '.join(empty)}"
    missing = [] if weights else ["model weights"]
    if not optimizer:
        missing.append("optimizer state")
    if SCHEDULER_NAME not in names and trainer_saves_scheduler(deepspeed):
        missing.append(SCHEDULER_NAME)
    if not any(n.startswith("rng_state") for n in names):
        missing.append("rng_state.pth")
    return f"no {', '.join(missing)}" if missing else None


def latest_complete_checkpoint(output_dir: str, *,
                               deepspeed: str | None = None) -> tuple[str | None, list[tuple[str, str]]]:
    """The latest complete checkpoint in ``output_dir`` (None if there is none), and the later
    incomplete ones as ``(path, problem)``."""
    skipped = []
    for _, path in reversed(checkpoint_folders(output_dir)):
        problem = checkpoint_problem(path, deepspeed=deepspeed)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def choose_checkpoint(output_dir: str, resume: str | bool, *, remove_incomplete: bool,
                      deepspeed: str | None = None) -> tuple[str, list[str]]:
    """The checkpoint folder ``--resume_from_checkpoint`` means, and lines saying what was chosen: ``True`` (the
    bare flag) is the latest complete one in ``output_dir``, the incomplete ones after it named and, with
    ``remove_incomplete``, deleted (the resumed run saves those steps again); a folder named must be complete."""
    if resume is not True:
        path = str(resume)
        if not os.path.isdir(path):
            raise UserError(f"--resume_from_checkpoint {path}: no such folder; pass a checkpoint-N folder, or the "
                            "bare flag for the latest complete checkpoint in --output_dir")
        problem = checkpoint_problem(path, deepspeed=deepspeed)
        if problem:
            raise UserError(f"--resume_from_checkpoint {path} is incomplete ({problem}: it was being written when "
                            "the run stopped); pass an earlier checkpoint, or the bare flag for the latest one")
        return path, [f"resuming from {path}"]
    path, skipped = latest_complete_checkpoint(output_dir, deepspeed=deepspeed)
    if path is None:
        found = "; incomplete: " + ", ".join(f"{os.path.basename(p)} ({why})" for p, why in skipped) if skipped else ""
        raise UserError(f"--resume_from_checkpoint: {output_dir} holds no complete checkpoint-* folder to resume "
                        f"from{found}")
    notes = [f"resuming from {path}, the latest complete checkpoint"]
    for folder, why in skipped:
        if remove_incomplete:
            shutil.rmtree(folder)
        notes.append(f"skipped {folder}: incomplete ({why}), it was being written when the run stopped"
                     + ("; removed it" if remove_incomplete else ""))
    return path, notes


def run_training(trainer: Any, resume: str | bool | None) -> Any:
    """``trainer.train``, from the checkpoint ``resume`` means (``choose_checkpoint``), saying which; a run
    that fails before saving anything leaves no empty output folder behind."""
    checkpoint = None
    deepspeed = trainer.args.deepspeed
    if not resume and trainer.is_world_process_zero():  # torn ones a full disk or a kill left: saved again
        for path, _ in latest_complete_checkpoint(trainer.args.output_dir, deepspeed=deepspeed)[1]:
            shutil.rmtree(path)
    if resume:
        main = trainer.is_world_process_zero()
        checkpoint, notes = choose_checkpoint(trainer.args.output_dir, resume, remove_incomplete=main,
                                              deepspeed=deepspeed)
        if main:
            print("\n".join(notes), flush=True)
    try:
        return trainer.train(resume_from_checkpoint=checkpoint)
    except BaseException as e:
        out = trainer.args.output_dir
        if trainer.is_world_process_zero() and os.path.isdir(out):
            if set(os.listdir(out)) <= {MARKER}:
                shutil.rmtree(out)
            elif disk_full(e):  # the checkpoint being written is torn: the next run resumes from the one before
                torn = os.path.join(out, f"checkpoint-{trainer.state.global_step}")
                for path in {torn, *(p for p, _ in latest_complete_checkpoint(out, deepspeed=deepspeed)[1])}:
                    shutil.rmtree(path, ignore_errors=True)
        if disk_full(e):
            latest = latest_complete_checkpoint(out, deepspeed=deepspeed)[0]
            need = f"a checkpoint needs about {folder_size(latest) / 2**20:,.1f} MiB" if latest else \
                "its first checkpoint did not fit"
            again = "with --resume_from_checkpoint" if latest else "again"
            raise UserError(f"the disk of {out} filled up while training ({need}); the partial checkpoint was "
                            f"removed: free space and run the same command {again}") from None
        raise
