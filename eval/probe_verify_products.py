"""Probe: what a product of T rows costs against a one-row product on this backend.

Self-speculative decoding verifies k + 1 positions in one pass; it can only beat vanilla
if that pass costs about one decode step, i.e. if x (T, I) . W (O, I) costs about what one
row does. Times, per matrix, a chain of N distinct (O, I) matrices (more than the CPU
cache, like a model's layers) as: XLA's dot ("dot"), a multiply-and-reduce over I written
two ways ("red", "red_t"), and T one-row dots ("rows"). docs/performance.md, "The
ceiling on this CPU", quotes its figures.

    python eval/probe_verify_products.py 256 768 40    # the CommonGen model's c_attn
    python eval/probe_verify_products.py 768 2304 20   # GPT-2 small's
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/_cli.py
from _cli import Parser  # noqa: E402

p = Parser(__file__, description=__doc__.split("\n\n")[0])
p.add_argument("I", type=int, help="the matrices' input width")
p.add_argument("O", type=int, help="their output width")
p.add_argument("N", type=int, help="how many distinct matrices (more than the CPU cache holds)")
args = p.parse_args()
I, O, N = args.I, args.O, args.N

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
ws = [jnp.asarray(np.random.randn(O, I).astype(np.float32) * 0.02) for _ in range(N)]

def dot(x, w): return jnp.einsum("ti,oi->to", x, w)
def red(x, w): return jnp.sum(x[:, None, :] * w[None, :, :], axis=-1)         # (T,O) reduce I
def red_t(x, w): return jnp.sum(w[:, None, :] * x[None, :, :], axis=-1).T     # (O,T) reduce I
def rows(x, w): return jnp.concatenate([jnp.einsum("ti,oi->to", x[t:t+1], w) for t in range(x.shape[0])], 0)

def chain(f):
    @jax.jit
    def run(x, ws):
        acc = jnp.zeros((x.shape[0], O), jnp.float32)
        for w in ws:  # a dependency chain, as layers are
            y = f(x + 1e-9 * acc[:, :1], w)
            acc = acc + y
        return acc
    return run

for T in (1, 2, 3, 5):
    x = jnp.asarray(np.random.randn(T, I).astype(np.float32))
    res = {}
    for name, f in [("dot", dot), ("red", red), ("red_t", red_t), ("rows", rows)]:
        run = chain(f)
        out = run(x, ws).block_until_ready()
        best = 1e9
        for _ in range(15):
            s = time.perf_counter(); run(x, ws).block_until_ready(); best = min(best, time.perf_counter() - s)
        res[name] = best * 1e6 / N
        if name != "dot":
            ref = chain(dot)(x, ws)
            assert np.allclose(out, ref, rtol=1e-3, atol=1e-3), name
    print(f"I={I} O={O} T={T}: " + "  ".join(f"{k} {v:6.1f}us" for k, v in res.items()), flush=True)
