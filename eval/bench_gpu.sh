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
# Extra arguments go to `hsd-jax bench` (e.g. --repeats 5, --json PATH).
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
exec timeout --signal=INT 470 "$PY" -m hsd_jax.cli bench --suite gpu --max-seconds 330 \
  --json runs/bench/gpu.json "$@"
