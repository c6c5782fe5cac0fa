"""Does chain-of-thought data improve reasoning? A small-scale check of the original project's claim.

SmolLM2-135M-Instruct is fine-tuned twice with LoRA on the same token budget:
- ``no_cot``: instruction data only (the original Stanford Alpaca records);
- ``cot``: the same instruction data for half the budget, FLAN's CoT data for the other half
  (StrategyQA, QASC, ECQA, Sen-Making, GSM8K train splits, each phrased by our converter).
Both arms (and with --base the base model) are scored with evaluate.py (greedy, zero-shot) on held-out
reasoning data: the last rows of the StrategyQA (yes/no) and QASC (8 options) files, which training never sees, and the
AQuA-RAT dev set (5 options), a task outside the training mix. Accuracy comes with Wilson 95% intervals.

Data: the shared folder's original source files ($ALPACA_COT_SHARED, default ../shared; data/raw).
Output: .cache/ablation/ (data), saved_models/ablation/ (adapters, evaluations, ablation.md with the table).

Usage: python3 scripts/cot_ablation.py [--budget_tokens 8000] [--eval_records 24] [--max_new_tokens 80] [--base]
(the defaults fit about an hour on a busy 2-core machine; raise them where there is more compute)
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # import the project's packages

from alpaca_cot.data.templates import get_template  # noqa: E402
from alpaca_cot.io import write_json_atomic, write_text_atomic  # noqa: E402
from data import curation  # noqa: E402
from data.converters import convert_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
INSTRUCTION_FILES = ["alpaca_chinese_dataset/alpaca_data-0-3252-英文.json",
                     "alpaca_chinese_dataset/alpaca_data-3252-6382-英文.json",
                     "alpaca_chinese_dataset/alpaca_data-9407-12345-英文.json"]
COT_TASKS = ["strategyqa", "qasc", "ecqa", "sensemaking", "gsm8k"]  # FLAN's CoT files; aqua is left out
HELD_OUT_TASKS = ["strategyqa", "qasc"]  # their last rows are held out of training
OUTSIDE = "aqua/dev.json"  # AQuA-RAT dev: not a training task
ARMS = ("no_cot", "cot")
HELD_OUT_ROWS = 24  # per evaluation set, kept out of training whatever --eval_records (the first N are scored)


def shared_raw() -> str:
    """The shared folder's data/raw, or exit with one line saying how to point at it."""
    shared = os.environ.get("ALPACA_COT_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")
    raw = os.path.join(shared, "data", "raw")
    if not os.path.isdir(os.path.join(raw, "flan_v2_cot")):
        print(f"error: the ablation reads FLAN's CoT files from {raw}/flan_v2_cot, which is absent; set "
              "ALPACA_COT_SHARED to the shared data folder", file=sys.stderr)
        sys.exit(2)
    return raw


def count_tokens(records: list[dict], tokenizer) -> list[int]:
    """Tokens each record trains on: its Alpaca-template text with BOS and EOS, as training tokenizes it."""
    template = get_template("alpaca", tokenizer)
    texts = ["".join(text for text, _ in template.render(r, tokenizer)) for r in records]
    return [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]  # + EOS


def take_budget(records: list[dict], lengths: list[int], budget: int, cutoff: int) -> tuple[list[dict], int]:
    """Records in order while they fit in ``budget`` tokens (each counted up to ``cutoff``, as training cuts it)."""
    taken, used = [], 0
    for record, length in zip(records, lengths, strict=True):
        if used + min(length, cutoff) > budget:
            break
        taken.append(record)
        used += min(length, cutoff)
    return taken, used


