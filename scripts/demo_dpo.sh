#!/usr/bin/env bash
# The DPO demo: LoRA DPO on SmolLM2-135M-Instruct (its own chat template) with a few hundred real hh-rlhf
# (harmless-base) preference pairs, scored by evaluate.py before and after on held-out pairs: how often the model
# ranks the chosen reply above the rejected one, with 95% intervals.
# "Before" is the base model. It is also DPO's reference (the adapter disabled), so its implicit-reward margin is 0 by
# definition; the before/after comparison is the plain log-probability ranking (chosen logp > rejected logp, summed
# over the reply's tokens, and per token), and evaluate.py scores the adapter and its reference in one run (the
# reference's rows are the base model's). After DPO the implicit-reward accuracy (margin over the base) is shown too.
# Data: hh-rlhf's harmless-base test split from the shared data folder (../shared, or ALPACA_COT_SHARED=/path),
# converted by data/collection.py; pairs of at most 300 characters (a DPO step is slow on 2 cores); 100 held-out
# pairs drawn first (seeded), then training pairs sharing a 13-gram with them dropped (decontaminate).
# Usage: bash scripts/demo_dpo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=saved_models/demo_dpo
DATA=.cache/demo_dpo
RAW=${ALPACA_COT_SHARED:-../shared}/data/raw/hh_rlhf/harmless-base/test.jsonl.gz
[ -f "$RAW" ] || { echo "error: $RAW is absent: set ALPACA_COT_SHARED to the shared data folder" >&2; exit 2; }
start=$(date +%s)

MODEL=$($PY scripts/smollm2.py)
mkdir -p $DATA
$PY data/collection.py convert "$RAW" $DATA/hh_pairs.jsonl --skip_bad --overwrite | tail -n 1
$PY scripts/demo_dpo_data.py split $DATA/hh_pairs.jsonl $DATA --heldout 100 --max_chars 300 --seed 0
$PY data/collection.py decontaminate $DATA/pool.jsonl $DATA/train.jsonl $DATA/heldout.jsonl --overwrite | sed -n 1p

echo "== DPO (LoRA r16 on every linear layer, beta 0.1, lr 1e-3, 192 pairs, batch 8: 24 steps) =="
$PY uniform_finetune.py --stage dpo --pref_beta 0.1 --model_type llama --model_name_or_path "$MODEL" --template chat \
  --data $DATA/train.jsonl --max_samples 192 --val_set_size 0 --epochs 1 --per_gpu_train_batch_size 8 \
  --cutoff_len 256 --learning_rate 1e-3 --lora_r 16 --lora_alpha 32 --lora_target_modules all --logging_steps 4 \
  --save_steps 10000 --seed 0 --output_dir "$OUT" --overwrite_output_dir

echo "== the DPO adapter and its reference (the base model) on the 100 held-out pairs =="
$PY evaluate.py --lora_dir "$OUT" --data $DATA/heldout.jsonl --cutoff_len 256 --eval_batch_size 8 \
  --output_dir "$OUT-eval" --overwrite

$PY scripts/demo_dpo_data.py report "$OUT-eval"
echo "DPO demo wall time: $(( $(date +%s) - start )) s (load average $(cut -d' ' -f1-3 /proc/loadavg));" \
  "adapter in $OUT, scores in $OUT-eval"
