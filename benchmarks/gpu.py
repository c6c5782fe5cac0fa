"""The GPU run of the speed benchmark: a Qwen3-0.6B-shaped model, bf16, packed and padded, and 4-bit QLoRA.

Usage (on a machine with one CUDA GPU):
  python benchmarks/gpu.py [--n_records 2000] [--out benchmarks/runs/gpu]
  python benchmarks/gpu.py --smoke        # a 2-layer model on a few records: checks the script (fp32 on CPU)

The model is random-init from Qwen3-0.6B's configuration (28 layers, hidden 1024, GQA 16/8 heads,
vocabulary 151,936, tied head; about 0.6B parameters) with the real Qwen3 tokenizer from
``../shared/models/qwen3-tokenizer``: throughput and memory do not depend on the weights' values, and
nothing is downloaded. Each contender trains LoRA (r 8, alpha 16, dropout 0.05, q_proj and v_proj)
on the same bench_2k records with batch 8 (and 32), cutoff 512, one epoch, in its own process:
ours (packed, the default), ours ``--packing False`` (length-grouped padding), ours with
``--quantization_bit 4`` (QLoRA, NF4), and the alpaca-lora-style reference loop (grouped and
pad-to-longest), all bf16. Writes ``gpu_results.md`` and ``gpu_results.json`` to ``--out``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
from run_all import OUR_FLAGS, Contender, loop_tokens_per_s, run_one  # noqa: E402 (puts the project on the path)
from workload import SHARED, load_bench_records  # noqa: E402

from alpaca_cot.cli import as_list  # noqa: E402

QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
SMOKE = dict(QWEN3_0_6B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)


def build_model(model_dir: str, smoke: bool) -> None:
    """Save the random-init model (seed 0, bf16) with the Qwen3 tokenizer."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(SHARED, "models", "qwen3-tokenizer"))
    config = transformers.Qwen3Config(**(SMOKE if smoke else QWEN3_0_6B), pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir + ".partial", safe_serialization=True)
    tokenizer.save_pretrained(model_dir + ".partial")
    os.replace(model_dir + ".partial", model_dir)


def contenders(model_dir: str, data_file: str, n_records: int, out: str, batch: int,
               precision: str = "bf16") -> list[Contender]:
    """The GPU contenders at one batch size, in run order: all of them at batch 8, else ours and the
    grouped reference (a larger batch shows what the GPU does once per-step overheads are amortized)."""
    flags = list(OUR_FLAGS)
    flags[flags.index("--per_gpu_train_batch_size") + 1] = str(batch)
    ours = [sys.executable, "uniform_finetune.py", "--model_type", "auto", "--model_name_or_path", model_dir,
            "--data", data_file, *flags, "--max_samples", str(n_records), "--compute_dtype", precision]
    variants = [("ours", "ours", []), ("ours --packing False", "nopack", ["--packing", "False"]),
                ("ours QLoRA (4-bit NF4)", "qlora", ["--quantization_bit", "4"])]
    refs = [("reference-grouped", True), ("reference", False)]
    if batch != 8:
        variants, refs = variants[:1], refs[:1]
    runs = [Contender(f"{name}, batch {batch}", precision, [*ours, *extra, "--output_dir", f"{out}/{tag}-b{batch}"],
                      output_dir=f"{out}/{tag}-b{batch}") for name, tag, extra in variants]
    for name, grouped in refs:
        cmd = [sys.executable, os.path.join(BENCH_DIR, "reference_loop.py"), "--output_dir", f"{out}/{name}-b{batch}",
               "--n_records", str(n_records), "--dtype", precision, "--model_dir", model_dir,
               "--batch_size", str(batch)]
        runs.append(Contender(f"{name}, batch {batch}", precision, cmd + (["--group_by_length"] if grouped else []),
                              output_dir=f"{out}/{name}-b{batch}"))
    return runs


def main(n_records: int = 2000, out: str = os.path.join(BENCH_DIR, "runs", "gpu"), smoke: bool = False,
         timeout_s: float = 600, batch_sizes: str | int | tuple = "8,32") -> None:
    """Run the GPU contenders; write gpu_results.md and gpu_results.json into --out."""
    import torch

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    n_records = 24 if smoke else int(n_records)
    model_dir = os.path.join(out, "qwen3-0.6b-shape-random" + ("-smoke" if smoke else ""))
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        build_model(model_dir, smoke)
    data_file = os.path.join(out, f"bench_{n_records}.json")
    with open(data_file, "w", encoding="utf-8") as f:
        json.dump(load_bench_records(n_records), f, ensure_ascii=False)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke run)"
    rows: list[dict[str, Any]] = []
    sizes = [int(b) for b in as_list(batch_sizes)]
    cuda = torch.cuda.is_available()
    precision = "bf16" if cuda else "fp32"  # a CPU without native bf16 emulates it 20x slower
    for c in [c for batch in sizes for c in contenders(model_dir, data_file, n_records, out, batch, precision)]:
        if "QLoRA" in c.name and not cuda:
            continue  # bitsandbytes 4-bit training is a GPU feature here
        print(f"{c.name} ...", flush=True)
        started = time.perf_counter()
        metrics, peak_rss, error = run_one(c, os.path.join(out, f"{os.path.basename(c.output_dir)}.log"), timeout_s)
        row = {"name": c.name, "wall_s": time.perf_counter() - started, "error": error, "peak_rss_mb": peak_rss}
        if metrics:
            row.update(tokens_per_s=loop_tokens_per_s(metrics), padding=metrics["padding_fraction"],
                       train_loss=metrics["train_loss"], steps=metrics["steps"], mfu=metrics.get("mfu"),
                       peak_gpu_mb=metrics.get("peak_gpu_mb"), matmul_peak_tflops=metrics.get("matmul_peak_gflops",
                                                                                              0) / 1e3 or None)
        print(f"  {row}", flush=True)
        rows.append(row)
    write_tables(out, rows, device, n_records)


def write_tables(out: str, rows: list[dict[str, Any]], device: str, n_records: int) -> None:
    """gpu_results.json (the rows) and gpu_results.md (a Markdown table with ratios to the best reference)."""
    import torch
    import transformers

    def best_reference(name: str) -> float | None:  # at the same batch size
        batch = name.rsplit(", ", 1)[-1]
        refs = [r["tokens_per_s"] for r in rows if r["name"].startswith("reference") and r["name"].endswith(batch)
                and "tokens_per_s" in r]
        return max(refs) if refs else None

    lines = [f"Device: {device}; torch {torch.__version__}, transformers {transformers.__version__}; "
             f"the first {n_records} bench_2k records, one epoch.", "",
             "| contender | effective tok/s (train loop) | x best reference (same batch) | padding | MFU | "
             "peak GPU MB | train loss | steps |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | |")
            continue
        best = best_reference(r["name"])
        ratio = f"{r['tokens_per_s'] / best:.2f}" if best else "-"
        mfu = f"{r['mfu']:.0%}" if r.get("mfu") is not None else "-"
        gpu = f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") else "-"
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.0f} | {ratio} | {r['padding']:.1%} | {mfu} | {gpu} | "
                     f"{r['train_loss']:.4f} | {r['steps']} |")
    with open(os.path.join(out, "gpu_results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "gpu_results.json"), "w", encoding="utf-8") as f:
        json.dump({"device": device, "rows": rows}, f, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
