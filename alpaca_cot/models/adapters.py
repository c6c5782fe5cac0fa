"""PEFT set-up: LoRA (+DoRA, rsLoRA), AdaLoRA, prompt / p-tuning / prefix tuning, or full fine-tuning."""

from __future__ import annotations

from typing import Any

import peft
import torch

from alpaca_cot.errors import UserError
from alpaca_cot.models.registry import ModelSpec

PEFT_TYPES = ("lora", "adalora", "prompt", "p_tuning", "prefix", "full")


def linear_module_names(model: Any) -> set[str]:
    """Leaf names of the linear layers LoRA can wrap (the output head excluded)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    kinds: tuple[type, ...] = (torch.nn.Linear, Conv1D)
    try:
        import bitsandbytes as bnb

        kinds += (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    except ImportError:
        pass
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, kinds) and module is not head}


def resolve_target_modules(model: Any, spec: ModelSpec, requested: list[str] | None) -> list[str]:
    """``--lora_target_modules`` (or the registry default) as names this model has."""
    available = linear_module_names(model)
    names = list(requested) if requested else list(spec.lora_targets)
    if "all" in names:
        return sorted(available)
    aliases = dict(spec.target_aliases)
    resolved: list[str] = []
    for name in names:
        if name in available:
            resolved.append(name)
        elif name in aliases and set(aliases[name]) <= available:
            resolved.extend(aliases[name])
        elif requested:
            raise UserError(f"--lora_target_modules {name!r} is not a linear layer of this model; its linear "
                             f"layers are: {', '.join(sorted(available))} (or pass 'all')")
    if not resolved:
        raise UserError(f"None of the default LoRA targets {names} is a linear layer of this model; pass "
                         f"--lora_target_modules from: {', '.join(sorted(available))} (or 'all')")
    return list(dict.fromkeys(resolved))


def build_peft_config(args: Any, target_modules: list[str], total_steps: int) -> peft.PeftConfig | None:
    """The PEFT config for ``args.peft_type``; None means full fine-tuning."""
    kind = args.peft_type
    if kind == "full":
        return None
    if kind == "lora":
        return peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                               target_modules=target_modules, bias="none", task_type="CAUSAL_LM",
                               use_dora=args.use_dora, use_rslora=args.use_rslora)
    if kind == "adalora":
        # AdaLoRA keeps the initial rank for tinit steps, prunes towards the target rank, and holds it for the
        # last tfinal steps; peft needs tinit < total - tfinal. Unset, they scale with the run (10% / 20%), so a
        # short run works without extra flags.
        total = max(total_steps, 1)
        tinit = args.adalora_tinit if args.adalora_tinit is not None else total // 10
        tfinal = args.adalora_tfinal if args.adalora_tfinal is not None else total // 5
        delta_t = args.adalora_delta_t if args.adalora_delta_t is not None else max(1, total // 100)
        if tinit >= total - tfinal:
            raise UserError(f"AdaLoRA needs --adalora_tinit ({tinit}) + --adalora_tfinal ({tfinal}) below the run's "
                            f"{total} optimizer steps; lower them or leave them unset (they then scale with the run).")
        return peft.AdaLoraConfig(init_r=args.adalora_init_r, target_r=args.lora_r, beta1=0.85, beta2=0.85,
                                  tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=total,
                                  lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                  target_modules=target_modules, task_type="CAUSAL_LM")
    if kind == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens)
    if kind == "p_tuning":
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens,
                                        encoder_hidden_size=args.prompt_encoder_hidden_size)
    if kind == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens,
                                       encoder_hidden_size=args.prompt_encoder_hidden_size, prefix_projection=True)
    raise UserError(f"Unknown --peft_type {kind!r}; valid choices: {', '.join(PEFT_TYPES)}")


def apply_peft(model: Any, config: peft.PeftConfig | None, *, quantized: bool, gradient_checkpointing: bool) -> Any:
    """Wrap ``model`` for training; quantized models get k-bit preparation first."""
    if quantized:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if config is None:
        if quantized:
            raise UserError("--peft_type full cannot train a quantized model; drop --quantization_bit.")
        return model
    return peft.get_peft_model(model, config)
