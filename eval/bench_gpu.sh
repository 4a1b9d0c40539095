#!/usr/bin/env bash
# usage: eval/bench_gpu.sh [--dry-run] [--results DIR] [--budget SECONDS] [--help]
#
# The GPU benchmark of issue 35, sized to one device call: GPT-2 large (36 layers) and Phi-2
# (32 layers) architectures, random weights in bfloat16, prompt 128, 128 new tokens, EOS off;
# greedy at batch 1, 32, 8 (64 if time is left) and beam 4 at batch 1 and 8; vanilla, the
# paper's HSD s=1 / s=2 and SkipDecode presets, each in compiled and static mode, and CALM's
# state measure near half depth; transformers' generate on CUDA beside them (dynamic cache in
# every case, then the static cache at batch 1 if time is left). Per run: tokens/s, ms/step,
# compile seconds, Avg. Layer, the ratios to transformers, the fraction of the ideal speedup
# (layers / Avg. Layer, by weight bytes), the fraction of the device's peak HBM bandwidth
# (weights + KV per step), and the conditionals / while loops per decode step in the compiled
# programs' HLO. The suites are `gpu` and `gpu-hf-static` in hsd_jax/bench/suites.py.
#
# Cases run by value and each is skipped (and listed as skipped) when it would end past the
# budget; results are rewritten atomically after every case, so a call cut short keeps the
# finished ones. Written to --results DIR (default: $OUT when set, else runs/bench/gpu):
#   gpu.json, gpu-hf-static.json   every case's figures (hsd-jax bench's JSON)
#   log.txt                        the progress and the tables as printed
#   versions.txt                   device, driver (nvidia-smi), jax, jaxlib, torch, transformers
#
# It installs nothing: it uses $PYTHON, else .venv/bin/python, else python3 (on the device
# machine: python3 with jax[cuda], torch and transformers preinstalled), with this checkout on
# PYTHONPATH. Without a CUDA backend in JAX it says so in one line and stops (--dry-run runs
# tiny models of both families on the CPU instead: about a minute).
#
# For a session lent a GPU: one device call, kind left out (H100 or H200; the device is recorded),
#   run(command="PYTHONUNBUFFERED=1 eval/bench_gpu.sh", timeout_s=480)
# The budget (440 s by default, start-up and the transformers baseline included) ends the
# script within about 7.5 minutes; the files come back from $OUT even if the call is cut short.
# Then commit eval/results/gpu/<device>-<date>.json from gpu.json (issue 35, item 6).
#
# Not in this call (run them separately when there is time): self-speculative decoding
# (`hsd-jax bench --suite speculative-gpu --model FOLDER`, which needs a trained model) and
# data parallel decoding on several GPUs (`hsd-jax bench --suite devices-gpu`).
#
# SIGINT / SIGTERM are passed on to the running benchmark (which stops after writing what it
# finished); the script exits only once it has stopped.
set -uo pipefail

usage() { sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p}}' "$0"; }
dry_run=0
results=""
budget=440
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --results) [ $# -ge 2 ] || { echo "eval/bench_gpu.sh: --results needs a folder; see --help" >&2; exit 2; }
               results="$2"; shift ;;
    --results=*) results="${1#--results=}" ;;
    --budget) [ $# -ge 2 ] || { echo "eval/bench_gpu.sh: --budget needs seconds; see --help" >&2; exit 2; }
              budget="$2"; shift ;;
    --budget=*) budget="${1#--budget=}" ;;
    *) echo "eval/bench_gpu.sh: unknown argument '$1' (it takes --dry-run, --results DIR, --budget SECONDS); see --help" >&2
       exit 2 ;;
  esac
  shift
done
case "$budget" in
  ''|*[!0-9]*) echo "eval/bench_gpu.sh: --budget must be whole seconds, got '$budget'" >&2; exit 2 ;;
esac
if [ -z "$results" ]; then results="${OUT:-runs/bench/gpu}"; fi

cd "$(dirname "$0")/.." || exit 1
repo="$(pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$results" || { echo "eval/bench_gpu.sh: cannot create the results folder $results" >&2; exit 1; }
results="$(cd "$results" && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Let XLA take what it needs instead of 75% of the GPU up front: PyTorch shares the device.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
log="$results/log.txt"
: > "$log"

