"""Model families and the one layer-range primitive every forward pass goes through.

A family module (`gpt2`, `phi`) supplies pure functions over its parameter pytree:
`embed`, `block` (one full layer, returning its K/V), `kv` (only the K/V a layer
would cache: state propagation) and `head`. Everything that runs layers — the full
forward, prefill, a decode step under any schedule, CALM, a training forward with
per-position layer masks — calls `run_layers` or `block`/`kv` directly, so there is
one definition of a layer.
"""

from __future__ import annotations

from types import ModuleType

import jax
import jax.numpy as jnp

from hsd_jax.models import gpt2, phi
from hsd_jax.models.common import Context, KVCache, ModelConfig, layer_slice
from hsd_jax.schedules import PROPAGATE, RUN, SKIP  # what a decode step does with a layer

FAMILIES: dict[str, ModuleType] = {"gpt2": gpt2, "phi": phi}


def family(config: ModelConfig) -> ModuleType:
    return FAMILIES[config.model_type]


def context(cache: KVCache | None, new_mask: jax.Array) -> Context:
    """Positions and visibility of T new tokens given the cache they extend."""
    new_mask = new_mask.astype(bool)
    if cache is None:
        positions = jnp.maximum(jnp.cumsum(new_mask, axis=1) - 1, 0).astype(jnp.int32)
        return Context(positions=positions, new_valid=new_mask)
    return Context(positions=cache.positions(new_mask), new_valid=new_mask, cache_valid=cache.valid)


def forward(params, config: ModelConfig, tokens, attention_mask=None, cache: KVCache | None = None,
            active=None):
    """All layers over T tokens, scanned over the stacked layer axis.

    tokens, attention_mask: (B, T). With a cache, the new tokens also attend to its
    valid slots and their K/V are written at `cache.index` (a prefill). `active`
    (L, B, T) bool, optional, runs layer l at position (b, t) only where it is True —
    elsewhere the hidden state passes through — which lets a teacher-forced training
    forward compute exactly what a skip schedule computes (skipped positions still
    give their K/V from the hidden state passing through, i.e. state propagation).
    Returns float32 logits (B, T, V) and the updated cache (or None).
    """
    fam = family(config)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    ctx = context(cache, attention_mask)
    h = fam.embed(params, tokens, ctx.positions, config)

    def layer(h, xs):
        p, ck, cv, act = xs
        out, k, v = fam.block(p, h, ctx, config, ck, cv)
        if act is not None:
            out = jnp.where(act[..., None], out, h)
        return out, (k, v)

    ck, cv = (None, None) if cache is None else (cache.k, cache.v)
    h, (k, v) = jax.lax.scan(layer, h, (params["layers"], ck, cv, active))
    if cache is not None:
        cache = cache.write_all(k, v).advance(attention_mask)
    return fam.head(params, h, config), cache


def run_layers(params, config: ModelConfig, h, ctx: Context, cache: KVCache, ops):
    """One decode step's layers, each RUN, PROPAGATE (K/V only) or SKIP.

    `ops` is either a tuple of Python ints — the schedule is baked into the program
    and skipped layers emit no code at all ("static" mode) — or an int array (L,)
    traced at run time, where each layer becomes a `lax.switch` ("compiled" mode: a
    new schedule of the same shape reuses the compiled program).

    The cache write sits outside the switch, so no branch carries the cache through
    (which would make XLA copy it). A skipped layer writes zeros: a slot it skips is
    never read, since a skip is only compiled where no later step runs that layer.
    """
    fam = family(config)
    for l in range(config.num_layers):
        p = layer_slice(params["layers"], l)
        ck, cv = cache.k[l], cache.v[l]
        op = ops[l]
        if isinstance(op, int):
            if op == SKIP:
                continue
            if op == RUN:
                h, k, v = fam.block(p, h, ctx, config, ck, cv)
            else:
                k, v = fam.kv(p, h, ctx, config)
        else:
            h, k, v = jax.lax.switch(
                op,
                [
                    lambda h: fam.block(p, h, ctx, config, ck, cv),
                    lambda h: (h, *fam.kv(p, h, ctx, config)),
                    lambda h: (h, *_zeros_kv(h, config, ck.dtype)),
                ],
                h,
            )
        cache = cache.write_layer(l, k, v)
    return h, cache


def _zeros_kv(h, config: ModelConfig, dtype):
    b, t, _ = h.shape
    z = jnp.zeros((b, config.num_heads, t, config.head_dim), dtype)
    return z, z


def decode_step(params, config: ModelConfig, tokens, cache: KVCache, ops):
    """One token per row through the scheduled layers: (B,) tokens -> (B, V) logits."""
    fam = family(config)
    new_mask = jnp.ones((tokens.shape[0], 1), bool)
    ctx = context(cache, new_mask)
    h = fam.embed(params, tokens[:, None], ctx.positions, config)
    h, cache = run_layers(params, config, h, ctx, cache, ops)
    return fam.head(params, h, config)[:, -1], cache.advance(new_mask)


__all__ = [
    "FAMILIES", "RUN", "PROPAGATE", "SKIP", "Context", "KVCache", "ModelConfig",
    "context", "decode_step", "family", "forward", "run_layers",
]
