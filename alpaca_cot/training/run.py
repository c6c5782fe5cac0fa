"""The fine-tuning run, in order: data -> tokens -> model + PEFT -> Trainer (``trainer``, ``packing``, ``engines``,
``checkpoints``) -> adapter, metrics, plot (``report``)."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import transformers

from alpaca_cot.config import FinetuneArgs
from alpaca_cot.data.pairs import refuse_preference_files
from alpaca_cot.data.prepared import prepare_splits
from alpaca_cot.data.templates import get_template
from alpaca_cot.errors import UserError
from alpaca_cot.models.adapters import apply_peft, build_peft_config, resolve_target_modules
from alpaca_cot.models.loading import load_model, load_tokenizer, meta_model, resolve_dtype
from alpaca_cot.models.registry import get_model_spec
from alpaca_cot.training import packing, report
from alpaca_cot.training.checkpoints import run_training
from alpaca_cot.training.engines import EnginePlan, gathered_state_dict, plan_engine
from alpaca_cot.training.flops import matmul_peak_flops, mean_causal_context, training_flops_per_token
from alpaca_cot.training.report import log
from alpaca_cot.training.trainer import AdaLoraCallback, CountingTrainer, RunTotals


def run_finetune(args: FinetuneArgs) -> tuple[dict, Any]:
    """Train as ``args`` say; write adapter, tokenizer, arguments, template, metrics and loss plot.

    Returns the metrics and the trained model (a PeftModel unless ``--peft_type full``), also after a resume
    that found the run finished (killed during its final save): it then holds the final checkpoint's weights.
    """
    spec, dtype, engine = start_run(args)
    if args.use_liger_kernel:
        packing.require_liger()  # before any data or model work
    tokenizer = load_tokenizer(args.model_name_or_path, spec, args.trust_remote_code)
    lora = args.peft_type in ("lora", "adalora")
    meta = meta_model(args.model_name_or_path, spec, args.trust_remote_code) if lora else None
    if meta is not None:  # a wrong name is refused before tokenizing
        resolve_target_modules(meta, spec, args.lora_target_modules)
    template = get_template(args.template or _default_template(spec.template, tokenizer), tokenizer)
    train_data, val_data, info = _load_data(args, tokenizer, template)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = args.per_gpu_train_batch_size * args.gradient_accumulation_steps * world
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(len(train_data) / per_step * args.epochs)
    evaluate = bool(len(val_data))
    # Before the model: with ZeRO-3 these arguments hold the DeepSpeed config (weakly referenced by transformers)
    # under which from_pretrained partitions each weight as it loads (deepspeed.zero.Init), so no rank ever holds
    # the whole model. Under FSDP they name the loaded model's decoder layers, so they come after it.
    training_args = None if engine.engine == "fsdp" else \
        build_training_args(args, engine, dtype, total_steps, evaluate=evaluate)
    model, plan = _build_model(args, spec, engine, dtype, total_steps)
    if training_args is None:
        training_args = build_training_args(args, engine, dtype, total_steps, evaluate=evaluate, model=model)
    trainer = _build_trainer(args, model, plan, training_args, tokenizer, train_data, val_data)
    metrics: dict[str, Any] = {"train_records": info["train_records"], "validation_records": len(val_data),
                               "data_cache": info["cache"], "world_size": world, "engine": engine.engine,
                               "dtype": str(dtype).removeprefix("torch."), "template": template.name,
                               "total_steps": total_steps, "packing": plan.packed,
                               "attention": plan.attention or "padded"}
    # The precision actually in use: autocast runs the matmuls in bf16/fp16 even over fp32 weights. On the rank's
    # device, not the weights': ZeRO-1/2 and FSDP load them on the CPU and move them inside train().
    peak = matmul_peak_flops(dtype, training_args.device)
    # Counted on the whole model: a ZeRO-3 partitioned parameter keeps its whole size in ``ds_numel``.
    flops_per_token = training_flops_per_token(model, args.peft_type == "full",
                                               mean_causal_context(train_data.lengths()))
    report.check_space(args, model)
    report.mark_output_dir(args)
    result = run_training(trainer, args.resume_from_checkpoint)
    _report_training(trainer, result, metrics, evaluate, peak, flops_per_token)
    # A collective (every rank takes part); none after a restored finished run, whose weights are its checkpoint's.
    state_dict = gathered_state_dict(trainer) if trainer.restored_from is None else None
    if trainer.is_world_process_zero():
        report.save_outputs(args, trainer, tokenizer, template, metrics, state_dict, truncation=info["truncation"],
                     weights_from=trainer.restored_from)
    return metrics, trainer.model


def start_run(args: FinetuneArgs) -> tuple[Any, torch.dtype, EnginePlan]:
    """What every stage does first: seed, model spec, compute dtype, output folder, engine plan."""
    # Before anything random: the adapter's initialisation, dropout and the batch order follow --seed.
    transformers.set_seed(args.seed)
    spec = get_model_spec(args.model_type)
    dtype, note = resolve_dtype(args.compute_dtype)
    if note:
        log(note)
    report.prepare_output_dir(args)
    engine = plan_engine(args)  # before the data: an engine that cannot run here stops the run at once
    return spec, dtype, engine


def _load_data(args: FinetuneArgs, tokenizer: Any, template: Any) -> tuple[Any, Any, dict]:
    """The tokenized training and validation splits, and what ``prepare_splits`` says about them (logged)."""
    refuse_preference_files(args.data)
    train_data, val_data, info = prepare_splits(args, tokenizer, template, cache_dir=args.cache_dir)
    report.report_truncation(info["truncation"], args)
    if info["train_records"] == 0:  # None with --streaming (prepare_splits refuses an empty stream)
        raise UserError("No training record has answer tokens within --cutoff_len; raise --cutoff_len.")
    log(f"data: {info['train_records'] or 'streamed'} training and {len(val_data)} validation records from "
        f"{', '.join(args.data)}; template {template.name}; tokenized data cache {info['cache']} "
        f"({info['cache_file']})")
    return train_data, val_data, info


def _build_model(args: FinetuneArgs, spec: Any, engine: EnginePlan, dtype: torch.dtype,
                 total_steps: int) -> tuple[Any, packing.PackingPlan]:
    """The base model, its batches' attention (packed or padded) and its PEFT adapter (or all weights)."""
    full = args.peft_type == "full"
    model = load_model(args.model_name_or_path, spec, dtype=torch.float32 if full else dtype,
                       quantization_bit=args.quantization_bit, trust_remote_code=args.trust_remote_code,
                       device=engine.load_device, quant_storage=engine.quant_storage(dtype))
    log(describe_loaded(model))
    # Decided on the loaded model's config, so that --model_type auto packs whatever class the checkpoint
    # names, with an attention that is exact for it (sliding windows, softcapping) or not at all.
    plan = packing.choose_packing(model, args.peft_type, args.packing, remote_code=args.trust_remote_code,
                          cuda=engine.cuda, dtype=dtype)
    packing.apply_packing(model, plan)
    log(f"batches: {plan.reason}")
    targets = resolve_target_modules(model, spec, args.lora_target_modules) \
        if args.peft_type in ("lora", "adalora") else []
    peft_config = build_peft_config(args, targets, total_steps)
    model = apply_peft(model, peft_config, quantized=engine.kbit_preparation,
                       gradient_checkpointing=args.gradient_checkpointing)
    if report.is_main_process() and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    model.config.use_cache = False  # the KV cache only costs memory in training
    if args.use_liger_kernel:
        packing.require_liger(model)
    return model, plan


