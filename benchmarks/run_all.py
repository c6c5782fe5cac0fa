"""The speed comparison in one invocation: ours, the alpaca-lora-style reference, LLaMA-Factory.

Usage:
  .venv/bin/python benchmarks/run_all.py                 # quick: first 200 records, 25 steps of batch 8
  .venv/bin/python benchmarks/run_all.py --n_records 400 --repeats 3 --only ours,reference-grouped

Each contender trains the same random-init Llama (benchmarks/workload.py) on the same records in
its own process with 2 threads; the table goes to benchmarks/RESULTS.md with the exact commands.
These machines drift by up to 4x between runs, so compare ratios within one invocation; with
``--repeats N`` the contenders run round-robin N times and the table shows medians.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)
sys.path.insert(1, ROOT)
import llama_factory  # noqa: E402
from heldout import HELDOUT_RECORDS, heldout_loss  # noqa: E402
from workload import DEFAULT_CACHE, Workload, build_workload  # noqa: E402

OUR_FLAGS = ["--val_set_size", "0", "--epochs", "1", "--per_gpu_train_batch_size", "8", "--cutoff_len", "512",
             "--learning_rate", "3e-4", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
             "--lora_target_modules", "q_proj,v_proj", "--template", "alpaca", "--save_steps", "100000",
             "--overwrite_output_dir"]
REFERENCE_NAMES = ("reference", "reference-grouped")


@dataclass
class Contender:
    """One run: its command, environment and output folder, or why it cannot run here."""

    name: str
    precision: str
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # on top of os.environ
    output_dir: str = ""
    skipped: str = ""  # why it was not run


@dataclass
class Outcome:
    """What one contender gave (medians over repeats), or why it failed."""

    contender: Contender
    metrics: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    heldout_loss: float | None = None
    error: str = ""


def our_supports(flag: str) -> bool:
    """Whether ``uniform_finetune.py --help`` lists ``--FLAG``."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "uniform_finetune.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return f"--{flag}=" in proc.stdout + proc.stderr  # fire prints help on stderr when not on a terminal


def baseline_checkout(commit: str, cache_dir: str) -> str:
    """A detached worktree of our code at ``commit`` (for a before/after comparison in one invocation)."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    path = os.path.join(cache_dir, f"baseline-{sha}")
    if not os.path.isdir(path):
        subprocess.run(["git", "worktree", "add", "--detach", path, sha], cwd=ROOT, check=True, capture_output=True)
    return path


def build_contenders(workload: Workload, out_root: str, threads: int, bf16: bool, bf16_note: str,
                     cache_dir: str, baseline: str | None = None) -> list[Contender]:
    """Every contender of the comparison, in run order."""
    threads_env = {"OMP_NUM_THREADS": str(threads)}
    args = ["--model_type", "llama", "--model_name_or_path", workload.model_dir, "--data", workload.data_file,
            *OUR_FLAGS, "--max_samples", str(workload.n_records)]
    ours = [sys.executable, "uniform_finetune.py", *args]
    has_packing = our_supports("packing")
    contenders = []
    if baseline:
        tree = baseline_checkout(baseline, cache_dir)
        name = f"ours @{os.path.basename(tree).removeprefix('baseline-')}"
        contenders.append(Contender(name, "fp32", [sys.executable, os.path.join(tree, "uniform_finetune.py"), *args,
                                                   "--compute_dtype", "fp32", "--output_dir", f"{out_root}/baseline"],
                                    threads_env, f"{out_root}/baseline"))
    contenders += [
        Contender("ours", "fp32", [*ours, "--compute_dtype", "fp32", "--output_dir", f"{out_root}/ours"],
                  threads_env, f"{out_root}/ours"),
        Contender("ours --packing False", "fp32",
                  [*ours, "--compute_dtype", "fp32", "--packing", "False", "--output_dir", f"{out_root}/ours-nopack"],
                  threads_env, f"{out_root}/ours-nopack",
                  skipped="" if has_packing else "uniform_finetune.py has no --packing flag yet"),
        Contender("ours bf16", "bf16", [*ours, "--compute_dtype", "bf16", "--output_dir", f"{out_root}/ours-bf16"],
                  threads_env, f"{out_root}/ours-bf16", skipped="" if bf16 else bf16_note),
    ]
    for name in REFERENCE_NAMES:
        out = f"{out_root}/{name}"
        cmd = [sys.executable, os.path.join(BENCH_DIR, "reference_loop.py"), "--output_dir", out,
               "--n_records", str(workload.n_records), "--threads", str(threads)]
        contenders.append(Contender(name, "fp32", cmd + (["--group_by_length"] if name.endswith("grouped") else []),
                                    threads_env, out))
    for variant in llama_factory.VARIANTS:
        for precision in ("fp32", "bf16"):
            out = f"{out_root}/llamafactory-{variant}-{precision}"
            args = llama_factory.build_args(workload, out, variant, precision == "bf16", threads)
            contenders.append(Contender(
                f"LLaMA-Factory {variant}", precision, llama_factory.driver_command(args, out, cache_dir),
                llama_factory.driver_env(cache_dir, threads),
                out, skipped="" if precision == "fp32" or bf16 else bf16_note))
    return contenders


def run_one(c: Contender, log_path: str, timeout_s: float) -> tuple[dict[str, Any], float, str]:
    """Run a contender in its own process: (its metrics.json, its peak RSS in MB, error or "")."""
    metrics_path = os.path.join(c.output_dir, "metrics.json")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(c.command, cwd=ROOT, env={**os.environ, **c.env}, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                return {}, usage.ru_maxrss / 1024, f"timed out after {timeout_s:.0f} s (log: {log_path})"
            time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; stop Popen from waiting again
    peak_mb = usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
    if proc.returncode != 0 or not os.path.isfile(metrics_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            last = [line.strip() for line in f if line.strip()][-1:] or ["(no output)"]
        return {}, peak_mb, f"exit {proc.returncode}: {last[0][:200]} (log: {log_path})"
    with open(metrics_path, encoding="utf-8") as f:
        return json.load(f), peak_mb, ""


def loop_tokens_per_s(metrics: dict[str, Any]) -> float:
    """Effective tokens per train-loop second (ours reports train_runtime_s; the others loop_seconds)."""
    seconds = metrics.get("loop_seconds") or metrics.get("train_runtime_s")
    if seconds and "effective_tokens" in metrics:
        return metrics["effective_tokens"] / seconds
    return metrics["effective_tokens_per_s"]


def median_metrics(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per-key medians of the numbers the table shows."""
    keys = {"loop": loop_tokens_per_s, "padding": lambda m: m["padding_fraction"],
            "loss": lambda m: m["train_loss"], "steps": lambda m: m["steps"]}
    return {k: statistics.median(get(m) for m in runs) for k, get in keys.items()}


