"""Measurements shared by the contenders that run on HF Trainer (the reference loop, LLaMA-Factory).

Imports only the standard library, torch and transformers, so that LLaMA-Factory's own
virtualenv can use it too. Every contender counts the same way:
- effective tokens: input ids that are not the pad id (<unk>, 0), summed over the batches trained;
- padding fraction: 1 - effective / all positions of the batches;
- train-loop seconds: from the Trainer's ``on_train_begin`` to its ``on_train_end`` (data loading,
  forward, backward and optimizer steps; not model loading or tokenization);
- step seconds: time inside ``Trainer.training_step`` (forward + backward only).
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
    """What the patched Trainer saw."""

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


def count_tokens(pad_id: int) -> tuple[Counts, LoopTimer]:
    """Patch ``transformers.Trainer.training_step`` (every subclass uses it) to count tokens and time.

    Counting ``input_ids != pad_id`` works for 2-D 0/1 masks, LLaMA-Factory's packed segment-id
    masks and its 4-D block-diagonal masks alike.
    """
    counts = Counts()
    original = transformers.Trainer.training_step

    def training_step(self: Any, model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        ids = inputs["input_ids"]
        counts.effective_tokens += int((ids != pad_id).sum())
        counts.batch_tokens += int(ids.numel())
        loss = original(self, model, inputs, *args, **kwargs)
        counts.step_seconds += time.perf_counter() - started
        return loss

    transformers.Trainer.training_step = training_step
    return counts, LoopTimer(counts)


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
