"""The preference row: our DPO (``uniform_finetune.py --stage dpo``) against TRL's own DPO script
(``python -m trl.scripts.dpo``, TRL's ``DPOTrainer`` as its documentation runs it), each a whole process, in one
invocation.

The same work for both: SmolLM2-135M-Instruct (``scripts/smollm2.py``; its chat template renders the prompt for
both), the first --n_pairs hh-rlhf harmless-base pairs that fit --max_length tokens whole (so neither side
truncates; ours reads them as pairs, TRL as conversational prompt/chosen/rejected), LoRA r 16 / alpha 32 /
dropout 0.05 on every linear layer, sigmoid loss with beta 0.1, the reference being the base with the adapter
disabled, batch 8, lr 5e-5, one epoch, 2 threads, no checkpoints, on the CPU, in --dtype: bf16 (weights loaded in
bf16, what ``--compute_dtype auto`` picks on a CPU with fast bf16 matmuls; TRL: ``--dtype bfloat16 --bf16 True``)
or fp32.

Reported per contender: whole-process wall seconds (start to exit: imports, loading, tokenization, training,
saving) and CPU seconds (user + system, less sensitive than wall time to other jobs on a shared machine), the train
loop's seconds and mean loss as the Trainer logs them, and peak RSS; then ours over TRL.
These machines drift, so read the ratio within one invocation (--repeats N runs them in turns, medians shown).

Usage: .venv/bin/python benchmarks/preference.py [--n_pairs 32] [--repeats 1] [--max_length 256] [--dtype bf16]
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, ROOT)
SHARED = os.environ.get("ALPACA_COT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
RAW = os.path.join(SHARED, "data", "raw", "hh_rlhf", "harmless-base", "test.jsonl.gz")
CACHE = os.path.join(BENCH_DIR, ".cache", "preference")
RUNS = os.path.join(BENCH_DIR, "runs", "preference")
COMMON = {"lr": "5e-5", "beta": "0.1", "batch": "8", "r": "16", "alpha": "32", "dropout": "0.05"}
# (ours, TRL's); on a CPU, transformers takes --bf16 only with --use_cpu
DTYPES = {"bf16": (["--compute_dtype", "bf16"], ["--dtype", "bfloat16", "--bf16", "True", "--use_cpu", "True"]),
          "fp32": (["--compute_dtype", "fp32"], ["--dtype", "float32", "--bf16", "False"])}


def build_data(model_dir: str, n_pairs: int, max_length: int) -> tuple[str, str]:
    """Our pairs file and TRL's dataset folder (train.jsonl) holding the same first ``n_pairs`` pairs that fit."""
    import transformers

    from alpaca_cot.data.records import read_records
    from alpaca_cot.data.templates import to_messages

    os.makedirs(CACHE, exist_ok=True)
    converted = os.path.join(CACHE, "hh_pairs.jsonl")
    if not os.path.isfile(converted):
        subprocess.run([sys.executable, "data/collection.py", "convert", RAW, converted, "--skip_bad"], cwd=ROOT,
                       check=True, capture_output=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ours, trl_rows = [], []
    for record in read_records(converted, kind="pairs"):
        prompt = to_messages(record)
        longer = max(record["chosen"], record["rejected"], key=len)
        ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": longer}], tokenize=True)
        if len(ids) + 8 > max_length:  # room for the longer reply's end markers in either rendering
            continue
        ours.append(record)
        trl_rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": record["chosen"]}],
                         "rejected": [{"role": "assistant", "content": record["rejected"]}]})
        if len(ours) == n_pairs:
            break
    ours_file, trl_dir = os.path.join(CACHE, f"pairs_{n_pairs}.jsonl"), os.path.join(CACHE, f"trl_{n_pairs}")
    os.makedirs(trl_dir, exist_ok=True)
    for path, rows in ((ours_file, ours), (os.path.join(trl_dir, "train.jsonl"), trl_rows)):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return ours_file, trl_dir


