"""The preference stage (``--stage dpo|orpo|simpo|kto``): TRL's trainers on our pre-tokenized records.

TRL computes every loss (``DPOTrainer``, ``KTOTrainer``, ``CPOTrainer`` with the SimPO loss, ``ORPOTrainer``).
The records reach it as token ids from ``alpaca_cot.data.pairs`` (our template, our truncation) and TRL's own
text pass (its chat template, its truncation) is skipped. TRL 1.16 has no switch for that in DPO and KTO, so
their ``_prepare_dataset`` hook is overridden to return our columns as they are (KTO's KL completions added
as TRL adds them; TRL's ``evaluate`` assumes the hook leaves a tokenized dataset so); CPO and ORPO map
``tokenize_row``, a public hook, to our ids.

A new adapter is TRL's (``peft_config``): its reference is the base with the adapter disabled. ``--lora_dir``
continues an adapter: TRL copies it as the frozen "ref" adapter, the reference, so no second copy of the base
is loaded. The run reuses the SFT stage's engines, Trainer arguments, batch order, totals, checkpoints and
outputs.
"""

from __future__ import annotations

import math
import os
from typing import Any

import datasets
import torch

from alpaca_cot.config import FinetuneArgs
from alpaca_cot.data.encoding import IGNORE_INDEX
from alpaca_cot.data.pairs import STAGE_KINDS, encode_preference, read_preference_data
from alpaca_cot.data.prepared import split_indices
from alpaca_cot.data.templates import TEMPLATE_FILE, Template, get_template
from alpaca_cot.errors import UserError
from alpaca_cot.models.adapters import build_peft_config, resolve_target_modules
from alpaca_cot.models.loading import load_model, load_tokenizer, resolve_lora_dir
from alpaca_cot.training import report
from alpaca_cot.training.checkpoints import run_training
from alpaca_cot.training.engines import gathered_state_dict
from alpaca_cot.training.report import log
from alpaca_cot.training.run import build_training_args, describe_loaded, start_run
from alpaca_cot.training.trainer import CountingTrainer, EpochLengthSampler, RunTotals

REF_ADAPTER = "ref"  # the name TRL gives its frozen copy of a continued adapter


def run_preference(args: FinetuneArgs) -> tuple[dict, Any]:
    """Train ``args.stage`` as ``args`` say; write what an SFT run writes. Returns the metrics and the model."""
    spec, dtype, engine = start_run(args)
    tokenizer = load_tokenizer(args.model_name_or_path, spec, args.trust_remote_code)
    template = choose_template(args, spec.template, tokenizer)
    train, val, truncation = load_preference_data(args, tokenizer, template)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = args.per_gpu_train_batch_size * args.gradient_accumulation_steps * world
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(len(train) / per_step * args.epochs)
    evaluate = val is not None
    config_class, extra = trl_config(args)
    training_args = None if engine.engine == "fsdp" else build_training_args(
        args, engine, dtype, total_steps, evaluate=evaluate, config_class=config_class, **extra)
    model, peft_config = build_policy(args, spec, engine, dtype, total_steps)
    if training_args is None:
        training_args = build_training_args(args, engine, dtype, total_steps, evaluate=evaluate, model=model,
                                            config_class=config_class, **extra)
    trainer = trainer_class(args.stage)(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                                        processing_class=tokenizer, peft_config=peft_config, callbacks=[RunTotals()])
    metrics: dict[str, Any] = {"stage": args.stage, "pref_loss": args.pref_loss, "pref_beta": args.pref_beta,
                               "train_records": len(train), "validation_records": len(val) if evaluate else 0,
                               "world_size": world, "engine": engine.engine, "template": template.name,
                               "dtype": str(dtype).removeprefix("torch."), "total_steps": total_steps,
                               "reference": reference_of(args)}
    report.check_space(args, trainer.model)
    report.mark_output_dir(args)
    result = run_training(trainer, args.resume_from_checkpoint)
    _report_training(trainer, result, metrics, evaluate)
    model = trainer.model
    if REF_ADAPTER in getattr(model, "peft_config", {}):  # the reference is the --lora_dir it was copied from
        model.delete_adapter(REF_ADAPTER)
    state_dict = gathered_state_dict(trainer) if trainer.restored_from is None else None
    if trainer.is_world_process_zero():
        report.save_outputs(args, trainer, tokenizer, template, metrics, state_dict, truncation=truncation,
                            weights_from=trainer.restored_from)
    return metrics, model


