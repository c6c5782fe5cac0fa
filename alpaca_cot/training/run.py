"""The fine-tuning run: data -> tokens -> model + PEFT -> HF Trainer -> adapter, metrics, plot."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from typing import Any

import torch
import transformers
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler

from alpaca_cot.config import FinetuneArgs
from alpaca_cot.data.encoding import IGNORE_INDEX
from alpaca_cot.data.prepared import prepare_splits
from alpaca_cot.data.templates import Template, get_template
from alpaca_cot.errors import UserError
from alpaca_cot.io import write_json_atomic, write_text_atomic
from alpaca_cot.models.adapters import apply_peft, build_peft_config, resolve_target_modules
from alpaca_cot.models.loading import load_model, load_tokenizer, resolve_dtype
from alpaca_cot.models.registry import get_model_spec
from alpaca_cot.training.checkpoints import (
    STAGING_SUFFIX,
    checkpoint_folders,
    choose_checkpoint,
    model_files,
    run_training,
    swap_in,
)
from alpaca_cot.training.engines import EnginePlan, gathered_state_dict, plan_engine
from alpaca_cot.training.flops import matmul_peak_flops, mean_causal_context, training_flops_per_token
from alpaca_cot.training.packing import PackCollator, apply_packing, choose_packing, packed_loss, require_liger

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


class PadCollator:
    """Right-pads a batch; labels pad with -100. ``input_ids`` and ``labels`` lists in, tensors out."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class RunTotals(transformers.TrainerCallback, ExportableState):
    """Whole-run totals over all ranks: real and padded tokens trained on, the step losses summed over
    steps (each step's the mean over ranks) and the seconds of the train loop without evaluations. Saved
    in every checkpoint (``ExportableState``), so a resumed run reports the whole run, also when it was
    killed during the final save, and whatever number of processes resumes it.

    Each rank adds its own batches on its device (no per-step sync); before a checkpoint and at the end
    the ranks pool what they added (``pool``, a collective), since only the main process writes the
    checkpoint and every rank restores it."""

    def __init__(self) -> None:
        self.real_tokens = 0
        self.batch_tokens = 0
        self.loss_sum = 0.0
        self.seconds = 0.0
        # This rank's additions since the last pooling: device-side sums (read only when pooling; reading
        # them per step would sync a GPU every step) and host-side counts.
        self._loss: torch.Tensor | None = None
        self._masked_real: torch.Tensor | None = None
        self._real = self._batch = 0
        self._begin: float | None = None  # set when train() begins (the Trainer asks for state() before)
        self._base = self._eval = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._begin, self._base, self._eval = time.perf_counter(), self.seconds, 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:  # set by the flow callback, which runs first; every rank is here
            self.pool()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.pool()

    def add_batch(self, inputs: dict, loss: torch.Tensor) -> None:
        """Count one micro-batch's tokens and its loss (as the Trainer sums them for its logs)."""
        mask = inputs.get("attention_mask")  # packed batches have none: every position is a real token
        if mask is None:
            self._real += inputs["input_ids"].numel()
        else:
            self._masked_real = mask.sum() if self._masked_real is None else self._masked_real + mask.sum()
        self._batch += inputs["input_ids"].numel()
        self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()

    def add_eval_seconds(self, seconds: float) -> None:
        """Leave an evaluation's seconds out of the train loop's."""
        self._eval += seconds

    def pool(self) -> None:
        """Add every rank's batches since the last pooling to the totals (a collective: call it on all ranks)."""
        loss = float(self._loss) if self._loss is not None else 0.0
        real = self._real + (int(self._masked_real) if self._masked_real is not None else 0)
        loss, real, batch = _sum_over_ranks([loss, real, self._batch])
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.loss_sum += loss / world
        self.real_tokens += int(real)
        self.batch_tokens += int(batch)
        self._loss = self._masked_real = None
        self._real = self._batch = 0
        if self._begin is not None:
            self.seconds = self._base + time.perf_counter() - self._begin - self._eval

    def state(self) -> dict:
        """What a checkpoint keeps (``ExportableState``): the totals as of the last pooling."""
        return {"args": {}, "attributes": {"real_tokens": self.real_tokens, "batch_tokens": self.batch_tokens,
                                           "loss_sum": self.loss_sum, "seconds": self.seconds}}


