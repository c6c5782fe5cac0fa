"""The distributed engines, through the HF Trainer's own integration (no sharding of ours).

- plain launcher (torchrun, accelerate launch, deepspeed): DDP, every rank holds the whole model.
- ``--deepspeed zero2|zero2_offload|zero3|zero3_offload`` (configs/deepspeed/NAME.json) or a JSON file:
  DeepSpeed ZeRO; the configs' ``"auto"`` values are filled by the Trainer from our flags (batch sizes,
  gradient accumulation, clipping, bf16/fp16, and the learning rate of an offloaded optimizer).
- ``--fsdp``: FSDP2 full sharding, each decoder layer (the model's ``_no_split_modules``) one unit;
  ``--fsdp_offload`` keeps the shards in CPU memory. The Trainer's words ("full_shard auto_wrap",
  "shard_grad_op", "offload") keep the meaning ``TrainingArguments`` gives them under FSDP2 (``fsdp_options``).

Every optimizer step sees the same records whatever the number of processes (the length-grouped order is
drawn for the global batch, the loss normalised over the global token count). The saved adapter or model
is gathered from the shards (``gathered_state_dict``; only the trained weights of an adapter) and loads alone in
plain transformers/peft.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import peft
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers.integrations import is_deepspeed_zero3_enabled

from alpaca_cot.errors import UserError
from alpaca_cot.io import read_json_object

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEEPSPEED_DIR = os.path.join(ROOT, "configs", "deepspeed")
DEEPSPEED_PRESETS = ("zero2", "zero2_offload", "zero3", "zero3_offload")
ZERO_STAGES = (0, 1, 2, 3)
FSDP_WORDS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")  # the Trainer's --fsdp words FSDP2 honours
FSDP1_WORDS = ("no_shard", "hybrid_shard", "hybrid_shard_zero2")  # FSDP1's sharding strategies


def resolve_deepspeed_config(value: str) -> str:
    """``--deepspeed`` as the absolute path of a readable ZeRO config: a preset name or a JSON file."""
    path = os.path.join(DEEPSPEED_DIR, f"{value}.json") if value in DEEPSPEED_PRESETS else value
    if not os.path.isfile(path):
        raise UserError(f"--deepspeed {value!r} is neither a shipped config ({', '.join(DEEPSPEED_PRESETS)}) "
                        "nor a JSON file")
    read_deepspeed_config(path)
    return os.path.abspath(path)


def read_deepspeed_config(path: str) -> dict:
    """The DeepSpeed config at ``path``; malformed JSON or a ZeRO stage outside 0-3 is one line naming the file."""
    config = read_json_object(path, f"--deepspeed {path}", "settings")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        raise UserError(f"--deepspeed {path}: zero_optimization.stage {stage!r} is not valid; valid choices: "
                        f"{', '.join(map(str, ZERO_STAGES))}")
    return config


def fsdp_options(value: str | bool) -> tuple[bool, bool] | None:
    """``--fsdp`` as ``(reshard_after_forward, offload)``, None when off. True is full sharding; the Trainer's words
    keep its meaning under FSDP2: full_shard frees each unit's gathered weights after its forward, shard_grad_op
    keeps them until the backward (ZeRO-2-like: more memory, one all-gather less), offload keeps the shards in CPU
    memory, auto_wrap makes each decoder layer a unit (always so here)."""
    if isinstance(value, bool):
        return (True, False) if value else None
    words = value.replace(",", " ").split()
    for word in words:
        if word in FSDP1_WORDS:
            raise UserError(f"--fsdp {word}: FSDP1's sharding strategy, which FSDP2 (fully_shard, which the Trainer "
                            "runs) does not offer; use full_shard or shard_grad_op, or plain DDP (drop --fsdp)")
        if word not in FSDP_WORDS:
            raise UserError(f"--fsdp {value!r}: {word!r} is not an FSDP option; valid words: "
                            f"{', '.join(FSDP_WORDS)} (several between spaces), or True/False")
    if {"full_shard", "shard_grad_op"} <= set(words):
        raise UserError(f"--fsdp {value!r}: full_shard and shard_grad_op are two sharding strategies; pass one")
    return ("shard_grad_op" not in words, "offload" in words) if words else None


def check_engine_flags(args: Any) -> None:
    """Refuse conflicting engine flags (called at the end of ``FinetuneArgs.__post_init__``).

    The DeepSpeed config file itself is read when training starts (``plan_engine``): the inference
    scripts read a run's saved arguments back, also where that file is absent.
    """
    fsdp = fsdp_options(args.fsdp) is not None
    if args.fsdp_offload and not fsdp:
        raise UserError("--fsdp_offload applies to FSDP only; add --fsdp or drop --fsdp_offload.")
    if args.deepspeed is not None and fsdp:
        raise UserError("--deepspeed and --fsdp are two sharding engines; pass one of them.")
    if fsdp and args.quantization_bit == 8:
        raise UserError("--fsdp cannot shard 8-bit weights (bitsandbytes Int8Params); use --quantization_bit 4 "
                        "(QLoRA) with --fsdp, or DDP for 8-bit.")
    if args.deepspeed is not None and args.deepspeed not in DEEPSPEED_PRESETS and os.path.isfile(args.deepspeed):
        args.deepspeed = os.path.abspath(args.deepspeed)  # a saved run names its config from any folder


@dataclass(frozen=True)
class EnginePlan:
    """How a run is distributed: ``engine`` is "ddp" (also one process alone), "deepspeed" or "fsdp"."""

    engine: str
    cuda: bool
    deepspeed_config: str | None = None
    zero_stage: int | None = None
    fsdp_offload: bool = False
    reshard_after_forward: bool = True
    quantized: bool = False

    @property
    def use_cpu(self) -> bool:
        """``TrainingArguments(use_cpu=...)``: without CUDA, except for DeepSpeed, which ``use_cpu`` would switch
        off (a CPU-only DeepSpeed process runs DeepSpeed's CPU accelerator)."""
        return not self.cuda and self.engine != "deepspeed"

    @property
    def params_sharded(self) -> bool:
        """Whether each rank holds only a shard of the weights (FSDP, ZeRO-3): no rank has the whole model."""
        return self.engine == "fsdp" or self.zero_stage == 3

    @property
    def load_device(self) -> torch.device | None:
        """Where to load the base model: on the CPU for DeepSpeed and FSDP, which move each rank's part (or
        shard) to its GPU; None (this rank's device) otherwise. A bitsandbytes model quantizes on its device."""
        return torch.device("cpu") if self.engine != "ddp" and not self.quantized else None

    def quant_storage(self, dtype: torch.dtype) -> torch.dtype | None:
        """``bnb_4bit_quant_storage`` for sharded QLoRA: the compute dtype, so FSDP shards the packed 4-bit
        weights as it shards the other weights (PEFT's and bitsandbytes' FSDP-QLoRA recipe); None otherwise."""
        return dtype if self.engine == "fsdp" and self.quantized else None

    @property
    def kbit_preparation(self) -> bool:
        """Whether to run peft's k-bit preparation (it upcasts the unquantized weights to fp32): not under
        FSDP, whose shards need the weights in one dtype (TRL skips it there for the same reason)."""
        return self.quantized and self.engine != "fsdp"

    def training_kwargs(self, model: Any) -> dict[str, Any]:
        """``transformers.TrainingArguments`` keywords for this engine (none for DDP)."""
        if self.engine == "deepspeed":
            return {"deepspeed": self.deepspeed_config}
        if self.engine == "fsdp":
            config = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                      "transformer_layer_cls_to_wrap": decoder_layer_classes(model),
                      "reshard_after_forward": self.reshard_after_forward,
                      "state_dict_type": "FULL_STATE_DICT", "cpu_offload": self.fsdp_offload}
            return {"fsdp": True, "fsdp_config": config}
        return {}