def choose_template(args: FinetuneArgs, registry_template: str, tokenizer: Any) -> Template:
    """--template, else the template the --lora_dir run trained with (the same markers), else the registry's."""
    folder = resolve_lora_dir(args.lora_dir) if args.lora_dir else None
    if args.template is None and folder and os.path.isfile(os.path.join(folder, TEMPLATE_FILE)):
        return Template.load(folder)
    chat_ok = registry_template != "chat" or getattr(tokenizer, "chat_template", None)
    return get_template(args.template or (registry_template if chat_ok else "alpaca"), tokenizer)


def reference_of(args: FinetuneArgs) -> str:
    """What the run's reference model is, for its metrics (ORPO and SimPO have none)."""
    if args.stage in ("orpo", "simpo"):
        return "none"
    if args.peft_type == "full":
        return "precomputed" if args.precompute_ref_logps else "a copy of the base model"
    return f"the --lora_dir adapter {args.lora_dir}" if args.lora_dir else "the base model (adapter disabled)"


def load_preference_data(args: FinetuneArgs, tokenizer: Any, template: Template
                         ) -> tuple[datasets.Dataset, datasets.Dataset | None, list[dict]]:
    """(train, validation or None, truncation entries as SFT lists them) of --data, encoded by ``pairs``."""
    kind = STAGE_KINDS[args.stage]
    rows: list[dict] = []
    where: list[tuple[str, int]] = []
    hint = f"--stage {args.stage} trains on " + ("preference pairs" if kind == "pairs" else "KTO records")
    for path, records in read_preference_data(args.data, kind, hint):
        rows += encode_preference(records, kind, template, tokenizer, args.cutoff_len)
        where += [(path, i) for i in range(len(records))]
    if args.max_samples:
        rows, where = rows[:args.max_samples], where[:args.max_samples]
    replies = ("chosen_ids", "rejected_ids") if kind == "pairs" else ("completion_ids",)
    splits, truncation = [], []
    for name, order in zip(("train", "val"), split_indices(len(rows), args.val_set_size, args.seed), strict=True):
        kept = []
        for index in order:
            row = rows[index]
            left_out = not all(row[key] for key in replies)  # a tiny --cutoff_len left no reply token
            if row["truncated"]:
                length = len(row["prompt_ids"]) + max(len(row[key]) for key in replies)
                truncation.append({"split": name, "action": "left out" if left_out else "cut", "index": index,
                                   "file": where[index][0], "index_in_file": where[index][1],
                                   "tokens": row["full_length"], "kept_tokens": 0 if left_out else length})
            if not left_out:
                kept.append({k: v for k, v in row.items() if k not in ("truncated", "full_length")})
        splits.append(datasets.Dataset.from_list(kept) if kept else None)
    report.report_truncation(truncation, args)
    if splits[0] is None:
        raise UserError("No training record has reply tokens within --cutoff_len; raise --cutoff_len.")
    log(f"data: {len(splits[0])} training and {len(splits[1]) if splits[1] else 0} validation {kind} records from "
        f"{', '.join(args.data)}; template {template.name}")
    return splits[0], splits[1], truncation


def trl_config(args: FinetuneArgs) -> tuple[type, dict]:
    """TRL's config class for the stage and its fields. Our records come truncated (``max_length`` None for DPO and
    KTO, whose collators would cut again; CPO and ORPO only read it), and TRL's gradient checkpointing (on by
    default there) follows --gradient_checkpointing."""
    # "sequential": evaluation in order (the Trainer's grouped order needs an input_ids column); training takes
    # PreferenceRun's order, and KTO's KL term (TRL checks this setting) the rows' own.
    common = {"beta": args.pref_beta, "gradient_checkpointing": args.gradient_checkpointing,
              "train_sampling_strategy": "sequential"}
    if args.stage == "dpo":
        from trl import DPOConfig

        return DPOConfig, {**common, "loss_type": [args.pref_loss], "max_length": None,
                           "precompute_ref_log_probs": args.precompute_ref_logps}
    if args.stage == "kto":
        from trl import KTOConfig

        return KTOConfig, {**common, "loss_type": args.pref_loss, "max_length": None,
                           "precompute_ref_log_probs": args.precompute_ref_logps}
    if args.stage == "simpo":
        from trl.experimental.cpo import CPOConfig

        return CPOConfig, {**common, "loss_type": "simpo", "cpo_alpha": 0.0, "max_length": args.cutoff_len}
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig, {**common, "max_length": args.cutoff_len}


