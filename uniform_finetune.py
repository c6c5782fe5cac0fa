"""Fine-tune a causal LM on instruction data with LoRA, QLoRA, AdaLoRA, prompt/prefix tuning or in full.

Usage:
  python3 uniform_finetune.py --model_type llama --model_name_or_path PATH --data alpaca-belle-cot \
      --lora_target_modules q_proj v_proj --per_gpu_train_batch_size 4 --learning_rate 3e-4 --epochs 1
  torchrun --nproc_per_node 2 uniform_finetune.py --model_type llama ...
"""

from __future__ import annotations

from alpaca_cot.cli import run_cli
from alpaca_cot.config import FinetuneArgs
from alpaca_cot.registry import default_checkpoint
from alpaca_cot.training import log, run_finetune


def main(
    # model
    model_type: str = "llama",
    model_name_or_path: str | None = None,
    trust_remote_code: bool = False,
    compute_dtype: str = "auto",
    quantization_bit: int | None = None,
    size: str | None = None,
    # data
    data: str | list[str] | None = None,
    template: str | None = None,
    cutoff_len: int = 512,
    val_set_size: float = 2000,
    max_samples: int | None = None,
    train_on_inputs: bool = False,
    cache_dir: str | None = None,
    # PEFT
    peft_type: str = "lora",
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: str | list[str] | None = None,
    use_dora: bool = False,
    use_rslora: bool = False,
    adalora_init_r: int = 12,
    adalora_tinit: int = 200,
    adalora_tfinal: int = 1000,
    adalora_delta_t: int = 10,
    num_virtual_tokens: int = 20,
    prompt_encoder_hidden_size: int = 128,
    # training
    per_gpu_train_batch_size: int = 4,
    gradient_accumulation_steps: int = 1,
    epochs: float = 3,
    max_steps: int = -1,
    learning_rate: float = 3e-4,
    warmup_ratio: float = 0.1,
    gradient_checkpointing: bool = False,
    packing: bool = True,
    logging_steps: int = 10,
    eval_steps: int | None = None,
    save_steps: int | None = None,
    seed: int = 42,
    report_to: str = "none",
    resume_from_checkpoint: str | bool | None = None,
    # output
    output_dir: str | None = None,
    overwrite_output_dir: bool = False,
) -> None:
    """Fine-tune MODEL_NAME_OR_PATH (a --model_type from the registry) on --data (names or files).

    Lists (--data, --lora_target_modules) take spaces or commas; --lora_target_modules all wraps
    every linear layer. --peft_type: lora | adalora | prompt | p_tuning | prefix | full.
    --compute_dtype: auto (bf16 where the hardware runs it fast, else fp32) | fp32 | bf16 | fp16.
    --quantization_bit 8|4 trains LoRA over a bitsandbytes-quantized base (QLoRA).
    --packing (default on where the model supports it) trains padding-free: each batch of
    --per_gpu_train_batch_size records becomes one row, attention stays within each record, so
    the number of optimizer steps is what the batch size says. --packing False pads instead. Either
    way, batches group records of similar length. --gradient_checkpointing trades speed for memory.
    --resume_from_checkpoint alone resumes from the latest checkpoint in --output_dir.
    Tokenized data is cached in --cache_dir (default ~/.cache/alpaca_cot/tokenized), keyed by the
    data, tokenizer, template, cutoff and split. --val_set_size is a record count, or a fraction
    when below 1. --size is accepted for seed compatibility and ignored when
    --model_name_or_path is given.
    """
    if model_name_or_path is None and size is not None:
        model_name_or_path = default_checkpoint(model_type, size)
    args = FinetuneArgs(**{k: v for k, v in locals().items() if k != "size"})
    run_finetune(args)
    log(f"Adapter, tokenizer, template, arguments, metrics and loss plot are in {args.output_dir}")


if __name__ == "__main__":
    run_cli(main)
