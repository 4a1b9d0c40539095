#!/usr/bin/env bash
# The small CommonGen reproduction's model: a 12-layer, 256-wide GPT-2
# (train/gpt2_commongen_small.json, 64-token context: every CommonGen row fits in 52
# tokens) drawn at random and trained on CommonGen train, with a 4,096-token byte-level
# BPE learned on the same training pairs (--tokenizer bpe:4096) and saved with the model.
# About 50 minutes on a 2-core CPU; deterministic for a seed.
#
#   train/commongen_small.sh OUT            # OUT ends as a Hugging Face model folder
#   eval/commongen_small.sh OUT RESULTS     # then the paper's table on CommonGen dev
#
# Why these settings (not the paper's, which fine-tunes pretrained models): with GPT-2's
# 50,257-token vocabulary the embedding and LM head cost more than all twelve layers of
# a 256-wide model; a 4,096-token BPE buys five epochs in the hour instead of one. A
# from-scratch model wants a larger learning rate than fine-tuning. Running the script
# again resumes the run in OUT where it stopped; extra flags are appended.
set -euo pipefail
USAGE="OUT [hsd-jax train flags]"
source "$(dirname "$0")/lib.sh"
args 1 1 "$@"
path_arg OUT "${POS[0]}" out
need hsd-jax
cd "$(dirname "$0")/.."
exec hsd-jax train \
  --model random:train/gpt2_commongen_small.json --tokenizer bpe:4096 \
  --dataset common_gen --split train --eval-split validation --eval-every 1000 --eval-limit 1000 \
  --mode full --epochs 5 --batch-size 32 --learning-rate 1e-3 --weight-decay 0.01 --seed 0 \
  --save-every 500 --resume --output "$OUT" ${EXTRA[@]+"${EXTRA[@]}"}
