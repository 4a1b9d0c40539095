#!/usr/bin/env bash
# Issue 16, second try: schedule-aware *fine-tuning* of the converged plain model, against a
# control that continues the same model for the same steps without skipping.
#
#   train/commongen_finetune.sh PLAIN_MODEL OUT skip-aware   # + --skip-aware ..., P = 0.5
#   train/commongen_finetune.sh PLAIN_MODEL OUT plain        # the control
#   train/commongen_finetune.sh PLAIN_MODEL OUT joint        # third try: both paths every batch
#
# PLAIN_MODEL is the reproduction's model (train/commongen_small.sh). Both runs: one more
# epoch of CommonGen train, the same data order and seed, a learning rate ten times lower
# than the first training's peak (1e-4, warm-up and cosine decay as usual), so the only
# difference between them is the schedule drawn for half of the batches. ~20 min each on
# 2 CPU cores. `joint` trains every batch twice, through every layer and under a drawn
# schedule, the two losses weighted equally (--skip-aware-joint; twice the compute).
# --resume continues an interrupted run.
set -euo pipefail
USAGE="PLAIN_MODEL OUT skip-aware|plain|joint [hsd-jax train flags]"
source "$(dirname "$0")/lib.sh"
args 3 3 "$@"
KIND="${POS[2]}"
case "$KIND" in
  skip-aware) SKIP=(--skip-aware paper hsd:s=2,min=0,max=2,T=72 hsd:s=2,min=0,max=1,T=72 --skip-aware-prob 0.5) ;;
  joint) SKIP=(--skip-aware paper hsd:s=2,min=0,max=2,T=72 hsd:s=2,min=0,max=1,T=72 --skip-aware-joint) ;;
  plain) SKIP=() ;;
  *) usage_error "the third argument is skip-aware, plain or joint, not '$KIND'" ;;
esac
path_arg MODEL "${POS[0]}" in
path_arg OUT "${POS[1]}" out
need hsd-jax
cd "$(dirname "$0")/.."
exec hsd-jax train \
  --model "$MODEL" \
  --dataset common_gen --split train --eval-split validation --eval-every 1000 --eval-limit 1000 \
  --mode full --epochs 1 --batch-size 32 --learning-rate 1e-4 --weight-decay 0.01 --seed 1 \
  --save-every 500 --resume --output "$OUT" ${SKIP[@]+"${SKIP[@]}"} \
  ${EXTRA[@]+"${EXTRA[@]}"}
