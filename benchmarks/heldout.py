"""One evaluator for every contender: the loss of a trained adapter on records no contender trained on.

Usage:
  .venv/bin/python benchmarks/heldout.py ADAPTER_DIR [--n_records 64]

The held-out records are the last ``n_records`` of bench_2k.json (the runs train on its first 200
or 400). Every adapter is evaluated with the same text (our Alpaca template), tokenization and
batching, so the numbers compare even where the contenders' own prompt texts differ slightly;
the loss is the mean cross-entropy over answer tokens (token-weighted).
"""

from __future__ import annotations

import os
import sys

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
sys.path.insert(1, os.path.dirname(BENCH_DIR))
from workload import build_workload, load_bench_records  # noqa: E402

HELDOUT_RECORDS = 32


def heldout_loss(model_dir: str, adapter_dir: str | None = None, n_records: int = HELDOUT_RECORDS,
                 batch_size: int = 8, threads: int = 2) -> float:
    """Token-weighted answer loss of the base model (+ adapter) on the held-out records."""
    import transformers

    from alpaca_cot.data.encoding import IGNORE_INDEX, encode_records
    from alpaca_cot.data.templates import get_template

    torch.set_num_threads(threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    encoded = encode_records(load_bench_records()[-n_records:], get_template("alpaca", tokenizer), tokenizer, 512)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            width = max(len(e.input_ids) for e in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), IGNORE_INDEX)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, e in enumerate(batch):
                ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
                labels[row, :len(e.labels)] = torch.tensor(e.labels)
                mask[row, :len(e.input_ids)] = 1
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                             ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((target != IGNORE_INDEX).sum())
    return total / count


def main(adapter_dir: str | None = None, n_records: int = HELDOUT_RECORDS) -> None:
    """Print the held-out loss of ADAPTER_DIR (or of the untrained base model when none is given)."""
    loss = heldout_loss(build_workload().model_dir, adapter_dir, int(n_records))
    print(f"held-out loss ({n_records} records): {loss:.4f}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
