"""Run a Trainer-based training script with step probes: steady-state throughput, one profiled step, a sync check.

Usage (benchmarks/gpu.py builds these commands):
  python benchmarks/step_probe.py --out probe.json [--steady 5:35] [--profile_step 36 --profile_out prof.txt]
      [--sync 36:40] -- SCRIPT [SCRIPT ARGS...]

Steps are optimizer steps, counted by torch's global optimizer step hook (every contender steps a
torch optimizer); ``A:B`` is the window from the end of step A to the end of step B. The probe
counts each micro-batch's real tokens (the attention mask's sum, or every position of a packed row)
through a callback that every Trainer gets (``TokenCallback``, in transformers' default callbacks): a
forward pre-hook on the Trainer's model, as in benchmarks/measure.py, adding them on the device so
that counting never waits for the GPU. It synchronizes the device only at the ends of
the steady window and of the profiled step, never inside the sync-check window:

- steady: effective tokens/s from step A to step B (the first steps' set-up, allocator growth and
  compilation left out);
- profile: one step under torch.profiler: wall and device-busy milliseconds, and the top operators
  by device time (CPU time without a GPU) written to ``--profile_out``;
- sync: ``torch.cuda.set_sync_debug_mode("warn")`` over the window; every synchronizing call is
  recorded with the Python frames that made it (warn, not error: one run lists all of them instead of
  stopping at the first). Syncs in the backward's C++ threads reach no Python handler: c10 prints
  them to the log, where benchmarks/gpu.py counts them. Skipped without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
import traceback
import warnings
from typing import Any

import torch
import transformers
import transformers.trainer
from torch.optim.optimizer import register_optimizer_step_post_hook

TOP_OPS = 30  # rows of the operator table
FRAMES = 6  # Python frames kept per sync site


def _window(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    start, end = (int(x) for x in text.split(":"))
    if not 0 <= start < end:
        raise SystemExit(f"step_probe: window {text!r} must be A:B with 0 <= A < B")
    return start, end


class StepProbe:
    """The probes, driven by the end of each optimizer step; ``report()`` is what the JSON file holds."""

    def __init__(self, command: str, steady: tuple[int, int] | None, profile_step: int | None,
                 profile_out: str | None, sync: tuple[int, int] | None):
        self.command = command
        self.steady, self.profile_step, self.profile_out, self.sync = steady, profile_step, profile_out, sync
        self.cuda = torch.cuda.is_available()
        self.step = 0
        self.host_tokens = 0  # packed rows: every position is real, known on the host
        self.device_tokens: torch.Tensor | None = None  # padded rows: mask sums, added on the device
        self.result: dict[str, Any] = {}
        self._mark: tuple[float, int] | None = None
        self._profiler: Any = None
        self._profile_started = 0.0
        self._syncs: list[list[str]] = []
        self._warnings: Any = None
        self._showwarning: Any = None

    def count(self, inputs: dict) -> None:
        """Add one micro-batch's real tokens without reading anything back from the device."""
        mask = inputs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            self.host_tokens += inputs["input_ids"].numel()
            return
        total = mask.sum()
        self.device_tokens = total if self.device_tokens is None else self.device_tokens + total

    def tokens(self) -> int:
        """All tokens counted so far (reads the device counter: call after a synchronize)."""
        return self.host_tokens + (int(self.device_tokens) if self.device_tokens is not None else 0)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_end(self, *args: Any) -> None:
        """torch's optimizer step post-hook: one optimizer step has ended."""
        self.step += 1
        step = self.step
        if self.sync and step == self.sync[1]:
            self._end_sync_check()
        if self.steady and step in self.steady:
            self.synchronize()
            now, tokens = time.perf_counter(), self.tokens()
            if step == self.steady[0]:
                self._mark = (now, tokens)
            elif self._mark:
                seconds, counted = now - self._mark[0], tokens - self._mark[1]
                self.result["steady"] = {"from_step": self.steady[0], "to_step": step, "tokens": counted,
                                         "seconds": seconds, "tokens_per_s": counted / seconds}
        if self.profile_step is not None and step == self.profile_step - 1:
            self._start_profile()
        elif self.profile_step is not None and step == self.profile_step and self._profiler is not None:
            self._end_profile()
        if self.sync and step == self.sync[0] and self.cuda:
            self._start_sync_check()

    def _start_profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.synchronize()
        self._profiler = profile(activities=activities)
        self._profiler.__enter__()
        self._profile_started = time.perf_counter()

    def _end_profile(self) -> None:
        self.synchronize()
        wall_ms = (time.perf_counter() - self._profile_started) * 1e3
        self._profiler.__exit__(None, None, None)
        events = self._profiler.key_averages()
        device = "device" if self.cuda else "cpu"
        busy_ms = sum(getattr(e, f"self_{device}_time_total") for e in events) / 1e3
        table = events.table(sort_by=f"self_{device}_time_total", row_limit=TOP_OPS, max_name_column_width=70)
        self.result["profile"] = {"step": self.profile_step, "wall_ms": wall_ms, f"{device}_busy_ms": busy_ms}
        if self.profile_out:
            header = (f"{self.command}\noptimizer step {self.profile_step}: "
                      f"{wall_ms:.1f} ms wall, {busy_ms:.1f} ms of {device} time in operators\n")
            with open(self.profile_out + ".partial", "w", encoding="utf-8") as f:
                f.write(header + table + "\n")
            os.replace(self.profile_out + ".partial", self.profile_out)
        self._profiler = None

    def _start_sync_check(self) -> None:
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("always")
        self._showwarning = warnings.showwarning

        def record(message: Any, category: Any, filename: str, lineno: int, *args: Any) -> None:
            if "synchroniz" not in str(message):
                return self._showwarning(message, category, filename, lineno, *args)
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith(("warnings.py",
                                                                                            "step_probe.py"))]
            self._syncs.append([f"{f.filename}:{f.lineno} {f.name}" for f in frames[-FRAMES:]])

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")

    def _end_sync_check(self) -> None:
        if not self.cuda:
            self.result["sync"] = {"checked": False, "why": "no CUDA device"}
            return
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = self._showwarning
        self._warnings.__exit__(None, None, None)
        sites: dict[str, dict] = {}
        for stack in self._syncs:
            site = sites.setdefault(stack[-1] if stack else "?", {"count": 0, "stack": stack})
            site["count"] += 1
        steps = self.sync[1] - self.sync[0]
        self.result["sync"] = {"checked": True, "from_step": self.sync[0], "to_step": self.sync[1],
                               "syncs": len(self._syncs), "per_step": len(self._syncs) / steps,
                               "sites": sorted(sites.values(), key=lambda s: -s["count"])}

    def report(self) -> dict[str, Any]:
        """What the probes found, and which were asked for but not reached (a run shorter than planned)."""
        asked = {"steady": self.steady, "profile": self.profile_step, "sync": self.sync}
        missing = [name for name, want in asked.items() if want and name not in self.result]
        return {"steps": self.step, **self.result, **({"not_reached": missing} if missing else {})}


