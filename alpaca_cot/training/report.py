"""What a run reports: log lines, the output folder (checked first, written at the end), metrics, loss plot."""

from __future__ import annotations

import json
import os
import resource
import shutil
from typing import Any

import torch

from alpaca_cot import outputs
from alpaca_cot.config import FinetuneArgs
from alpaca_cot.data.templates import Template
from alpaca_cot.errors import UserError
from alpaca_cot.io import write_json_atomic, write_text_atomic
from alpaca_cot.outputs import STAGING_SUFFIX, claim_folder, swap_in, writing
from alpaca_cot.training.checkpoints import choose_checkpoint, latest_complete_checkpoint, model_files

METRICS_FILE = "metrics.json"
LOSS_PLOT = "loss_curve.png"
TRUNCATION_FILE = "truncated_records.jsonl"  # records cut to --cutoff_len or left out, by index


def is_main_process() -> bool:
    """Rank 0 (or no launcher): the process that prints and writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    """Print on the main process only."""
    if is_main_process():
        print(message, flush=True)


def prepare_output_dir(args: FinetuneArgs) -> None:
    """Check --output_dir before any work (nothing is created or deleted): it is never an input (or holds one),
    and a folder there is replaced or resumed only if uniform_finetune.py wrote it (its marker). A previous run is
    kept unless resumed; with --overwrite_output_dir the new run trains in ``<output_dir>.staging``
    (``args.output_dir`` becomes that) and replaces the old run once it has finished. --resume_from_checkpoint
    must find a complete checkpoint."""
    out, staging = args.output_dir, args.output_dir + STAGING_SUFFIX
    outputs.refuse_all_inputs([out, staging], {"--model_name_or_path": [args.model_name_or_path], "--data": args.data},
                      flag="--output_dir", shown=out)
    started = claim_folder(out, "finetune", flag="--output_dir") and os.listdir(out) != [outputs.MARKER]
    if args.overwrite_output_dir:
        claim_folder(staging, "finetune", flag="--output_dir")
        args.output_dir = staging
        if latest_complete_checkpoint(staging, deepspeed=args.deepspeed)[0] and not args.resume_from_checkpoint:
            raise UserError(f"{staging} holds checkpoints of an unfinished --overwrite_output_dir run; add "
                            "--resume_from_checkpoint to continue it, or delete that folder to start again.")
        log(f"--overwrite_output_dir: this run trains in {staging} and replaces {out} once it has finished")
    elif started and not args.resume_from_checkpoint:
        raise UserError(f"--output_dir {out} already holds files; pass --resume_from_checkpoint to continue "
                        "that run, --overwrite_output_dir to replace it, or choose another --output_dir.")
    if args.resume_from_checkpoint:
        choose_checkpoint(args.output_dir, args.resume_from_checkpoint, remove_incomplete=False,
                          deepspeed=args.deepspeed)


def mark_output_dir(args: FinetuneArgs) -> None:
    """Mark the folder the run writes as uniform_finetune.py's, before its first checkpoint (main process)."""
    if is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        outputs.write_marker(outputs.marker_path(args.output_dir), "finetune")


def check_space(args: FinetuneArgs, model: Any) -> None:
    """Refuse a run whose checkpoints and outputs clearly will not fit on its disk: a checkpoint holds the trained
    weights and Adam's two moments in fp32, two are kept while a third is written, and the output holds the weights."""
    weights = 4 * sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    outputs.check_free_space(args.output_dir, 3 * 3 * weights + weights, "this run's checkpoints and outputs")


def report_truncation(entries: list[dict], args: FinetuneArgs) -> None:
    """Log how many records were cut to --cutoff_len or left out (``save_outputs`` lists them)."""
    if not entries:
        return
    cut = sum(e["action"] == "cut" for e in entries)
    log(f"--cutoff_len {args.cutoff_len}: {cut} records cut (leading whole turns kept; a single turn shares the "
        f"budget between prompt and answer) and {len(entries) - cut} left out (no answer token left); "
        f"listed in {os.path.join(args.output_dir.removesuffix(STAGING_SUFFIX), TRUNCATION_FILE)} at the end")


def throughput(totals: Any, world: int) -> dict[str, float]:
    """Tokens, seconds, padding and peak memory of the train loop, from the run's ``RunTotals``."""
    # The train loop (data, forward, backward, optimizer steps) without the evaluations inside it: timing
    # single steps would need a GPU sync per step, which stops the CPU queueing the next step's kernels.
    real, total = totals.real_tokens, totals.batch_tokens
    seconds = max(totals.seconds, 1e-9)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"effective_tokens": real, "effective_tokens_per_s": real / seconds, "train_loop_seconds": seconds,
           "padding_fraction": 1 - real / total if total else 0.0, "peak_rss_mb": peak_rss_mb}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def save_outputs(args: FinetuneArgs, trainer: Any, tokenizer: Any, template: Template, metrics: dict,
                 state_dict: dict | None = None, truncation: list[dict] | None = None,
                 weights_from: str | None = None) -> None:
    """Adapter (safetensors), tokenizer, arguments, template, metrics, loss plot and the records cut to
    --cutoff_len: written aside, moved in, and an --overwrite_output_dir run then takes the old run's place.
    ``state_dict``: the weights gathered from a sharded engine's ranks (default: the model's own);
    ``weights_from``: a checkpoint folder whose saved adapter or model files are copied instead."""
    out = args.output_dir
    target = out.removesuffix(STAGING_SUFFIX) if args.overwrite_output_dir else out
    args.output_dir = target  # what the saved arguments and the caller name
    with writing(out, whole=False) as staging:
        if weights_from:
            for name in model_files(weights_from):
                shutil.copy2(os.path.join(weights_from, name), os.path.join(staging, name))
        else:
            trainer.model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        template.save(staging)
        args.save(staging)
        write_json_atomic(os.path.join(staging, METRICS_FILE), metrics)
        plot_loss(trainer.state.log_history, os.path.join(staging, LOSS_PLOT))
        if truncation:
            write_text_atomic(os.path.join(staging, TRUNCATION_FILE),
                              "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in truncation))
    if target != out:
        swap_in(out, target)
    log(f"saved to {target}: {', '.join(sorted(n for n in os.listdir(target) if not n.startswith('checkpoint')))}")


def plot_loss(history: list[dict], path: str) -> None:
    """Training (and evaluation) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
