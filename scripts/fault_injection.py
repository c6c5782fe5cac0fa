"""Kill fine-tuning with SIGKILL at random moments, resume each time, and check the final adapter bit for bit.

Usage:
  .venv/bin/python scripts/fault_injection.py [--kills 24] [--val_set_size 0] [--seed 0] [--work_dir DIR]
  .venv/bin/python scripts/fault_injection.py --disk_full --kills 10   # as root: fills a tmpfs instead of killing

Trains a tiny model (../shared/models/stories260K-hf, or a random tiny Llama from the test fixtures)
on small synthetic records with uniform_finetune.py, first twice without interruption (the two
adapters must be identical, or no comparison means anything). Then, in chains of 1 to 4 kills, it
starts a run in a fresh folder, kills it with SIGKILL, resumes it with the bare
--resume_from_checkpoint, kills the resumed run, ... and lets the last resume finish; the chain's
final adapter_model.safetensors must equal the uninterrupted run's byte for byte. A kill is aimed at
a random moment: a random time after the start, or the first sight (watched in a busy loop, plus a
random 0-1 ms) of a checkpoint folder, of a file inside one (the Trainer writes
trainer_state.json last), of the final save's staging folder ``.saving`` or a file in it, or of the
adapter moved to the top level. Where each kill landed is read from the folder it left. A run killed
before its first complete checkpoint is started again (with --overwrite_output_dir if it left files).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from alpaca_cot.cli import run_cli  # noqa: E402
from alpaca_cot.errors import UserError  # noqa: E402
from alpaca_cot.io import write_json_atomic  # noqa: E402
from alpaca_cot.outputs import STAGING_SUFFIX  # noqa: E402
from alpaca_cot.training.checkpoints import checkpoint_folders, checkpoint_problem  # noqa: E402

ADAPTER = "adapter_model.safetensors"
CHECKPOINT_FILES = (ADAPTER, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
FINAL_FILES = (ADAPTER, "tokenizer.json", "finetune_args.json", "metrics.json", "loss_curve.png")
POLL_S = 0.0005  # timers


def write_records(path: str, count: int, seed: int) -> None:
    """Short arithmetic records (nothing is cut at --cutoff_len 64)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        rows.append({"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}."})
    write_json_atomic(path, rows)


