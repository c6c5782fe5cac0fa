"""The GPU speed comparison in one command: ours (packed, padded, QLoRA, Liger, torch.compile, ZeRO-3) against
the alpaca-lora-style reference loop, at batch 8 and 32, with a profiled step and a sync check.

Usage (one CUDA GPU; on a machine without our requirements run benchmarks/gpu_setup.sh first):
  python benchmarks/gpu.py [--steps 40] [--batch_sizes 8,32] [--budget_s 400] [--report_dir DIR]
  python benchmarks/gpu.py --plan       # the rows in run order, each one's expected and longest seconds
  python benchmarks/gpu.py --smoke      # CPU check of the whole script (2-layer model, 5 steps of batch 2)

The model is random-init from Qwen3-0.6B's configuration (28 layers, hidden 1024, GQA 16/8 heads,
vocabulary 151,936, tied head; about 0.6B parameters) with the real Qwen3 tokenizer from
``$ALPACA_COT_SHARED/models/qwen3-tokenizer``: throughput and memory do not depend on the weights'
values, and nothing is downloaded. Every contender trains LoRA (r 8, alpha 16, dropout 0.05, q_proj
and v_proj) on the first ``steps x batch`` bench_2k records, cutoff 512, bf16 (fp32 on a CPU), for
``--steps`` optimizer steps, in its own process under benchmarks/step_probe.py, which measures:
steady-state effective tokens/s (after the first quarter of the steps: set-up, allocator growth and
compilation left out), one profiled step (batch 8: top operators by device time, into profiles.txt)
and host-device syncs over the last two steps (``torch.cuda.set_sync_debug_mode``). The sync check can
fail: a sync inside a step of one of our training rows (not the reference's, DeepSpeed's own in the ZeRO-3
smoke, nor the stock library's listed in ``KNOWN_SYNCS``) makes the script exit with status 1 once the tables
are written, naming the rows; the table lists every sync's site.

Contenders, in ``run_order`` (``--budget_s`` covers building the model and every row; a row is not started
where less than its expected seconds are left, and is stopped at its longest): at batch 8 then 32, ours
(packed), the length-grouped reference, ours --packing False, --use_liger_kernel, --quantization_bit 4
(QLoRA); a 1-process ZeRO-3 smoke (``--deepspeed zero3`` under torchrun, batch 8); --torch_compile (dynamic
shapes from the first batch and one inductor cache, so batch 32 reuses batch 8's kernels; the steady
window excludes compilation either way); the ungrouped reference. A row that cannot run here is listed
with the reason.
MFU = steady tokens/s x training FLOPs per token (ours' count; the reference rows take ours' at the
same batch) / the highest bf16 matmul peak our runs measured at start-up. Writes gpu_results.md,
gpu_results.json, profiles.txt and logs.txt (each contender's last lines) to ``--out``, and copies
them to ``--report_dir``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
from run_all import OUR_FLAGS, ROOT, Contender, loop_tokens_per_s  # noqa: E402 (puts the project on the path)
from workload import SHARED, load_bench_records  # noqa: E402

from alpaca_cot.config import FinetuneArgs  # noqa: E402
from alpaca_cot.flags import as_list  # noqa: E402
from alpaca_cot.io import write_json_atomic, write_text_atomic  # noqa: E402

QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
SMOKE = dict(QWEN3_0_6B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
PROBE = os.path.join(BENCH_DIR, "step_probe.py")
VERSIONS = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "triton", "deepspeed",
            "flash-attn", "datasets")
# Seconds a row takes on the H200 (expected) and the most it may take (longest), per kind: a process start
# (imports, CUDA context, the 0.6B model, the data cache, the matmul peak, the Trainer) is most of a row.
# Estimates, until a device run replaces them with its own wall_s (gpu_results.json).
ROW_SECONDS = {"plain": (20, 45), "zero3": (35, 75), "compile-first": (90, 150), "compile-cached": (40, 90)}
EXTRAS = ("reference, batch",)  # after the plan, where time is left: the ungrouped reference (the grouped is faster)
BUILD_SECONDS = 15  # the random-init model, saved once
SMOKE_ROW_S = 300  # the CPU smoke's limit per row
# Syncs inside a step that are the stock library's, by the innermost Python function: reported, not failed.
KNOWN_SYNCS = {"_ignore_causal_mask_sdpa": "transformers' SDPA mask for padded batches reads the padding mask to "
                                           "see whether it may skip it (masking_utils.fast_all): --packing False",
               "fused_linear_cross_entropy_forward": "Liger's fused linear cross-entropy reads its count of label "
                                                     "tokens (.item()) every forward: --use_liger_kernel"}


@dataclasses.dataclass
class Row:
    """One contender of the table: what it runs, its batch size and, once run, what it measured."""

    contender: Contender
    batch: int
    kind: str = "plain"  # a key of ROW_SECONDS
    reference: bool = False
    probe_file: str = ""
    profile_file: str = ""
    result: dict[str, Any] = dataclasses.field(default_factory=dict)


def build_model(model_dir: str, smoke: bool) -> None:
    """Save the random-init model (seed 0, bf16) with the Qwen3 tokenizer."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(SHARED, "models", "qwen3-tokenizer"))
    config = transformers.Qwen3Config(**(SMOKE if smoke else QWEN3_0_6B), pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 0.6B on a GPU takes a second
        model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16)
    shutil.rmtree(model_dir + ".partial", ignore_errors=True)
    model.save_pretrained(model_dir + ".partial", safe_serialization=True)
    tokenizer.save_pretrained(model_dir + ".partial")
    os.replace(model_dir + ".partial", model_dir)