def build_data(raw: str, out: str, model: str, budget: int, held_rows: int, cutoff: int, seed: int) -> dict:
    """Write the two training sets and the three evaluation sets; returns their sizes and token counts."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    instructions = [r for name in INSTRUCTION_FILES for r in convert_file(os.path.join(raw, name))[0]]
    cot, evals = [], {}
    for task in COT_TASKS:
        records = convert_file(os.path.join(raw, "flan_v2_cot", f"{task}_train.tsv"))[0]
        if task in HELD_OUT_TASKS:
            records, evals[f"{task}_heldout"] = records[:-held_rows], records[-held_rows:]
        cot += records
    evals["aqua_dev"] = rng.sample(convert_file(os.path.join(raw, OUTSIDE))[0], held_rows)
    held = [r for records in evals.values() for r in records]
    rng.shuffle(instructions)
    rng.shuffle(cot)
    # The candidates that fill each budget, then nothing that shares a 13-gram with an evaluation record.
    instructions, _ = curation.decontaminate(instructions[:4 * budget // 100], held)
    cot, _ = curation.decontaminate(cot[:4 * budget // 100], held)
    sizes = {}
    inst_lengths, cot_lengths = count_tokens(instructions, tokenizer), count_tokens(cot, tokenizer)
    arms = {"no_cot": take_budget(instructions, inst_lengths, budget, cutoff)}
    half_inst, used_inst = take_budget(instructions, inst_lengths, budget // 2, cutoff)
    half_cot, used_cot = take_budget(cot, cot_lengths, budget - used_inst, cutoff)
    mixed = half_inst + half_cot
    random.Random(seed).shuffle(mixed)
    arms["cot"] = (mixed, used_inst + used_cot)
    for arm, (records, tokens) in arms.items():
        write_unchanged(os.path.join(out, f"train_{arm}.json"), records)
        sizes[arm] = {"records": len(records), "tokens": tokens}
    sizes["cot"]["cot_records"] = len(half_cot)
    for name, records in evals.items():
        write_unchanged(os.path.join(out, f"{name}.json"), records)
    return sizes


def write_unchanged(path: str, records: list[dict]) -> None:
    """Write ``records`` unless ``path`` already holds them: an unchanged file keeps its time, so a trained
    arm and its evaluations stay valid for a rerun (see ``trained``)."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f) == records:
                return
    write_json_atomic(path, records)


def trained(run_dir: str, train_file: str) -> bool:
    """Whether ``run_dir`` holds a finished run newer than its training file (a rerun reuses it)."""
    metrics = os.path.join(run_dir, "metrics.json")
    return os.path.isfile(metrics) and os.path.getmtime(metrics) > os.path.getmtime(train_file)