def _build_trainer(args: FinetuneArgs, model: Any, plan: packing.PackingPlan, training_args: Any, tokenizer: Any,
                   train_data: Any, val_data: Any) -> CountingTrainer:
    # Liger's fused loss leaves no logits for packed_loss: the model computes its loss from the labels.
    model_loss = args.use_liger_kernel or not plan.packed
    collator = packing.PackCollator(model_loss) if plan.packed else packing.PadCollator(tokenizer.pad_token_id)
    callbacks = [RunTotals()] + ([AdaLoraCallback(model)] if args.peft_type == "adalora" else [])
    return CountingTrainer(model=model, args=training_args, train_dataset=train_data,
                           eval_dataset=val_data if len(val_data) else None, data_collator=collator,
                           processing_class=tokenizer, compute_loss_func=None if model_loss else packing.packed_loss,
                           callbacks=callbacks)


def _report_training(trainer: CountingTrainer, result: Any, metrics: dict, evaluate: bool, peak: float,
                     flops_per_token: float) -> None:
    """Add the losses, throughput and MFU to ``metrics`` (the final evaluation runs here), and log them."""
    totals = trainer.totals  # pooled over the ranks when training ended
    first_eval = next((h for h in trainer.state.log_history if "eval_loss" in h), None)
    if first_eval is not None and first_eval["step"] == 0:
        metrics["eval_loss_before"] = first_eval["eval_loss"]
        log(f"eval loss before training: {metrics['eval_loss_before']:.4f}")
    steps = trainer.state.global_step
    metrics.update(train_loss=totals.loss_sum / max(steps, 1),
                   train_runtime_s=result.metrics["train_runtime"], steps=steps)
    if evaluate:
        metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]
        log(f"eval loss after training: {metrics['eval_loss_after']:.4f}")
    world = metrics["world_size"]
    metrics.update(report.throughput(totals, world))
    metrics["flops_per_token"] = flops_per_token
    metrics["matmul_peak_gflops"] = peak / 1e9
    metrics["mfu"] = metrics["effective_tokens_per_s"] / world * metrics["flops_per_token"] / peak
    log(f"throughput: {metrics['effective_tokens_per_s']:.0f} effective (non-padding) tokens/s over "
        f"{metrics['train_loop_seconds']:.1f} s of training (evaluation excluded); "
        f"padding {metrics['padding_fraction']:.1%}; "
        f"MFU {metrics['mfu']:.0%} of the {metrics['matmul_peak_gflops']:.0f} GFLOP/s {metrics['dtype']} matmul peak "
        f"measured at start-up")


