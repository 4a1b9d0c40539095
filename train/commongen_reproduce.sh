#!/usr/bin/env bash
# Both CommonGen models of the project's results, rebuilt from nothing in one command:
#
#   1. plain:          a 12-layer, 256-wide GPT-2 trained from random weights on CommonGen
#                      train (train/commongen_small.sh), -> OUT/plain
#   2. schedule_aware: the final schedule-aware fine-tune of it, four stages
#                      (train/commongen_schedule_aware_ft.sh), -> OUT/schedule_aware/stage4
#   3. control:        with --control, the plain fine-tune with the same stages, steps, data
#                      order, seed and rates, -> OUT/control/stage4
#   4. views:          with --views, issue 37's candidate: the same stages trained as skip
#                      decoding and as self-speculative drafts (--skip-aware-view both), the
#                      validation loss on dev's selection half, -> OUT/schedule_aware_views/stage4
#
#   train/commongen_reproduce.sh OUT [--control] [--views]
#
# Time, measured (2026-12-04): on one NVIDIA H200, 5.5 minutes for both models (plain 87 s,
# the four schedule-aware stages 239 s). On this project's 2-core CPU machine the plain
# stage ran at 0.80 s a step (2,125 of its 6,105 steps in 28 minutes, beside other work):
# about 80 minutes, and the schedule-aware stages, which train each batch twice, about
# 2.7 hours more (at twice that step time): more than a 3-hour session holds, so on a CPU
# run it across sessions on one machine. Every stage passes --resume, so running the
# command again continues where it stopped (a finished stage is checked and skipped).
# Needs only this repository and CommonGen in ../shared/data (or $HSD_DATA_DIR). For a
# seed the runs are deterministic on one machine; CPU and GPU agree on the first hundred
# steps' losses to five digits and then drift apart as float sums do (float32 matrix
# products at full precision and XLA's deterministic GPU reductions are set below).
set -euo pipefail
export JAX_DEFAULT_MATMUL_PRECISION="${JAX_DEFAULT_MATMUL_PRECISION:-highest}"  # no TF32 on GPUs
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"  # a no-op on CPUs
USAGE="OUT [--control] [--views]"
OWN_FLAGS="--control --views"
source "$(dirname "$0")/lib.sh"
args 1 1 "$@"
CONTROL=0
VIEWS=0
for flag in ${EXTRA[@]+"${EXTRA[@]}"}; do
  case "$flag" in --control) CONTROL=1 ;; --views) VIEWS=1 ;; esac
done
path_arg OUT "${POS[0]}" out
need hsd-jax
cd "$(dirname "$0")/.."
STAGES=$((2 + CONTROL + VIEWS))
START=$SECONDS
N=0
# $1: stage name, $2: where its model ends; the rest: the command that builds it (run:
# a signal sent to this script stops it, and this script after it).
stage() {
  local name="$1" model="$2" t0=$SECONDS status=0
  shift 2
  N=$((N + 1))
  echo "[$N/$STAGES] $name -> $model (log: $OUT/$name.log)" >&2
  run --log "$OUT/$name.log" "$@" || status=$?
  if [ "$status" != 0 ]; then
    echo "[$N/$STAGES] $name failed; its log: $OUT/$name.log (run the same command again to continue)" >&2
    tail -n 5 "$OUT/$name.log" >&2
    exit "$status"
  fi
  echo "[$N/$STAGES] $name done in $(( (SECONDS - t0) / 60 )) min" >&2
}
mkdir -p "$OUT"
stage plain "$OUT/plain" train/commongen_small.sh "$OUT/plain"
stage schedule_aware "$OUT/schedule_aware/stage4" \
  train/commongen_schedule_aware_ft.sh "$OUT/plain" "$OUT/schedule_aware"
if [ "$CONTROL" = 1 ]; then
  stage control "$OUT/control/stage4" \
    train/commongen_schedule_aware_ft.sh "$OUT/plain" "$OUT/control" plain
fi
if [ "$VIEWS" = 1 ]; then
  stage schedule_aware_views "$OUT/schedule_aware_views/stage4" \
    train/commongen_schedule_aware_ft.sh "$OUT/plain" "$OUT/schedule_aware_views" views
fi
echo "all $STAGES stages done in $(( (SECONDS - START) / 60 )) min: models $OUT/plain, $OUT/schedule_aware/stage4" >&2
