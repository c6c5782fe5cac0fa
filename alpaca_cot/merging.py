"""Merge a LoRA adapter into its base model and save a plain checkpoint, checked before it is saved.

Checks: the merge changes every weight the adapter changes (an all-zero adapter, or an update that
rounds away in a low-precision dtype, is an error), and the merged model's logits equal the adapter
model's on a probe input within a stated tolerance. The folder is written aside and swapped into place
(``alpaca_cot.outputs.writing``), so a failed merge leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
import transformers

from alpaca_cot.config import ARGS_FILE
from alpaca_cot.errors import UserError
from alpaca_cot.io import write_json_atomic
from alpaca_cot.models import loading
from alpaca_cot.outputs import claim_folder, marker_path, refuse_all_inputs, write_marker, writing

MERGEABLE = ("LORA", "ADALORA")  # prompt, p-tuning and prefix adapters add tokens, not weight updates
REPORT_FILE = "merge.json"
# Probe-logit tolerance, relative to the largest probe logit: float32 only reorders sums; 16-bit
# dtypes round every weight to 8 (bf16) or 11 (fp16) bits. Measured on stories260K + a trained
# LoRA: 7.5e-7 (fp32), 3.1e-3 (fp16), 2.2e-2 (bf16).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
SAVE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}
PROBE = {"instruction": "Tell me about alpacas.", "input": "",
         "output": "Alpacas are domesticated camelids from South America, kept for their soft fleece."}


def check_adapter(lora_dir: str) -> str:
    """The adapter's peft type; refuse folders that hold no mergeable adapter, with the reason."""
    if not os.path.isfile(os.path.join(lora_dir, loading.ADAPTER_CONFIG)):
        if os.path.isfile(os.path.join(lora_dir, "config.json")):
            raise UserError(f"{lora_dir} holds a full model (a full fine-tune), not an adapter: there is nothing "
                            "to merge; use the folder as it is.")
        raise UserError(f"{lora_dir} holds no {loading.ADAPTER_CONFIG}: pass the output folder of uniform_finetune.py "
                        "or a PEFT adapter folder or hub id")
    peft_type = str(loading.read_adapter_config(lora_dir).get("peft_type", "")).upper()
    if peft_type not in MERGEABLE:
        raise UserError(f"A {peft_type} adapter adds virtual tokens in front of the input instead of changing "
                        "weights, so it cannot be merged into the model; load it with --lora_dir instead.")
    return peft_type


def check_unquantized(base: str, quantization_bit: int | None) -> dict:
    """Refuse to merge into quantized weights; returns the base's config as a dict."""
    if quantization_bit:
        raise UserError(f"merge.py does not load a {quantization_bit}-bit base: adding the LoRA update to quantized "
                        "weights rounds it onto the quantization grid (most of it is lost) and the result cannot be "
                        "saved as a plain checkpoint. Drop --quantization_bit: the base is loaded in full precision "
                        "(quantize the merged model afterwards if you need to).")
    try:
        config, _ = transformers.PretrainedConfig.get_config_dict(base)
    except OSError:
        return {}  # the loader reports a missing base with what to pass
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "quantized")
        raise UserError(f"The base model {base} is stored {method}-quantized: the LoRA update cannot be added "
                        "to quantized weights without rounding most of it away. Pass --model_name_or_path the "
                        "unquantized checkpoint it was made from.")
    return config


def _probe_ids(tokenizer: Any, template: Any, device: torch.device) -> torch.Tensor:
    text = "".join(segment for segment, _ in template.render(PROBE, tokenizer))
    ids = tokenizer(text, add_special_tokens=template.add_special_tokens, return_tensors="pt")["input_ids"]
    return ids.to(device)


def _fingerprint(weight: torch.Tensor) -> tuple[float, float]:
    # Sum and sum of squares in float64: any merged update moves one of them.
    w = weight.detach().double()
    return float(w.sum()), float((w * w).sum())


def _save_dtype(name: str, config: dict) -> torch.dtype:
    if name == "auto":
        name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    if name not in SAVE_DTYPES:
        raise UserError(f"Unknown --save_dtype {name!r}; valid choices: auto, fp32, bf16, fp16")
    return SAVE_DTYPES[name]


