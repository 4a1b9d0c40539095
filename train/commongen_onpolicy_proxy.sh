#!/usr/bin/env bash
# Issue 37, a short proxy of one question: does training the schedule's copy on the full
# model's *own* greedy continuations (on-policy data, as sequence-level distillation and
# DistillSpec do) lift how often a self-speculative HSD draft is accepted, against the same
# steps on CommonGen's references? The draft is accepted where it picks the full model's
# greedy token, on the full model's own prefixes, so references train it on prefixes it is
# never asked about at decode time.
#
#   train/commongen_onpolicy_proxy.sh PLAIN_MODEL OUT [STEPS]
#
#   1. OUT/onpolicy_pairs.jsonl: PLAIN_MODEL's greedy continuation (vanilla, up to 40
#      tokens) of every distinct CommonGen train concept set, as source/target pairs;
#   2. OUT/reference and OUT/onpolicy: STEPS (default 500) steps of stage 1 of the current
#      recipe (train/commongen_schedule_aware_ft.sh: both paths on every batch, the
#      schedule's loss distilled from the full model's, 3e-4, seed 1) from PLAIN_MODEL,
#      on CommonGen train's references and on OUT/onpolicy_pairs.jsonl; nothing else differs;
#   3. both runs' HSD s=2 drafts' acceptance at k = 1 on dev's selection half, then both,
#      and PLAIN_MODEL's vanilla, decoded there (beam 4, the rows of eval/commongen_small.sh).
#
# A proxy: the figures compare the two data at equal steps, not with the full recipe.
# Every step resumes (run the same command again to continue).
set -euo pipefail
USAGE="PLAIN_MODEL OUT [STEPS]"
source "$(dirname "$0")/lib.sh"
args 2 3 "$@"
path_arg PLAIN "${POS[0]}" in
path_arg OUT "${POS[1]}" out
STEPS="${POS[2]:-500}"
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || usage_error "STEPS is a positive whole number of steps, not '$STEPS'"
need hsd-jax
need python
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
NEW_TOKENS=40  # every decode here, as eval/commongen_small.sh's

if [ ! -s "$OUT/train_sources.jsonl" ]; then
  python - "$OUT/train_sources.jsonl" <<'EOF2'
import sys
from hsd_jax.data import load_dataset_sources
from hsd_jax.io import write_jsonl
write_jsonl(sys.argv[1], ({"source": s} for s in load_dataset_sources("common_gen", "train", "--train-file")))
EOF2
fi
echo "== targets: the plain model's greedy continuations" >&2
run hsd-jax generate --model "$PLAIN" --seq2seq --input-file "$OUT/train_sources.jsonl" --field source \
  --max-new-tokens "$NEW_TOKENS" --batch-size 64 --output "$OUT/targets.jsonl" --resume > /dev/null
# generate's rows hold the prompt with its separator: pair each continuation with its source
# again, leaving out those the token limit cut before their EOS.
python - "$OUT" "$NEW_TOKENS" <<'EOF2'
import sys
from pathlib import Path
from hsd_jax.io import read_jsonl_rows, write_jsonl
out, limit = Path(sys.argv[1]), int(sys.argv[2])
sources, rows = read_jsonl_rows(out / "train_sources.jsonl"), read_jsonl_rows(out / "targets.jsonl")
pairs = [{"source": s["source"], "target": r["text"]} for s, r in zip(sources, rows, strict=True) if len(r["tokens"]) < limit]
write_jsonl(out / "onpolicy_pairs.jsonl", pairs)
print(f"{len(pairs)} of {len(rows)} continuations ended within {limit} tokens", file=sys.stderr)
EOF2

# Stage 1 of train/commongen_schedule_aware_ft.sh (commongen_finetune.sh joint), cut at STEPS;
# no validation loss, as the two runs' data differ.
STAGE1=(--mode full --epochs 1 --max-steps "$STEPS" --batch-size 32 --learning-rate 3e-4 --weight-decay 0.01
        --seed 1 --save-every 250 --skip-aware paper hsd:s=2,min=0,max=2,T=72 hsd:s=2,min=0,max=1,T=72
        --skip-aware-joint --skip-aware-distill 1.0 --resume)
echo "== reference: $STEPS steps on the references" >&2
run hsd-jax train --model "$PLAIN" --dataset common_gen --split train "${STAGE1[@]}" --output "$OUT/reference"
echo "== onpolicy: $STEPS steps on the plain model's own continuations" >&2
run hsd-jax train --model "$PLAIN" --train-file "$OUT/onpolicy_pairs.jsonl" "${STAGE1[@]}" --output "$OUT/onpolicy"

DRAFTS=(hsd:s=2,min=0,max=1,T=72 hsd:s=2,min=0,max=4,T=72)
echo "== acceptance at k = 1 on the selection half" >&2
[ -s "$OUT/acceptance/speculative.json" ] || run python eval/speculative_acceptance.py --models reference="$OUT/reference" onpolicy="$OUT/onpolicy" \
  --drafts "${DRAFTS[@]}" --k 1 --dataset common_gen --split validation:selection \
  --max-new-tokens "$NEW_TOKENS" --output "$OUT/acceptance"
for name in reference onpolicy; do
  echo "== $name: dev's selection half" >&2
  run hsd-jax eval --model "$OUT/$name" --dataset common_gen --split validation:selection \
    --schedules paper paper-hsd-warmup hsd:s=2,min=0,max=2,T=72 hsd:s=2,min=0,max=1,T=72 --num-beams 4 --max-new-tokens "$NEW_TOKENS" \
    --batch-size 32 --no-bertscore --predictions-only --resume --output "$OUT/$name-selection" > /dev/null
done
echo "== the plain model's vanilla on the selection half" >&2
run hsd-jax eval --model "$PLAIN" --dataset common_gen --split validation:selection --schedules vanilla \
  --num-beams 4 --max-new-tokens "$NEW_TOKENS" --batch-size 32 --no-bertscore --predictions-only --resume \
  --output "$OUT/plain-selection" > /dev/null
python eval/holdout_report.py "$OUT/reference-selection" "$OUT/onpolicy-selection" "$OUT/plain-selection" \
  --output "$OUT/holdout.md" > /dev/null
cat "$OUT/acceptance/speculative.md" "$OUT/holdout.md"
