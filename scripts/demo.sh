#!/usr/bin/env bash
# The main job: fine-tune a small real pretrained model (SmolLM2-135M-Instruct) on real instruction and
# chain-of-thought data on this machine, and score it before and after with evaluate.py on held-out yes/no
# chain-of-thought questions (accuracy and exact match with 95% intervals, next to the eval loss).
# Data (scripts/demo_data.py): the shared data folder as an offline mirror when present (../shared, or
# ALPACA_COT_SHARED=/path/to/shared), else the original collection on the Hugging Face hub (QingyiSi/Alpaca-CoT).
# Usage: bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=saved_models/demo
start=$(date +%s)

MODEL=$($PY scripts/smollm2.py)
$PY scripts/demo_data.py --out .cache/demo --train 144 --heldout 16  # seeded: the same files every run
EVAL=(--data .cache/demo/heldout.json --max_new_tokens 80 --eval_batch_size 16)

echo "== before fine-tuning: the base model on 16 held-out yes/no questions (greedy) =="
$PY evaluate.py --model_type llama --model_name_or_path "$MODEL" "${EVAL[@]}" --output_dir "$OUT-eval/before" --overwrite

echo "== fine-tuning (LoRA on every linear layer, 120 records, 1 epoch) =="
$PY uniform_finetune.py --model_type llama --model_name_or_path "$MODEL" --data .cache/demo/train.json \
  --val_set_size 24 --epochs 1 --per_gpu_train_batch_size 8 --cutoff_len 256 --learning_rate 1e-3 \
  --lora_r 16 --lora_alpha 32 --lora_target_modules all --logging_steps 5 --eval_steps 1000 --output_dir "$OUT" \
  --overwrite_output_dir

echo "== after fine-tuning: the same questions =="
$PY evaluate.py --lora_dir "$OUT" "${EVAL[@]}" --output_dir "$OUT-eval/after" --overwrite

$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
run = json.load(open(f"{out}/metrics.json"))
rows = {name: json.load(open(f"{out}-eval/{name}/results.json"))["data"]["heldout"] for name in ("before", "after")}
def pct(p): return f"{100 * p['value']:.0f}% [{100 * p['ci95'][0]:.0f}, {100 * p['ci95'][1]:.0f}]"
print("| model | accuracy [95% CI] | exact match [95% CI] | held-out answer loss |\n|---|---|---|---|")
for name, r in rows.items():
    print(f"| {name} fine-tuning | {pct(r['accuracy'])} | {pct(r['exact_match'])} | {r['eval_loss']:.3f} |")
print(f"validation loss during training: {run['eval_loss_before']:.3f} -> {run['eval_loss_after']:.3f}")
PY
echo "main job wall time: $(( $(date +%s) - start )) s; adapter in $OUT, scores in $OUT-eval/{before,after}"
