"""Model families and the one layer-range primitive every forward pass goes through.

A family (`gpt2.FAMILY`, `phi.FAMILY`; the contract is `hsd_jax.models.family.Family`)
supplies its checkpoint names, config translation, initialiser and pure functions over
its parameter pytree: `embed`, `block` (one full layer, returning its K/V), `kv` (only
the K/V a layer would cache: state propagation) and `head`. The NNX model classes that
hold the weights are in `modules.py`. Everything that runs layers — the full
forward, prefill, a decode step under any schedule, CALM, a training forward with
per-position layer masks — calls `run_layers` or `block`/`kv` directly, so there is
one definition of a layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hsd_jax.models import gpt2, phi
from hsd_jax.models.common import Context, KVCache, ModelConfig, layer_slice
from hsd_jax.models.family import Family
from hsd_jax.schedules import PROPAGATE, RUN, SKIP  # what a decode step does with a layer

# The registry: config.json's model_type -> its family. A new family adds one entry here.
FAMILIES: dict[str, Family] = {fam.name: fam for fam in (gpt2.FAMILY, phi.FAMILY)}


def family(config: ModelConfig) -> Family:
    return FAMILIES[config.model_type]


def context(cache: KVCache | None, new_mask: jax.Array) -> Context:
    """Positions and visibility of T new tokens given the cache they extend."""
    new_mask = new_mask.astype(bool)
    if cache is None:
        positions = jnp.maximum(jnp.cumsum(new_mask, axis=1) - 1, 0).astype(jnp.int32)
        return Context(positions=positions, new_valid=new_mask)
    return Context(positions=cache.positions(new_mask), new_valid=new_mask, cache_valid=cache.valid,
                   cache_beam=cache.beam_source)


def forward(params, config: ModelConfig, tokens, attention_mask=None, cache: KVCache | None = None,
            active=None, last_only: bool = False):
    """All layers over T tokens, scanned over the stacked layer axis (unrolled over a
    per-layer tuple: the decode layout, `decode_layout`).

    tokens, attention_mask: (B, T). With a cache, the new tokens also attend to its
    valid slots and their K/V are written at `cache.index` (a prefill). `active`
    (L, B, T) bool, optional, runs layer l at position (b, t) only where it is True —
    elsewhere the hidden state passes through — which lets a teacher-forced training
    forward compute exactly what a skip schedule computes (skipped positions still
    give their K/V from the hidden state passing through, i.e. state propagation).
    Returns float32 logits (B, T, V) and the updated cache (or None); with
    `last_only`, the logits of the last position only, (B, 1, V) (a prefill: the LM
    head over all T positions would cost T times its weight reads in compute).
    """
    fam = family(config)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    ctx = context(cache, attention_mask)
    ck, cv = (None, None) if cache is None else (cache.k, cache.v)
    h, k, v = _layers(params, config, fam.embed(params, tokens, ctx.positions, config), ctx, ck, cv, active)
    if cache is not None:
        cache = cache.write_all(k, v).advance(attention_mask)
    return fam.head(params, h[:, -1:] if last_only else h, config), cache


def draft_forward(params, config: ModelConfig, tokens, attention_mask, active):
    """Teacher-forced logits of the full model and of a self-speculative draft.

    The draft of token t + 1 (`hsd_jax.speculative`, k = 1) runs the schedule's layers for
    position t over the *full model's* K/V of positions before t, the verified prefix;
    `forward(active=...)` instead gives every position the schedule, so earlier
    positions' K/V come from skipped layers too (plain skip decoding). Here the full
    pass runs first and its K/V, held fixed, are what each draft position attends to,
    beside its own K/V (`Context.draft_view`). tokens, attention_mask: (B, T); active:
    (L, B, T) bool. Returns float32 logits (B, T, V), full then draft.
    """
    fam = family(config)
    ctx = context(None, attention_mask)
    h0 = fam.embed(params, tokens, ctx.positions, config)
    h, k, v = _layers(params, config, h0, ctx, None, None, None)
    k, v = jax.lax.stop_gradient((k, v))
    view = ctx.replace(cache_valid=ctx.new_valid, draft_view=True)
    draft, _, _ = _layers(params, config, h0, view, k, v, active)
    return fam.head(params, h, config), fam.head(params, draft, config)


def _layers(params, config: ModelConfig, h, ctx: Context, ck, cv, active):
    """Every layer over hidden states h (B, T, D): (h, K, V). ck/cv: per layer, the keys
    and values the new tokens attend to besides their own (a cache; see `Context`), or
    None. K/V come back stacked (L, ...) in the stacked layout, a tuple in the decode one."""
    fam = family(config)

    def layer(h, xs):
        p, k_in, v_in, act = xs
        out, k, v = fam.block(p, h, ctx, config, k_in, v_in)
        if act is not None:
            out = jnp.where(act[..., None], out, h)
        return out, (k, v)

    if isinstance(params["layers"], (tuple, list)):  # the decode layout: the same layer, unrolled
        kvs = []
        for l, p in enumerate(params["layers"]):
            h, kv_ = layer(h, (p, None if ck is None else ck[l], None if cv is None else cv[l],
                               None if active is None else active[l]))
            kvs.append(kv_)
        k, v = zip(*kvs)
        return h, k, v
    if ck is not None and isinstance(ck, (tuple, list)):
        ck, cv = jnp.stack(ck), jnp.stack(cv)
    h, (k, v) = jax.lax.scan(layer, h, (params["layers"], ck, cv, active))
    return h, k, v


def run_layers(params, config: ModelConfig, h, ctx: Context, cache: KVCache, ops):
    """One decode step's layers, each RUN, PROPAGATE (K/V only) or SKIP.

    `params["layers"]` is stacked or, faster, a per-layer tuple (`decode_layout`).
    `ops` is either a tuple of Python ints — the schedule is baked into the program
    and skipped layers emit no code at all ("static" mode) — or an int array (L,)
    traced at run time, where each layer becomes a `lax.switch` ("compiled" mode: a
    new schedule of the same shape reuses the compiled program).

    The cache write sits outside the switch, so no branch carries the cache through
    (which would make XLA copy it). A skipped layer writes zeros: a slot it skips is
    never read, since a skip is only compiled where no later step runs that layer.
    A layer reads only its own cache buffer, so the static form writes every layer's
    K/V after the last layer, once all reads are done (see `_after_layers`).
    """
    fam = family(config)
    layers = params["layers"]
    pending = []  # static mode: (layer, k, v) to write once every layer has read the cache
    for l in range(config.num_layers):
        p = layers[l] if isinstance(layers, (tuple, list)) else layer_slice(layers, l)
        op = ops[l]
        if isinstance(op, int):
            if op == SKIP:
                continue
            if op == RUN:
                h, k, v = fam.block(p, h, ctx, config, cache.k[l], cache.v[l])
            else:
                k, v = fam.kv(p, h, ctx, config)
            pending.append((l, k, v))
        else:
            h, k, v = jax.lax.switch(
                op,
                [
                    lambda h, cache=cache, l=l: fam.block(p, h, ctx, config, cache.k[l], cache.v[l]),
                    lambda h: (h, *fam.kv(p, h, ctx, config)),
                    lambda h: (h, *_zeros_kv(h, config, cache.dtype)),
                ],
                h,
            )
            cache = cache.write_layer(l, k, v)
    for l, k, v in pending:
        cache = cache.write_layer(l, _after_layers(k, h), _after_layers(v, h))
    return h, cache


def _after_layers(kv, h):
    """`kv` (B, H, T, Dh), made to depend on the hidden state `h` (B, T, D); same values.

    XLA updates the cache in place only when it can prove that every read of the old
    cache comes first. Straight-line code gives it no such order (a layer's K/V are
    ready before its attention reads the cache), so it would copy the whole cache for
    every layer of every step (docs/performance.md). Adding 0 x (a value of h) orders
    the writes after the last layer, hence after every read: XLA does not fold x * 0
    for floats (NaN semantics), and the sum is exact for finite h (and per row, so
    nothing leaks across the batch). In compiled mode each write already consumes the
    output of its layer's `lax.switch`.
    """
    return kv + (0 * h[:, None, :1, :1]).astype(kv.dtype)


def decode_layout(params):
    """`params` laid out for the decode loop: `layers` a tuple of per-layer pytrees, and
    every dense kernel stored transposed, (out, in), as `kernel_t` (Phi's LM head too).

    A decode step is a chain of matrix-vector products bound by memory bandwidth. On
    XLA's CPU backend they stream (out, in) weights faster than (in, out) ones (+15%
    at one row, +40% at four, docs/performance.md), and a layer taken out of the
    stacked (L, ...) arrays inside the loop is a slice that XLA copies before every
    dot (2-3x the memory traffic). A model is put in this layout once, in place
    (`CausalLM.to_layout`, with `decode_layout_leaves`), so it never holds both;
    `dense` and the heads read either layout.
    """
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    out = {**params, "layers": tuple(_transpose_kernels(layer_slice(layers, l)) for l in range(n))}
    if "lm_head" in params and "kernel" in params["lm_head"]:
        out["lm_head"] = _transpose_kernels(params["lm_head"])
    return out


def decode_layout_leaves(params: dict) -> dict:
    """`decode_layout(params)` made array by array, emptying `params` (a stacked pytree the
    caller gives up: its dicts are emptied in place) as it goes: each stacked array is
    dropped once its per-layer parts exist, so converting a model costs its weights plus
    one array, not two copies. (Emptying copies of the dicts would leave the caller's
    holding every stacked array to the end: the weights twice.)"""
    stacked = params.pop("layers")
    n = jax.tree.leaves(stacked)[0].shape[0]
    layers: list[dict] = [{} for _ in range(n)]
    for path, leaf in _drain(stacked):
        name = "kernel_t" if path[-1] == "kernel" else path[-1]
        for l in range(n):
            _put(layers[l], (*path[:-1], name), _layer_part(leaf, l, path[-1] == "kernel"))
        del leaf
    out = {**params, "layers": tuple(layers)}
    params.clear()
    if "lm_head" in out and "kernel" in out["lm_head"]:
        out["lm_head"] = _transpose_kernels(out["lm_head"])
    return out


def stacked_layout(params) -> dict:
    """The inverse of `decode_layout`: per-layer pytrees stacked into (L, ...) arrays,
    kernels back to (in, out). A stacked pytree is returned as it is."""
    layers = params["layers"]
    if not isinstance(layers, (tuple, list)):
        return params
    untransposed = [_untranspose_kernels(layer) for layer in layers]
    out = {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *untransposed)}
    if "lm_head" in out and "kernel_t" in out["lm_head"]:
        out["lm_head"] = _untranspose_kernels(out["lm_head"])
    return out


@functools.partial(jax.jit, static_argnums=2)
def _layer_part(leaf, layer, transpose: bool):
    """Layer `layer` of a stacked (L, ...) array, a kernel transposed. The layer is an
    argument, not a constant: one program per array shape, where a constant layer would
    compile L programs, each keeping its memory (a quarter of GPT-2 medium's weights)."""
    part = jax.lax.dynamic_index_in_dim(leaf, layer, keepdims=False)
    return part.T if transpose else part


def _drain(tree: dict, prefix: tuple = ()):
    """(path, leaf) of a nested dict, popping each from its dict as it is given out."""
    for key in list(tree):
        value = tree.pop(key)
        if isinstance(value, dict):
            yield from _drain(value, (*prefix, key))
        else:
            yield (*prefix, key), value
        del value


def _put(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _untranspose_kernels(tree):
    if not isinstance(tree, dict):
        return tree
    return {("kernel" if k == "kernel_t" else k): (v.T if k == "kernel_t" else _untranspose_kernels(v))
            for k, v in tree.items()}


def _transpose_kernels(tree):
    if not isinstance(tree, dict):
        return tree
    return {("kernel_t" if k == "kernel" else k): (v.T if k == "kernel" else _transpose_kernels(v))
            for k, v in tree.items()}


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


def init_params(config: ModelConfig, key, *, initializer_range: float = 0.02, dtype=jnp.float32):
    """Random weights for `config`, drawn by its family's `init` as transformers
    initialises that architecture (normal(0, initializer_range) kernels and embeddings,
    zero biases, unit norm scales; GPT-2 also scales its residual projections), in the
    stacked layout `checkpoint.params_from_tensors` produces."""
    return family(config).init(config, key, initializer_range=initializer_range, dtype=dtype)


__all__ = [
    "FAMILIES", "RUN", "PROPAGATE", "SKIP", "Context", "Family", "KVCache", "ModelConfig",
    "context", "decode_layout", "decode_layout_leaves", "decode_step", "family", "forward", "run_layers",
    "init_params", "stacked_layout",
]
