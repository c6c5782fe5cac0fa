"""Does chain-of-thought data improve reasoning? The original project's claim, at a scale where the arms can differ.

SmolLM2-135M-Instruct is fine-tuned twice with LoRA (its own chat template, r 16 on every linear layer) on the
same token budget, counted on the chat-rendered text:
- ``no_cot``: instruction data only (the original Stanford Alpaca records);
- ``cot``: the same instruction data for half the budget, FLAN's CoT data for the other half
  (StrategyQA, QASC, ECQA, Sen-Making, GSM8K train files, each phrased by our converter).
Both arms and the base model are scored with evaluate.py (greedy, zero-shot) on three held-out sets of
``--eval_records`` questions each: rows of the StrategyQA (yes/no) and QASC (8 options) files that training never
sees (drawn with the seed, then every training record sharing a 13-gram with them is dropped), and the AQuA-RAT
dev set (5 options), a task outside the mix. Besides accuracy and exact match (Wilson 95% intervals) and the
answer loss, it measures the claim itself: how often the model gives a rationale before its answer, i.e. states a
final answer (evaluate's strict reading) with at least ``RATIONALE_WORDS`` words before the first final-answer
statement. Each arm's training loss is read from its log every ``LOG_EVERY`` steps.

Data: the shared folder's original source files ($ALPACA_COT_SHARED, default ../shared; data/raw).
Output: .cache/ablation/ (data), saved_models/ablation/ (adapters, evaluations, ablation.md with the tables).

Usage: python3 scripts/cot_ablation.py [--budget_tokens 24000] [--batch_size 4] [--eval_records 100]
       [--max_new_tokens 96]
(on a 2-core CPU shared with other jobs, OMP_NUM_THREADS=1 keeps each process from spinning on a busy core)
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import subprocess
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # import the project's packages

from alpaca_cot.data.templates import get_template  # noqa: E402
from alpaca_cot.evaluation.answers import first_statement, stated_answer  # noqa: E402
from alpaca_cot.evaluation.stats import proportion  # noqa: E402
from alpaca_cot.io import write_json_atomic, write_text_atomic  # noqa: E402
from data import curation  # noqa: E402
from data.converters import convert_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
INSTRUCTION_FILES = ["alpaca_chinese_dataset/alpaca_data-0-3252-英文.json",
                     "alpaca_chinese_dataset/alpaca_data-3252-6382-英文.json",
                     "alpaca_chinese_dataset/alpaca_data-9407-12345-英文.json"]
COT_TASKS = ["strategyqa", "qasc", "ecqa", "sensemaking", "gsm8k"]  # FLAN's CoT files; aqua is left out
HELD_OUT_TASKS = ["strategyqa", "qasc"]  # rows drawn out of training
OUTSIDE = "aqua/dev.json"  # AQuA-RAT dev: not a training task
SETS = {"strategyqa_heldout": "StrategyQA held-out (yes/no)", "qasc_heldout": "QASC held-out (8 options)",
        "aqua_dev": "AQuA dev, outside the mix (5 options)"}
ARMS = ("no_cot", "cot")
TITLES = {"base": "base model", "no_cot": "no CoT", "cot": "with CoT"}
RATIONALE_WORDS = 10  # a rationale: at least this many words before the first final-answer statement
LOG_EVERY = 5  # training steps between logged losses
# Where a generation first states a final answer: "the answer is", "Answer:", "the option to choose is", "####".
_LOGGED_LOSS = re.compile(r"\{'loss': '([0-9.]+)'.*?'epoch': '([0-9.]+)'\}")


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
    """Tokens each record trains on: its chat-template text, as training renders and tokenizes it."""
    template = get_template("chat", tokenizer)
    texts = ["".join(text for text, _ in template.render(r, tokenizer)) for r in records]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


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
            rng.shuffle(records)
            records, evals[f"{task}_heldout"] = records[held_rows:], records[:held_rows]
        cot += records
    aqua = convert_file(os.path.join(raw, OUTSIDE))[0]
    evals["aqua_dev"] = rng.sample(aqua, min(held_rows, len(aqua)))
    held = [r for records in evals.values() for r in records]
    rng.shuffle(instructions)
    rng.shuffle(cot)
    # The candidates that fill each budget (records average over 50 tokens), then nothing that shares a 13-gram
    # with an evaluation record.
    instructions, _ = curation.decontaminate(instructions[:budget // 50], held)
    cot, _ = curation.decontaminate(cot[:budget // 50], held)
    inst_lengths, cot_lengths = count_tokens(instructions, tokenizer), count_tokens(cot, tokenizer)
    arms = {"no_cot": take_budget(instructions, inst_lengths, budget, cutoff)}
    half_inst, used_inst = take_budget(instructions, inst_lengths, budget // 2, cutoff)
    half_cot, used_cot = take_budget(cot, cot_lengths, budget - used_inst, cutoff)
    mixed = half_inst + half_cot
    random.Random(seed).shuffle(mixed)
    arms["cot"] = (mixed, used_inst + used_cot)
    sizes = {}
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


def run(*args: str) -> str:
    """Run a project script as a user would, echoing the command and its output; returns the output."""
    print("$ " + " ".join(shlex.quote(a) for a in args), flush=True)
    proc = subprocess.Popen([PY, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if proc.wait():
        raise subprocess.CalledProcessError(proc.returncode, args)
    return "".join(lines)


def loss_curve(log: str) -> list[list[float]]:
    """[epoch, training loss] pairs of a uniform_finetune.py log (the Trainer's logged dicts)."""
    return [[float(epoch), float(loss)] for loss, epoch in _LOGGED_LOSS.findall(log)]


def rationale_words(generation: str) -> int:
    """Words before the first final-answer statement (all the words when there is none)."""
    cue = first_statement(generation)
    return len((generation[:cue.start()] if cue else generation).split())


def claim_rates(scored_file: str) -> dict:
    """Share of generations that state a final answer, and that give a rationale before it."""
    rows = [json.loads(line) for line in open(scored_file, encoding="utf-8")]
    stated = [r for r in rows if r["kind"] and stated_answer(r["generation"], r["kind"]) is not None]
    reasoned = [r for r in stated if rationale_words(r["generation"]) >= RATIONALE_WORDS]
    return {"stated": proportion(len(stated), len(rows)), "rationale_first": proportion(len(reasoned), len(rows))}


def main(budget_tokens: int = 24000, eval_records: int = 100, max_new_tokens: int = 96, cutoff_len: int = 384,
         learning_rate: float = 1e-3, batch_size: int = 4, eval_batch_size: int = 50, retrain: bool = False,
         seed: int = 0, data_dir: str = ".cache/ablation", out_dir: str = "saved_models/ablation") -> None:
    """Build the data, train both arms, evaluate them and the base model, write the tables."""
    start = time.time()
    raw = shared_raw()
    model = subprocess.run([PY, "scripts/smollm2.py"], cwd=ROOT, check=True, capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
    sizes = build_data(raw, data_dir, model, budget_tokens, eval_records, cutoff_len, seed)
    print(json.dumps(sizes), flush=True)
    evals = ",".join(os.path.join(data_dir, f"{name}.json") for name in SETS)
    eval_flags = ["--data", evals, "--max_new_tokens", str(max_new_tokens), "--eval_batch_size", str(eval_batch_size)]
    timings, curves = {}, {}
    for arm in ARMS:
        t = time.time()
        train_file, run_dir = os.path.join(data_dir, f"train_{arm}.json"), os.path.join(out_dir, arm)
        curve_file = os.path.join(run_dir, "loss_curve.json")
        if not retrain and trained(run_dir, train_file) and os.path.isfile(curve_file):
            print(f"{arm}: reusing the finished run in {run_dir} (--retrain to train again)")
            curves[arm] = json.load(open(curve_file, encoding="utf-8"))
            continue
        log = run("uniform_finetune.py", "--model_type", "llama", "--model_name_or_path", model, "--template", "chat",
                  "--data", train_file,
                  "--val_set_size", "0",  # every budgeted token is trained on; evaluate.py gives the held-out loss
                  "--epochs", "1", "--per_gpu_train_batch_size", str(batch_size), "--cutoff_len", str(cutoff_len),
                  "--learning_rate", str(learning_rate), "--lora_r", "16", "--lora_alpha", "32",
                  "--lora_target_modules", "all", "--logging_steps", str(LOG_EVERY), "--save_steps", "100000",
                  "--seed", str(seed), "--output_dir", run_dir, "--overwrite_output_dir")
        curves[arm] = loss_curve(log)
        write_json_atomic(curve_file, curves[arm])
        timings[f"train {arm}"] = time.time() - t
    for arm in ("base", *ARMS):
        t = time.time()
        model_flags = (["--model_type", "llama", "--model_name_or_path", model, "--template", "chat"] if arm == "base"
                       else ["--lora_dir", os.path.join(out_dir, arm)])
        run("evaluate.py", *model_flags, *eval_flags, "--output_dir", os.path.join(out_dir, f"eval_{arm}"),
            "--overwrite")
        timings[f"evaluate {arm}"] = time.time() - t
    table = render(out_dir, sizes, curves)
    wall = time.time() - start
    command = "python3 scripts/cot_ablation.py " + " ".join(
        f"--{k} {v}" for k, v in {"budget_tokens": budget_tokens, "batch_size": batch_size,
                                  "eval_records": eval_records, "max_new_tokens": max_new_tokens}.items())
    report = (f"{table}\nCommand: `{command}`; wall time {wall / 60:.1f} min on this machine "
              f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in timings.items())}; load average "
              f"{os.getloadavg()[0]:.1f} at the end).\n")
    write_text_atomic(os.path.join(out_dir, "ablation.md"), report)
    print(report)