def machine_summary() -> str:
    """CPU model, cores, measured bf16 and fp32 matmul rates, and load: the context the numbers were taken in."""
    from alpaca_cot.models.loading import measured_matmul_rates

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
                  if line.startswith("model name")), platform.processor())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rates = measured_matmul_rates()
    return (f"{model}, {os.cpu_count()} cores, matmul bf16 {rates['bf16']:.0f} / fp32 {rates['fp32']:.0f} GFLOP/s; "
            f"load average {load}")


def versions(cache_dir: str) -> str:
    """Library versions of our virtualenv and of LLaMA-Factory's."""
    probe = ("import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
             "('llamafactory', 'torch', 'transformers', 'peft')))")
    lf = subprocess.run([llama_factory.venv_python(cache_dir), "-c", probe], capture_output=True, text=True)
    import peft
    import torch
    import transformers

    ours = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    return f"ours and the reference: {ours}; LLaMA-Factory's virtualenv: {lf.stdout.strip() or 'not installed'}"


def relative(text: str) -> str:
    """Paths in commands, relative to the project root (and the venv's python as .venv/bin/python)."""
    return text.replace(sys.executable, ".venv/bin/python").replace(ROOT + os.sep, "")


def command_line(c: Contender) -> str:
    """The shell line that reruns a contender."""
    env = " ".join(f"{k}={shlex.quote(relative(v))}" for k, v in c.env.items())
    return relative(f"{env} {shlex.join(c.command)}".strip())