class TokenCallback(transformers.TrainerCallback):
    """Counts each training forward's tokens into the probe: a forward pre-hook on the Trainer's model."""

    def __init__(self, probe: StepProbe):
        self.probe = probe

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    @torch.compiler.disable  # counted eagerly, outside a --torch_compile graph
    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        if module.training:  # not the evaluations
            self.probe.count(kwargs)


def main(argv: list[str]) -> None:
    """Parse the probe's options, install the hook and the callback, run the script as __main__, write the report."""
    if "--" not in argv:
        raise SystemExit("usage: step_probe.py --out FILE [--steady A:B] [--profile_step N --profile_out FILE] "
                         "[--sync A:B] -- SCRIPT [ARGS...]")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="step_probe.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steady")
    parser.add_argument("--profile_step", type=int)
    parser.add_argument("--profile_out")
    parser.add_argument("--sync")
    opts = parser.parse_args(argv[:split])
    script, *script_args = argv[split + 1:]
    probe = StepProbe(" ".join(argv[split + 1:]), _window(opts.steady), opts.profile_step, opts.profile_out,
                      _window(opts.sync))
    register_optimizer_step_post_hook(probe.on_step_end)
    # Every Trainer the script builds starts with transformers' default callbacks: this one among them.
    transformers.trainer.DEFAULT_CALLBACKS.append(TokenCallback(probe))
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        if int(os.environ.get("RANK", "0")) == 0:
            with open(opts.out + ".partial", "w", encoding="utf-8") as f:
                json.dump(probe.report(), f, indent=2)
            os.replace(opts.out + ".partial", opts.out)


if __name__ == "__main__":
    main(sys.argv[1:])