def probe_args(tag: str, out: str, steps: int, profile: bool, cuda: bool) -> tuple[list[str], str, str]:
    """step_probe.py's options for a run of ``steps`` optimizer steps: the steady window from the end of the
    first quarter to three steps before the end, then (batch 8) one profiled step, then the sync check over
    the last two steps; the probe's own synchronizations stay outside the sync window."""
    warm = max(1, steps // 4)
    probe_file = os.path.join(out, f"{tag}.probe.json")
    profile_file = os.path.join(out, f"{tag}.profile.txt") if profile else ""
    args = ["--out", probe_file, "--steady", f"{warm}:{steps - 3}"]
    if profile:
        args += ["--profile_step", str(steps - 2), "--profile_out", profile_file]
    if cuda:
        args += ["--sync", f"{steps - 2}:{steps}"]
    return args, probe_file, profile_file


def unavailable(package: str) -> bool:
    """Whether ``package`` cannot be imported here."""
    return importlib.util.find_spec(package) is None


def plan_rows(model_dir: str, out: str, batch: int, steps: int, cuda: bool, smoke: bool, first: bool) -> list[Row]:
    """Every contender at one batch size (the ZeRO-3 smoke and the first compilation at the ``first`` size)."""
    n_records = steps * batch
    precision = "bf16" if cuda else "fp32"  # a CPU without native bf16 emulates it 20x slower
    cutoff = "128" if smoke else "512"
    flags = list(OUR_FLAGS)
    flags[flags.index("--per_gpu_train_batch_size") + 1] = str(batch)
    flags[flags.index("--cutoff_len") + 1] = cutoff
    data_file = os.path.join(out, f"bench_{n_records}.json")  # written by main
    ours = ["uniform_finetune.py", "--model_type", "auto", "--model_name_or_path", model_dir, "--data", data_file,
            *flags, "--max_samples", str(n_records), "--compute_dtype", precision, "--logging_steps", "10"]
    fields = {f.name for f in dataclasses.fields(FinetuneArgs)}
    zero3 = os.path.join(ROOT, "configs", "deepspeed", "zero3.json")
    not_on_cpu = "needs a CUDA GPU"
    variants = [  # name, tag, extra flags, why it cannot run here ("" = it can)
        ("ours", "ours", [], ""),
        ("ours --packing False", "padded", ["--packing", "False"], ""),
        ("ours --use_liger_kernel", "liger", ["--use_liger_kernel", "True"],
         not_on_cpu if not cuda else "liger-kernel is not installed" if unavailable("liger_kernel") else ""),
        ("ours QLoRA (4-bit NF4)", "qlora", ["--quantization_bit", "4"],
         not_on_cpu if not cuda else "bitsandbytes is not installed" if unavailable("bitsandbytes") else ""),
        ("ours --torch_compile", "compile", ["--torch_compile", "True"],
         "smoke: compiling alone takes longer than the whole smoke" if smoke else ""),
    ]
    # Compiled rows: dynamic shapes from the first batch (accelerate's setting; otherwise a static compile
    # comes first, then a dynamic one) and one inductor cache for both batch sizes.
    compiled = {"ACCELERATE_DYNAMO_USE_DYNAMIC": "1", "TORCHINDUCTOR_CACHE_DIR": os.path.join(out, "inductor")}
    rows = []
    for name, tag, extra, skipped in variants:
        tag = f"{tag}-b{batch}"
        args, probe_file, profile_file = probe_args(tag, out, steps, profile=batch == 8 or smoke, cuda=cuda)
        output_dir = os.path.join(out, tag)
        command = [sys.executable, PROBE, *args, "--", *ours, *extra, "--output_dir", output_dir]
        compile_row = tag.startswith("compile")
        kind = ("compile-first" if first else "compile-cached") if compile_row else "plain"
        rows.append(Row(Contender(f"{name}, batch {batch}", precision, command, env=compiled if compile_row else {},
                                  output_dir=output_dir, skipped=skipped), batch, kind=kind, probe_file=probe_file,
                        profile_file=profile_file))
    for name, grouped in (("reference-grouped", True), ("reference", False)):
        tag = f"{name}-b{batch}"
        args, probe_file, profile_file = probe_args(tag, out, steps, profile=batch == 8 or smoke, cuda=cuda)
        output_dir = os.path.join(out, tag)
        command = [sys.executable, PROBE, *args, "--", os.path.join(BENCH_DIR, "reference_loop.py"),
                   "--output_dir", output_dir, "--n_records", str(n_records), "--dtype", precision,
                   "--model_dir", model_dir, "--batch_size", str(batch), "--cutoff_len", cutoff,
                   *(["--group_by_length"] if grouped else [])]
        rows.append(Row(Contender(f"{name}, batch {batch}", precision, command, output_dir=output_dir), batch,
                        reference=True, probe_file=probe_file, profile_file=profile_file))
    if first:
        why = ("our uniform_finetune.py has no --deepspeed" if "deepspeed" not in fields
               else f"{zero3} is absent" if not os.path.isfile(zero3)
               else "deepspeed is not installed" if unavailable("deepspeed") else "")
        tag = f"zero3-b{batch}"
        args, probe_file, _ = probe_args(tag, out, steps, profile=False, cuda=cuda)
        output_dir = os.path.join(out, tag)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", PROBE,
                   *args, "--", *ours, "--deepspeed", "zero3", "--output_dir", output_dir]
        rows.append(Row(Contender(f"ours --deepspeed zero3 (1 process), batch {batch}", precision, command,
                                  output_dir=output_dir, skipped=why), batch, kind="zero3", probe_file=probe_file))
    return rows


