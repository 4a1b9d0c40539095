#!/usr/bin/env bash
# Blind predictions on the 1,497 CommonGen test concept sets, whose references the project
# never sees (they are scored elsewhere): every input decoded with beam 4, 40 new tokens,
# under the rows of the dev evaluation (eval/commongen_small.sh): vanilla, the paper's eleven
# rows scaled to the model's depth, its six HSD rows with layer 0 always run, and HSD s=2 at
# the budgets (0, 2) and (0, 1).
#
#   eval/commongen_test.sh MODEL OUT
#
# Writes OUT/manifest.json ({"model", "model_sha256" (of MODEL/model.safetensors), "built_on"
# (devices, versions, date), "settings", "rows": [{"spec", "avg_layers", "tokens_per_second",
# "predictions"}, ...]}, each "predictions" a path relative to it), OUT/table.md and
# OUT/predictions/<spec>.jsonl: one line per input, in input order, {"index": <0-based line
# of commongen.test.inputs.jsonl>, "source_sha256", "prediction"}. The concept set
# "dog_N#throw_V" is given to the model as "dog throw", the form of the training sources.
# No scores. Running it again continues an interrupted run (--resume).
set -euo pipefail
USAGE="MODEL OUT [hsd-jax eval flags]"
source "$(dirname "$0")/../train/lib.sh"
args 2 2 "$@"
path_arg MODEL "${POS[0]}" in
path_arg OUT "${POS[1]}" out
need hsd-jax
cd "$(dirname "$0")/.."
LOW_BUDGET_ROWS="hsd:s=2,min=0,max=2,T=72 hsd:s=2,min=0,max=1,T=72"
exec hsd-jax eval --model "$MODEL" --dataset common_gen --split test --blind \
  --schedules paper paper-hsd-warmup $LOW_BUDGET_ROWS --num-beams 4 --max-new-tokens 40 --batch-size 32 \
  --resume --output "$OUT" ${EXTRA[@]+"${EXTRA[@]}"}
