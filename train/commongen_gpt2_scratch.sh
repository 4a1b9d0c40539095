#!/usr/bin/env bash
# A small from-scratch reproduction on CommonGen: a 6-layer, 512-wide GPT-2 drawn at
# random (train/gpt2_commongen_scratch.json, 128-token context: CommonGen rows are
# under 64 tokens) with the GPT-2 tokenizer, trained on CommonGen train, validation
# loss on dev. Minutes on one GPU; hours on a CPU.
#
#   TOKENIZER=path/to/gpt2-folder OUT=runs/commongen-scratch train/commongen_gpt2_scratch.sh
#
# Settings chosen here (not the paper's, which fine-tunes pretrained models): a
# from-scratch model wants a larger learning rate and more epochs. Re-running the script
# resumes the run in $OUT where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
hsd-jax train \
  --model random:train/gpt2_commongen_scratch.json \
  --tokenizer "${TOKENIZER:-gpt2}" \
  --dataset common_gen --split train --eval-split validation --eval-every 1000 --eval-limit 1000 \
  --mode full --epochs "${EPOCHS:-10}" --batch-size "${BATCH:-64}" --learning-rate "${LR:-5e-4}" \
  --warmup-steps 500 --seed "${SEED:-0}" \
  --save-every 1000 --resume --output "${OUT:-runs/commongen-gpt2-scratch}" "$@"
