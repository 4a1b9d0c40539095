"""Pieces shared by every model family: config, KV cache, norms, attention.

Shapes: B batch, T new tokens, S cache slots, H heads, Dh head size, D width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct, traverse_util

# Masked attention scores get the most negative finite float rather than -inf, so a
# query that sees no valid key (a left-pad position) gives a uniform softmax, not NaN.
_MASKED = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the JAX code needs; hashable, so jit can treat it as static."""

    model_type: str  # "gpt2" or "phi"
    num_layers: int
    num_heads: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position: int  # learned position table size (GPT-2) / nominal context (Phi)
    layer_norm_eps: float
    activation: str  # a key of ACTIVATIONS
    rotary_dim: int = 0  # Phi: leading dims of each head that get rotary embedding
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@struct.dataclass
class KVCache:
    """A fixed-size, pre-allocated key/value cache for all layers.

    Each layer's keys and values are a buffer of their own, (R, H, S, Dh): attention
    reads a layer's buffer in place, where a slice of one stacked (L, ...) array would
    be copied before every use (XLA on CPU materialises a slice that feeds a dot:
    3-14x slower attention, docs/performance.md). Every row writes at the same slot
    `index` (prompts are left-padded), so a write is one `dynamic_update_slice`.

    Beam search (`track_beams`): rows are B inputs x K beams, and the K/V are never
    moved when beams are reordered. Instead `beam_source[b, j, s]` names the beam of
    input b whose row holds slot s of beam j's history, and attention reads through it
    (`attend`). A reorder rewrites this (B, K, S) table, where moving the cache itself
    cost two cache-sized copies per step.
    """

    k: tuple[jax.Array, ...]  # L x (R, H, S, Dh), R rows = B (x K beams)
    v: tuple[jax.Array, ...]  # L x (R, H, S, Dh)
    valid: jax.Array  # (R, S) bool: slot holds a real (non-pad) token
    index: jax.Array  # () int32: slots written so far
    beam_source: jax.Array | None = None  # (B, K, S) int32, beam search only (see above)

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, config.num_heads, max_len, config.head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def dtype(self):
        return self.k[0].dtype

    def positions(self, new_mask: jax.Array) -> jax.Array:
        """Position ids of new tokens, derived from the attention mask.

        A token's position is the number of real tokens before it in its row, so a
        left-padded row gets the same positions as the unpadded prompt (as in
        transformers' `generate`). Pads get position 0; their outputs are never read.
        """
        seen = jnp.sum(self.valid, axis=1, keepdims=True)  # (B, 1)
        return jnp.maximum(seen + jnp.cumsum(new_mask, axis=1) - 1, 0).astype(jnp.int32)

    def write_layer(self, layer: int, k: jax.Array, v: jax.Array) -> "KVCache":
        """Writes (R, H, T, Dh) keys/values of layer `layer` (a Python int) at slots
        [index, index + T)."""
        at = (0, 0, self.index, 0)

        def put(buffers, new):
            return (*buffers[:layer], jax.lax.dynamic_update_slice(buffers[layer], new.astype(self.dtype), at),
                    *buffers[layer + 1:])

        return self.replace(k=put(self.k, k), v=put(self.v, v))

    def write_all(self, k, v) -> "KVCache":
        """Writes every layer's (R, H, T, Dh) keys/values (sequences of L arrays)."""
        cache = self
        for layer, (kl, vl) in enumerate(zip(k, v)):
            cache = cache.write_layer(layer, kl, vl)
        return cache

    def advance(self, new_mask: jax.Array) -> "KVCache":
        """Marks T new slots as written, valid where `new_mask` (R, T) is."""
        valid = jax.lax.dynamic_update_slice(self.valid, new_mask.astype(bool), (0, self.index))
        return self.replace(valid=valid, index=self.index + new_mask.shape[1])

    def track_beams(self, num_beams: int) -> "KVCache":
        """The cache of B prompts as that of B x K beams: each row copied K times, and
        beam bookkeeping started (each row reads its own slots)."""
        b = self.valid.shape[0]
        own = jnp.arange(num_beams, dtype=jnp.int32)[None, :, None]
        def copies(x):
            return jnp.repeat(x, num_beams, axis=0)
        return self.replace(k=tuple(map(copies, self.k)), v=tuple(map(copies, self.v)), valid=copies(self.valid),
                            beam_source=jnp.broadcast_to(own, (b, num_beams, self.max_len)))

    def reorder(self, parents: jax.Array) -> "KVCache":
        """Beam j of input b continues beam `parents[b, j]` (B, K): it takes over that
        beam's history for the slots written so far; its own row holds what comes next."""
        b, k, s = self.beam_source.shape
        inherited = jnp.take_along_axis(self.beam_source, parents[:, :, None], axis=1)
        own = jnp.arange(k, dtype=jnp.int32)[None, :, None]
        beam_source = jnp.where(jnp.arange(s) < self.index, inherited, own)
        # Each input's own rows, gathered within the input: a batch split by inputs over
        # devices (hsd_jax.engine) then needs no rows from another device.
        valid = jnp.take_along_axis(self.valid.reshape(b, k, -1), parents[:, :, None], axis=1)
        return self.replace(beam_source=beam_source, valid=valid.reshape(b * k, -1))