class CountingTrainer(transformers.Trainer):
    """Trainer that keeps ``RunTotals`` and draws each epoch's length-grouped order from ``seed + epoch``,
    so the order does not depend on what else used the global random state before (an evaluation
    before training, or none on resume): a resumed run trains the same batches."""

    @property
    def totals(self) -> RunTotals:
        """The run's totals (a resume replaces the callback with the one restored from the checkpoint)."""
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, RunTotals))

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        started = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.totals.add_eval_seconds(time.perf_counter() - started)

    def training_step(self, model: Any, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.totals.add_batch(inputs, loss)
        return loss

    restored_from: str | None = None  # the final checkpoint of a finished run that train() restored

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> transformers.trainer_utils.TrainOutput:
        """``Trainer.train``, except from a checkpoint of the final step: transformers 5 would train one step
        past the end there (it checks the step limit only after a step), so the finished run's state is
        restored instead (a run killed during its final save) and its weights are the checkpoint's
        (``restored_from``), which every engine saves whole."""
        if resume_from_checkpoint:
            state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME))
            end = self.args.max_steps if self.args.max_steps > 0 else state.max_steps  # epochs: the same count
            if end and state.global_step >= end:
                return self._restore_finished(resume_from_checkpoint, state)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _restore_finished(self, checkpoint: str, state: TrainerState) -> transformers.trainer_utils.TrainOutput:
        self.restored_from, self.state = checkpoint, state
        totals = self.totals
        for name, value in state.stateful_callbacks.get(type(totals).__name__, {}).get("attributes", {}).items():
            setattr(totals, name, value)
        loss = totals.loss_sum / max(state.global_step, 1)
        return transformers.trainer_utils.TrainOutput(state.global_step, loss, {"train_runtime": 0.0})

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        # Grouped for the global batch: accelerate deals each rank every world-th batch of this order, so
        # an optimizer step trains the same records whatever the number of processes.
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return EpochLengthSampler(global_batch, dataset.lengths(), self.args.seed)


class EpochLengthSampler(LengthGroupedSampler):
    """transformers' length-grouped order, drawn from a generator seeded with ``seed + epoch``."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at the start of each epoch."""
        self.epoch = epoch

    def __iter__(self) -> Any:
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class AdaLoraCallback(transformers.TrainerCallback):
    """AdaLoRA re-allocates ranks from gradients after each optimizer step, before they are zeroed."""

    def __init__(self, model: Any):
        self.model = model

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model.base_model.update_and_allocate(state.global_step)


def prepare_output_dir(args: FinetuneArgs) -> None:
    """Check --output_dir before any work; nothing is created or deleted.

    A previous run is kept unless resumed. With --overwrite_output_dir the new run trains in
    ``<output_dir>.staging`` (``args.output_dir`` becomes that) and replaces the old run only once it
    has finished (``save_outputs``). --resume_from_checkpoint must find a complete checkpoint.
    """
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out} is an existing file; pass a folder.")
    if args.overwrite_output_dir:
        args.output_dir = out + STAGING_SUFFIX
        if checkpoint_folders(args.output_dir) and not args.resume_from_checkpoint:
            raise UserError(f"{args.output_dir} holds checkpoints of an unfinished --overwrite_output_dir run; add "
                            "--resume_from_checkpoint to continue it, or delete that folder to start again.")
        log(f"--overwrite_output_dir: this run trains in {args.output_dir} and replaces {out} once it has finished")
    elif _holds_files(out) and not args.resume_from_checkpoint:
        raise UserError(f"--output_dir {out} already holds files; pass --resume_from_checkpoint to continue "
                        "that run, --overwrite_output_dir to replace it, or choose another --output_dir.")
    if args.resume_from_checkpoint:
        choose_checkpoint(args.output_dir, args.resume_from_checkpoint, remove_incomplete=False)


