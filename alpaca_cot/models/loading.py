"""One loader for every script: tokenizer, base model (dtype, quantization, device), adapter."""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import torch
import transformers
from transformers.integrations import is_deepspeed_zero3_enabled

from alpaca_cot.errors import UserError
from alpaca_cot.models.registry import ModelSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LoadError(UserError):
    """A model or tokenizer that cannot be loaded, with what to pass instead."""


@cache
def measured_matmul_rates(device_type: str = "cpu") -> dict[str, float]:
    """GFLOP/s of bf16 and fp32 matmuls on this device, measured once per process (about a second).

    CPU flags do not predict bf16 speed: one AVX-512 BF16 machine ran bf16 at half the fp32 rate,
    another at twice it. The probe decides.
    """
    from alpaca_cot.training.flops import matmul_peak_flops

    device = torch.device(device_type)
    return {name: matmul_peak_flops(DTYPES[name], device, seconds=0.3) / 1e9 for name in ("bf16", "fp32")}


def resolve_dtype(compute_dtype: str | None) -> tuple[torch.dtype, str | None]:
    """``--compute_dtype`` (auto|fp32|bf16|fp16) -> (dtype, note for the log: the measurement or a replacement).

    ``auto`` is bf16 on a CUDA device that supports it; on a CPU, bf16 only where a short matmul
    probe measures it faster than fp32 (by 10%, so noise does not flip the choice), else fp32.
    """
    name = (compute_dtype or "auto").lower()
    if name not in ("auto", *DTYPES):
        raise UserError(f"Unknown --compute_dtype {compute_dtype!r}; valid choices: auto, {', '.join(DTYPES)}")
    if torch.cuda.is_available():
        if name == "auto":
            return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32), None
        if name == "bf16" and not torch.cuda.is_bf16_supported():
            return torch.float32, "--compute_dtype bf16 is not supported on this GPU; using fp32 instead."
        return DTYPES[name], None
    if name in ("fp32", "bf16"):
        return DTYPES[name], None
    rates = measured_matmul_rates()
    choice = "bf16" if rates["bf16"] > 1.1 * rates["fp32"] else "fp32"
    why = (f"measured matmuls on this CPU: bf16 {rates['bf16']:.0f} GFLOP/s, fp32 {rates['fp32']:.0f} GFLOP/s; "
           f"using {choice}")
    if name == "fp16":  # fp16 matmuls on CPUs run at 0.4-3 GFLOP/s (no fp16 kernels), 100x slower than bf16
        return DTYPES[choice], f"--compute_dtype fp16 has no fast kernels on CPU; {why} instead."
    return DTYPES[choice], f"--compute_dtype auto: {why}."


def device_for_rank() -> torch.device:
    """This process's device: cuda:LOCAL_RANK under a launcher, cuda:0 alone, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _hub_error(path: str, what: str, error: Exception) -> LoadError:
    if os.path.isdir(path):
        found = ", ".join(sorted(os.listdir(path))[:8]) or "nothing"
        return LoadError(f"Could not load the {what} from the folder {path} (it holds {found}): "
                         f"{(str(error).strip().splitlines() or [''])[0]}")
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
    return bool(getattr(config, "auto_map", None)) and trust_remote_code and spec.remote_code


def load_tokenizer(path: str, spec: ModelSpec, trust_remote_code: bool = False) -> Any:
    """The tokenizer, with a pad token chosen by the registry's pad-token rule."""
    # An adapter folder with its tokenizer has no config.json; any other folder must have one.
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")) or not has_tokenizer(path):
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


def quantization_config(bits: int | None, dtype: torch.dtype,
                        quant_storage: torch.dtype | None = None) -> transformers.BitsAndBytesConfig | None:
    """``--quantization_bit 8|4`` as a BitsAndBytesConfig (NF4 with double quantization for 4-bit); 4-bit weights
    are packed into ``quant_storage`` elements (default uint8; FSDP shards them in the compute dtype)."""
    if bits in (None, 0, "", "none"):
        return None
    if int(bits) == 8:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    if int(bits) == 4:
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                                               bnb_4bit_quant_storage=quant_storage or torch.uint8)
    raise UserError(f"Unknown --quantization_bit {bits!r}; valid choices: 8, 4")