def commands(model_dir: str, ours_file: str, trl_dir: str, max_length: int, dtype: str) -> dict[str, list[str]]:
    """The two contenders' command lines."""
    c = COMMON
    ours_dtype, trl_dtype = DTYPES[dtype]
    ours = [sys.executable, "uniform_finetune.py", "--stage", "dpo", "--model_type", "llama", "--model_name_or_path",
            model_dir, "--template", "chat", "--data", ours_file, "--val_set_size", "0", "--epochs", "1",
            "--per_gpu_train_batch_size", c["batch"], "--cutoff_len", str(max_length), "--learning_rate", c["lr"],
            "--pref_beta", c["beta"], "--lora_r", c["r"], "--lora_alpha", c["alpha"], "--lora_dropout",
            c["dropout"], "--lora_target_modules", "all", *ours_dtype, "--logging_steps", "1",
            "--save_steps", "100000", "--seed", "0", "--output_dir", os.path.join(RUNS, "ours"),
            "--overwrite_output_dir"]
    trl = [sys.executable, "-m", "trl.scripts.dpo", "--model_name_or_path", model_dir, "--dataset_name", trl_dir,
           "--per_device_train_batch_size", c["batch"], "--gradient_accumulation_steps", "1", "--num_train_epochs",
           "1", "--learning_rate", c["lr"], "--beta", c["beta"], "--max_length", str(max_length), "--use_peft",
           "--lora_r", c["r"], "--lora_alpha", c["alpha"], "--lora_dropout", c["dropout"], "--lora_target_modules",
           "all-linear", *trl_dtype, "--logging_steps", "1", "--save_strategy", "no",
           "--report_to", "none", "--seed", "0", "--dataloader_num_workers", "0",
           # TRL's DPOConfig turns gradient checkpointing on by default; ours recomputes nothing unless asked
           "--gradient_checkpointing", "False", "--output_dir",
           os.path.join(RUNS, "trl")]
    return {"ours": ours, "TRL DPOTrainer script": trl}


def run(name: str, command: list[str], threads: int) -> dict:
    """One whole process: wall and CPU seconds, peak RSS (MB) and the Trainer's train_runtime and train_loss."""
    os.makedirs(RUNS, exist_ok=True)
    log_path = os.path.join(RUNS, f"{name.split()[0].lower()}.log")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    with open(log_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); log: {log_path}")
    # Both print the Trainer's closing metrics dict; ours also writes metrics.json.
    found = {key: float(m[-1]) for key in ("train_runtime", "train_loss")
             if (m := re.findall(rf"'{key}': '?([0-9.]+)", text))}
    metrics_path = os.path.join(RUNS, "ours", "metrics.json")
    if name == "ours" and os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            saved = json.load(f)
        found = {"train_runtime": saved.get("train_runtime_s", found.get("train_runtime")),
                 "train_loss": saved.get("train_loss", found.get("train_loss"))}
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024, **found}


def main(n_pairs: int = 32, repeats: int = 1, max_length: int = 256, threads: int = 2, dtype: str = "bf16") -> None:
    """Build the data, run both contenders --repeats times in turns, print the Markdown row and commands."""
    model_dir = subprocess.run([sys.executable, "scripts/smollm2.py"], cwd=ROOT, check=True, capture_output=True,
                               text=True).stdout.strip()
    ours_file, trl_dir = build_data(model_dir, n_pairs, max_length)
    if dtype not in DTYPES:
        raise SystemExit(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    cmds = commands(model_dir, ours_file, trl_dir, max_length, dtype)
    results: dict[str, list[dict]] = {name: [] for name in cmds}
    load = [os.getloadavg()[0]]
    for rep in range(repeats):
        for name, command in cmds.items():
            print(f"[{rep + 1}/{repeats}] {name} ...", flush=True)
            results[name].append(run(name, command, threads))
            load.append(os.getloadavg()[0])
            print(f"  {results[name][-1]}", flush=True)
    med = {name: {k: statistics.median(r[k] for r in runs if r.get(k) is not None) for k in runs[0]}
           for name, runs in results.items()}
    print(f"\n{n_pairs} pairs, batch {COMMON['batch']}, {dtype}, {repeats} run(s) each (medians); load average (1 min) "
          f"{min(load):.1f}-{max(load):.1f}\n")
    print("| contender | whole process s | CPU s | train loop s | train loss | peak RSS MB |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['wall']:.1f} | {m['cpu']:.1f} | {m.get('train_runtime', float('nan')):.1f} "
              f"| {m.get('train_loss', float('nan')):.4f} | {m['rss']:.0f} |")
    ours, trl = med["ours"], med["TRL DPOTrainer script"]
    print(f"\nours / TRL: whole process {ours['wall'] / trl['wall']:.2f}x the time "
          f"({ours['cpu'] / trl['cpu']:.2f}x the CPU time), train loop "
          f"{ours.get('train_runtime', float('nan')) / trl.get('train_runtime', float('nan')):.2f}x\n")
    for name, command in cmds.items():
        shown = shlex.join(command).replace(sys.executable, ".venv/bin/python").replace(ROOT + os.sep, "")
        print(f"{name}: OMP_NUM_THREADS={threads} {shown}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
