#!/usr/bin/env bash
# The main job: fine-tune a small real pretrained model (SmolLM2-135M-Instruct, through its own chat template) on
# real yes/no chain-of-thought data on this machine, and score it before and after with evaluate.py on 100
# held-out StrategyQA questions (with `out-of-set`, also on 100 yes/no claims from each of two sources training
# never reads: Sen-Making, QASC): accuracy, exact match and the share of answers that state a final answer,
# with 95% intervals, next to the held-out answer loss.
# Data (scripts/demo_data.py): the shared data folder as an offline mirror when present (../shared, or
# ALPACA_COT_SHARED=/path/to/shared), else the original collection on the Hugging Face hub (QingyiSi/Alpaca-CoT;
# then the StrategyQA set alone).
# Usage: bash scripts/demo.sh [out-of-set]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=saved_models/demo
DATA=.cache/demo
start=$(date +%s)

MODEL=$($PY scripts/smollm2.py)
# seeded: the same files every run; the held-out sets are drawn first, then training records sharing a 13-gram
# with them are dropped
$PY scripts/demo_data.py --out $DATA --train 300 --train_claims 300 --heldout 100 --out_of_set_records 100
SETS=$DATA/heldout.json
if [ "${1:-}" = out-of-set ]; then
  for name in sensemaking_yesno qasc_yesno; do [ -f $DATA/$name.json ] && SETS=$SETS,$DATA/$name.json; done
fi
# greedy; 128 new tokens hold the longest rationale and answer (99% of held-out references are under 90 tokens);
# generation stops at the chat template's end of turn
EVAL=(--data "$SETS" --max_new_tokens 128 --eval_batch_size 50)

echo "== before fine-tuning: the base model, chat template, on the held-out yes/no questions =="
$PY evaluate.py --model_type llama --model_name_or_path "$MODEL" --template chat "${EVAL[@]}" \
  --output_dir "$OUT-eval/before" --overwrite

echo "== fine-tuning (LoRA r16 on every linear layer, chat template, 600 yes/no records, 75 steps) =="
$PY uniform_finetune.py --model_type llama --model_name_or_path "$MODEL" --template chat --data $DATA/train.json \
  --val_set_size 0 --epochs 1 --per_gpu_train_batch_size 8 --cutoff_len 256 --learning_rate 1e-3 \
  --lora_r 16 --lora_alpha 32 --lora_target_modules all --logging_steps 5 --save_steps 10000 --seed 0 \
  --output_dir "$OUT" --overwrite_output_dir

echo "== after fine-tuning: the same questions =="
$PY evaluate.py --lora_dir "$OUT" "${EVAL[@]}" --output_dir "$OUT-eval/after" --overwrite

$PY scripts/demo_data.py --report "$OUT-eval"
echo "main job wall time: $(( $(date +%s) - start )) s (load average $(cut -d' ' -f1-3 /proc/loadavg));" \
  "adapter in $OUT, scores in $OUT-eval/{before,after}"
