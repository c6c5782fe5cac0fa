#!/usr/bin/env bash
# The main job: fine-tune a small real pretrained model (SmolLM2-135M-Instruct) on real instruction
# and chain-of-thought data (Stanford Alpaca + GSM8K CoT from ../shared/data/raw) on this machine,
# then show the eval loss and one answer before and after.
# Usage: bash scripts/demo.sh   (ALPACA_COT_SHARED=/path/to/shared to use another data folder)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
RAW=${ALPACA_COT_SHARED:-../shared}/data/raw
OUT=saved_models/demo
start=$(date +%s)

MODEL=$($PY scripts/smollm2.py)
mkdir -p .cache/demo
[ -f .cache/demo/gsm8k.json ] || $PY data/collection.py convert "$RAW/flan_v2_cot/gsm8k_train.tsv" .cache/demo/gsm8k.json
[ -f .cache/demo/alpaca_en.json ] || $PY data/collection.py convert \
  "$RAW/alpaca_chinese_dataset/alpaca_data-0-3252-英文.json" .cache/demo/alpaca_en.json --skip_bad
[ -f .cache/demo/train.json ] || $PY data/collection.py mix .cache/demo/train.json \
  .cache/demo/gsm8k.json:0.5 .cache/demo/alpaca_en.json:0.5 --total 144 --seed 0

QUESTION="A baker makes 12 muffins per tray and bakes 4 trays. She sells 30 muffins. How many muffins are left?"
echo "== before fine-tuning: base model, greedy =="
$PY generate.py --model_type llama --model_name_or_path "$MODEL" --instruction "$QUESTION" --do_sample False \
  --max_new_tokens 96 2>/dev/null

echo "== fine-tuning (LoRA on every linear layer, 120 records, 1 epoch) =="
$PY uniform_finetune.py --model_type llama --model_name_or_path "$MODEL" --data .cache/demo/train.json \
  --val_set_size 24 --epochs 1 --per_gpu_train_batch_size 8 --cutoff_len 256 --learning_rate 1e-3 \
  --lora_r 16 --lora_alpha 32 --lora_target_modules all --logging_steps 5 --eval_steps 1000 --output_dir "$OUT" --overwrite_output_dir

echo "== after fine-tuning: greedy =="
$PY generate.py --lora_dir "$OUT" --instruction "$QUESTION" --do_sample False --max_new_tokens 96 2>/dev/null
$PY -c "import json; m = json.load(open('$OUT/metrics.json')); print(f\"eval loss {m['eval_loss_before']:.3f} -> {m['eval_loss_after']:.3f}\")"
echo "main job wall time: $(( $(date +%s) - start )) s; outputs in $OUT (loss curve: $OUT/loss_curve.png)"
