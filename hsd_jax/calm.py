"""CALM (Schuster et al. 2022): early exit decided at run time inside the decode loop.

Each decode step runs its layers in order and, after the layers it may test at, asks
every row that has not exited yet whether it is confident enough to exit there
(`CalmConfig`, docs/methods.md):

- **measure** "softmax" (the paper's softmax response, the default): top-1 minus top-2
  probability of `softmax(head(h))` at the tested layer. Costs an LM head per tested
  layer (V x D weights, for GPT-2 small about 5 layers' worth), which the exit must
  win back. "state" (hidden-state saturation, also CALM's): the cosine similarity of
  the row's hidden state before and after the layer; a D-vector dot, no weights read.
- **where** it tests: after layers `min_exit`, `min_exit + every`, ... below the last
  (a row that reaches the last layer exits there; its logits need no test).
- **exit** "row" (the default): each row, i.e. each beam of each input, exits at its
  own layer, so a sequence's tokens and layers do not depend on the other sequences
  of its batch. "batch": one decision per step, the step exits once every live row is
  confident (the least confident decides), as in CALM's released t5x code.

A row that has exited is frozen: its hidden state passes every later layer unchanged,
and those layers' K/V entries at this position are filled by state propagation (the
family's `kv` of the frozen state), so later steps that run those layers attend to a
complete cache. Its logits are the LM head of the frozen state. A layer's attention and
MLP run for the batch while any row has not exited (`jnp.where` keeps the exited rows
frozen: the K/V the layer computes for them are those of the frozen state, i.e. `kv`'s);
once every row has exited the layer only propagates (a `lax.cond`). A live row is one
whose next token can still change the output: every beam, but not a greedy row that has
emitted EOS (it only emits pad from then on); a row that is not live exits at its first
test.

Thresholds (`CalmConfig.threshold`): `λ_t = clip(0.9 λ + 0.1 exp(-τ t / N), 0, 1)` at
decode step t for softmax, `clip(λ + 0.1 (1 - λ) exp(-τ t / N), 0, 1)` for state (the
same start, decaying towards λ: similarities sit near 1, docs/methods.md), with two
endpoint rules **(choice)** so that the extremes mean what a user expects: `λ = 0`
exits at the first test at every step, and `λ > 1`, or any step whose `λ_t` reaches
the clip ceiling 1, never exits while a row is live (a confidence of 1 can only come
from float rounding). A setting that cannot exit at all (`λ > 1`, or no test below the
last layer) compiles no exit test: its step is vanilla's (compiled mode).

CALM is a step strategy of the decode engine (`CalmSteps`), in three forms over the
same primitives (the family's `block`, `kv` and `head`), all reading the weights in the
decode layout (`hsd_jax.models.decode_layout`):

- compiled: the step unrolls the layers, each a `lax.cond` on whether every row has
  exited (propagate K/V only, or run the layer for the batch), then the exit test (for
  softmax, a `lax.cond` that runs the LM head only at a test layer with a row still
  running). Thresholds (N,), `min_exit` and `every` are arguments, so every setting of
  one measure and exit rule reuses one program per search and shape.
- static: CALM has no schedule to bake in, so "static" runs the compiled program.
- eager: plain Python over steps and layers, every exit decided on the host; the
  reference the compiled loop is checked against (same tokens, same layers).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hsd_jax.models import RUN, KVCache, ModelConfig, context, decode_step, family
from hsd_jax.schedules import CalmConfig


def step_thresholds(calm: CalmConfig, max_new_tokens: int) -> np.ndarray:
    """(N,) float32 exit threshold of each decode step, endpoint rules applied.

    A row exits when its confidence is >= the threshold: `-inf` exits at the first test
    whatever the measure (lambda 0), `inf` never exits.
    """
    if calm.lam == 0:
        return np.full((max_new_tokens,), -np.inf, np.float32)
    if calm.lam > 1:
        return np.full((max_new_tokens,), np.inf, np.float32)
    thr = calm.thresholds(max_new_tokens)
    return np.where(thr >= 1.0, np.inf, thr).astype(np.float32)


def layers_tested(num_layers: int, min_exit: int, every: int = 1) -> list[int]:
    """The layers (0-based) after which a row may exit on a test: l + 1 = min_exit,
    min_exit + every, ... below the last layer (where every row exits anyway)."""
    return list(range(min_exit - 1, num_layers - 1, every))


def can_exit(calm: CalmConfig, num_layers: int, max_new_tokens: int) -> bool:
    """Whether any step can exit before the last layer: a threshold below inf and a test layer."""
    return bool((step_thresholds(calm, max_new_tokens) < np.inf).any()) and \
        bool(layers_tested(num_layers, calm.min_exit, calm.every))


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


def saturation(before: jax.Array, after: jax.Array) -> jax.Array:
    """Hidden-state saturation: cosine similarity of each row's last-position state
    before and after a layer, (R, 1, D) x 2 -> (R,) float32."""
    a, b = before[:, -1].astype(jnp.float32), after[:, -1].astype(jnp.float32)
    norms = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
    return jnp.sum(a * b, axis=-1) / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)


def exits(ok, running, live, rule: str):
    """(R,) bool: the running rows that exit at this test.

    ok: (R,) the row's confidence reached the threshold; running: (R,) not exited yet;
    live: (R,) rows whose output can still change (the others exit at once). "row":
    each row decides for itself; "batch": every running row exits once all running live
    rows are confident.
    """
    ready = ok | ~live
    if rule == "row":
        return running & ready
    return running & jnp.all(ready | ~running)


def calm_layers(params, config: ModelConfig, h, ctx, cache: KVCache, threshold, min_exit, every, live, *,
                measure: str = "softmax", rule: str = "row"):
    """One decode step's layers with data-dependent exits (traceable).

    params: the decode layout (`hsd_jax.models.decode_layout`); h: (R, 1, D) embedded
    tokens; threshold: () float32; min_exit, every: () int32, the test layers
    (`layers_tested`); live: (R,) bool. Returns the (R, V) float32 logits of each row's
    exit state, the cache with every layer's K/V written at `cache.index` (run or
    propagated) and the layers each row ran, (R,) int32.

    The layers are unrolled (each reads its own weight and cache buffers, and writes its
    cache outside the cond: no branch carries the cache, which would make XLA copy it).
    """
    fam = family(config)
    num_layers = config.num_layers
    rows = h.shape[0]
    exited = jnp.zeros((rows,), bool)
    n = jnp.full((rows,), num_layers, jnp.int32)
    logits = jnp.zeros((rows, config.vocab_size), jnp.float32)  # softmax: the exit layer's, carried
    for l, p in enumerate(params["layers"]):
        def propagate(h, exited, p=p):
            return (h, *fam.kv(p, h, ctx, config))

        def run(h, exited, p=p, l=l):
            out, k, v = fam.block(p, h, ctx, config, cache.k[l], cache.v[l])
            return jnp.where(exited[:, None, None], h, out), k, v

        before = h
        h, k, v = jax.lax.cond(jnp.all(exited), propagate, run, h, exited)
        cache = cache.write_layer(l, k, v)
        if l + 1 == num_layers:
            break
        at = (l + 1 >= min_exit) & ((l + 1 - min_exit) % every == 0)
        running = ~exited & at
        if measure == "state":
            now = exits(saturation(before, h) >= threshold, running, live, rule)
        else:
            def test(h, logits, running):
                out = fam.head(params, h, config)[:, -1]  # (R, V)
                now = exits(confidence(out) >= threshold, running, live, rule)
                return jnp.where(now[:, None], out, logits), now

            logits, now = jax.lax.cond(jnp.any(running), test,
                                       lambda h, logits, running: (logits, jnp.zeros((rows,), bool)),
                                       h, logits, running)
        n = jnp.where(now, l + 1, n)
        exited = exited | now
    if measure == "state":
        return fam.head(params, h, config)[:, -1], cache, n
    # Rows that ran every layer get the head of the last one (run only if there are any).
    logits = jax.lax.cond(jnp.all(exited), lambda h, logits: logits,
                          lambda h, logits: jnp.where(exited[:, None], logits, fam.head(params, h, config)[:, -1]),
                          h, logits)
    return logits, cache, n


def calm_step(config: ModelConfig, thresholds, min_exit, every=1, *, measure: str = "softmax", rule: str = "row"):
    """A decode-loop step (`hsd_jax.engine.StepFn`) that exits early, CALM style; the
    layers it returns are per row, (R,).

    thresholds: (N,) float32 (traced or not), indexed by the decode step t.
    """

    def step(params, tokens, cache, t, live):
        fam = family(config)
        new_mask = jnp.ones((tokens.shape[0], 1), bool)
        ctx = context(cache, new_mask)
        h = fam.embed(params, tokens[:, None], ctx.positions, config)
        logits, cache, n = calm_layers(params, config, h, ctx, cache, thresholds[t], jnp.asarray(min_exit),
                                       jnp.asarray(every), live, measure=measure, rule=rule)
        return logits, cache.advance(new_mask), n

    return step


def full_step(config: ModelConfig, ops):
    """The step of a setting that cannot exit: every layer, the head once, no test. `ops`
    is vanilla's (N, L) op table (all RUN) as a program argument, so the step is the one
    vanilla's compiled program runs (`hsd_jax.engine.schedule_step`)."""

    def step(params, tokens, cache, t, live):
        row = ops[t]
        logits, cache = decode_step(params, config, tokens, cache, row)
        return logits, cache, jnp.asarray(jnp.sum(row == RUN), jnp.int32)  # L, counted as vanilla counts

    return step