def build_training_args(args: FinetuneArgs, engine: EnginePlan, dtype: torch.dtype, total_steps: int, *,
                        evaluate: bool, model: Any = None, config_class: type = transformers.TrainingArguments,
                        **extra: Any) -> transformers.TrainingArguments:
    """The Trainer's arguments for this run; ``model`` only for FSDP (its units are the model's decoder layers).
    With DeepSpeed they hold the config ``from_pretrained`` reads to partition ZeRO-3 weights as they load.
    A preference stage passes TRL's config class and its fields (``extra`` overrides ours)."""
    every = max(1, total_steps // 5)
    settings = dict(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_gpu_train_batch_size,
        per_device_eval_batch_size=args.per_gpu_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.learning_rate, warmup_steps=int(args.warmup_ratio * total_steps),
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        logging_steps=args.logging_steps,
        logging_nan_inf_filter=False,  # the filter reads every micro-batch's loss: a GPU sync per step
        eval_strategy="steps" if evaluate else "no",
        # Evaluate before training inside train(): a trainer.evaluate() call before train() leaves
        # the model unwrapped by DDP in transformers 5 (ranks then drift apart; see tests/test_ddp.py).
        eval_on_start=evaluate and not args.resume_from_checkpoint,
        eval_steps=args.eval_steps or every,
        save_strategy="steps", save_steps=args.save_steps or every, save_total_limit=2,
        report_to=[] if args.report_to == "none" else args.report_to.split(","),
        seed=args.seed,
        # Batches of similar lengths: padded batches waste less, and packed ones less attention work
        # (measured: one causal SDPA over samples laid out to the longest; 8% more tokens/s on CPU).
        train_sampling_strategy="group_by_length",
        restore_callback_states_from_checkpoint=True,  # RunTotals: the whole run's metrics after a resume
        remove_unused_columns=False,
        # --streaming: each rank reads the stream and keeps its share; dispatching would cut packed batches
        # (accelerate slices every tensor of a batch along its first dimension).
        # non_blocking: batches reach a GPU without draining its queue at every step (pinned memory).
        accelerator_config={"non_blocking": torch.cuda.is_available(),
                            **({"dispatch_batches": False} if args.streaming else {})},
        ddp_find_unused_parameters=False if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        use_cpu=engine.use_cpu,
        **engine.training_kwargs(model),
        disable_tqdm=not report.is_main_process(),
        use_liger_kernel=args.use_liger_kernel, torch_compile=args.torch_compile,
        dataloader_num_workers=args.dataloader_num_workers,
    )
    return config_class(**{**settings, **extra})


def describe_loaded(model: Any) -> str:
    """The log line on the base model as loaded: whole on this rank, or partitioned by ZeRO-3 while loading
    (DeepSpeed leaves each parameter empty, its whole size in ``ds_numel`` and this rank's part in ``ds_tensor``)."""
    params = list(model.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    partitioned = [p for p in params if hasattr(p, "ds_tensor")]
    held = sum(p.ds_tensor.numel() for p in partitioned)
    where = (f"partitioned by DeepSpeed ZeRO-3 as they loaded ({len(partitioned)} tensors); this rank holds "
             f"{held:,}") if partitioned else "whole on this rank"
    return f"model: {total:,} weight elements in {len(params)} tensors, {where}"


def _default_template(name: str, tokenizer: Any) -> str:
    if name == "chat" and not getattr(tokenizer, "chat_template", None):
        log("This tokenizer has no chat template: using the alpaca template (pass --template to choose).")
        return "alpaca"
    return name
