#!/usr/bin/env bash
# GPT-2 large, full fine-tuning as in the paper: AdamW, learning rate 5e-5, 3 epochs.
#
#   DATASET=cnn_dailymail train/gpt2_large_full.sh      # or xsum, e2e_nlg, common_gen, healthcaremagic
#
# The batch size (global, split over all devices) and bfloat16 compute are choices made
# here for one 80-140 GB GPU, not settings from the paper. Re-running resumes the run.
# Settings from the environment: DATASET, MODEL (default gpt2-large), OUT (default
# runs/gpt2-large-DATASET), BATCH, SEED; extra flags go on to hsd-jax train.
# Several hosts: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID on each
# (or launch under SLURM / mpirun) and run the same command everywhere.
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
  --model "${MODEL:-gpt2-large}" \
  --dataset "$DATASET" --split train $EVAL \
  --mode full --epochs 3 --learning-rate 5e-5 --batch-size "${BATCH:-16}" --bf16 \
  --seed "${SEED:-0}" --save-every 2000 --resume \
  --output "${OUT:-runs/gpt2-large-$DATASET}" ${EXTRA[@]+"${EXTRA[@]}"}