def load_model(path: str, spec: ModelSpec, *, dtype: torch.dtype = torch.float32, quantization_bit: int | None = None,
               trust_remote_code: bool = False, attn_implementation: str | None = None,
               device: torch.device | None = None, quant_storage: torch.dtype | None = None) -> Any:
    """The base model on ``device`` (default: this process's device); ``quant_storage`` as in
    ``quantization_config``."""
    remote = _check_remote_code(path, spec, trust_remote_code)
    cls = getattr(transformers, spec.remote_model_class if remote else spec.model_class)
    device = device or device_for_rank()
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": remote}
    quant = quantization_config(quantization_bit, dtype, quant_storage)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = cls.from_pretrained(path, **kwargs)
    except OSError as e:
        raise _hub_error(path, "model", e) from None
    if quant is None and not is_deepspeed_zero3_enabled():  # ZeRO-3 put each rank's part in place as it loaded
        model.to(device)
    _fix_cpu_4bit(model)
    return model


def meta_model(path: str, spec: ModelSpec, trust_remote_code: bool = False) -> Any:
    """The model of ``path``'s config on the meta device (no weights read or allocated), for its module names;
    None where the config builds no causal LM this way (the loaded model is checked instead)."""
    remote = _check_remote_code(path, spec, trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=remote)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    except Exception:  # noqa: BLE001 - only an early check: load_model reports the real problem
        return None


def _fix_cpu_4bit(model: Any) -> None:
    # A bitsandbytes bug, wrapped at our boundary: 0.50's CPU 4-bit layer (the fused kernel of
    # bitsandbytes PR #1804) repacks its weights for AVX-512 BF16 after the first eval-mode forward;
    # from then on LoRA above it silently gets zero gradients. Its public per-layer switch
    # `support_avx512bf16_for_cpu` opts out before any forward (measured: gradients stay non-zero;
    # see tests/test_quantization.py).
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
                       trust_remote_code: bool = False, template: str | None = None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, template) for generation, in eval mode.

    ``lora_dir`` is an output folder of uniform_finetune.py (its saved arguments give the base model,
    type and template, so nothing else is needed), any PEFT adapter folder or hub id (the base comes
    from its adapter_config.json), or a full model's folder. Explicit arguments override what was
    saved. Without a saved type, the type is the base config's ``model_type`` where the registry has
    it, else ``auto``; without ``template`` or a saved template.json, the type's default template.
    Remote code runs only with ``trust_remote_code`` passed now, whatever the saved run used.
    """
    from alpaca_cot.data.templates import TEMPLATE_FILE, Template, get_template
    from alpaca_cot.models.registry import default_checkpoint, get_model_spec

    folder = resolve_lora_dir(lora_dir) if lora_dir else None
    saved = saved_run_args(folder) if folder else None
    is_adapter = bool(folder) and os.path.isfile(os.path.join(folder, ADAPTER_CONFIG))
    if folder and not is_adapter:
        check_model_folder(folder)  # a full fine-tune's folder holds the model itself
        base = folder
    else:
        base = resolve_base_model(folder, model_name_or_path) if is_adapter else model_name_or_path
    if base is None:
        if model_type is None:
            raise UserError("Pass --lora_dir (a run's output folder, a PEFT adapter folder or hub id) or "
                            "--model_name_or_path (a base model).")
        base = default_checkpoint(model_type, size)
    model_type = model_type or (saved.model_type if saved else None) or infer_model_type(base)
    spec = get_model_spec(model_type)
    dtype, note = resolve_dtype(compute_dtype)
    if note:
        print(note)
    tokenizer = load_tokenizer(folder if folder and has_tokenizer(folder) else base, spec, trust_remote_code)
    tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    model = load_model(base, spec, dtype=dtype, quantization_bit=quantization_bit,
                       trust_remote_code=trust_remote_code)
    if is_adapter:
        model = load_adapter(model, folder)
    model.eval()
    if template is None and folder and os.path.isfile(os.path.join(folder, TEMPLATE_FILE)):
        return model, tokenizer, Template.load(folder)
    name = template or (spec.template if (spec.template != "chat" or tokenizer.chat_template) else "alpaca")
    return model, tokenizer, get_template(name, tokenizer)


# What inference reads from a hub adapter repository (never a full model's weights).
HUB_ADAPTER_FILES = [ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin", "finetune_args.json",
                     "template.json", "tokenizer*", "special_tokens_map.json", "chat_template*", "*.model"]
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
# Fields of adapter configs saved by peft < 0.3 (the original project's checkpoints) that current
# peft ignores with a warning about a *newer* peft; merge_weights was a training-time switch.
LEGACY_LORA_FIELDS = ("enable_lora", "merge_weights")


def resolve_lora_dir(lora_dir: str) -> str:
    """``--lora_dir`` as a local folder: the folder itself, or a hub adapter's files (fetched or cached)."""
    if os.path.isdir(lora_dir):
        return lora_dir
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(lora_dir, allow_patterns=HUB_ADAPTER_FILES)
    except (OSError, ValueError):  # offline, no such repository, or not a repository id at all
        raise LoadError(f"--lora_dir {lora_dir!r} is neither a local folder nor an adapter the Hugging Face hub "
                        "could serve (offline, or no such repository); pass a local folder that holds "
                        f"{ADAPTER_CONFIG} and the adapter weights (or a run's output folder).") from None
    if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
        raise LoadError(f"The hub repository {lora_dir} holds no {ADAPTER_CONFIG}, so it is not a PEFT adapter; "
                        "pass a full model as --model_name_or_path instead.")
    return folder


