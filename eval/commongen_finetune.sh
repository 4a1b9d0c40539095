#!/usr/bin/env bash
# Issue 16, second try: evaluates the two fine-tunes of train/commongen_finetune.sh with the
# same rows as the first schedule-aware run (the paper's rows scaled to 12 layers and two
# HSD rows below 40% of the depth) and compares them: a table and an overlaid plot.
#
#   eval/commongen_finetune.sh PLAIN_FT_MODEL SKIP_AWARE_FT_MODEL OUT
#
# writes OUT/plain and OUT/skip_aware (hsd-jax eval folders; --resume continues them) and
# OUT/comparison.md + OUT/plain_vs_schedule_aware.png. ~15 min per model on 2 CPU cores.
set -euo pipefail
USAGE="PLAIN_FT_MODEL SKIP_AWARE_FT_MODEL OUT"
source "$(dirname "$0")/../train/lib.sh"
args 3 3 "$@"
path_arg PLAIN "${POS[0]}" in
path_arg AWARE "${POS[1]}" in
path_arg OUT "${POS[2]}" out
need python
cd "$(dirname "$0")/.."
ROWS=(--schedules paper hsd:s=2,min=0,max=2,T=72 hsd:s=2,min=0,max=1,T=72)
run eval/commongen_small.sh "$PLAIN" "$OUT/plain" "${ROWS[@]}"
run eval/commongen_small.sh "$AWARE" "$OUT/skip_aware" "${ROWS[@]}"
exec python eval/compare_runs.py "$OUT/plain" "$OUT/skip_aware" --labels plain schedule-aware \
  --output "$OUT"
