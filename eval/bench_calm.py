"""Side-by-side decode speed: vanilla vs CALM on a random GPT-2-small-sized model.

    .venv/bin/python eval/bench_calm.py [--new-tokens 32] [--prompt-len 16] [--batch 1]

A random model is never confident, so a CALM run with lambda > 0 would run every layer;
`calm:lambda=0,min_exit=M` exits after exactly M layers at every decode step, which
shows what the dynamic loop costs and saves at a known depth. `calm:lambda=2` never
exits: all layers plus a softmax-response test (LM head) after each one, CALM's
overhead. The mask run executes the same layers as the min_exit=6 CALM run from a
static schedule, for comparison. Each row: one warm-up (compile) run, then the median
of `--repeats` timed runs; tokens/s counts generated tokens over prefill + decode,
compile excluded (`Generation.tokens_per_second`).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_cli.py, when imported from elsewhere
from _cli import Parser  # noqa: E402

import numpy as np  # noqa: E402


def make_model(folder: Path, layers: int, width: int, heads: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=heads)).eval().save_pretrained(folder)


def main(argv=None) -> int:
    ap = Parser(__file__, description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--specs", nargs="*",
                    default=["vanilla", "calm:lambda=0,min_exit=6", "calm:lambda=0,min_exit=3", "calm:lambda=2",
                             "mask:6"],
                    help="schedules to time; 'mask:M' = a static schedule running the first M layers")
    args = ap.parse_args(argv)

    import jax

    import hsd_jax

    with tempfile.TemporaryDirectory() as tmp:
        make_model(Path(tmp), args.layers, args.width, args.heads)
        lm = hsd_jax.load(tmp)
    L = lm.config.num_layers
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, lm.config.vocab_size, (args.batch, args.prompt_len)).tolist()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), model: random GPT-2 "
          f"{L} layers, d={args.width}, vocab {lm.config.vocab_size}; batch {args.batch}, beams {args.num_beams}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'schedule':34s} {'avg layers':>10s} {'tokens/s':>9s} {'ms/token':>9s} {'compile s':>9s}")
    base = None
    for spec in args.specs:
        sched = spec
        if spec.startswith("mask:") and spec[5:].isdigit():
            sched = np.zeros((args.new_tokens, L), bool)
            sched[:, : int(spec[5:])] = True

        def once():
            return hsd_jax.generate(lm, input_ids=prompts, schedule=sched, num_beams=args.num_beams,
                                    max_new_tokens=args.new_tokens, eos_token_id=None)

        warm = once()
        runs = [once() for _ in range(args.repeats)]
        tps = statistics.median(g.tokens_per_second for g in runs)
        base = tps if base is None else base
        print(f"{spec:34s} {warm.avg_layers:10.2f} {tps:9.1f} {1000 * args.batch / tps:9.2f} "
              f"{warm.compile_seconds:9.1f}   x{tps / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
