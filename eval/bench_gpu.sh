#!/usr/bin/env bash
# GPU benchmark: GPT-2 large and Phi-2 architectures (random weights, bfloat16), batch 1
# and 32 greedy and beam 4 at batch 1, prompt 32, 64 new tokens; vanilla and HSD
# (hsd-s1-20), each under compiled (a lax.switch per layer: a host sync per layer on
# GPU) and static (straight-line segments) mode. Prints one table per case and writes
# runs/bench/gpu.json after every case. Sized for under 8 minutes on one H200: cases
# that would start after --max-seconds are skipped (and listed as skipped).
#
#   eval/bench_gpu.sh              # on the GPU machine
#   eval/bench_gpu.sh --dry-run    # tiny models of the same families, 1 repeat: runs on CPU in ~2 min
#
# Then self-speculative greedy decoding (`draft=`, docs/methods.md), the speculative-gpu
# suite: a trained model's vanilla compiled greedy against HSD / SkipDecode drafts x k = 1..4,
# batch 1 and 32, in the same rounds (runs/bench/gpu-speculative.json). The model is
# $SPEC_MODEL, by default the offline demo's plain model (hsd-jax-demo/plain/model), which the
# script trains first when it is absent (`hsd-jax demo`: ~4 min on 2 CPU cores). Sized for under 4
# more minutes (`--max-seconds 150`, `timeout 230`), training apart.
#
# With several GPUs visible, last, data-parallel decoding (the devices-gpu suite): compiled
# vanilla on one GPU against all of them, each GPU the case's batch (GPT-2 large and Phi-2,
# bfloat16, batch 32 greedy and 8 x beam 4 per GPU), inputs per second side by side and the
# tokens compared (runs/bench/gpu-devices.json). Under 4 more minutes; skipped on one GPU.
#
# Extra arguments go to every `hsd-jax bench` run (e.g. --repeats 5, --dry-run); --json
# applies to the first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Let XLA take what it needs on the device instead of 75% up front (Phi-2 needs ~12 GB).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
"$PY" -c "import jax; print('backend:', jax.default_backend(), jax.devices())"
status=0
timeout --signal=INT 470 "$PY" -m hsd_jax.cli bench --suite gpu --max-seconds 330 \
  --json runs/bench/gpu.json "$@" || status=$?

SPEC_MODEL="${SPEC_MODEL:-hsd-jax-demo/plain/model}"
spec_args=()  # the extra arguments but --json, which names the first run's file
skip=0
for a in "$@"; do
  if [ "$skip" = 1 ]; then skip=0; continue; fi
  case "$a" in --json) skip=1 ;; --json=*) ;; *) spec_args+=("$a") ;; esac
done
if [[ " $* " != *" --dry-run "* && ! -d "$SPEC_MODEL" ]]; then
  echo "no model at $SPEC_MODEL: training the offline demo's (hsd-jax demo --output hsd-jax-demo)"
  "$PY" -m hsd_jax.cli demo --output hsd-jax-demo
fi
timeout --signal=INT 230 "$PY" -m hsd_jax.cli bench --suite speculative-gpu --model "$SPEC_MODEL" \
  --max-seconds 150 --json runs/bench/gpu-speculative.json ${spec_args[@]+"${spec_args[@]}"} || status=$?

devices=$("$PY" -c "import jax; print(len(jax.local_devices()))")
if [ "$devices" -gt 1 ] || [[ " $* " == *" --dry-run "* ]]; then
  timeout --signal=INT 230 "$PY" -m hsd_jax.cli bench --suite devices-gpu --max-seconds 150 \
    --json runs/bench/gpu-devices.json ${spec_args[@]+"${spec_args[@]}"} || status=$?
else
  echo "one device: the multi-GPU case (--suite devices-gpu) is skipped"
fi
exit "$status"