# One child at a time; a signal to this script is passed on as SIGINT (the benchmark then writes
# what it finished and exits 130), then SIGTERM after 30 s and SIGKILL after 45 s in case it is
# deep inside a compile. Job control (set -m) gives the child SIGINT's default handling, which
# a non-interactive shell would otherwise make it ignore.
set -m
child=""
stopping=0
watchdog=""
forward() {
  [ "$stopping" = 1 ] && return
  stopping=1
  [ -n "$child" ] || return
  kill -INT "$child" 2>/dev/null
  ( trap 'kill $s 2>/dev/null; exit 0' TERM
    sleep 30 & s=$!; wait $s; kill -TERM "$child" 2>/dev/null
    sleep 15 & s=$!; wait $s; kill -KILL "$child" 2>/dev/null ) &
  watchdog=$!
}
trap forward INT TERM

run_child() {  # runs "$@" in the background, its output into the log too; returns its exit status
  "$@" > >(tee -a "$log") 2>&1 &
  child=$!
  local status
  while :; do
    wait "$child"; status=$?
    kill -0 "$child" 2>/dev/null || break  # exited; else a trap ended the wait: wait again
  done
  child=""
  if [ -n "$watchdog" ]; then kill "$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null; watchdog=""; fi
  return "$status"
}

run_child "$PY" - "$results/versions.txt" <<'EOF'
import os, platform, subprocess, sys
lines = [f"python {platform.python_version()} ({sys.executable})"]
for name in ("jax", "jaxlib", "flax", "torch", "transformers", "numpy"):
    try:
        lines.append(f"{name} {__import__(name).__version__}")
    except Exception as err:  # absent or broken: say which
        lines.append(f"{name}: {type(err).__name__}: {err}")
try:
    import jax
    lines.append(f"jax backend {jax.default_backend()}: {jax.devices()}")
except Exception as err:
    lines.append(f"jax backend: {type(err).__name__}: {err}")
try:
    import torch
    lines.append(f"torch cuda {torch.version.cuda}, available {torch.cuda.is_available()}")
except Exception:
    pass
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20)
    lines.append("nvidia-smi: " + (smi.stdout.strip() or smi.stderr.strip()))
except (OSError, subprocess.SubprocessError) as err:
    lines.append(f"nvidia-smi: {err}")
lines.append(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
[ "$stopping" = 1 ] && exit 130

backend=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null | tail -1)
if [ -z "$backend" ]; then
  echo "eval/bench_gpu.sh: $PY cannot import jax (see $results/versions.txt); set PYTHON to a Python with jax" | tee -a "$log" >&2
  exit 1
fi
extra=()
if [ "$dry_run" = 1 ]; then
  extra=(--dry-run)
elif [ "$backend" != gpu ]; then
  echo "eval/bench_gpu.sh: JAX has no CUDA backend here (backend: $backend): install jax[cuda12] or jax[cuda13] matching the driver, or run --dry-run" | tee -a "$log" >&2
  exit 1
fi

# The budget: the gpu suite gets what is left after start-up and a reserve for the static
# cache case; that case runs with what is left then (it is skipped if it would not fit).
main=$(( budget - SECONDS - 130 ))
[ "$main" -lt 30 ] && main=30
status=0
run_child "$PY" -m hsd_jax.cli bench --suite gpu --max-seconds "$main" --json "$results/gpu.json" "${extra[@]}" || status=$?
[ "$stopping" = 1 ] && exit "${status:-130}"
left=$(( budget - SECONDS - 15 ))
if [ "$left" -gt 20 ]; then
  run_child "$PY" -m hsd_jax.cli bench --suite gpu-hf-static --max-seconds "$left" --json "$results/gpu-hf-static.json" \
    "${extra[@]}" || status=$?
else
  echo "transformers with the static cache: skipped, ${left}s of the budget left" | tee -a "$log"
fi
[ "$stopping" = 1 ] && exit 130
echo "results in $results" | tee -a "$log"
exit "$status"