def run_order(rows: list[Row]) -> list[Row]:
    """The order the budget is spent in: the core comparison at each batch size, the other variants, the ZeRO-3
    smoke, compilation (the longest rows), the ungrouped reference (the grouped one is the faster)."""
    sizes = sorted({r.batch for r in rows})
    variants = ["ours", "reference-grouped", "ours --packing False", "ours --use_liger_kernel",
                "ours QLoRA (4-bit NF4)"]
    order = [f"{v}, batch {b}" for b in sizes for v in variants] + \
        [f"ours --deepspeed zero3 (1 process), batch {sizes[0]}"] + \
        [f"{v}, batch {b}" for v in ("ours --torch_compile", "reference") for b in sizes]
    rank = {name: i for i, name in enumerate(order)}
    return sorted(rows, key=lambda r: rank.get(r.contender.name, len(order)))


def render_plan(rows: list[Row], budget_s: float) -> str:
    """The device run's rows in run order, each one's expected and longest seconds, and the total (``--plan``)."""
    lines = ["| # | row | expected s | longest s |", "|---:|---|---:|---:|",
             f"| 0 | build the random-init model | {BUILD_SECONDS} | |"]
    total = extra = 0
    for i, row in enumerate(run_order(rows), 1):
        expected, longest = ROW_SECONDS[row.kind]
        is_extra = row.contender.name.startswith(EXTRAS)
        lines.append(f"| {i} | {row.contender.name}{' (if time is left)' if is_extra else ''} | {expected} | "
                     f"{longest} |")
        extra, total = (extra + expected, total) if is_extra else (extra, total + expected)
    lines.append(f"| | total, the model and the planned rows (--budget_s {budget_s:.0f}) | {BUILD_SECONDS + total} | |")
    lines.append(f"| | and the rows if time is left | {extra} | |")
    return "\n".join(lines) + "\n"


