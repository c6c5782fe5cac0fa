"""Fine-tune a causal LM on instruction data with LoRA, QLoRA, AdaLoRA, prompt/prefix tuning or in full.

Usage:
  python3 uniform_finetune.py --model_type llama --model_name_or_path PATH --data alpaca-belle-cot \
      --lora_target_modules q_proj v_proj --per_gpu_train_batch_size 4 --learning_rate 3e-4 --epochs 1
  torchrun --nproc_per_node 2 uniform_finetune.py --model_type llama ...
"""

from __future__ import annotations

from alpaca_cot.cli import command, run_cli
from alpaca_cot.config import FinetuneArgs
from alpaca_cot.training.engines import leave_process_group
from alpaca_cot.training.preference import run_preference
from alpaca_cot.training.run import log, run_finetune


@command(FinetuneArgs)
def main(args: FinetuneArgs) -> None:
    """Fine-tune MODEL_NAME_OR_PATH (a --model_type from the registry) on --data (names or files).

    Lists (--data, --lora_target_modules) take spaces or commas. Packed batches (the default) put
    each batch's records in one padding-free row with attention kept within each record, where that
    is exact for the model; the log says which attention it took and why. Batches group records of
    similar length. Tokenized data is cached, keyed by the data, tokenizer, template, cutoff and
    split. Records longer than --cutoff_len keep their leading whole turns (a single turn shares the
    budget between prompt and answer); those cut or left out are listed in the output folder.

    --stage dpo, orpo or simpo trains on preference pairs and --stage kto on labelled replies, through TRL's
    trainers, with the same template and truncation rules; --lora_dir continues an SFT run's adapter.
    """
    if args.stage == "sft":
        run_finetune(args)
    else:
        run_preference(args)
    leave_process_group()
    log(f"Adapter, tokenizer, template, arguments, metrics and loss plot are in {args.output_dir}")


if __name__ == "__main__":
    run_cli(main, interrupted="interrupted: rerun the same command with --resume_from_checkpoint to continue from "
                              "the last complete checkpoint in --output_dir")
