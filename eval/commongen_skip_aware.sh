#!/usr/bin/env bash
# The schedule-aware model's evaluation (train/commongen_skip_aware.sh): the same
# CommonGen dev decoding as eval/commongen_small.sh (beam 4, 40 new tokens, the same
# metrics), under the paper's eleven rows scaled to 12 layers and the two HSD rows
# below 40% of the depth; then the comparison with the plainly trained model.
#
#   eval/commongen_skip_aware.sh MODEL OUT [PLAIN_RESULTS]
#
# PLAIN_RESULTS (default eval/results/commongen_small) is the plain model's evaluation;
# OUT gets comparison.md and plain_vs_schedule_aware.png beside the usual files.
set -euo pipefail
USAGE="MODEL OUT [PLAIN_RESULTS]"
source "$(dirname "$0")/../train/lib.sh"
args 2 3 "$@"
path_arg MODEL "${POS[0]}" in
path_arg OUT "${POS[1]}" out
path_arg PLAIN "${POS[2]:-$(dirname "$0")/results/commongen_small}" in
[ -f "$PLAIN/results.json" ] || die "PLAIN_RESULTS $PLAIN has no results.json; give a folder written by hsd-jax eval"
need python
run "$(dirname "$0")/commongen_small.sh" "$MODEL" "$OUT" \
  --schedules paper hsd:s=2,min=0,max=2,T=72 hsd:s=2,min=0,max=1,T=72
exec python "$(dirname "$0")/compare_runs.py" "$PLAIN" "$OUT" --labels plain schedule-aware --output "$OUT"
