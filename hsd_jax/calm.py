"""CALM (Schuster et al. 2022): early exit decided at run time inside the decode loop.

Each decode step runs its layers in order. After every layer from the `min_exit`-th
on, it measures the softmax response of the exited hidden state (top-1 minus top-2
probability of `softmax(head(h))`) and exits once the least confident live row
reaches the step's threshold `λ_t`: one scalar decision per step, as in CALM's
released t5x code. A live row is one whose next token can still change the output:
every beam of every input, but not a greedy row that has emitted EOS (it only emits
pad from then on); with no live row the step exits as early as allowed. The layers
above the exit run no attention or MLP, but their KV entries at this position are
filled by state propagation (the family's `kv` of the exited hidden state), so later
steps that run those layers attend to a complete cache. The token's logits are the
exit layer's.

CALM is a step strategy of the decode engine (`CalmSteps`, see `hsd_jax.engine`), in
three forms over the same primitives (the family's `block`, `kv` and `head`), all
reading the weights in the decode layout (`hsd_jax.models.decode_layout`):

- compiled: the step unrolls the layers, each a `lax.cond` on whether the step has
  exited (run the layer, or propagate its K/V), then a `lax.cond` that runs the LM
  head and the exit test while the step has not exited (`calm_layers`). The
  thresholds (N,) and `min_exit` are arguments, so every CALM setting reuses one
  program per search and shape.
- static: CALM has no schedule to bake in, so "static" runs the compiled program
  (the same executable; its exit point is data dependent by nature).
- eager: plain Python over steps and layers, deciding each exit on the host; the
  reference the compiled loop is checked against (same tokens, same layers).

Thresholds (docs/methods.md): `λ_t = clip(0.9 λ + 0.1 exp(-τ t / N), 0, 1)` at decode step
t, with two endpoint rules **(choice)** so that the extremes mean what a user expects:
`λ = 0` exits as early as allowed at every step (the decay term alone would keep a
threshold of up to 0.1), and `λ > 1`, or any step whose `λ_t` reaches the clip
ceiling 1, never exits while a row is live (a confidence of exactly 1 can only come
from float rounding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hsd_jax.models import KVCache, ModelConfig, context, family
from hsd_jax.schedules import CalmConfig


def step_thresholds(calm: CalmConfig, max_new_tokens: int) -> np.ndarray:
    """(N,) float32 exit threshold of each decode step, endpoint rules applied.

    A step exits when its confidence is >= its threshold; `inf` means it never exits.
    """
    if calm.lam == 0:
        return np.zeros((max_new_tokens,), np.float32)
    if calm.lam > 1:
        return np.full((max_new_tokens,), np.inf, np.float32)
    thr = calm.thresholds(max_new_tokens)
    return np.where(thr >= 1.0, np.inf, thr).astype(np.float32)


def confidence(logits: jax.Array) -> jax.Array:
    """Softmax response of (R, V) logits: top-1 minus top-2 probability, (R,) float32.

    Computed as (1 - exp(l2 - l1)) / sum(exp(l - l1)) from the two largest logits
    l1 >= l2: two reductions instead of a `top_k` over the vocabulary (which costs
    more than the LM head itself on CPU). Tied maxima give 0.
    """
    x = logits.astype(jnp.float32)
    top = jnp.max(x, axis=-1, keepdims=True)  # (R, 1)
    z = jnp.sum(jnp.exp(x - top), axis=-1)  # (R,)
    first = jnp.argmax(x, axis=-1)[:, None]
    second = jnp.max(jnp.where(jnp.arange(x.shape[-1]) == first, -jnp.inf, x), axis=-1)
    return (1.0 - jnp.exp(second - top[:, 0])) / z


def confident(logits: jax.Array, threshold, live: jax.Array) -> jax.Array:
    """The exit test, () bool: every live row's confidence reaches `threshold`.

    Rows that are not live are left out (they no longer change the output), so with
    none live the step exits as early as allowed.
    """
    return jnp.all((confidence(logits) >= threshold) | ~live)


def calm_layers(params, config: ModelConfig, h, ctx, cache: KVCache, threshold, min_exit, live):
    """One decode step's layers with a data-dependent exit (traceable).

    params: the decode layout (`hsd_jax.models.decode_layout`); h: (R, 1, D) embedded
    tokens; threshold: () float32; min_exit: () int32, the fewest layers the step
    runs; live: (R,) bool, the rows the exit test looks at (`confident`). Returns the
    exit layer's (R, V) float32 logits, the cache with every layer's K/V written at
    `cache.index` (run or propagated) and the number of layers run, () int32.

    The layers are unrolled, each a `lax.cond` on whether the step has exited: run
    the layer, or only propagate its K/V from the exited state. With the layer index
    static, each layer reads its own weight and cache buffers and writes its cache
    outside the cond (no branch carries the cache, which would make XLA copy it). The
    exit test after a layer is a `lax.cond` too, so the LM head runs only while the
    step has not exited and at or after `min_exit`.
    """
    fam = family(config)
    num_layers = config.num_layers
    exited = jnp.zeros((), bool)
    n = jnp.asarray(num_layers, jnp.int32)
    logits = jnp.zeros((h.shape[0], config.vocab_size), jnp.float32)
    for l, p in enumerate(params["layers"]):
        h, k, v = jax.lax.cond(
            exited,
            lambda h, p=p: (h, *fam.kv(p, h, ctx, config)),
            lambda h, p=p, l=l: fam.block(p, h, ctx, config, cache.k[l], cache.v[l]),
            h,
        )
        cache = cache.write_layer(l, k, v)

        def test(h, logits, l=l):
            out = fam.head(params, h, config)[:, -1]  # (R, V)
            return out, (l + 1 == num_layers) | confident(out, threshold, live)

        logits, now = jax.lax.cond(~exited & (l + 1 >= min_exit), test,
                                   lambda h, logits: (logits, jnp.zeros((), bool)), h, logits)
        n = jnp.where(now, l + 1, n)
        exited = exited | now
    return logits, cache, n


def calm_step(config: ModelConfig, thresholds, min_exit):
    """A decode-loop step (`hsd_jax.engine.StepFn`) that exits early, CALM style.

    thresholds: (N,) float32 (traced or not), indexed by the decode step t.
    """

    def step(params, tokens, cache, t, live):
        fam = family(config)
        new_mask = jnp.ones((tokens.shape[0], 1), bool)
        ctx = context(cache, new_mask)
        h = fam.embed(params, tokens[:, None], ctx.positions, config)
        logits, cache, n = calm_layers(params, config, h, ctx, cache, thresholds[t], min_exit, live)
        return logits, cache.advance(new_mask), n

    return step


def eager_step(params, config: ModelConfig, tokens, cache: KVCache, threshold: float, min_exit: int, live):
    """The reference step: Python over layers, the exit decided on the host.

    Same contract as `calm_step`'s step (tokens and live rows apart; params in the
    decode layout); `threshold` is the step's float32 threshold.
    """
    fam = family(config)
    new_mask = jnp.ones((tokens.shape[0], 1), bool)
    ctx = context(cache, new_mask)
    h = fam.embed(params, tokens[:, None], ctx.positions, config)
    threshold = np.float32(threshold)
    layers = params["layers"]
    n, logits = config.num_layers, None
    for l in range(config.num_layers):
        h, k, v = fam.block(layers[l], h, ctx, config, cache.k[l], cache.v[l])
        cache = cache.write_layer(l, k, v)
        if l + 1 < min_exit:
            continue
        logits = fam.head(params, h, config)[:, -1]
        if l + 1 == config.num_layers or bool(confident(logits, threshold, live)):
            n = l + 1
            break
    for l in range(n, config.num_layers):
        k, v = fam.kv(layers[l], h, ctx, config)
        cache = cache.write_layer(l, k, v)
    return logits, cache.advance(new_mask), n


@dataclasses.dataclass(frozen=True)
class CalmSteps:
    """CALM as a step strategy of the decode engine (`hsd_jax.engine.Strategy`).

    "static" runs the compiled program too (CALM has no schedule to bake in). The
    program is keyed without lambda, tau or min_exit: they are arguments, so changing
    them does not recompile.
    """

    calm: CalmConfig
    max_new_tokens: int

    def program_key(self):
        return ("calm",)

    def arguments(self) -> tuple:
        return (jnp.asarray(self._thresholds()), jnp.asarray(self.calm.min_exit, jnp.int32))

    def decode(self, params, config, search, state, step_layers, loop, thresholds, min_exit):
        return loop(params, search, state, step_layers, calm_step(config, thresholds, min_exit))

    def eager_step(self, params, config, tokens, cache, t, live):
        return eager_step(params, config, tokens, cache, self._thresholds()[t], self.calm.min_exit, live)

    def _thresholds(self) -> np.ndarray:
        return step_thresholds(self.calm, self.max_new_tokens)