def _holds_files(folder: str) -> bool:
    return os.path.isdir(folder) and bool(os.listdir(folder))


def report_truncation(entries: list[dict], args: FinetuneArgs) -> None:
    """Log how many records were cut to --cutoff_len or left out (``save_outputs`` lists them)."""
    if not entries:
        return
    cut = sum(e["action"] == "cut" for e in entries)
    log(f"--cutoff_len {args.cutoff_len}: {cut} records cut (leading whole turns kept; a single turn shares the "
        f"budget between prompt and answer) and {len(entries) - cut} left out (no answer token left); "
        f"listed in {os.path.join(args.output_dir.removesuffix(STAGING_SUFFIX), TRUNCATION_FILE)} at the end")


def run_finetune(args: FinetuneArgs) -> tuple[dict, Any]:
    """Train as ``args`` say; write adapter, tokenizer, arguments, template, metrics and loss plot.

    Returns the metrics and the trained model (a PeftModel unless ``--peft_type full``); after a resume that
    found the run finished (killed during its final save), the weights are in the saved files, not in it.
    """
    # Before anything random: the adapter's initialisation, dropout and the batch order follow --seed.
    transformers.set_seed(args.seed)
    spec = get_model_spec(args.model_type)
    dtype, note = resolve_dtype(args.compute_dtype)
    if note:
        log(note)
    prepare_output_dir(args)
    engine = plan_engine(args)  # before the data: an engine that cannot run here stops the run at once
    if args.use_liger_kernel:
        require_liger()  # before any data or model work
    tokenizer = load_tokenizer(args.model_name_or_path, spec, args.trust_remote_code)
    template = get_template(args.template or _default_template(spec.template, tokenizer), tokenizer)

    train_data, val_data, info = prepare_splits(args, tokenizer, template, cache_dir=args.cache_dir)
    report_truncation(info["truncation"], args)
    if info["train_records"] == 0:  # None with --streaming (prepare_splits refuses an empty stream)
        raise UserError("No training record has answer tokens within --cutoff_len; raise --cutoff_len.")
    log(f"data: {info['train_records'] or 'streamed'} training and {len(val_data)} validation records from "
        f"{', '.join(args.data)}; template {template.name}; tokenized data cache {info['cache']} "
        f"({info['cache_file']})")

    full = args.peft_type == "full"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = args.per_gpu_train_batch_size * args.gradient_accumulation_steps * world
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(len(train_data) / per_step * args.epochs)
    # Before the model: with ZeRO-3 these arguments hold the DeepSpeed config (weakly referenced by transformers)
    # under which from_pretrained partitions each weight as it loads (deepspeed.zero.Init), so no rank ever holds
    # the whole model. Under FSDP they name the loaded model's decoder layers, so they come after it.
    training_args = None if engine.engine == "fsdp" else \
        build_training_args(args, engine, dtype, total_steps, evaluate=bool(len(val_data)))
    model = load_model(args.model_name_or_path, spec, dtype=torch.float32 if full else dtype,
                       quantization_bit=args.quantization_bit, trust_remote_code=args.trust_remote_code,
                       device=engine.load_device, quant_storage=engine.quant_storage(dtype))
    log(describe_loaded(model))
    # Decided on the loaded model's config, so that --model_type auto packs whatever class the checkpoint
    # names, with an attention that is exact for it (sliding windows, softcapping) or not at all.
    plan = choose_packing(model, args.peft_type, args.packing, remote_code=args.trust_remote_code,
                          cuda=engine.cuda)
    apply_packing(model, plan)
    packing = plan.packed
    log(f"batches: {plan.reason}")
    targets = resolve_target_modules(model, spec, args.lora_target_modules) \
        if args.peft_type in ("lora", "adalora") else []
    peft_config = build_peft_config(args, targets, total_steps)
    model = apply_peft(model, peft_config, quantized=engine.kbit_preparation,
                       gradient_checkpointing=args.gradient_checkpointing)
    if is_main_process() and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    model.config.use_cache = False  # the KV cache only costs memory in training

    if training_args is None:
        training_args = build_training_args(args, engine, dtype, total_steps, evaluate=bool(len(val_data)),
                                            model=model)
    if args.use_liger_kernel:
        require_liger(model)
    # Liger's fused loss leaves no logits for packed_loss: the model computes its loss from the labels.
    model_loss = args.use_liger_kernel or not packing
    collator = PackCollator(model_loss=model_loss) if packing else PadCollator(tokenizer.pad_token_id)
    callbacks = [RunTotals()] + ([AdaLoraCallback(model)] if args.peft_type == "adalora" else [])
    trainer = CountingTrainer(model=model, args=training_args, train_dataset=train_data,
                              eval_dataset=val_data if len(val_data) else None, data_collator=collator,
                              processing_class=tokenizer, compute_loss_func=None if model_loss else packed_loss,
                              callbacks=callbacks)
    metrics: dict[str, Any] = {"train_records": info["train_records"], "validation_records": len(val_data),
                               "data_cache": info["cache"], "world_size": world, "engine": engine.engine,
                               "dtype": str(dtype).removeprefix("torch."), "template": template.name,
                               "total_steps": total_steps, "packing": packing,
                               "attention": plan.attention or "padded"}
    # The precision actually in use: autocast runs the matmuls in bf16/fp16 even over fp32 weights. On the rank's
    # device, not the weights': ZeRO-1/2 and FSDP load them on the CPU and move them inside train().
    peak = matmul_peak_flops(dtype, training_args.device)
    # Counted on the whole model: a ZeRO-3 partitioned parameter keeps its whole size in ``ds_numel``.
    flops_per_token = training_flops_per_token(model, full, mean_causal_context(train_data.lengths()))
    result = run_training(trainer, args.resume_from_checkpoint)
    totals = trainer.totals  # pooled over the ranks when training ended
    first_eval = next((h for h in trainer.state.log_history if "eval_loss" in h), None)
    if first_eval is not None and first_eval["step"] == 0:
        metrics["eval_loss_before"] = first_eval["eval_loss"]
        log(f"eval loss before training: {metrics['eval_loss_before']:.4f}")
    steps = trainer.state.global_step
    metrics.update(train_loss=totals.loss_sum / max(steps, 1),
                   train_runtime_s=result.metrics["train_runtime"], steps=steps)
    if len(val_data):
        metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]
        log(f"eval loss after training: {metrics['eval_loss_after']:.4f}")
    metrics.update(_throughput(totals, world))
    metrics["flops_per_token"] = flops_per_token
    metrics["matmul_peak_gflops"] = peak / 1e9
    metrics["mfu"] = metrics["effective_tokens_per_s"] / world * metrics["flops_per_token"] / peak
    if world > 1 and not engine.params_sharded:  # sharded ranks hold different parts by design
        metrics["replicas_in_sync"] = _replicas_in_sync(trainer.model)
    log(f"throughput: {metrics['effective_tokens_per_s']:.0f} effective (non-padding) tokens/s over "
        f"{metrics['train_loop_seconds']:.1f} s of training (evaluation excluded); "
        f"padding {metrics['padding_fraction']:.1%}; "
        f"MFU {metrics['mfu']:.0%} of the {metrics['matmul_peak_gflops']:.0f} GFLOP/s {metrics['dtype']} matmul peak "
        f"measured at start-up")
    # A collective (every rank takes part); none after a restored finished run, whose weights are its checkpoint's.
    state_dict = gathered_state_dict(trainer, engine) if trainer.restored_from is None else None
    if trainer.is_world_process_zero():
        save_outputs(args, trainer, tokenizer, template, metrics, state_dict, truncation=info["truncation"],
                     weights_from=trainer.restored_from)
    return metrics, trainer.model


