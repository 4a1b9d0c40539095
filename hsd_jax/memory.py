"""Peak resident memory of a model loaded and decoding: is there one copy of the weights?

    python -m hsd_jax.memory --model gpt2-large        # or: hsd-jax bench --memory gpt2-large

Each measurement runs in a fresh process, because the peak resident set size
(`ru_maxrss`) only ever grows. That process imports JAX and hsd-jax and decodes with a
tiny model first, so the runtime's baseline (the interpreter, XLA, the compiler) is
measured before the model exists; then it loads the benchmark architecture with random
weights (written to a temporary Hugging Face folder by another process, so the drawing
does not count) in the decode layout, and decodes greedily. The report compares the
peak with the bound the design promises: baseline + 1.2 x (weight bytes + KV cache).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _save_random(arch: str, folder: Path) -> None:
    from hsd_jax.bench import random_model

    random_model(arch).save_pretrained(folder)


def _measure(arch: str, folder: Path, batch: int, prompt_len: int, new_tokens: int) -> dict:
    import jax
    import numpy as np

    import hsd_jax
    from hsd_jax.bench import model_config, random_model

    # The runtime's baseline: a whole decode (compile included) with a tiny model.
    tiny = random_model("tiny-gpt2")
    hsd_jax.generate(tiny, input_ids=[[1, 2, 3]], max_new_tokens=2, eos_token_id=None)
    del tiny
    baseline = _peak_bytes()

    lm = hsd_jax.load(folder, tokenizer=False, layout="decode")
    loaded = _peak_bytes()
    weights = sum(x.nbytes for x in jax.tree.leaves(lm.params))
    _, config = model_config(arch)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt_len)).tolist()
    out = hsd_jax.generate(lm, input_ids=ids, max_new_tokens=new_tokens, eos_token_id=None,
                           devices=1)  # the bound counts one copy of the weights
    cache_len = prompt_len + new_tokens
    kv = 2 * config.num_layers * batch * config.num_heads * cache_len * config.head_dim * 4
    peak = _peak_bytes()
    bound = baseline + 1.2 * (weights + kv)
    return {"model": arch, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "layout": lm.layout, "weight_bytes": weights, "kv_cache_bytes": kv, "baseline_bytes": baseline,
            "peak_after_load_bytes": loaded, "peak_bytes": peak, "bound_bytes": int(bound),
            "peak_over_baseline_per_weight_and_kv": (peak - baseline) / (weights + kv),
            "within_bound": peak <= bound, "tokens": out.num_tokens}


def measure(arch: str = "gpt2-large", batch: int = 1, prompt_len: int = 32, new_tokens: int = 32) -> dict:
    """Runs the measurement in fresh processes (see the module docstring); returns its report."""
    with tempfile.TemporaryDirectory(prefix="hsd-memory-") as tmp:
        folder = Path(tmp) / arch
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        for step in (["--save", str(folder)], ["--measure", str(folder)]):
            cmd = [sys.executable, "-m", "hsd_jax.memory", "--model", arch, "--batch", str(batch),
                   "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens), *step]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def format_report(r: dict) -> str:
    gib = 2.0 ** 30
    return (f"{r['model']} (batch {r['batch']}, {r['prompt_len']}+{r['new_tokens']} tokens, {r['layout']} layout): "
            f"weights {r['weight_bytes'] / gib:.2f} GiB, KV cache {r['kv_cache_bytes'] / gib:.3f} GiB, "
            f"runtime baseline {r['baseline_bytes'] / gib:.2f} GiB; peak {r['peak_bytes'] / gib:.2f} GiB = baseline + "
            f"{r['peak_over_baseline_per_weight_and_kv']:.2f} x (weights + KV); bound (baseline + 1.2 x) "
            f"{r['bound_bytes'] / gib:.2f} GiB: {'within' if r['within_bound'] else 'OVER'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-large", help="a benchmark architecture (default: gpt2-large)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.save:
        _save_random(args.model, Path(args.save))
        return 0
    if args.measure:
        print(json.dumps(_measure(args.model, Path(args.measure), args.batch, args.prompt_len, args.new_tokens)))
        return 0
    report = measure(args.model, args.batch, args.prompt_len, args.new_tokens)
    print(format_report(report))
    if args.json:
        from hsd_jax.io import write_json

        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