def tiny_model(work_dir: str) -> str:
    """The real 260K-parameter Llama from ../shared, else a random tiny Llama built from a config."""
    shared = os.environ.get("ALPACA_COT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
    path = os.path.join(shared, "models", "stories260K-hf")
    if os.path.isdir(path):
        return path
    from tests.fixtures.tiny_models import write_tiny_model

    return write_tiny_model(os.path.join(work_dir, "tiny-llama"), "llama")


class Trainer:
    """uniform_finetune.py with fixed settings, started as a process of its own (output in ``<out>.log``)."""

    def __init__(self, model: str, data: str, val_set_size: float, max_steps: int, save_steps: int):
        self.base = [sys.executable, os.path.join(ROOT, "uniform_finetune.py"), "--model_type", "llama",
                     "--model_name_or_path", model, "--data", data, "--val_set_size", str(val_set_size),
                     "--max_steps", str(max_steps), "--save_steps", str(save_steps), "--per_gpu_train_batch_size",
                     "4", "--cutoff_len", "64", "--logging_steps", "1", "--compute_dtype", "fp32"]
        self.saves = list(range(save_steps, max_steps, save_steps)) + [max_steps]
        self.logs: str | None = None
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def start(self, out: str, *flags: str) -> subprocess.Popen:
        """Start a run writing to ``out`` with ``flags`` added."""
        logs = self.logs or os.path.dirname(out)  # off the filled disk with --disk_full
        with open(os.path.join(logs, os.path.basename(out) + ".log"), "a", encoding="utf-8") as log:
            log.write(f"\n$ uniform_finetune.py ... {' '.join(flags)}\n")
            log.flush()
            return subprocess.Popen([*self.base, "--output_dir", out, *flags], cwd=ROOT, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT)

    def run(self, out: str, *flags: str) -> float:
        """Run to the end; returns the seconds it took."""
        started = time.perf_counter()
        proc = self.start(out, *flags)
        if proc.wait() != 0:
            raise UserError(f"training failed ({proc.returncode}); see {out}.log")
        return time.perf_counter() - started


def read_adapter(out: str) -> bytes:
    """The bytes of the final adapter in ``out``."""
    with open(os.path.join(out, ADAPTER), "rb") as f:
        return f.read()


def choose_trigger(rng: random.Random, trainer: Trainer, folder: str, done_step: int,
                   seconds: float) -> tuple[str, str | None, float]:
    """(label, path whose appearance fires the kill or None, delay in seconds after it or after the start).

    Only paths that are not there yet: a folder left incomplete by the last kill is still there
    when the resumed run starts (it removes it), and must not fire the kill at once.
    """
    kind = rng.choices(["timer", "checkpoint", "final"], weights=[3, 4, 3])[0]
    if kind == "checkpoint":
        options = [(step, name) for step in trainer.saves if step > done_step for name in (None, *CHECKPOINT_FILES)
                   if not os.path.exists(os.path.join(folder, f"checkpoint-{step}"))]
        if options:
            step, name = rng.choice(options)
            path = os.path.join(folder, f"checkpoint-{step}", *([name] if name else []))
            return f"checkpoint-{step}/{name or ''} appeared", path, rng.uniform(0, 0.001)
    if kind == "final":
        options = [n for n in (".saving", *(f".saving/{n}" for n in FINAL_FILES), ADAPTER)
                   if not os.path.exists(os.path.join(folder, n.split("/")[0]))]
        if options:
            name = rng.choice(options)
            return f"final save: {name} appeared", os.path.join(folder, name), rng.uniform(0, 0.001)
    delay = rng.uniform(0, seconds)
    return f"{delay:.2f} s after the start", None, delay


def kill_when(proc: subprocess.Popen, path: str | None, delay: float, fill: str | None = None) -> bool:
    """SIGKILL ``proc`` ``delay`` s after ``path`` appears (after the start when None); False if it ended first.
    ``fill``: fill that disk instead (the run ends on its own, one line), then free it."""
    if path is not None:
        # A tiny model's checkpoint is written in milliseconds: watch without sleeping (one busy core).
        while not os.path.exists(path):
            if proc.poll() is not None:
                return False
    deadline = time.perf_counter() + delay
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(POLL_S)
    if proc.poll() is not None:
        return False
    if fill is None:
        proc.send_signal(signal.SIGKILL)
    else:
        filler = os.path.join(fill, "filler")
        with open(filler, "wb", buffering=0) as f:
            try:
                while f.write(b"\0" * 4096):
                    pass
            except OSError:  # full
                pass
    proc.wait()
    if fill is not None:
        os.remove(filler)
        if proc.returncode not in (0, 2):
            raise UserError(f"a full disk ended training with status {proc.returncode}, not one line")
    return True


def snapshot(folder: str) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime in ns) of every file below ``folder``; folders end in "/" (size -1),
    so that a folder created and killed before its first file counts as written."""
    files = {}
    for root, dirs, names in os.walk(folder):
        for name in names + [d + "/" for d in dirs]:
            path = os.path.join(root, name)
            try:
                info = os.stat(path)
            except FileNotFoundError:
                continue
            files[os.path.relpath(path, folder) + ("/" if name.endswith("/") else "")] = \
                (-1 if name.endswith("/") else info.st_size, info.st_mtime_ns)
    return files


def landing(folder: str, before: dict[str, tuple[int, int]]) -> tuple[str, str]:
    """(category, detail) of where a kill landed: what the killed run wrote, against the folder before it."""
    after = snapshot(folder)
    changed = {p for p, v in after.items() if before.get(p) != v}
    if any(p.startswith(".saving") for p in changed) or ADAPTER in changed:
        saving = os.path.join(folder, ".saving")
        if os.path.isdir(saving):
            return "final save", f"{len(os.listdir(saving))} files in .saving"
        return "final save", "moving the files to the top level"
    touched = sorted({int(p.split(os.sep)[0].split("-")[1]) for p in changed if p.startswith("checkpoint-")})
    for step in reversed(touched):
        problem = checkpoint_problem(os.path.join(folder, f"checkpoint-{step}"))
        if problem:
            return "checkpoint save", f"checkpoint-{step} ({problem})"
    if not changed:
        return "start-up", "nothing written yet"
    complete = [s for s, p in checkpoint_folders(folder) if checkpoint_problem(p) is None]
    return "training", f"after checkpoint-{complete[-1]}" if complete else "before the first checkpoint"


def main(kills: int = 24, val_set_size: float = 0, max_steps: int = 12, save_steps: int = 3, seed: int = 0,
         work_dir: str | None = None, disk_full: bool = False) -> None:
    """Kill, resume and compare until at least ``kills`` kills; print and save the figures. ``disk_full``: each
    chain writes to a tmpfs of its own (mounted: needs root), which is filled instead of killing, then freed."""
    if kills < 1 or max_steps < 2 or not 1 <= save_steps < max_steps:
        raise UserError("pass --kills >= 1, --max_steps >= 2 and 1 <= --save_steps < --max_steps")
    work_dir = os.path.abspath(work_dir or tempfile.mkdtemp(prefix="fault_injection-"))
    os.makedirs(work_dir, exist_ok=True)
    data = os.path.join(work_dir, "records.json")
    write_records(data, 64, seed)
    trainer = Trainer(tiny_model(work_dir), data, val_set_size, max_steps, save_steps)
    trainer.logs = work_dir
    print(f"work folder {work_dir}; checkpoints at steps {trainer.saves}", flush=True)

    seconds = trainer.run(os.path.join(work_dir, "reference"))
    trainer.run(os.path.join(work_dir, "reference-2"))
    reference = read_adapter(os.path.join(work_dir, "reference"))
    if read_adapter(os.path.join(work_dir, "reference-2")) != reference:
        raise UserError("two uninterrupted runs gave different adapters: the comparison would mean nothing")
    print(f"uninterrupted run: {seconds:.1f} s; two runs give the same adapter", flush=True)

    rng = random.Random(seed)
    records: list[dict] = []
    chains: list[dict] = []
    while len(records) < kills:
        disk = os.path.join(work_dir, f"disk-{len(chains)}") if disk_full else None
        if disk:
            os.makedirs(disk)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", disk], check=True)
        out = os.path.join(disk or work_dir, f"chain-{len(chains)}")
        planned, flags, finished, chain_kills = rng.randint(1, 4), [], False, 0
        while chain_kills < planned and len(records) < kills:
            folder = out + STAGING_SUFFIX if "--overwrite_output_dir" in flags else out
            done = [s for s, p in checkpoint_folders(folder) if checkpoint_problem(p) is None]
            label, path, delay = choose_trigger(rng, trainer, folder, max(done, default=0), seconds)
            before = snapshot(folder)
            proc = trainer.start(out, *flags)
            if not kill_when(proc, path, delay, disk):
                if proc.returncode != 0:
                    raise UserError(f"training failed ({proc.returncode}); see {out}.log")
                finished = True  # the run ended before the moment came: the chain ends here
                break
            category, detail = landing(folder, before)
            if proc.returncode == 0:  # filled after its last write: the run finished
                finished = True
                break
            chain_kills += 1
            records.append({"chain": len(chains), "trigger": label, "landed": category, "detail": detail,
                            "flags": flags})
            print(f"kill {len(records):2d} (chain {len(chains)}): {label:42s} -> {category}: {detail}", flush=True)
            flags = next_flags(out, "--overwrite_output_dir" in flags)
        if not finished:
            trainer.run(out, *flags)
        same = read_adapter(out) == reference
        leftovers = sorted(n for n in os.listdir(disk or work_dir) if n.startswith(os.path.basename(out) + ".")
                           and not n.endswith(".log"))
        leftovers += [name for name in os.listdir(out) if name == ".saving"]
        leftovers += [os.path.basename(p) for _, p in checkpoint_folders(out) if checkpoint_problem(p)]
        if disk:
            subprocess.run(["umount", disk], check=True)
        chains.append({"kills": chain_kills, "identical": same, "leftovers": leftovers})
        print(f"chain {len(chains) - 1}: {chain_kills} kills, final adapter "
              f"{'bit-identical' if same else 'DIFFERENT'}{', leftovers ' + str(leftovers) if leftovers else ''}",
              flush=True)

    summary = {"kills": len(records), "landed": dict(Counter(r["landed"] for r in records)),
               "chains": len(chains), "chains_identical": sum(c["identical"] for c in chains),
               "resumes": sum(c["kills"] for c in chains), "val_set_size": val_set_size, "max_steps": max_steps,
               "save_steps": save_steps, "seed": seed, "uninterrupted_seconds": seconds}
    write_json_atomic(os.path.join(work_dir, "fault_injection.json"),
                      {"summary": summary, "kills": records, "chains": chains})
    print(json.dumps(summary))
    if summary["chains_identical"] != summary["chains"]:
        sys.exit(1)


def next_flags(out: str, overwrite: bool) -> list[str]:
    """How a user carries on after a kill: resume from a complete checkpoint, else start again."""
    folder = out + STAGING_SUFFIX if overwrite else out
    if any(checkpoint_problem(p) is None for _, p in checkpoint_folders(folder)):
        return ["--overwrite_output_dir", "--resume_from_checkpoint"] if overwrite else ["--resume_from_checkpoint"]
    if overwrite or (os.path.isdir(out) and os.listdir(out)):
        return ["--overwrite_output_dir"]
    return []


if __name__ == "__main__":
    run_cli(main)