def plan_engine(args: Any, *, cuda: bool | None = None, world: int | None = None) -> EnginePlan:
    """The engine ``args`` ask for on this machine, or a UserError where it cannot run here."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    launched = "LOCAL_RANK" in os.environ
    quantized = args.quantization_bit is not None
    fsdp = fsdp_options(args.fsdp)
    if fsdp is not None:
        if not cuda:
            # accelerate 1.15 turns FSDP on only for accelerator devices: on CPU the Trainer would silently
            # train plain DDP with every rank holding the whole model (measured).
            raise UserError("--fsdp needs CUDA GPUs: the Trainer's FSDP (through accelerate) runs only on "
                            "accelerator devices; on CPU drop --fsdp (torchrun alone trains DDP).")
        if not launched:
            raise UserError("--fsdp runs under a launcher: torchrun --nproc_per_node N uniform_finetune.py ... "
                            "(or accelerate launch).")
        _refuse_adalora(args, "--fsdp")
        reshard, offload = fsdp
        return EnginePlan("fsdp", cuda, fsdp_offload=args.fsdp_offload or offload, reshard_after_forward=reshard,
                          quantized=quantized)
    if args.deepspeed:
        config = resolve_deepspeed_config(args.deepspeed)
        stage = read_deepspeed_config(config).get("zero_optimization", {}).get("stage", 0)
        _refuse_adalora(args, f"--deepspeed {args.deepspeed}")
        if quantized and stage == 3:
            raise UserError(f"--quantization_bit with ZeRO-3 (--deepspeed {args.deepspeed}): our loader puts the "
                            "whole quantized model on every GPU before ZeRO-3 partitions it, so nothing is saved; "
                            "shard QLoRA with --fsdp --quantization_bit 4, or use zero2 or zero2_offload.")
        if not launched:
            raise UserError("--deepspeed runs under a launcher: deepspeed uniform_finetune.py ... or torchrun "
                            "--nproc_per_node N uniform_finetune.py ...")
        if not cuda and world > 1:
            # Without an accelerator, accelerate 1.15 records one process while DeepSpeed's CPU accelerator
            # joins them all, and DeepSpeed then refuses the batch sizes (train_batch_size != micro x world).
            raise UserError(f"--deepspeed on CPU runs one process only (the Trainer's DeepSpeed set-up counts one "
                            f"process without a GPU; {world} were launched); use GPUs, or DDP (drop --deepspeed).")
        return EnginePlan("deepspeed", cuda, deepspeed_config=config, zero_stage=stage, quantized=quantized)
    return EnginePlan("ddp", cuda, quantized=quantized)


def _refuse_adalora(args: Any, engine: str) -> None:
    # Measured: AdaLoRA's rank update (peft's update_and_allocate, after each backward) fails on FSDP's DTensors,
    # on ZeRO-3's empty partitions, and under ZeRO-2, whose engine keeps the gradients to itself.
    if args.peft_type == "adalora":
        raise UserError(f"--peft_type adalora cannot run under {engine}: peft's AdaLoRA reallocates ranks from the "
                        "whole weights and their gradients after each backward, which a sharding engine does not "
                        "leave in place; use plain DDP (torchrun without --deepspeed or --fsdp).")


def decoder_layer_classes(model: Any) -> list[str]:
    """The decoder-layer class names FSDP wraps one by one: the base model's ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = list(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise UserError(f"--fsdp: {type(base).__name__} names no decoder layer class (_no_split_modules), so FSDP "
                        "cannot wrap its layers; use --deepspeed instead.")
    return names


