#!/usr/bin/env bash
# Schedule-aware training on the small CommonGen reproduction: the same model, data,
# steps and seed as train/commongen_small.sh, but half the batches (drawn per step,
# reproducibly) train under one of the paper's SkipDecode / HSD rows scaled to 12
# layers, or one of two HSD rows below 40% of the depth; the other half train every
# layer, so the model stays good without skipping (docs/methods.md).
#
#   train/commongen_skip_aware.sh OUT
#   eval/commongen_skip_aware.sh OUT RESULTS
#
# Running it again resumes the run in OUT; extra flags are appended.
set -euo pipefail
USAGE="OUT [hsd-jax train flags]"
source "$(dirname "$0")/lib.sh"
args 1 1 "$@"
exec "$(dirname "$0")/commongen_small.sh" "${POS[0]}" \
  --skip-aware paper hsd:s=2,min=0,max=2,T=72 hsd:s=2,min=0,max=1,T=72 --skip-aware-prob 0.5 \
  ${EXTRA[@]+"${EXTRA[@]}"}
