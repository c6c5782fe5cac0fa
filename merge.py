"""Merge a LoRA adapter into its base model: a plain checkpoint any loader can read.

Usage:
  python3 merge.py --lora_dir saved_models/RUN --merged_dir saved_models/RUN-merged
  python3 merge.py --model_type llama --size 7b --lora_dir xxx --merged_dir yyy
"""

from __future__ import annotations

import os

from alpaca_cot.cli import command, run_cli
from alpaca_cot.config import MergeArgs, ModelArgs
from alpaca_cot.errors import UserError
from alpaca_cot.merging import merge_adapter


@command(ModelArgs, MergeArgs, defaults={"compute_dtype": "fp32"})
def main(model: ModelArgs, args: MergeArgs) -> None:
    """Merge the LoRA (or AdaLoRA) adapter of --lora_dir (a run of ours, or any PEFT adapter) into its base.

    The merged weights are saved as safetensors (in shards of --max_shard_size), with the tokenizer,
    the generation config, and the run's template.json and finetune_args.json, so generate.py,
    predict.py, server.py and web.py take --lora_dir MERGED_DIR too. Before saving, the merge must
    change every weight the adapter updates, and its logits must equal the adapter model's on a probe
    input (within 1e-4 x the largest logit in fp32); merge.json records both. The merge runs in
    --compute_dtype (fp32 by default); --save_dtype auto keeps the base checkpoint's dtype. A
    quantized base is refused. --overwrite replaces only an earlier merge.py output, never an input.
    """
    if not model.lora_dir:
        raise UserError("Pass --lora_dir: an output folder of uniform_finetune.py, or a PEFT adapter folder or hub id.")
    # A hub id (org/name) names no local folder: its merge goes to ./name-merged.
    local = model.lora_dir if os.path.isdir(model.lora_dir) else os.path.basename(os.path.normpath(model.lora_dir))
    merged_dir = args.merged_dir or os.path.normpath(local) + "-merged"
    report = merge_adapter(model.lora_dir, merged_dir, model_type=model.model_type,
                           model_name_or_path=model.model_name_or_path, size=model.size,
                           compute_dtype=model.compute_dtype, save_dtype=args.save_dtype,
                           quantization_bit=model.quantization_bit, trust_remote_code=model.trust_remote_code,
                           max_shard_size=args.max_shard_size, overwrite=args.overwrite, template=model.template)
    print(f"{report['changed_layers']} layers merged; probe logits differ by {report['max_abs_logit_diff']:.2e} "
          f"(tolerance {report['tolerance']:.2e}).")
    print(f"Merged model, tokenizer, generation config, template and report are in {merged_dir}")


if __name__ == "__main__":
    run_cli(main)
