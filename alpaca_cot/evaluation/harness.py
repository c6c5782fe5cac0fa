"""Standard benchmarks through lm-evaluation-harness: ``--tasks`` run on its HF model with our base
model and adapter, per-sample logs saved under ``lm_eval/``."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from alpaca_cot.config import EvaluateArgs
from alpaca_cot.errors import UserError
from alpaca_cot.io import write_text_atomic


def lm_eval_model_args(loader_kwargs: dict) -> dict:
    """lm-eval's HF model arguments for our ``ModelArgs``: ``pretrained=BASE,peft=ADAPTER,dtype=...``."""
    from alpaca_cot.models.loading import (
        ADAPTER_CONFIG,
        check_model_folder,
        resolve_base_model,
        resolve_dtype,
        resolve_lora_dir,
    )
    from alpaca_cot.models.registry import default_checkpoint

    lora_dir = loader_kwargs.get("lora_dir")
    folder = resolve_lora_dir(lora_dir) if lora_dir else None
    args: dict[str, Any] = {}
    if folder and os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
        args["pretrained"] = resolve_base_model(folder, loader_kwargs.get("model_name_or_path"))
        args["peft"] = folder
    elif folder:
        check_model_folder(folder)
        args["pretrained"] = folder
    elif loader_kwargs.get("model_name_or_path"):
        args["pretrained"] = loader_kwargs["model_name_or_path"]
    elif loader_kwargs.get("model_type"):
        args["pretrained"] = default_checkpoint(loader_kwargs["model_type"], loader_kwargs.get("size"))
    else:
        raise UserError("Pass --lora_dir (a run's output folder, a PEFT adapter folder or hub id) or "
                        "--model_name_or_path (a base model).")
    dtype, note = resolve_dtype(loader_kwargs.get("compute_dtype"))
    if note:
        print(note)
    args["dtype"] = str(dtype).removeprefix("torch.")
    if loader_kwargs.get("trust_remote_code"):
        args["trust_remote_code"] = True
    return args


def task_manager(args: EvaluateArgs) -> Any:
    """lm-eval's task manager, once every ``--tasks`` name is known to it (checked before any output is written)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--tasks needs lm-evaluation-harness: pip install lm_eval") from None
    if args.include_path and not os.path.isdir(args.include_path):
        raise UserError(f"--include_path {args.include_path} is not a folder of task configs")
    manager = TaskManager(include_path=args.include_path or None)
    unknown = [task for task in args.tasks if not manager.match_tasks([task])]
    if unknown:
        raise UserError(f"--tasks: unknown lm-eval task {', '.join(unknown)}; list them with `lm_eval ls tasks`"
                        f" (offline tasks: a YAML in --include_path, now {args.include_path})")
    return manager


def run_lm_eval(loader_kwargs: dict, model: Any, args: EvaluateArgs, manager: Any) -> dict:
    """Run ``--tasks`` through lm-evaluation-harness's HF model (``manager``: ``task_manager``'s); its results,
    per-sample logs saved."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_args = lm_eval_model_args(loader_kwargs)
    if loader_kwargs.get("quantization_bit"):
        # lm-eval quantizes through from_pretrained(load_in_4bit=...), which transformers 5 removed:
        # hand it our loader's quantized model (with the adapter) instead.
        loaded, tokenizer, _ = model.get()
        lm = HFLM(pretrained=loaded, tokenizer=tokenizer, batch_size=args.eval_batch_size, device=device)
        described = {**model_args, "quantization_bit": loader_kwargs["quantization_bit"]}
    else:
        lm = HFLM(**model_args, batch_size=args.eval_batch_size, device=device)
        described = model_args
    output = lm_eval.simple_evaluate(model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot or None,
                                     limit=args.max_samples, task_manager=manager, log_samples=True,
                                     random_seed=args.fewshot_seed, numpy_random_seed=args.fewshot_seed,
                                     torch_random_seed=args.fewshot_seed, fewshot_random_seed=args.fewshot_seed)
    folder = os.path.join(args.output_dir, "lm_eval")
    for task, samples in (output.get("samples") or {}).items():
        write_text_atomic(os.path.join(folder, f"{task}.samples.jsonl"),
                          "".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in samples))
    model_arg_text = ",".join(f"{k}={v}" for k, v in described.items())
    return {"model_args": model_arg_text, "tasks": args.tasks, "num_fewshot": args.num_fewshot,
            "limit": args.max_samples, "results": plain(output["results"]),
            "n_samples": plain(output.get("n-samples", {})), "lm_eval_version": lm_eval.__version__,
            "samples": os.path.join("lm_eval", "TASK.samples.jsonl")}


def plain(value: Any) -> Any:
    """JSON-ready: numbers as floats (NaN as None), everything else as text."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)

