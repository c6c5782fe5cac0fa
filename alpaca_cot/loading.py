"""One loader for every script: tokenizer, base model (dtype, quantization, device), adapter."""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import torch
import transformers

from alpaca_cot.errors import UserError
from alpaca_cot.registry import ModelSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LoadError(UserError):
    """A model or tokenizer that cannot be loaded, with what to pass instead."""


@cache
def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: the CPU runs bf16 matmuls natively (about 2x fp32 here)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported() -> bool:
    """Whether bf16 compute is fast on the device training would use."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def resolve_dtype(compute_dtype: str | None) -> tuple[torch.dtype, str | None]:
    """``--compute_dtype`` (auto|fp32|bf16|fp16) -> (dtype, note explaining a replacement or None)."""
    name = (compute_dtype or "auto").lower()
    if name == "auto":
        return (torch.bfloat16 if bf16_supported() else torch.float32), None
    if name not in DTYPES:
        raise UserError(f"Unknown --compute_dtype {compute_dtype!r}; valid choices: auto, {', '.join(DTYPES)}")
    if name == "fp16" and not torch.cuda.is_available():
        # fp16 matmuls on CPUs run at 0.4-3 GFLOP/s (no fp16 kernels), 100x slower than bf16.
        replacement = torch.bfloat16 if cpu_has_bf16() else torch.float32
        return replacement, (f"--compute_dtype fp16 has no fast kernels on CPU (about 100x slower than bf16); "
                             f"using {str(replacement).removeprefix('torch.')} instead.")
    if name == "bf16" and not bf16_supported():
        return torch.float32, "--compute_dtype bf16 is not supported on this device; using fp32 instead."
    return DTYPES[name], None


def device_for_rank() -> torch.device:
    """This process's device: cuda:LOCAL_RANK under a launcher, cuda:0 alone, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _hub_error(path: str, what: str, error: Exception) -> LoadError:
    if os.path.isdir(path):
        return LoadError(f"Could not load the {what} from the folder {path}: {error}")
    return LoadError(f"Could not load the {what} {path!r}: it is not a local folder and the Hugging Face hub "
                     f"could not serve it (offline, or no such repository); pass --model_name_or_path a local "
                     f"folder that holds config.json, the weights and the tokenizer files.")


def _check_remote_code(path: str, spec: ModelSpec, trust_remote_code: bool) -> bool:
    """True when the checkpoint needs its own code; raise unless the user allowed it."""
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise _hub_error(path, "model config", e) from None
        if not trust_remote_code:
            raise LoadError(f"{path} ships its own modeling code (ChatGLM-6B-style checkpoint), which runs only "
                            "if you pass --trust_remote_code; do so only if you trust its source.") from None
        return True
    except OSError as e:
        raise _hub_error(path, "model config", e) from None
    needs = bool(getattr(config, "auto_map", None)) and trust_remote_code and spec.remote_code
    return needs


def load_tokenizer(path: str, spec: ModelSpec, trust_remote_code: bool = False) -> Any:
    """The tokenizer, with a pad token chosen by the registry's pad-token rule."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):  # adapter folders have none
        _check_remote_code(path, spec, trust_remote_code)  # the clear sentence comes before any custom code
    cls = getattr(transformers, spec.tokenizer_class)
    try:
        tokenizer = cls.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(path, "tokenizer", e) from None
    if tokenizer.pad_token is None:
        for role in spec.pad_token:
            token = getattr(tokenizer, f"{role}_token", None)
            if token is not None:
                tokenizer.pad_token = token
                break
    if tokenizer.eos_token is None:
        raise LoadError(f"The tokenizer of {path} has no EOS token, which training needs to teach the model "
                        "to stop; add one to its tokenizer_config.json.")
    return tokenizer


def quantization_config(bits: int | None, dtype: torch.dtype) -> transformers.BitsAndBytesConfig | None:
    """``--quantization_bit 8|4`` as a BitsAndBytesConfig (NF4 with double quantization for 4-bit)."""
    if bits in (None, 0, "", "none"):
        return None
    if int(bits) == 8:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    if int(bits) == 4:
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    raise UserError(f"Unknown --quantization_bit {bits!r}; valid choices: 8, 4")


def load_model(path: str, spec: ModelSpec, *, dtype: torch.dtype = torch.float32, quantization_bit: int | None = None,
               trust_remote_code: bool = False, attn_implementation: str | None = None) -> Any:
    """The base model on this process's device."""
    remote = _check_remote_code(path, spec, trust_remote_code)
    cls = getattr(transformers, spec.remote_model_class if remote else spec.model_class)
    device = device_for_rank()
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": remote}
    quant = quantization_config(quantization_bit, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = cls.from_pretrained(path, **kwargs)
    except OSError as e:
        raise _hub_error(path, "model", e) from None
    if quant is None:
        model.to(device)
    _fix_cpu_4bit(model)
    return model


def _fix_cpu_4bit(model: Any) -> None:
    # bitsandbytes 0.50's CPU 4-bit layer repacks its weights for AVX-512 BF16 after the first
    # eval-mode forward; from then on LoRA above it silently gets zero gradients. Opt out before
    # any forward (measured: gradients stay non-zero; see tests/test_quantization.py).
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


ADAPTER_CONFIG = "adapter_config.json"


def load_for_inference(lora_dir: str | None = None, *, model_type: str | None = None,
                       model_name_or_path: str | None = None, size: str | None = None,
                       compute_dtype: str = "auto", quantization_bit: int | None = None,
                       trust_remote_code: bool = False) -> tuple[Any, Any, Any]:
    """(model, tokenizer, template) for generation, in eval mode.

    With ``lora_dir`` (an output folder of uniform_finetune.py) the run's saved arguments give the
    base model, type and template, so nothing else is needed; explicit arguments override them.
    A full fine-tune's folder holds the model itself. Remote code runs only with
    ``trust_remote_code`` passed now, whatever the saved run used.
    """
    from alpaca_cot.config import FinetuneArgs
    from alpaca_cot.registry import default_checkpoint, get_model_spec
    from alpaca_cot.templates import TEMPLATE_FILE, Template, get_template

    saved = FinetuneArgs.load(lora_dir) if lora_dir else None
    model_type = model_type or (saved.model_type if saved else "llama")
    spec = get_model_spec(model_type)
    base = model_name_or_path or (saved.model_name_or_path if saved else None)
    if base is None:
        base = default_checkpoint(model_type, size)
    dtype, note = resolve_dtype(compute_dtype)
    if note:
        print(note)
    is_adapter = bool(lora_dir) and os.path.isfile(os.path.join(lora_dir, ADAPTER_CONFIG))
    weights = base if (is_adapter or not lora_dir) else lora_dir
    tokenizer = load_tokenizer(lora_dir or base, spec, trust_remote_code)
    tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    model = load_model(weights, spec, dtype=dtype, quantization_bit=quantization_bit,
                       trust_remote_code=trust_remote_code)
    if is_adapter:
        import peft

        model = peft.PeftModel.from_pretrained(model, lora_dir)
    model.eval()
    if lora_dir and os.path.isfile(os.path.join(lora_dir, TEMPLATE_FILE)):
        template = Template.load(lora_dir)
    else:
        name = spec.template if (spec.template != "chat" or tokenizer.chat_template) else "alpaca"
        template = get_template(name, tokenizer)
    return model, tokenizer, template