def build_policy(args: FinetuneArgs, spec: Any, engine: Any, dtype: torch.dtype, total_steps: int) -> tuple[Any, Any]:
    """(model, peft_config): the base with the --lora_dir adapter trainable (no config), or the base and the
    config of a new adapter for TRL to add (None for --peft_type full)."""
    import peft

    full = args.peft_type == "full"
    model = load_model(args.model_name_or_path, spec, dtype=torch.float32 if full else dtype,
                       quantization_bit=args.quantization_bit, trust_remote_code=args.trust_remote_code,
                       device=engine.load_device, quant_storage=engine.quant_storage(dtype))
    log(describe_loaded(model))
    if engine.kbit_preparation:  # as SFT's apply_peft does; TRL's DPO and KTO leave it to us
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    model.config.use_cache = False  # the KV cache only costs memory in training
    if args.lora_dir:
        return peft.PeftModel.from_pretrained(model, resolve_lora_dir(args.lora_dir), is_trainable=True), None
    targets = [] if full else resolve_target_modules(model, spec, args.lora_target_modules)
    return model, build_peft_config(args, targets, total_steps)


def _report_training(trainer: Any, result: Any, metrics: dict, evaluate: bool) -> None:
    """Add the losses, TRL's last logged rewards and the throughput to ``metrics``, and log them."""
    history = trainer.state.log_history
    first_eval = next((h for h in history if "eval_loss" in h), None)
    if first_eval is not None and first_eval["step"] == 0:
        metrics["eval_loss_before"] = first_eval["eval_loss"]
    steps = trainer.state.global_step
    metrics.update(train_loss=trainer.totals.loss_sum / max(steps, 1),
                   train_runtime_s=result.metrics["train_runtime"], steps=steps)
    last = next((h for h in reversed(history) if "loss" in h), {})
    metrics.update({f"train_{k}": v for k, v in last.items() if "/" in k})  # rewards/margins, logps/chosen, ...
    if evaluate:
        after = trainer.evaluate()
        metrics.update(eval_loss_after=after["eval_loss"], **{k: v for k, v in after.items() if "/" in k})
        log(f"eval loss after training: {metrics['eval_loss_after']:.4f}")
    metrics.update(report.throughput(trainer.totals, metrics["world_size"]))
    log(f"throughput: {metrics['effective_tokens_per_s']:.0f} tokens/s of the policy's batches over "
        f"{metrics['train_loop_seconds']:.1f} s of training (evaluation excluded)")


class PreferenceRun(CountingTrainer):
    """CountingTrainer over preference rows: the SFT batch order (length-grouped for the global batch, seeded per
    epoch) by each row's longest sequence, or the rows' own (shuffled once) order where KTO's KL term pairs each
    row with its neighbour."""

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(self, "calculate_KL", False):
            return torch.utils.data.SequentialSampler(dataset)
        replies = [name for name in ("chosen_ids", "rejected_ids", "completion_ids") if name in dataset.column_names]
        lengths = [len(prompt) + max(len(r) for r in rs)
                   for prompt, *rs in zip(dataset["prompt_ids"], *(dataset[n] for n in replies), strict=True)]
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return EpochLengthSampler(global_batch, lengths, self.args.seed)


def trainer_class(stage: str) -> type:
    """TRL's trainer for ``stage`` fed our token ids (see the module docstring), with our run's bookkeeping."""
    if stage in ("dpo", "kto"):
        from trl import DPOTrainer, KTOTrainer

        class Pretokenized(PreferenceRun, DPOTrainer if stage == "dpo" else KTOTrainer):
            def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
                if getattr(self, "calculate_KL", False):  # KTO's mismatched pairs, as TRL builds them
                    return dataset.map(_kl_completions, batched=True, batch_size=args.per_device_train_batch_size)
                return dataset

        return Pretokenized
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    class PretokenizedPairs(PreferenceRun, CPOTrainer if stage == "simpo" else ORPOTrainer):
        def tokenize_row(self, feature: dict, model: Any = None) -> dict:
            prompt = feature["prompt_ids"]
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                ids = prompt + feature[f"{side}_ids"]
                row.update({f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                            f"{side}_labels": [IGNORE_INDEX] * len(prompt) + feature[f"{side}_ids"]})
            return row

    return PretokenizedPairs


def _kl_completions(batch: dict) -> dict:
    """Each record's KL completion is the previous record's reply within its batch (TRL's rotation by one)."""
    completions = batch["completion_ids"]
    return {**batch, "KL_completion_ids": completions[-1:] + completions[:-1]}
