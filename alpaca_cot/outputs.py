"""The one owner of output folders: who may replace what, and how a finished output takes its place.

An output we write carries a marker, ``run.json`` (``<name>.run.json`` beside a single output file), whose
``written_by`` names the command (``WRITERS``). ``claim`` / ``claim_folder`` read only: True where an earlier
output of the same kind is there, False where nothing is; anything else is refused in one line, untouched
(every command claims its outputs first, even with --overwrite_output_dir / --overwrite). ``refuse_inputs``
refuses an output path that is (or holds) an input. ``writing``
stages files in a temp folder and publishes them when complete: swapped in whole (``swap_in``: the old output is
renamed aside, the new one into place, the old deleted) or moved file by file into a run folder that also
holds checkpoints. A long run that must survive kills stages in ``<target>.staging`` (training's
--overwrite_output_dir) and is swapped in when it has finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator

from alpaca_cot import cli
from alpaca_cot.errors import UserError
from alpaca_cot.io import write_json_atomic

MARKER = "run.json"
WRITERS = {"finetune": "alpaca_cot uniform_finetune.py", "merge": "alpaca_cot merge.py",
           "evaluate": "alpaca_cot evaluate.py", "predict": "alpaca_cot predict.py"}
STAGING_SUFFIX = ".staging"  # where a long run writes until it has finished (resumable after a kill)


def check_not_file(path: str, flag: str) -> None:
    """Refuse ``path`` where a folder is wanted and a file is there."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is an existing file; pass a folder")


def marker_path(output: str, single_file: bool = False) -> str:
    """The marker of an output folder (``run.json`` inside), or of a single output file (``<name>.run.json``)."""
    return os.path.splitext(output)[0] + "." + MARKER if single_file else os.path.join(output, MARKER)


def read_marker(path: str) -> dict:
    """The marker at ``path`` as a dict ({} where it is absent, torn or not a JSON object)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def write_marker(path: str, kind: str, **fields: object) -> None:
    """Mark an output as written by the command ``kind`` (a key of ``WRITERS``), with ``fields`` beside."""
    write_json_atomic(path, {"written_by": WRITERS[kind], **fields})


def claim(marker: str, kind: str, present: Iterable[str], *, flag: str, shown: str) -> bool:
    """Whether an earlier output of ``kind`` is there (True: ``marker`` is its own) or nothing is (False).

    ``present``: the paths of the output that exist now. Reads only; raises UserError naming the first thing
    found that ``kind`` did not write, which is then never read, cut, resumed or replaced.
    """
    script = WRITERS[kind].split()[-1]
    if os.path.exists(marker):
        if read_marker(marker).get("written_by") == WRITERS[kind]:
            return True
        found, why = marker, "it is not its marker"
    else:
        found, why = next(iter(present), None), f"there is no {marker}"
        if found is None:
            return False
    raise UserError(f"{flag} {shown}: {found} exists and was not written by {script} ({why}); {script} never "
                    f"replaces what it did not write: choose another {flag}")


def claim_folder(folder: str, kind: str, *, flag: str) -> bool:
    """``claim`` for an output folder: a file there is refused, and every entry of the folder counts."""
    check_not_file(folder, flag)
    present = sorted(os.path.join(folder, n) for n in os.listdir(folder)) if os.path.isdir(folder) else []
    return claim(marker_path(folder), kind, present, flag=flag, shown=folder)


def refuse_inputs(outputs: Iterable[str], inputs: Iterable[str | None], *, flag: str, shown: str,
                  input_flag: str = "--data") -> None:
    """Refuse when an output path is one of the command's ``inputs`` (or a folder that holds one), whatever the
    flags: an output never replaces what the command reads. Inputs that name no local path (hub ids) are skipped."""
    real = {os.path.realpath(path) for path in inputs if path and os.path.exists(path)}
    for path in outputs:
        out = os.path.realpath(path)
        held = [p for p in real if p == out or p.startswith(out + os.sep)]
        if held:
            kind = "folder" if os.path.isdir(held[0]) else "file"
            what = f"is a {input_flag} {kind}" if held[0] == out else f"holds the {input_flag} {kind} {held[0]}"
            raise UserError(f"{flag} {shown}: {path} {what}, and an output never replaces its input; choose "
                            f"another {flag}")


def refuse_all_inputs(outputs: list[str], inputs: dict[str, Iterable[str | None]], *, flag: str,
                      shown: str) -> None:
    """``refuse_inputs`` for each input flag (``{"--data": paths, ...}``), and the ``--config`` file read."""
    for input_flag, paths in {**inputs, "--config": cli.CONFIG_FILES}.items():
        refuse_inputs(outputs, paths, flag=flag, shown=shown, input_flag=input_flag)


def folder_size(path: str) -> int:
    """Bytes of the files under ``path`` (0 where it is absent)."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def check_free_space(folder: str, need: int, what: str) -> None:
    """Refuse in one line, before any work, when the disk of ``folder`` has clearly less free than ``need`` bytes."""
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < need:
        raise UserError(f"{folder}: {what} need about {need / 2**20:,.1f} MiB and its disk has {free / 2**20:,.1f} "
                        "MiB free; free some space or choose a folder on another disk")


def swap_in(staging: str, target: str) -> None:
    """Put the finished output in ``staging`` at ``target``; the output there before is deleted only after."""
    old = target + ".replaced"
    if os.path.isdir(target):
        shutil.rmtree(old, ignore_errors=True)  # left by a swap killed after its second rename: already replaced
        os.replace(target, old)
    # A kill between the two renames leaves the old output in `old` and the new one in `staging`:
    # the next swap (a resumed run's) finishes the job.
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def writing(target: str, *, whole: bool = True) -> Iterator[str]:
    """A temp folder to write ``target``'s files in, published when the block ends without an error.

    ``whole``: the temp folder then replaces ``target`` (``swap_in``); else its files are moved into the
    existing ``target`` one by one (a run folder that also holds checkpoints). On an error, the temp folder
    is removed and ``target`` is as it was. A temp folder left by a killed process is cleared first.
    """
    parent, name = os.path.split(os.path.abspath(target))
    temp = os.path.join(parent, f".{name}.writing") if whole else os.path.join(target, ".saving")
    shutil.rmtree(temp, ignore_errors=True)
    os.makedirs(temp)
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if whole:
        swap_in(temp, target)
        return
    for entry in os.listdir(temp):
        os.replace(os.path.join(temp, entry), os.path.join(target, entry))
    os.rmdir(temp)
