"""evaluate.py's run: chain-of-thought scores on our data files (``generative``), preference accuracy on
pair files (``preference``; each --data entry is scored by its kind) and standard benchmarks through
lm-evaluation-harness (``harness``), into one output folder.

Each ``--data`` record's final answer is scored as ``alpaca_cot.evaluation.answers`` reads it:
``accuracy`` (flexible), ``exact_match`` (strict) and ``stated`` (the share of generations that state
a final answer), each a proportion with its Wilson 95% interval, next to the eval loss.

Output folder (``--output_dir``): ``results.json``, ``results.md`` (the Markdown table) and
``generations/NAME.jsonl`` (each record's prompt, generation, extracted and reference answers),
all written atomically. ``run.json`` marks the folder as evaluate.py's and holds the settings; a
rerun with the same settings resumes the generations where a killed run stopped (the machinery of
``alpaca_cot.prediction``), a rerun with other settings is refused unless ``--overwrite``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from typing import Any

from alpaca_cot.config import EvaluateArgs
from alpaca_cot.data.sources import resolve_data
from alpaca_cot.errors import UserError
from alpaca_cot.evaluation.generative import LazyModel, data_name, evaluate_data
from alpaca_cot.evaluation.harness import plain, run_lm_eval, task_manager
from alpaca_cot.evaluation.preference import data_kind, evaluate_pairs, preference_run, render_pairs_table
from alpaca_cot.evaluation.stats import percent
from alpaca_cot.io import write_json_atomic, write_text_atomic
from alpaca_cot.outputs import claim_folder, marker_path, read_marker, refuse_all_inputs, write_marker


def run_evaluation(model_args: Any, sampling: Any, args: EvaluateArgs) -> dict:
    """Evaluate as ``args`` say; writes results.json and results.md and returns the results."""
    loader_kwargs = model_args.loader_kwargs()
    data_files = resolve_data(args.data) if args.data else []  # a bad name fails before anything is written
    settings = {"model": loader_kwargs, "model_files": file_stamps(_folder_files(loader_kwargs.get("lora_dir"))),
                "data_files": file_stamps(data_files), "sampling": asdict(sampling),
                **{k: v for k, v in asdict(args).items() if k not in ("output_dir", "overwrite")}}
    names = [data_name(source) for source in args.data]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UserError(f"--data: two entries are both named {duplicated[0]!r}; give them different file names")
    manager = task_manager(args) if args.tasks else None  # an unknown task is refused before anything is written
    kinds = [data_kind(source) for source in args.data]  # so is a KTO file
    refuse_all_inputs([args.output_dir], {"--data": data_files, "--lora_dir": [loader_kwargs.get("lora_dir")],
                                          "--model_name_or_path": [loader_kwargs.get("model_name_or_path")]},
                      flag="--output_dir", shown=args.output_dir)
    prepare_output_dir(args.output_dir, settings, args.overwrite)
    model = LazyModel(loader_kwargs)
    results: dict[str, Any] = {"model": loader_kwargs, "sampling": asdict(sampling), "data": {}}
    run = preference_run(loader_kwargs.get("lora_dir")) if "pairs" in kinds else (None, None)
    for source, name, kind in zip(args.data, names, kinds, strict=True):
        results["data"][name] = evaluate_pairs(source, model, args, run) if kind == "pairs" else \
            evaluate_data(source, model, sampling, args)
    if args.tasks:
        results["lm_eval"] = run_lm_eval(loader_kwargs, model, args, manager)
    write_json_atomic(os.path.join(args.output_dir, "results.json"), plain(results))
    write_text_atomic(os.path.join(args.output_dir, "results.md"), render_table(results))
    return results


def render_table(results: dict) -> str:
    """The results as Markdown: one row per --data set, then one per lm-eval task metric."""
    sft = {name: r for name, r in results.get("data", {}).items() if r.get("kind") != "pairs"}
    lines = render_pairs_table(results.get("data", {}))
    if sft:
        lines += [""] if lines else []
        lines += ["| data | records | accuracy [95% CI] | exact match [95% CI] | states an answer [95% CI] "
                  "| eval loss |", "|---|---|---|---|---|---|"]
        for name, r in sft.items():
            loss = f"{r['eval_loss']:.3f}" if isinstance(r.get("eval_loss"), float) else "n/a"
            lines.append(f"| {name} | {r['scored']} | {percent(r['accuracy'])} | {percent(r['exact_match'])} "
                         f"| {percent(r['stated'])} | {loss} |")
    if results.get("lm_eval"):
        if lines:
            lines.append("")
        lines += ["| lm-eval task | metric | value | stderr |", "|---|---|---|---|"]
        for task, metrics in results["lm_eval"]["results"].items():
            for key, value in metrics.items():
                metric, comma, filt = key.partition(",")  # lm-eval keys are "metric,filter"
                if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                shown_err = f"{stderr:.4f}" if isinstance(stderr, float) else "n/a"
                lines.append(f"| {task} | {metric}{f' ({filt})' if filt and filt != 'none' else ''} "
                             f"| {value:.4f} | {shown_err} |")
    return "\n".join(lines) + "\n"


def prepare_output_dir(output_dir: str, settings: dict, overwrite: bool) -> None:
    """Claim ``output_dir`` for this evaluation: new, or an earlier evaluate.py run with the same settings.

    Raises UserError for a file, for a folder evaluate.py did not write (nothing in it is touched),
    and for an earlier run with other settings unless ``overwrite`` (which clears what it wrote).
    """
    marker = marker_path(output_dir)
    if claim_folder(output_dir, "evaluate", flag="--output_dir"):
        saved = read_marker(marker).get("settings", {})
        changed = sorted(k for k in set(settings) | set(saved) if settings.get(k) != saved.get(k))
        if changed and not overwrite:
            raise UserError(f"--output_dir {output_dir} holds an evaluation with other settings "
                            f"({', '.join(changed)}); pass --overwrite to replace it, or another --output_dir")
        if overwrite:
            for name in ("generations", "lm_eval"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
            for name in ("results.json", "results.md"):
                if os.path.isfile(os.path.join(output_dir, name)):
                    os.remove(os.path.join(output_dir, name))
    write_marker(marker, "evaluate", settings=settings)


def file_stamps(paths: list[str]) -> dict[str, list[int]]:
    """Size and modification time of each file: a retrained adapter in the same --lora_dir, or an edited
    --data file, is other settings, so generations are never resumed from what was there before."""
    return {os.path.abspath(path): [os.stat(path).st_size, os.stat(path).st_mtime_ns] for path in sorted(paths)}


def _folder_files(folder: str | None) -> list[str]:
    if not folder or not os.path.isdir(folder):
        return []
    return [os.path.join(folder, name) for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name))]