def eager_step(params, config: ModelConfig, tokens, cache: KVCache, threshold: float, min_exit: int, live, *,
               every: int = 1, measure: str = "softmax", rule: str = "row"):
    """The reference step: Python over layers, every exit decided on the host.

    Same contract as `calm_step`'s step (params in the decode layout); `threshold` is
    the step's float32 threshold. Written plainly: every layer computes the batch's
    block and, for rows that have exited, `kv` of their frozen state; the logits are
    the head of each row's final (frozen) state.
    """
    fam = family(config)
    new_mask = jnp.ones((tokens.shape[0], 1), bool)
    ctx = context(cache, new_mask)
    h = fam.embed(params, tokens[:, None], ctx.positions, config)
    threshold = np.float32(threshold)
    live = np.asarray(live)
    layers, num_layers = params["layers"], config.num_layers
    rows = tokens.shape[0]
    exited, n = np.zeros((rows,), bool), np.full((rows,), num_layers, np.int32)
    tested = set(layers_tested(num_layers, min_exit, every))
    for l in range(num_layers):
        out, k_run, v_run = fam.block(layers[l], h, ctx, config, cache.k[l], cache.v[l])
        k_prop, v_prop = fam.kv(layers[l], h, ctx, config)
        frozen = jnp.asarray(exited)[:, None, None, None]
        cache = cache.write_layer(l, jnp.where(frozen, k_prop, k_run), jnp.where(frozen, v_prop, v_run))
        after = jnp.where(frozen[:, 0], h, out)
        if l in tested and not exited.all():
            if measure == "state":
                score = np.asarray(saturation(h, after))
            else:
                score = np.asarray(confidence(fam.head(params, after, config)[:, -1]))
            ready = (score >= threshold) | ~live
            now = ~exited & (ready if rule == "row" else np.all(ready | exited))
            n[now] = l + 1
            exited |= now
        h = after
    return fam.head(params, h, config)[:, -1], cache.advance(new_mask), n


