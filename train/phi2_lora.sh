#!/usr/bin/env bash
# Phi-2, LoRA as in the paper: rank 16, alpha 32, AdamW, learning rate 5e-5, 3 epochs;
# adapters on every attention and MLP projection (q_proj, k_proj, v_proj, dense, fc1,
# fc2), merged into the exported weights.
#
#   DATASET=xsum train/phi2_lora.sh
#
# The batch size, the 1024-token rows and bfloat16 compute are choices made here for one
# 80-140 GB GPU, not settings from the paper. Re-running resumes the run. Settings from the
# environment: DATASET, MODEL (default microsoft/phi-2), OUT (default runs/phi2-lora-DATASET),
# BATCH, MAX_LENGTH, SEED; extra flags go on to hsd-jax train.
set -euo pipefail
USAGE="[hsd-jax train flags]"
source "$(dirname "$0")/lib.sh"
args 0 0 "$@"
need hsd-jax
# $OUT, and $MODEL when it is a local folder, are paths from where the command was given
if [ -n "${OUT:-}" ]; then path_arg OUT "$OUT" out; fi
if [ -e "${MODEL:-}" ]; then path_arg MODEL "$MODEL" in; fi
cd "$(dirname "$0")/.."
DATASET="${DATASET:-cnn_dailymail}"
EVAL="--eval-split validation --eval-every 2000 --eval-limit 2000"
if [ "$DATASET" = healthcaremagic ]; then EVAL=""; fi  # that dataset has a train split only
exec hsd-jax train \
  --model "${MODEL:-microsoft/phi-2}" \
  --dataset "$DATASET" --split train $EVAL \
  --mode lora --lora-rank 16 --lora-alpha 32 \
  --epochs 3 --learning-rate 5e-5 --batch-size "${BATCH:-16}" --max-length "${MAX_LENGTH:-1024}" --bf16 \
  --seed "${SEED:-0}" --save-every 2000 --resume \
  --output "${OUT:-runs/phi2-lora-$DATASET}" ${EXTRA[@]+"${EXTRA[@]}"}
