"""The reference: an alpaca-lora-style LoRA loop (HF Trainer, DataCollatorForSeq2Seq, pad to longest).

Usage:
  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/reference_loop.py --output_dir benchmarks/runs/ref \
      [--group_by_length] [--n_records 200]

Follows tloen/alpaca-lora's finetune.py: its Alpaca prompts, prompt tokens masked with -100, EOS
appended when the text fits, DataCollatorForSeq2Seq, LoRA on q_proj and v_proj, no gradient
checkpointing, fp32 (bf16 weights and autocast with ``--dtype bf16``). Differences, so that every
contender trains alike: right padding (not left), no pad_to_multiple_of, and the warm-up and
schedule of uniform_finetune.py (10% linear warm-up, then linear decay) instead of 100 warm-up
steps that a 25-step run would never leave.
Writes metrics.json (effective tokens/s, padding fraction, peak RSS, train loss, steps) and the adapter.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import Counts, LoopTimer, count_tokens, summarize, write_metrics  # noqa: E402
from workload import build_workload, load_bench_records  # noqa: E402

IGNORE_INDEX = -100
# alpaca-lora's templates/alpaca.json
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")


def render_prompt(record: dict) -> str:
    """alpaca-lora's Prompter.generate_prompt without the answer."""
    fmt = PROMPT_INPUT if record.get("input") else PROMPT_NO_INPUT
    return fmt.format(instruction=record["instruction"], input=record.get("input", ""))


def tokenize_record(record: dict, tokenizer: Any, cutoff_len: int) -> dict[str, list[int]]:
    """alpaca-lora's generate_and_tokenize_prompt with train_on_inputs=False."""
    prompt = render_prompt(record)
    ids = tokenizer(prompt + record["output"], truncation=True, max_length=cutoff_len)["input_ids"]
    if ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
        ids.append(tokenizer.eos_token_id)
    n_prompt = len(tokenizer(prompt, truncation=True, max_length=cutoff_len)["input_ids"])
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]}


class CountingCollator:
    """Counts each batch's real (``input_ids != pad``) and padded positions on the CPU as it builds it.

    On a GPU, counting each training forward's tokens (measure.count_tokens) would read a device tensor
    back every step: a host-device sync that alpaca-lora's loop does not have.
    """

    def __init__(self, collator: Any, counts: Counts, pad_id: int):
        self.collator, self.counts, self.pad_id = collator, counts, pad_id

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = self.collator(features)
        self.counts.effective_tokens += int((batch["input_ids"] != self.pad_id).sum())
        self.counts.batch_tokens += batch["input_ids"].numel()
        return batch


def run_reference(output_dir: str, model_dir: str, records: list[dict], group_by_length: bool = False,
                  batch_size: int = 8, cutoff_len: int = 512, learning_rate: float = 3e-4, threads: int = 2,
                  seed: int = 42, dtype: str = "fp32") -> dict[str, Any]:
    """Train one epoch over ``records``; return (and write) the metrics."""
    import peft

    torch.set_num_threads(threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    data = [tokenize_record(r, tokenizer, cutoff_len) for r in records]
    bf16 = dtype == "bf16"
    cuda = torch.cuda.is_available()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if bf16 else torch.float32, device_map="cuda" if cuda else None)
    model.config.use_cache = False
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                           bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    args = transformers.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, num_train_epochs=1,
        learning_rate=learning_rate, warmup_steps=int(0.1 * -(-len(data) // batch_size)), logging_steps=10,
        optim="adamw_torch", save_strategy="no", report_to=[], seed=seed, use_cpu=not cuda, bf16=bf16,
        train_sampling_strategy="group_by_length" if group_by_length else "random", disable_tqdm=True)
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True, return_tensors="pt")
    if cuda:
        counts = Counts()
        timer = LoopTimer(counts)
        collator = CountingCollator(collator, counts, tokenizer.pad_token_id)
    else:
        counts, timer = count_tokens(tokenizer.pad_token_id)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                                   processing_class=tokenizer, callbacks=[timer])
    result = trainer.train()
    model.save_pretrained(output_dir)
    extra = {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {}
    metrics = summarize(counts, result.training_loss, train_records=len(data),
                        dtype="bfloat16" if bf16 else "float32", group_by_length=group_by_length, **extra)
    if cuda:  # training_step is not timed on a GPU (timing it would need a sync per step)
        metrics = {k: v for k, v in metrics.items() if k not in ("step_seconds", "step_tokens_per_s",
                                                                  "train_step_seconds")}
    write_metrics(output_dir, metrics)
    return metrics


def main(output_dir: str = os.path.join("benchmarks", "runs", "reference"), group_by_length: bool = False,
         n_records: int = 200, threads: int = 2, dtype: str = "fp32", model_dir: str | None = None,
         batch_size: int = 8, cutoff_len: int = 512) -> None:
    """Run the reference loop on the first N workload records; print its numbers.

    ``--model_dir`` trains another model folder (as benchmarks/gpu.py does) instead of the workload's.
    """
    model_dir = model_dir or build_workload(int(n_records)).model_dir
    metrics = run_reference(output_dir, model_dir, load_bench_records(int(n_records)),
                            group_by_length=bool(group_by_length), threads=int(threads), dtype=dtype,
                            batch_size=int(batch_size), cutoff_len=int(cutoff_len))
    print(f"reference{' (grouped)' if group_by_length else ''}: {metrics['effective_tokens_per_s']:.0f} effective "
          f"tokens/s, padding {metrics['padding_fraction']:.1%}, peak RSS {metrics['peak_rss_mb']:.0f} MB, "
          f"loss {metrics['train_loss']:.4f}, {metrics['steps']} steps; metrics in {output_dir}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
