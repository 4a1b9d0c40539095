"""Pieces shared by every model family: config, KV cache, norms, attention.

Shapes: B batch, T new tokens, S cache slots, H heads, Dh head size, D width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

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

    Every row of the batch writes at the same slot `index` (prompts are left-padded),
    so a write is one `dynamic_update_slice`, never a scatter.
    """

    k: jax.Array  # (L, B, H, S, Dh)
    v: jax.Array  # (L, B, H, S, Dh)
    valid: jax.Array  # (B, S) bool: slot holds a real (non-pad) token
    index: jax.Array  # () int32: slots written so far

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_layers, batch, config.num_heads, max_len, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def positions(self, new_mask: jax.Array) -> jax.Array:
        """Position ids of new tokens, derived from the attention mask.

        A token's position is the number of real tokens before it in its row, so a
        left-padded row gets the same positions as the unpadded prompt (as in
        transformers' `generate`). Pads get position 0; their outputs are never read.
        """
        seen = jnp.sum(self.valid, axis=1, keepdims=True)  # (B, 1)
        return jnp.maximum(seen + jnp.cumsum(new_mask, axis=1) - 1, 0).astype(jnp.int32)

    def write_layer(self, layer: int, k: jax.Array, v: jax.Array) -> "KVCache":
        """Writes (B, H, T, Dh) keys/values of one layer at slots [index, index + T)."""
        at = (layer, 0, 0, self.index, 0)
        return self.replace(
            k=jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), at),
            v=jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), at),
        )

    def write_all(self, k: jax.Array, v: jax.Array) -> "KVCache":
        """Writes (L, B, H, T, Dh) keys/values of every layer at slots [index, index + T)."""
        at = (0, 0, 0, self.index, 0)
        return self.replace(
            k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
            v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at),
        )

    def advance(self, new_mask: jax.Array) -> "KVCache":
        """Marks T new slots as written, valid where `new_mask` (B, T) is."""
        valid = jax.lax.dynamic_update_slice(self.valid, new_mask.astype(bool), (0, self.index))
        return self.replace(valid=valid, index=self.index + new_mask.shape[1])

    def reorder(self, rows: jax.Array) -> "KVCache":
        """Gathers batch rows (beam search keeps the parents of the surviving beams).

        One dynamic slice per row, concatenated: XLA's gather (`k[:, rows]`) gives its
        result a layout with the row axis outermost, and every later cache write or
        layer slice then pays a full-cache transposing copy (docs/performance.md).
        """
        def take(x, axis):
            return jnp.concatenate([jax.lax.dynamic_slice_in_dim(x, rows[r], 1, axis=axis)
                                    for r in range(rows.shape[0])], axis=axis)

        return self.replace(k=take(self.k, 1), v=take(self.v, 1), valid=self.valid[rows])


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
    """

    positions: jax.Array  # (B, T) int32
    new_valid: jax.Array  # (B, T) bool: new token is real (not a pad)
    cache_valid: jax.Array | None = None  # (B, S) bool


def attend(q, k, v, ctx: Context, cache_k=None, cache_v=None) -> jax.Array:
    """Causal attention of T new queries over the cache slots plus the T new keys.

    The two key sets share one softmax, so the new keys need not be written into the
    cache first: a decode step can write its K/V after the layer, unconditionally.
    q, k, v: (B, H, T, Dh); cache_k, cache_v: (B, H, S, Dh). Returns (B, H, T, Dh).
    """
    scale = q.shape[-1] ** -0.5
    t = q.shape[2]
    causal = jnp.tril(jnp.ones((t, t), bool))
    new_mask = causal[None, None] & ctx.new_valid[:, None, None, :]  # (B, 1, T, T)
    scores = jnp.einsum("bhtd,bhud->bhtu", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(new_mask, scores, _MASKED)
    if cache_k is not None:
        cache_scores = jnp.einsum("bhtd,bhsd->bhts", q, cache_k, preferred_element_type=jnp.float32) * scale
        cache_scores = jnp.where(ctx.cache_valid[:, None, None, :], cache_scores, _MASKED)
        scores = jnp.concatenate([cache_scores, scores], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if cache_k is None:
        return jnp.einsum("bhtu,bhud->bhtd", probs, v)
    s = cache_k.shape[2]
    return jnp.einsum("bhts,bhsd->bhtd", probs[..., :s], cache_v) + jnp.einsum(
        "bhtu,bhud->bhtd", probs[..., s:], v
    )


def layer_slice(stacked: Any, layer) -> Any:
    """One layer's parameters out of the stacked (L, ...) pytree."""
    return jax.tree.map(lambda p: p[layer], stacked)