def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm computed in float32 whatever the weights' dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def dense(p: dict, x: jax.Array, out: slice | None = None) -> jax.Array:
    """x @ kernel + bias, with the kernel stored (in, out) as `kernel`, or (out, in) as
    `kernel_t` (the decode layout, see `hsd_jax.models.decode_layout`). `out` keeps
    only those output features (and bias entries)."""
    if "kernel_t" in p:
        w = p["kernel_t"] if out is None else p["kernel_t"][out]
        y = jnp.einsum("...i,oi->...o", x, w)
    else:
        w = p["kernel"] if out is None else p["kernel"][:, out]
        y = jnp.einsum("...i,io->...o", x, w)
    if "bias" not in p:
        return y
    return y + (p["bias"] if out is None else p["bias"][out])


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, T, H*Dh) -> (B, H, T, Dh)."""
    b, t, d = x.shape
    return x.reshape(b, t, num_heads, d // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x: jax.Array) -> jax.Array:
    """(B, H, T, Dh) -> (B, T, H*Dh)."""
    b, h, t, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * dh)


@struct.dataclass
class Context:
    """What attention needs to know about the tokens around the new ones.

    `cache_k`/`cache_v` are one layer's cache (None when there is no cache, as in a
    prefill or a training forward); `cache_valid` marks the slots a new token may see.

    `draft_view` (a training forward of a self-speculative draft, `models.draft_forward`):
    the "cache" is the full model's K/V of the same T positions, and the query at
    position t sees those at positions before t and, of the new keys, only its own, as a
    draft step sees the verified prefix.
    """

    positions: jax.Array  # (B, T) int32
    new_valid: jax.Array  # (B, T) bool: new token is real (not a pad)
    cache_valid: jax.Array | None = None  # (B, S) bool
    cache_beam: jax.Array | None = None  # (B, K, S) int32, `KVCache.beam_source`
    draft_view: bool = struct.field(pytree_node=False, default=False)


def attend(q, k, v, ctx: Context, cache_k=None, cache_v=None) -> jax.Array:
    """Causal attention of T new queries over the cache slots plus the T new keys.

    The two key sets share one softmax, so the new keys need not be written into the
    cache first: a decode step can write its K/V after the layer, unconditionally.
    q, k, v: (B, H, T, Dh); cache_k, cache_v: (B, H, S, Dh). Returns (B, H, T, Dh).
    With `ctx.cache_beam` (beam search), a query row reads each cache slot from the
    row of the beam named there (`KVCache.beam_source`).
    """
    scale = q.shape[-1] ** -0.5
    t = q.shape[2]
    causal = jnp.eye(t, dtype=bool) if ctx.draft_view else jnp.tril(jnp.ones((t, t), bool))
    new_mask = causal[None, None] & ctx.new_valid[:, None, None, :]  # (B, 1, T, T)
    scores = jnp.einsum("bhtd,bhud->bhtu", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(new_mask, scores, _MASKED)
    if cache_k is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bhtu,bhud->bhtd", probs, v)
    if ctx.cache_beam is None:
        cache_scores = jnp.einsum("bhtd,bhsd->bhts", q, cache_k, preferred_element_type=jnp.float32)
    else:
        cache_scores = _beam_scores(q, cache_k, ctx.cache_beam)
    cache_mask = ctx.cache_valid[:, None, None, :]  # (B, 1, 1, S)
    if ctx.draft_view:  # slot s holds position s: a query sees the positions before its own
        cache_mask = cache_mask & jnp.tril(jnp.ones((t, t), bool), k=-1)[None, None]
    cache_scores = jnp.where(cache_mask, cache_scores * scale, _MASKED)
    probs = jax.nn.softmax(jnp.concatenate([cache_scores, scores], axis=-1), axis=-1).astype(v.dtype)
    s = cache_k.shape[2]
    new_part = jnp.einsum("bhtu,bhud->bhtd", probs[..., s:], v)
    if ctx.cache_beam is None:
        return jnp.einsum("bhts,bhsd->bhtd", probs[..., :s], cache_v) + new_part
    return _beam_values(probs[..., :s], cache_v, ctx.cache_beam) + new_part


# Beam search reads the cache through `beam_source` (B, K, S). Every cache row is scored
# against the queries of all K beams of its input — the same batched product as without
# beams, with K x T queries per row, so the cache is read in place in its own layout —
# and each query keeps, per slot, the score from the row the table names (a gather of
# exact values). The weighted sum over values is taken per source row and the K parts
# added: the same terms, regrouped. The K x extra arithmetic costs far less than moving
# the cache at every reorder (docs/performance.md, fix 9).

def _beam_pick(beam_source: jax.Array) -> jax.Array:
    """(B, K_i, K_j, S) bool: query beam j reads slot s from beam i's row."""
    k = beam_source.shape[1]
    return beam_source[:, None] == jnp.arange(k)[:, None, None]