def build_training_args(args: FinetuneArgs, engine: EnginePlan, dtype: torch.dtype, total_steps: int, *,
                        evaluate: bool, model: Any = None) -> transformers.TrainingArguments:
    """The Trainer's arguments for this run; ``model`` only for FSDP (its units are the model's decoder layers).

    With DeepSpeed they hold the config that ``from_pretrained`` reads to partition ZeRO-3 weights as they load:
    keep them alive until the Trainer has them.
    """
    every = max(1, total_steps // 5)
    return transformers.TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_gpu_train_batch_size,
        per_device_eval_batch_size=args.per_gpu_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=int(args.warmup_ratio * total_steps),
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        # Evaluate before training inside train(): a trainer.evaluate() call before train() leaves
        # the model unwrapped by DDP in transformers 5 (ranks then drift apart; see tests/test_ddp.py).
        eval_on_start=evaluate and not args.resume_from_checkpoint,
        eval_steps=args.eval_steps or every,
        save_strategy="steps",
        save_steps=args.save_steps or every,
        save_total_limit=2,
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
        disable_tqdm=not is_main_process(),
        use_liger_kernel=args.use_liger_kernel,
        torch_compile=args.torch_compile,
    )


def describe_loaded(model: Any) -> str:
    """The log line on the base model as loaded: whole on this rank, or partitioned by ZeRO-3 while loading
    (DeepSpeed leaves each parameter empty, its whole size in ``ds_numel`` and this rank's part in ``ds_tensor``)."""
    params = list(model.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    partitioned = [p for p in params if hasattr(p, "ds_tensor")]
    where = "whole on this rank"
    if partitioned:
        held = sum(p.ds_tensor.numel() for p in partitioned)
        where = (f"partitioned by DeepSpeed ZeRO-3 as they loaded ({len(partitioned)} tensors); this rank holds "
                 f"{held:,}")
    return f"model: {total:,} weight elements in {len(params)} tensors, {where}"


def _default_template(name: str, tokenizer: Any) -> str:
    if name == "chat" and not getattr(tokenizer, "chat_template", None):
        log("This tokenizer has no chat template: using the alpaca template (pass --template to choose).")
        return "alpaca"
    return name


def _sum_over_ranks(values: list[float]) -> list[float]:
    """``values`` summed over the processes of a launcher (unchanged in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    # NCCL reduces only GPU tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    total = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()


def _throughput(totals: RunTotals, world: int) -> dict[str, float]:
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


def _replicas_in_sync(model: Any) -> bool:
    """Whether every rank ends with bit-identical trainable weights (DDP should guarantee it)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None  # NCCL: GPU
    digest = torch.zeros(2, dtype=torch.float64, device=device)
    for p in model.parameters():
        if p.requires_grad:
            flat = p.detach().to(device=digest.device, dtype=torch.float64).flatten()
            positions = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=digest.device)
            digest += torch.stack([flat.sum(), (flat * positions).sum()])
    gathered = [torch.zeros_like(digest) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, digest)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    if not same:
        log(f"warning: trainable weights differ between ranks after training: {[g.tolist() for g in gathered]}")
    return same


def save_outputs(args: FinetuneArgs, trainer: transformers.Trainer, tokenizer: Any, template: Template,
                 metrics: dict, state_dict: dict | None = None, truncation: list[dict] | None = None,
                 weights_from: str | None = None) -> None:
    """Adapter (safetensors), tokenizer, arguments, template, metrics, loss plot and the records cut to
    --cutoff_len (TRUNCATION_FILE): staged, then moved in.

    ``state_dict``: the weights gathered from a sharded engine's ranks (default: the model's own).
    ``weights_from``: a checkpoint folder whose saved adapter or model files are copied instead.

    An --overwrite_output_dir run, trained beside --output_dir, then takes the old run's place.
    """
    out = args.output_dir
    target = out.removesuffix(STAGING_SUFFIX) if args.overwrite_output_dir else out
    args.output_dir = target  # what the saved arguments and the caller name
    staging = os.path.join(out, ".saving")
    shutil.rmtree(staging, ignore_errors=True)
    if weights_from:
        os.makedirs(staging)
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
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)
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