def gathered_state_dict(trainer: Any) -> dict[str, torch.Tensor] | None:
    """The weights to save, gathered from the shards onto rank 0 (None elsewhere); None where the model is whole.

    An adapter's are its trained weights only (stock routes: FSDP2's state dict without frozen parameters, as
    accelerate saves an adapter's FSDP checkpoint; DeepSpeed's ``GatheredParameters`` over them): the frozen base is
    never gathered, where accelerate's ``get_state_dict`` gathers the whole 16-bit model. A collective: call it on
    every rank.
    """
    zero3 = trainer.is_deepspeed_enabled and is_deepspeed_zero3_enabled()
    if not (trainer.is_fsdp_enabled or zero3):
        return None  # DDP, ZeRO-1/2: every rank holds the whole model
    if not isinstance(trainer.model, peft.PeftModel):
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.is_fsdp_enabled:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(trainer.model, options=options)
    import deepspeed

    trained = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(trained.values())):
        main = trainer.is_world_process_zero()
        return {name: p.detach().cpu().clone() for name, p in trained.items()} if main else None


def leave_process_group() -> None:
    """Every rank leaves together and tears its process group down while Python is whole: a rank that exits with
    the group alive can abort (SIGABRT) in gloo's teardown, and its launcher then kills the others mid-save."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