def _pct(p: dict) -> str:
    return f"{100 * p['value']:.1f}% [{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}]"


def render(out_dir: str, sizes: dict, curves: dict) -> str:
    """The Markdown tables: per evaluation set and model, accuracy, exact match, answers stated, rationale before
    the answer (each with a 95% interval) and answer loss; then the training data and loss curves."""
    models = ("base", *ARMS)
    results = {m: json.load(open(os.path.join(out_dir, f"eval_{m}", "results.json"), encoding="utf-8"))["data"]
               for m in models}
    rates = {m: {key: claim_rates(os.path.join(out_dir, f"eval_{m}", "generations", f"{key}.scored.jsonl"))
                 for key in SETS} for m in models}
    lines = ["| evaluation set | metric | " + " | ".join(TITLES[m] for m in models) + " |",
             "|---|---|" + "---|" * len(models)]
    for key, title in SETS.items():
        n = results["cot"][key]["scored"]
        metrics = [("accuracy", lambda m, k=key: results[m][k]["accuracy"]),
                   ("exact match", lambda m, k=key: results[m][k]["exact_match"]),
                   ("states a final answer", lambda m, k=key: rates[m][k]["stated"]),
                   (f"rationale first (>= {RATIONALE_WORDS} words before the answer)",
                    lambda m, k=key: rates[m][k]["rationale_first"])]
        for i, (name, get) in enumerate(metrics):
            lines.append(f"| {title + f', n={n}' if i == 0 else ''} | {name} [95% CI] | "
                         + " | ".join(_pct(get(m)) for m in models) + " |")
        lines.append("| | answer loss | " + " | ".join(f"{results[m][key]['eval_loss']:.3f}" for m in models) + " |")
    lines += ["", "| arm | records (CoT) | tokens | steps | training loss every " + f"{LOG_EVERY} steps |",
              "|---|---|---|---|---|"]
    for arm in ARMS:
        curve = curves.get(arm, [])
        cot = f" ({sizes[arm]['cot_records']})" if "cot_records" in sizes[arm] else ""
        steps = json.load(open(os.path.join(out_dir, arm, "metrics.json"), encoding="utf-8")).get("steps")
        lines.append(f"| {TITLES[arm]} | {sizes[arm]['records']}{cot} | {sizes[arm]['tokens']:,} | {steps} | "
                     + " ".join(f"{loss:.2f}" for _, loss in curve) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import fire

    fire.Fire(main)