def _beam_scores(q, cache_k, beam_source):
    b, k, s = beam_source.shape
    _, h, t, d = q.shape
    # Row (b, i) gets the queries of every beam j of input b: (B*K, H, K*T, D).
    queries = q.reshape(b, 1, k, h, t, d).transpose(0, 1, 3, 2, 4, 5)
    queries = jnp.broadcast_to(queries, (b, k, h, k, t, d)).reshape(b * k, h, k * t, d)
    # Slots x queries, not the transpose: with 4 queries per row XLA's CPU dot runs this
    # operand order 3.5x faster (12 layers, 4 rows, 576 slots: 3.2 ms against 11.0 ms).
    every = jnp.einsum("rhsd,rhqd->rhsq", cache_k, queries, preferred_element_type=jnp.float32)
    every = every.reshape(b, k, h, s, k, t).transpose(0, 4, 2, 5, 3, 1)  # (B, K_j, H, T, S, K_i)
    rows = jnp.broadcast_to(beam_source[:, :, None, None, :, None], (b, k, h, t, s, 1))
    return jnp.take_along_axis(every, rows, axis=-1).reshape(b * k, h, t, s)


def _beam_values(probs, cache_v, beam_source):
    b, k, s = beam_source.shape
    _, h, t, _ = probs.shape
    d = cache_v.shape[-1]
    per_query = probs.reshape(b, 1, k, h, t, s).transpose(0, 1, 3, 2, 4, 5)  # (B, 1, H, K_j, T, S)
    pick = _beam_pick(beam_source)[:, :, None, :, None, :]  # (B, K_i, 1, K_j, 1, S)
    weights = jnp.where(pick, per_query, 0).reshape(b * k, h, k * t, s)
    out = jnp.einsum("rhqs,rhsd->rhqd", weights, cache_v).reshape(b, k, h, k, t, d).sum(axis=1)
    return out.transpose(0, 2, 1, 3, 4).reshape(b * k, h, t, d)


def layer_slice(stacked: Any, layer) -> Any:
    """One layer's parameters out of the stacked (L, ...) pytree."""
    return jax.tree.map(lambda p: p[layer], stacked)


def draw_weights(shapes: dict[tuple, tuple], key, std_of: Callable[[tuple], float], dtype=jnp.float32,
                 adjust: Callable[[tuple, jax.Array], jax.Array] | None = None) -> dict:
    """Random weights for a family's `expected_shapes`: norm scales 1, biases 0, every
    other leaf normal(0, `std_of(path)`), then `adjust(path, value)` if given. Leaf i of
    the sorted paths draws from `fold_in(key, i)` in float32 before the cast to `dtype`,
    so a seed always gives the same weights (a resumed training run checks them)."""
    def draw(path, shape, leaf_key):
        if path[-1] == "scale":
            return jnp.ones(shape, dtype)
        if path[-1] == "bias":
            return jnp.zeros(shape, dtype)
        value = std_of(path) * jax.random.normal(leaf_key, shape, jnp.float32)
        return (adjust(path, value) if adjust else value).astype(dtype)

    flat = {path: draw(path, shape, jax.random.fold_in(key, i)) for i, (path, shape) in enumerate(sorted(shapes.items()))}
    return traverse_util.unflatten_dict(flat)