def saved_run_args(folder: str) -> Any:
    """The FinetuneArgs a run of uniform_finetune.py saved in ``folder``, or None for a foreign folder."""
    from alpaca_cot.config import ARGS_FILE, FinetuneArgs

    return FinetuneArgs.load(folder) if os.path.isfile(os.path.join(folder, ARGS_FILE)) else None


def check_model_folder(folder: str) -> None:
    """Refuse a ``--lora_dir`` that holds neither an adapter nor a full model."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise LoadError(f"{folder} holds neither {ADAPTER_CONFIG} (a PEFT adapter) nor config.json (a full model); "
                        "pass the output folder of uniform_finetune.py, a PEFT adapter folder or hub id.")


def resolve_base_model(folder: str, model_name_or_path: str | None = None) -> str:
    """The base model of the adapter in ``folder``: the flag, else the run's saved one, else adapter_config.json's."""
    if model_name_or_path:
        return model_name_or_path
    saved = saved_run_args(folder)
    if saved is not None and saved.model_name_or_path:
        return saved.model_name_or_path
    path = os.path.join(folder, ADAPTER_CONFIG)
    base = read_adapter_config(folder).get("base_model_name_or_path")
    if not base:
        raise LoadError(f"{path} names no base_model_name_or_path; pass --model_name_or_path the base model the "
                        "adapter was trained on.")
    if os.path.isabs(os.path.expanduser(base)) and not os.path.isdir(os.path.expanduser(base)):
        raise LoadError(f"{path} names the base model {base!r} (base_model_name_or_path), a folder that is not on "
                        "this machine; pass --model_name_or_path the base model the adapter was trained on.")
    return base


def read_adapter_config(folder: str) -> dict:
    """adapter_config.json of ``folder`` as a dict; a malformed file is a one-line error."""
    from alpaca_cot.io import read_json_object

    path = os.path.join(folder, ADAPTER_CONFIG)
    return read_json_object(path, path, "adapter settings", LoadError)


def infer_model_type(base: str) -> str:
    """The registry type named by the base model's config ``model_type``, else ``auto``."""
    from alpaca_cot.models.registry import MODEL_REGISTRY

    try:
        config, _ = transformers.PretrainedConfig.get_config_dict(base)
    except (OSError, ValueError):
        return "auto"  # an unreachable base is reported by the loader, with what to pass
    kind = config.get("model_type")
    return kind if kind in MODEL_REGISTRY else "auto"


def has_tokenizer(folder: str) -> bool:
    """Whether ``folder`` holds tokenizer files (our runs save them; foreign adapters rarely do)."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def load_adapter(model: Any, folder: str) -> Any:
    """The PEFT adapter of ``folder`` over ``model``; weights in a .bin load weights-only (tensors, no code)."""
    import pickle
    import re

    import peft

    config = read_adapter_config(folder)
    if config.get("enable_lora"):
        raise LoadError(f"{os.path.join(folder, ADAPTER_CONFIG)}: enable_lora {config['enable_lora']} is the fused-"
                        "projection LoRA of peft < 0.3, which current peft cannot load.")
    legacy = [key for key in LEGACY_LORA_FIELDS if key in config]
    peft_config = peft.PeftConfig.from_peft_type(**{k: v for k, v in config.items() if k not in legacy}) \
        if legacy else None
    try:
        # peft reads adapter_model.bin with torch.load(weights_only=True): a pickle that needs any
        # global beyond tensors and plain containers is refused instead of run.
        return peft.PeftModel.from_pretrained(model, folder, config=peft_config)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the first global it refused
        reason = f"it needs {found.group(1)}" if found else "it is not a plain state dict"
        raise LoadError(f"{os.path.join(folder, 'adapter_model.bin')} holds more than tensors ({reason}) and is "
                        "loaded only weights-only, since unpickling it fully could run any code; re-save its "
                        "tensors as adapter_model.safetensors if you trust its source.") from None