@torch.inference_mode()
def merge_adapter(lora_dir: str, merged_dir: str, *, model_type: str | None = None,
                  model_name_or_path: str | None = None, size: str | None = None, compute_dtype: str = "fp32",
                  save_dtype: str = "auto", quantization_bit: int | None = None, trust_remote_code: bool = False,
                  max_shard_size: str = "2GB", overwrite: bool = False, template: str | None = None) -> dict:
    """Merge the adapter of ``lora_dir`` into its base, check it, and save it to ``merged_dir``; returns the report.

    ``lora_dir`` is a run's output folder or any PEFT adapter folder or hub id; the base comes from
    ``model_name_or_path``, else the run's saved arguments, else adapter_config.json.
    """
    folder = loading.resolve_lora_dir(lora_dir)
    peft_type = check_adapter(folder)
    saved = loading.saved_run_args(folder)
    base = loading.resolve_base_model(folder, model_name_or_path)
    refuse_all_inputs([merged_dir], {"--lora_dir": [lora_dir, folder], "--model_name_or_path": [base]},
                      flag="--merged_dir", shown=merged_dir)
    if claim_folder(merged_dir, "merge", flag="--merged_dir") and not overwrite:
        raise UserError(f"{merged_dir} is not empty; pass --overwrite to replace it, or another --merged_dir")
    config = check_unquantized(base, quantization_bit)
    if saved is not None and saved.quantization_bit:
        print(f"The adapter was trained over a {saved.quantization_bit}-bit base; it is merged into the full-precision "
              "base, whose outputs differ slightly from the quantized model's.", flush=True)
    target_dtype = _save_dtype(str(save_dtype), config)
    model, tokenizer, prompt_template = loading.load_for_inference(
        folder, model_type=model_type, model_name_or_path=model_name_or_path, size=size,
        compute_dtype=compute_dtype, trust_remote_code=trust_remote_code, template=template)
    dtype = next(model.parameters()).dtype
    ids = _probe_ids(tokenizer, prompt_template, next(model.parameters()).device)
    adapter_logits = model(input_ids=ids).logits.float()

    lora_layers = [m for m in model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "get_base_layer")]
    updated = [m.get_base_layer() for m in lora_layers
               if any(m.get_delta_weight(a).abs().max() > 0 for a in m.active_adapters)]
    if not updated:
        raise UserError(f"The adapter in {lora_dir} changes no weight (its LoRA B matrices are zero: an untrained "
                        "adapter?); merging it would save the base model unchanged.")
    before = [_fingerprint(layer.weight) for layer in updated]
    merged = model.merge_and_unload()
    changed = sum(_fingerprint(layer.weight) != fp for layer, fp in zip(updated, before, strict=True))
    if changed < len(updated):
        raise UserError(f"Only {changed} of {len(updated)} updated layers changed when merged: the update rounds away "
                        f"in {str(dtype).removeprefix('torch.')}; merge with --compute_dtype fp32.")

    merged_logits = merged(input_ids=ids).logits.float()
    max_diff = float((merged_logits - adapter_logits).abs().max())
    scale = max(1.0, float(adapter_logits.abs().max()))
    tolerance = TOLERANCE[dtype] * scale
    if not max_diff <= tolerance:
        raise UserError(f"The merged model's logits differ from the adapter model's by up to {max_diff:.3g} on the "
                        f"probe input (tolerance {tolerance:.3g}); nothing was saved.")

    report = {
        "base_model": base, "lora_dir": os.path.abspath(lora_dir) if os.path.isdir(lora_dir) else lora_dir,
        "peft_type": peft_type,
        "compute_dtype": str(dtype).removeprefix("torch."), "save_dtype": str(target_dtype).removeprefix("torch."),
        "updated_layers": len(updated), "changed_layers": changed, "probe_tokens": int(ids.shape[1]),
        "max_abs_logit_diff": max_diff, "tolerance": tolerance,
        "tolerance_rule": f"{TOLERANCE[dtype]:g} x max(1, max |adapter logit|)",
    }
    _save(merged.to(target_dtype), tokenizer, prompt_template, folder, merged_dir, max_shard_size, report)
    return report


def _save(model: Any, tokenizer: Any, template: Any, lora_dir: str, merged_dir: str, max_shard_size: str,
          report: dict) -> None:
    with writing(merged_dir) as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(folder)
        # The template the merge was checked with, so the merged folder prompts as the adapter did
        # (a foreign adapter has no template.json of its own).
        template.save(folder)
        if os.path.isfile(os.path.join(lora_dir, ARGS_FILE)):
            shutil.copy2(os.path.join(lora_dir, ARGS_FILE), folder)
        write_json_atomic(os.path.join(folder, REPORT_FILE), report)
        write_marker(marker_path(folder), "merge")
