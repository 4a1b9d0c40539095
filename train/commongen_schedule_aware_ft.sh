#!/usr/bin/env bash
# Issue 16's best recipe in one command: schedule-aware fine-tuning of the finished CommonGen
# reproduction in four stages, each one run of train/commongen_finetune.sh from the stage
# before (eval/results/commongen_finetune/README.md has what each stage measured):
#
#   1. both paths on every batch, the schedule's loss distilled from the full model's
#      predictions, 2 epochs at 3e-4 (the schedules: the paper's SkipDecode and HSD rows and
#      HSD s=2 at budgets (0, 2) and (0, 1));
#   2. the same with the schedule's loss weighted 0.75, 1 epoch at 3e-4;
#   3. stage 2 again at 1e-4;
#   4. 1 epoch at 1e-4, weight 0.6, only the nested HSD s=2 schedules at the low budgets
#      (0, 1), (0, 2) and (0, 4): what lifted HSD below 40% of the layers.
#
#   train/commongen_schedule_aware_ft.sh PLAIN_MODEL OUT          # the model: OUT/stage4
#   train/commongen_schedule_aware_ft.sh PLAIN_MODEL OUT plain    # the control: same stages,
#                                                                 # steps, data, seed, rates
#   train/commongen_schedule_aware_ft.sh PLAIN_MODEL OUT views    # issue 37's candidate: the
#       same stages with the schedule's copy trained both as skip decoding and as a
#       self-speculative draft (--skip-aware-view both, 1.5x the compute), the validation
#       loss on dev's selection half only (docs/holdout.md)
#
# PLAIN_MODEL comes from train/commongen_small.sh. ~100 minutes on 2 CPU cores (the control
# about half); running it again continues where it stopped (every stage passes --resume).
set -euo pipefail
USAGE="PLAIN_MODEL OUT [plain|views]"
source "$(dirname "$0")/lib.sh"
args 2 3 "$@"
KIND="${POS[2]:-joint}"
VIEWS=()  # flags every schedule-aware stage adds for the views recipe
case "$KIND" in
  joint|plain) ;;
  views) KIND=joint; VIEWS=(--skip-aware-view both --eval-split validation:selection) ;;
  *) usage_error "the third argument is 'plain', 'views' or nothing, not '$KIND'" ;;
esac
path_arg MODEL "${POS[0]}" in
path_arg OUT "${POS[1]}" out
need hsd-jax
cd "$(dirname "$0")/.."
# $1: stage, $2: its base model; the rest: this stage's flags (the schedule's flags only
# when schedule-aware).
stage() {
  local name="$1" base="$2" common=() aware=()
  shift 2
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do common+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  aware=("$@" ${VIEWS[@]+"${VIEWS[@]}"})
  if [ "$KIND" = plain ]; then aware=(); fi
  echo "== $name (from $base)" >&2
  run train/commongen_finetune.sh "$base" "$OUT/$name" "$KIND" "${common[@]}" ${aware[@]+"${aware[@]}"}
}
LOW=(hsd:s=2,min=0,max=1,T=72 hsd:s=2,min=0,max=2,T=72 hsd:s=2,min=0,max=4,T=72)
stage stage1 "$MODEL" --learning-rate 3e-4 --epochs 2 -- --skip-aware-distill 1.0
stage stage2 "$OUT/stage1" --learning-rate 3e-4 -- --skip-aware-distill 1.0 --skip-aware-prob 0.75
stage stage3 "$OUT/stage2" --learning-rate 1e-4 -- --skip-aware-distill 1.0 --skip-aware-prob 0.75
stage stage4 "$OUT/stage3" --learning-rate 1e-4 -- --skip-aware "${LOW[@]}" --skip-aware-distill 1.0 \
  --skip-aware-prob 0.6
echo "model: $OUT/stage4" >&2
