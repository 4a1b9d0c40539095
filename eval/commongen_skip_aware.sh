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
MODEL="${1:?usage: eval/commongen_skip_aware.sh MODEL OUT [PLAIN_RESULTS]}"
OUT="$(realpath -m "${2:?usage: eval/commongen_skip_aware.sh MODEL OUT [PLAIN_RESULTS]}")"
PLAIN="$(realpath -m "${3:-$(dirname "$0")/results/commongen_small}")"
"$(dirname "$0")/commongen_small.sh" "$MODEL" "$OUT" \
  --schedules paper hsd:s=2,min=0,max=2,T=72 hsd:s=2,min=0,max=1,T=72
python "$(dirname "$0")/compare_runs.py" "$PLAIN" "$OUT" --labels plain schedule-aware --output "$OUT"