@dataclasses.dataclass(frozen=True)
class CalmSteps:
    """CALM as a step strategy of the decode engine (`hsd_jax.engine.Strategy`).

    "static" runs the compiled program too (CALM has no schedule to bake in). The
    program is keyed by the measure and exit rule, not by lambda, tau, min_exit or
    every: they are arguments, so changing them does not recompile. A setting that
    cannot exit (`can_exit`) gets vanilla's compiled step, with no exit test.
    """

    calm: CalmConfig
    max_new_tokens: int
    num_layers: int

    def program_key(self):
        if not self._exits():
            return ("calm", "never")
        return ("calm", self.calm.measure, self.calm.exit)

    def arguments(self) -> tuple:
        if not self._exits():
            return (jnp.full((self.max_new_tokens, self.num_layers), RUN, jnp.int32),)
        return (jnp.asarray(self._thresholds()), jnp.asarray(self.calm.min_exit, jnp.int32),
                jnp.asarray(self.calm.every, jnp.int32))

    def decode(self, params, config, search, state, loop, *arguments):
        if not self._exits():
            (ops,) = arguments
            return loop(params, search, state, full_step(config, ops))
        thresholds, min_exit, every = arguments
        step = calm_step(config, thresholds, min_exit, every, measure=self.calm.measure, rule=self.calm.exit)
        return loop(params, search, state, step)

    def eager_step(self, params, config, tokens, cache, t, live):
        c = self.calm
        return eager_step(params, config, tokens, cache, self._thresholds()[t], c.min_exit, live, every=c.every,
                          measure=c.measure, rule=c.exit)

    def _thresholds(self) -> np.ndarray:
        return step_thresholds(self.calm, self.max_new_tokens)

    def _exits(self) -> bool:
        return can_exit(self.calm, self.num_layers, self.max_new_tokens)