def run_contender(c: Contender, log_path: str, timeout_s: float) -> tuple[dict[str, Any], float, str]:
    """Run a contender in a process group of its own: (its metrics.json, its peak RSS in MB, error or "").

    A timed-out run is killed with its whole group (torchrun's workers too), so that no process is left
    holding GPU memory while the next contender runs.
    """
    metrics_path = os.path.join(c.output_dir, "metrics.json")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(c.command, cwd=ROOT, env={**os.environ, **c.env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline, error = time.monotonic() + timeout_s, ""
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # wait4: this child's own peak RSS
            if pid:
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                error = f"timed out after {timeout_s:.0f} s"
                break
            time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; stop Popen from waiting again
    error = error or (f"exit {proc.returncode}" if proc.returncode else "")
    peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
    if not error and os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            return json.load(f), peak_mb, ""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        last = [line.strip() for line in f if line.strip()][-1:] or ["(no output)"]
    return {}, peak_mb, f"{error or 'no metrics.json'}: {last[0][:200]} (log: {log_path})"


def run_rows(rows: list[Row], out: str, deadline: float, smoke: bool) -> None:
    """Run each row in its own process before ``deadline`` (``time.monotonic()``); fill ``row.result``."""
    for row in run_order(rows):
        c = row.contender
        if c.skipped:
            row.result = {"skipped": c.skipped}
            continue
        left = deadline - time.monotonic()
        expected, longest = ROW_SECONDS[row.kind]
        if left < expected and not smoke:  # the smoke runs every row: a CPU is slower than the plan
            row.result = {"skipped": f"time budget: {left:.0f} s left, the row expects {expected} s"}
            continue
        print(f"{c.name} ...", flush=True)
        t0 = time.perf_counter()
        log = os.path.join(out, f"{os.path.basename(c.output_dir)}.log")
        metrics, peak_rss, error = run_contender(c, log, SMOKE_ROW_S if smoke else min(left, longest))
        with open(log, encoding="utf-8", errors="replace") as f:
            # syncs in the backward's C++ threads reach no Python warning handler: c10 prints them
            log_syncs = f.read().count("synchronizing CUDA operation")
        row.result = {"wall_s": time.perf_counter() - t0, "error": error, "peak_rss_mb": peak_rss,
                      "metrics": metrics, "log_syncs": log_syncs}
        if os.path.isfile(row.probe_file):
            with open(row.probe_file, encoding="utf-8") as f:
                row.result["probe"] = json.load(f)
        print(f"  {summary(row)}", flush=True)


def summary(row: Row) -> str:
    """One line of what a row measured."""
    r = row.result
    if r.get("skipped") or r.get("error"):
        return r.get("skipped") or r["error"]
    steady = r.get("probe", {}).get("steady", {}).get("tokens_per_s")
    return (f"steady {steady or 0:.0f} tok/s, loop {loop_tokens_per_s(r['metrics']):.0f} tok/s, "
            f"loss {r['metrics']['train_loss']:.4f}, {r['wall_s']:.0f} s")


def table_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """The table's figures per row. MFU: over one matmul peak for every row (the highest any of our runs
    measured at start-up), with the row's FLOPs per token (ours' at the same batch for the reference)."""
    ours = {r.batch: r.result.get("metrics", {}) for r in rows if r.contender.name.startswith("ours, ")}
    peaks = [r.result["metrics"]["matmul_peak_gflops"] for r in rows
             if r.result.get("metrics", {}).get("matmul_peak_gflops")]
    peak = max(peaks) if peaks else None
    out = []
    for row in rows:
        r, m = row.result, row.result.get("metrics") or {}
        probe = r.get("probe", {})
        entry: dict[str, Any] = {"name": row.contender.name, "batch": row.batch, "reference": row.reference,
                                 "skipped": r.get("skipped", ""), "error": r.get("error", "")}
        if m:
            flops = m.get("flops_per_token") or ours.get(row.batch, {}).get("flops_per_token")
            steady = probe.get("steady", {}).get("tokens_per_s")
            sync = probe.get("sync", {})
            entry.update(steady_tokens_per_s=steady, loop_tokens_per_s=loop_tokens_per_s(m),
                         padding=m.get("padding_fraction"), train_loss=m.get("train_loss"), steps=m.get("steps"),
                         peak_gpu_mb=m.get("peak_gpu_mb"), peak_rss_mb=r.get("peak_rss_mb"),
                         mfu=steady * flops / (peak * 1e9) if steady and flops and peak else None,
                         matmul_peak_gflops=peak,
                         syncs_per_step=(sync["syncs"] + r.get("log_syncs", 0)) / (sync["to_step"] - sync["from_step"])
                         if sync.get("checked") else None, log_syncs=r.get("log_syncs", 0),
                         unknown_syncs_per_step=unknown_syncs(sync, r.get("log_syncs", 0)),
                         sync_sites=sync.get("sites", []), profile=probe.get("profile"),
                         not_reached=probe.get("not_reached", []), wall_s=r.get("wall_s"))
        out.append(entry)
    return out


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape the figures, the device and the commit."""
    import torch

    found = {}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    found["cuda"] = torch.version.cuda or "none"
    found["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                   text=True).stdout.strip()
    except OSError:  # no git installed
        described = ""
    # a copy of the working tree without .git (the device machine): the commit gpu_setup.sh stamped
    found["commit"] = described or f"{os.environ.get('ALPACA_COT_COMMIT', 'unknown')} (stamped, no git here)"
    return found


def render(entries: list[dict[str, Any]], found: dict[str, str], steps: int, smoke: bool) -> str:
    """gpu_results.md: the versions, the table (ratios to the best reference at the same batch), the syncs."""
    def best_reference(batch: int) -> float | None:
        refs = [e["steady_tokens_per_s"] for e in entries
                if e["reference"] and e["batch"] == batch and e.get("steady_tokens_per_s")]
        return max(refs) if refs else None

    def peak(e: dict) -> str:
        if e.get("peak_gpu_mb"):
            return f"{e['peak_gpu_mb']:.0f}"
        return f"{e['peak_rss_mb']:.0f} (RSS)" if e.get("peak_rss_mb") else "-"

    lines = [f"Device: {found['device']} (CUDA {found['cuda']}); commit {found['commit']}; "
             + ", ".join(f"{k} {found[k]}" for k in VERSIONS) + ".",
             f"{'Smoke run (2-layer model, fp32 on CPU): checks the script, not the speed. ' if smoke else ''}"
             f"Each row: {steps} optimizer steps on the first steps x batch bench_2k records; steady = steps "
             f"{max(1, steps // 4) + 1}-{steps - 3}; syncs over the last two steps.", "",
             "| contender | steady tok/s | x best reference | loop tok/s | MFU | peak MB | padding | train loss (mean) "
             "| syncs/step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        if e["skipped"] or e["error"]:
            lines.append(f"| {e['name']} | {'skipped' if e['skipped'] else 'failed'}: "
                         f"{(e['skipped'] or e['error']).replace('|', '/')} | | | | | | | |")
            continue
        best = best_reference(e["batch"])
        steady = e.get("steady_tokens_per_s")
        ratio = f"{steady / best:.2f}" if steady and best else "-"
        mfu = f"{e['mfu']:.1%}" if e.get("mfu") is not None else "-"
        syncs = f"{e['syncs_per_step']:g}" if e.get("syncs_per_step") is not None else "not checked"
        lines.append(f"| {e['name']} | {steady or 0:.0f} | {ratio} | {e['loop_tokens_per_s']:.0f} | {mfu} | "
                     f"{peak(e)} | {e['padding']:.1%} | {e['train_loss']:.4f} | {syncs} |")
    synced = [e for e in entries if e.get("sync_sites")]
    if synced or any(e.get("log_syncs") for e in entries):
        lines += ["", "Host-device syncs inside the step (innermost Python frame, count over the window):"]
        for e in synced:
            lines += [f"- {e['name']}: " + "; ".join(f"{s['count']}x {s['stack'][-1] if s['stack'] else '?'}"
                                                       for s in e["sync_sites"][:6])]
    for e in entries:
        if e.get("log_syncs"):
            lines.append(f"- {e['name']}: {e['log_syncs']} more in C++ threads (the backward), printed in its log")
    return "\n".join(lines) + "\n"


def collect_profiles(rows: list[Row]) -> str:
    """Every profiled step's operator table, one after another."""
    parts = []
    for row in rows:
        if row.profile_file and os.path.isfile(row.profile_file):
            with open(row.profile_file, encoding="utf-8") as f:
                parts.append(f"=== {row.contender.name}\n{f.read()}")
    return "\n".join(parts) or "(no step was profiled)\n"


def collect_logs(rows: list[Row], out: str, lines: int = 40) -> str:
    """The last lines of every contender's log."""
    parts = []
    for row in rows:
        path = os.path.join(out, f"{os.path.basename(row.contender.output_dir)}.log")
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                parts.append(f"=== {row.contender.name}\n" + "".join(f.readlines()[-lines:]))
    return "\n".join(parts) or "(no logs)\n"


def main(steps: int = 40, batch_sizes: str | int | tuple = "8,32", out: str = os.path.join(BENCH_DIR, "runs", "gpu"),
         smoke: bool = False, budget_s: float = 400, report_dir: str | None = None, plan: bool = False) -> None:
    """Run the GPU comparison; write gpu_results.md, gpu_results.json and profiles.txt into --out. ``--budget_s``
    covers building the model and every row; ``--plan`` prints the device run's rows and seconds instead."""
    import torch

    deadline = time.monotonic() + float(budget_s)
    if plan:
        sizes = [int(b) for b in as_list(batch_sizes)]
        rows = [row for b in sizes for row in plan_rows("MODEL", "OUT", b, int(steps), True, False, b == sizes[0])]
        print(render_plan(rows, float(budget_s)))
        return
    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        print("No CUDA GPU here: this runs the CPU smoke check instead (--smoke).", flush=True)
        smoke = True
    if smoke:
        steps, batch_sizes = 5, "2"
    steps = int(steps)
    if steps < 5:
        raise SystemExit(f"--steps {steps}: at least 5 (a warm-up, a steady window, a profiled step, a sync check)")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    model_dir = os.path.join(out, "qwen3-0.6b-shape-random" + ("-smoke" if smoke else ""))
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        build_model(model_dir, smoke)
    sizes = [int(b) for b in as_list(batch_sizes)]
    for batch in sizes:
        write_json_atomic(os.path.join(out, f"bench_{steps * batch}.json"), load_bench_records(steps * batch))
    rows = [row for batch in sizes for row in plan_rows(model_dir, out, batch, steps, cuda, smoke, batch == sizes[0])]
    run_rows(rows, out, deadline, smoke)
    entries, found = table_rows(rows), versions()
    text = render(entries, found, steps, smoke)
    write_text_atomic(os.path.join(out, "gpu_results.md"), text)
    write_json_atomic(os.path.join(out, "gpu_results.json"), {"versions": found, "steps": steps, "rows": entries})
    write_text_atomic(os.path.join(out, "profiles.txt"), collect_profiles(rows))
    write_text_atomic(os.path.join(out, "logs.txt"), collect_logs(rows, out))
    print(text)
    if report_dir:
        os.makedirs(report_dir, exist_ok=True)
        for name in ("gpu_results.md", "gpu_results.json", "profiles.txt", "logs.txt"):
            shutil.copy(os.path.join(out, name), os.path.join(report_dir, name))
    print(f"Results in {out}" + (f" (copied to {report_dir})" if report_dir else ""))
    failed = sync_failures(entries)
    if failed:
        raise SystemExit("sync check failed: host-device syncs inside training steps of " + "; ".join(failed))


def unknown_syncs(sync: dict[str, Any], log_syncs: int) -> float | None:
    """Syncs per step of the sync window other than KNOWN_SYNCS (those in the backward's threads, which name no
    site, count as unknown); None where the window was not checked."""
    if not sync.get("checked"):
        return None
    known = sum(s["count"] for s in sync["sites"] if s["stack"] and s["stack"][-1].split()[-1] in KNOWN_SYNCS)
    return (sync["syncs"] - known + log_syncs) / (sync["to_step"] - sync["from_step"])


def sync_failures(entries: list[dict[str, Any]]) -> list[str]:
    """Our training rows that synchronized the device inside a step other than at KNOWN_SYNCS, with their count per
    step (the reference's and DeepSpeed's own syncs are reported in the table, not failed: not ours to remove)."""
    return [f"{e['name']} ({e['unknown_syncs_per_step']:g}/step)" for e in entries
            if e.get("unknown_syncs_per_step") and not e["reference"] and "--deepspeed" not in e["name"]]


if __name__ == "__main__":
    import fire

    fire.Fire(main)