def write_results(path: str, outcomes: list[Outcome], header: dict[str, str], extra: list[str]) -> None:
    """The table, the context and the exact commands as Markdown."""
    done = [o for o in outcomes if o.metrics]
    refs = [o.metrics["loop"] for o in done if o.contender.name in REFERENCE_NAMES]
    best_ref = max(refs) if refs else None
    lines = ["# Speed benchmark results", "",
             "Written by `benchmarks/run_all.py`. Every contender trains the same random-init ~57M Llama with "
             "LoRA (r 8, alpha 16, dropout 0.05, q_proj and v_proj) on the same bench_2k records, batch 8, "
             "cutoff 512, lr 3e-4, one epoch, 2 threads, each in its own process.", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| contender | precision | effective tok/s (train loop) | x best reference | padding | "
              "peak RSS MB | train loss | held-out loss | optimizer steps |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for o in outcomes:
        c, m = o.contender, o.metrics
        if not m:
            why = c.skipped or f"failed: {o.error}"
            lines.append(f"| {c.name} | {c.precision} | {why} | | | | | | |")
            continue
        ratio = f"{m['loop'] / best_ref:.2f}" if best_ref else "-"
        held = f"{o.heldout_loss:.4f}" if o.heldout_loss is not None else "-"
        lines.append(f"| {c.name} | {c.precision} | {m['loop']:.0f} | {ratio} | {m['padding']:.1%} | "
                     f"{o.peak_rss_mb:.0f} | {m['loss']:.4f} | {held} | {m['steps']:.0f} |")
    lines += ["", "Definitions:",
              "- effective tokens: non-padding input tokens of the batches trained (the same records for all);",
              "- train loop: from the Trainer's start of training to its end (data loading, forward, backward, "
              "optimizer steps);",
              "- x best reference: train-loop tokens/s over the faster of the two reference loops, in this run;",
              "- peak RSS: the contender process's maximum resident memory (rusage), model loading included;",
              "- train loss: the Trainer's mean training loss over the run (each contender's own prompt text);",
              f"- held-out loss: the trained adapter's answer-token loss on the last {HELDOUT_RECORDS} bench_2k "
              "records, computed by `benchmarks/heldout.py` for every contender alike (our Alpaca template).", ""]
    lines += extra
    lines += ["", "## Commands", "", "Run from the project root; LLaMA-Factory's arguments are in each "
              "`lf_args.json` (its YAML keys; `lf_driver.py` passes them to `llamafactory.train.tuner.run_exp` "
              "and only adds token counting).", "", "```"]
    lines += [command_line(o.contender) for o in outcomes if not o.contender.skipped]
    lines += ["```", ""]
    gpu = os.path.join(BENCH_DIR, "RESULTS_GPU.md")
    if os.path.isfile(gpu):  # written by hand from benchmarks/gpu.py's output on a lent GPU
        with open(gpu, encoding="utf-8") as f:
            lines += ["#" + f.read().strip()]  # its title becomes a section of this file
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main(n_records: int = 200, repeats: int = 1, only: str | list[str] | None = None, threads: int = 2,
         bf16: str = "auto", heldout: bool = True, data_prep: bool = True, timeout_s: float = 7200,
         cache_dir: str = DEFAULT_CACHE, results: str = os.path.join(BENCH_DIR, "RESULTS.md"),
         baseline: str | None = None) -> None:
    """Run every contender (or those named in --only, comma-separated) and write RESULTS.md.

    --baseline COMMIT adds our code at that commit (a git worktree) as a contender, for before/after ratios.

    --bf16: auto (bf16 contenders only where --compute_dtype auto measures bf16 faster) | yes | no.
    """
    import torch

    from alpaca_cot.models.loading import resolve_dtype

    started = time.strftime("%Y-%m-%d %H:%M %Z")
    header = {"date": started, "machine": machine_summary()}
    workload = build_workload(int(n_records), cache_dir)
    out_root = os.path.join(BENCH_DIR, "runs")
    native = resolve_dtype("auto")[0] == torch.bfloat16
    use_bf16 = {"auto": native, "yes": True, "no": False}[str(bf16)]
    bf16_note = "not run: bf16 measured no faster than fp32 here" if not native else "not run: --bf16 no"
    lf_error = llama_factory.install(cache_dir)
    contenders = build_contenders(workload, out_root, int(threads), use_bf16, bf16_note, cache_dir, baseline)
    wanted = [w.strip() for w in (only.split(",") if isinstance(only, str) else only or [])]
    for c in contenders:
        if wanted and not any(w in c.name for w in wanted):
            c.skipped = "not selected (--only)"
        elif lf_error and c.name.startswith("LLaMA-Factory") and not c.skipped:
            c.skipped = f"not run: {lf_error}"
    runs: dict[int, list[dict[str, Any]]] = {}
    outcomes = {id(c): Outcome(c) for c in contenders}
    for rep in range(int(repeats)):
        for c in contenders:
            if c.skipped:
                continue
            log = os.path.join(out_root, f"{os.path.basename(c.output_dir)}.log")
            print(f"[{rep + 1}/{repeats}] {c.name} ({c.precision}) ...", flush=True)
            metrics, peak, error = run_one(c, log, timeout_s)
            o = outcomes[id(c)]
            o.peak_rss_mb = max(o.peak_rss_mb, peak)
            if error:
                o.error = error
                print(f"  failed: {error}", flush=True)
                continue
            runs.setdefault(id(c), []).append(metrics)
            print(f"  {loop_tokens_per_s(metrics):.0f} effective tokens/s (train loop), padding "
                  f"{metrics['padding_fraction']:.1%}, loss {metrics['train_loss']:.4f}, {metrics['steps']} steps",
                  flush=True)
    extra: list[str] = []
    for key, metrics_list in runs.items():
        o = outcomes[key]
        o.metrics, o.error = median_metrics(metrics_list), ""
        if heldout:
            o.heldout_loss = heldout_loss(workload.model_dir, o.contender.output_dir, threads=int(threads))
    if heldout:
        extra.append(f"Held-out loss of the untrained base model: "
                     f"{heldout_loss(workload.model_dir, None, threads=int(threads)):.4f} ({HELDOUT_RECORDS} records).")
    if lf_error:
        extra.append(f"LLaMA-Factory: {lf_error}")
    if data_prep:
        proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "data_prep.py")], cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
        extra.append(f"Data preparation (`OMP_NUM_THREADS={threads} .venv/bin/python benchmarks/data_prep.py`): "
                     + (proc.stdout.strip().splitlines() or [f"failed: {proc.stderr.strip()[-300:]}"])[-1])
    header.update(workload=f"the first {workload.n_records} records of bench_2k.json; "
                           f"{repeats} run(s) per contender (medians)", versions=versions(cache_dir),
                  finished=time.strftime("%Y-%m-%d %H:%M %Z") + f"; load average then "
                           f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    write_results(results, list(outcomes.values()), header, extra)
    print(f"table written to {results}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