def run(*args: str) -> None:
    """Run a project script as a user would, echoing the command."""
    print("$ " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([PY, *args], cwd=ROOT, check=True)


def main(budget_tokens: int = 8000, eval_records: int = 24, max_new_tokens: int = 80, cutoff_len: int = 384,
         learning_rate: float = 1e-3, base: bool = False, retrain: bool = False, seed: int = 0,
         data_dir: str = ".cache/ablation", out_dir: str = "saved_models/ablation") -> None:
    """Build the data, train both arms, evaluate them (and the base model with --base), write the table."""
    start = time.time()
    raw = shared_raw()
    model = subprocess.run([PY, "scripts/smollm2.py"], cwd=ROOT, check=True, capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
    if eval_records > HELD_OUT_ROWS:
        print(f"error: --eval_records {eval_records}: at most {HELD_OUT_ROWS} rows per task are held out",
              file=sys.stderr)
        sys.exit(2)
    sizes = build_data(raw, data_dir, model, budget_tokens, HELD_OUT_ROWS, cutoff_len, seed)
    print(json.dumps(sizes), flush=True)
    evals = ",".join(os.path.join(data_dir, f"{name}.json") for name in ("strategyqa_heldout", "qasc_heldout",
                                                                          "aqua_dev"))
    eval_flags = ["--data", evals, "--max_samples", str(eval_records), "--max_new_tokens", str(max_new_tokens),
                  "--eval_batch_size", "8"]
    timings = {}
    for arm in ARMS:
        t = time.time()
        train_file = os.path.join(data_dir, f"train_{arm}.json")
        if not retrain and trained(os.path.join(out_dir, arm), train_file):
            print(f"{arm}: reusing the finished run in {os.path.join(out_dir, arm)} (--retrain to train again)")
            continue
        run("uniform_finetune.py", "--model_type", "llama", "--model_name_or_path", model, "--data", train_file,
            "--val_set_size", "0",  # every budgeted token is trained on; evaluate.py gives the held-out loss
            "--epochs", "1",
            "--per_gpu_train_batch_size", "8", "--cutoff_len", str(cutoff_len), "--learning_rate", str(learning_rate),
            "--lora_r", "16", "--lora_alpha", "32", "--lora_target_modules", "all", "--logging_steps", "10",
            "--seed", str(seed), "--output_dir", os.path.join(out_dir, arm), "--overwrite_output_dir")
        timings[f"train {arm}"] = time.time() - t
    models = ("base", *ARMS) if base else ARMS
    for arm in models:
        t = time.time()
        model_flags = (["--model_type", "llama", "--model_name_or_path", model] if arm == "base"
                       else ["--lora_dir", os.path.join(out_dir, arm)])
        run("evaluate.py", *model_flags, *eval_flags, "--output_dir", os.path.join(out_dir, f"eval_{arm}"),
            "--overwrite")
        timings[f"evaluate {arm}"] = time.time() - t
    table = render(out_dir, sizes, models)
    wall = time.time() - start
    command = "python3 scripts/cot_ablation.py " + " ".join(
        f"--{k} {v}" for k, v in {"budget_tokens": budget_tokens, "eval_records": eval_records,
                                  "max_new_tokens": max_new_tokens}.items()) + (" --base" if base else "")
    report = (f"{table}\nCommand: `{command}`; wall time {wall / 60:.1f} min on this machine "
              f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in timings.items())}).\n")
    write_text_atomic(os.path.join(out_dir, "ablation.md"), report)
    print(report)


def render(out_dir: str, sizes: dict, models: tuple[str, ...]) -> str:
    """The Markdown table: accuracy [95% CI] per evaluation set and arm, training records and tokens."""
    names = {"strategyqa_heldout": "StrategyQA held-out (yes/no)", "qasc_heldout": "QASC held-out (8 options)",
             "aqua_dev": "AQuA dev, outside the mix (5 options)"}
    results = {arm: json.load(open(os.path.join(out_dir, f"eval_{arm}", "results.json"), encoding="utf-8"))["data"]
               for arm in models}
    titles = {"base": "base model", "no_cot": "no CoT", "cot": "with CoT"}
    head = ("| evaluation set (zero-shot, greedy) | " + " | ".join(titles[m] for m in models) + " |\n|---"
            + "|---" * len(models) + "|")
    rows = []
    for key, title in names.items():
        cells = []
        for arm in models:
            p = results[arm][key]["accuracy"]
            cells.append(f"{100 * p['value']:.1f}% [{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}]")
        rows.append(f"| {title}, n={results['cot'][key]['scored']}: accuracy [95% CI] | " + " | ".join(cells) + " |")
    for metric in ("exact_match",):
        for key, title in names.items():
            cells = [f"{100 * results[arm][key][metric]['value']:.1f}%" for arm in models]
            rows.append(f"| {title}: exact match (answer stated) | " + " | ".join(cells) + " |")
    losses = [f"{results[arm]['strategyqa_heldout']['eval_loss']:.3f}" for arm in models]
    rows.append("| StrategyQA held-out: answer loss | " + " | ".join(losses) + " |")
    rows.append("| training records (tokens) | " + ("- | " if "base" in models else "")
                + f"{sizes['no_cot']['records']} ({sizes['no_cot']['tokens']}) | "
                f"{sizes['cot']['records']} ({sizes['cot']['tokens']}; {sizes['cot']['cot_records']} CoT) |")
    return "\n".join([head, *rows]) + "\n"


if __name__ == "__main__":
    import fire

    fire.Fire(main)
