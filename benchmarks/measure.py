"""Measurements shared by the contenders that run on HF Trainer (the reference loop, LLaMA-Factory).

Imports only the standard library, torch and transformers, so that LLaMA-Factory's own
virtualenv can use it too. Every contender counts the same way:
- effective tokens: input ids that are not the pad id (<unk>, 0), summed over the batches trained;
- padding fraction: 1 - effective / all positions of the batches;
- train-loop seconds: from the Trainer's ``on_train_begin`` to its ``on_train_end`` (data loading,
  forward, backward and optimizer steps; not model loading or tokenization);
- step seconds: from the start of each training forward to the end of its micro-batch (forward and
  backward; on a step's last micro-batch also the gradient clipping before the optimizer step).
Peak RSS: this process's maximum resident memory (run_all.py takes the same from outside, via wait4).
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import Any

import transformers

METRICS_FILE = "metrics.json"


@dataclass
class Counts:
    """What the Trainer's callbacks saw."""

    effective_tokens: int = 0
    batch_tokens: int = 0
    step_seconds: float = 0.0
    loop_seconds: float = 0.0
    steps: int = 0


class LoopTimer(transformers.TrainerCallback):
    """Train-loop seconds and optimizer steps, from the Trainer's own events."""

    def __init__(self, counts: Counts):
        self.counts = counts
        self.started = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.counts.loop_seconds = time.perf_counter() - self.started
        self.counts.steps = state.global_step


class TokenCounter(LoopTimer):
    """Also counts the tokens and seconds of every training forward, through a forward pre-hook that it puts
    on the Trainer's model when training begins (evaluation forwards, in eval mode, are left out).

    Counting ``input_ids != pad_id`` works for 2-D 0/1 masks, LLaMA-Factory's packed segment-id masks and
    its 4-D block-diagonal masks alike. It reads the count back at once: a CPU measure.
    """

    def __init__(self, counts: Counts, pad_id: int):
        super().__init__(counts)
        self.pad_id = pad_id
        self._forward_started: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, **kwargs)
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        self._forward_started = time.perf_counter()
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.counts.effective_tokens += int((ids != self.pad_id).sum())
        self.counts.batch_tokens += int(ids.numel())

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end_micro_batch()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end_micro_batch()

    def _end_micro_batch(self) -> None:
        if self._forward_started is not None:
            self.counts.step_seconds += time.perf_counter() - self._forward_started
            self._forward_started = None


def count_tokens(pad_id: int) -> tuple[Counts, TokenCounter]:
    """The counts, and the callback that fills them: pass it in the Trainer's ``callbacks``."""
    counts = Counts()
    return counts, TokenCounter(counts, pad_id)


def summarize(counts: Counts, train_loss: float, **extra: Any) -> dict[str, Any]:
    """The metrics every contender reports (keys as in uniform_finetune.py's metrics.json)."""
    real, total = counts.effective_tokens, counts.batch_tokens
    return {
        **asdict(counts),
        "effective_tokens_per_s": real / max(counts.loop_seconds, 1e-9),
        "step_tokens_per_s": real / max(counts.step_seconds, 1e-9),
        "train_step_seconds": counts.step_seconds,
        "padding_fraction": 1 - real / total if total else 0.0,
        "train_loss": train_loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # ru_maxrss is in KiB
        **extra,
    }


def write_metrics(output_dir: str, metrics: dict[str, Any]) -> str:
    """Write ``metrics.json`` into ``output_dir``; return its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, METRICS_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    return path
