"""Phi (`PhiForCausalLM`, e.g. microsoft/phi-2) as pure functions over a stacked pytree.

Differences from GPT-2 that matter here: rotary embedding on the first `rotary_dim`
dims of each head (the rest pass through), attention and MLP run in parallel on one
shared LayerNorm output, and an untied LM head with a bias. `nn.Linear` stores
(out, in), so every projection is transposed on load.
"""

from __future__ import annotations

import jax.numpy as jnp

from hsd_jax.models.common import (
    ACTIVATIONS,
    Context,
    ModelConfig,
    attend,
    dense,
    draw_weights,
    layer_norm,
    merge_heads,
    split_heads,
)
from hsd_jax.models.family import Family

LAYER_WEIGHTS = {
    "input_layernorm.weight": ("input_layernorm", "scale"),
    "input_layernorm.bias": ("input_layernorm", "bias"),
    **{
        f"self_attn.{name}.{kind}": ("self_attn", name, "kernel" if kind == "weight" else "bias")
        for name in ("q_proj", "k_proj", "v_proj", "dense")
        for kind in ("weight", "bias")
    },
    **{
        f"mlp.{name}.{kind}": ("mlp", name, "kernel" if kind == "weight" else "bias")
        for name in ("fc1", "fc2")
        for kind in ("weight", "bias")
    },
}
GLOBAL_WEIGHTS = {
    "model.embed_tokens.weight": ("embed_tokens",),
    "model.final_layernorm.weight": ("final_layernorm", "scale"),
    "model.final_layernorm.bias": ("final_layernorm", "bias"),
    "lm_head.weight": ("lm_head", "kernel"),
    "lm_head.bias": ("lm_head", "bias"),
}
LAYER_PREFIX = "model.layers.{}."
OPTIONAL_PREFIX = None
TRANSPOSED = frozenset(
    [k for k in LAYER_WEIGHTS if k.endswith("_proj.weight") or k.endswith("dense.weight")]
    + ["mlp.fc1.weight", "mlp.fc2.weight", "lm_head.weight"]
)
# config.json keys `load` checks before building a ModelConfig (see gpt2.py).
LAYERS_KEY, HEADS_KEY, WIDTH_KEY = "num_hidden_layers", "num_attention_heads", "hidden_size"
SIZE_KEYS = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size")
OPTIONAL_SIZE_KEYS = ("max_position_embeddings",)
# config.json of a Phi made from scratch (`random:` in hsd_jax.train): transformers'
# PhiConfig defaults, the keys a config file leaves out.
CONFIG_DEFAULTS = dict(model_type="phi", architectures=["PhiForCausalLM"], vocab_size=51200, hidden_size=2048,
                       intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, resid_pdrop=0.0,
                       embd_pdrop=0.0, attention_dropout=0.0, hidden_act="gelu_new", max_position_embeddings=2048,
                       initializer_range=0.02, layer_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0,
                       partial_rotary_factor=0.5, qk_layernorm=False, bos_token_id=1, eos_token_id=2)


def config_from_hf(hf: dict) -> ModelConfig:
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return ModelConfig(
        model_type="phi",
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        hidden_size=d,
        intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position=hf.get("max_position_embeddings", 2048),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        activation=hf.get("hidden_act", "gelu_new"),
        rotary_dim=int((d // heads) * rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def check_supported(hf: dict) -> list[str]:
    problems = []
    if hf.get("qk_layernorm"):
        problems.append("qk_layernorm=True")
    if hf.get("num_key_value_heads") not in (None, hf["num_attention_heads"]):
        problems.append("grouped-query attention (num_key_value_heads != num_attention_heads)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
    if hf.get("tie_word_embeddings"):
        problems.append("tie_word_embeddings=True")
    return problems


def expected_shapes(c: ModelConfig) -> dict[tuple, tuple]:
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    shapes = {
        ("embed_tokens",): (v, d),
        ("final_layernorm", "scale"): (d,),
        ("final_layernorm", "bias"): (d,),
        ("lm_head", "kernel"): (d, v),
        ("lm_head", "bias"): (v,),
    }
    per_layer = {("input_layernorm", "scale"): (d,), ("input_layernorm", "bias"): (d,)}
    for name in ("q_proj", "k_proj", "v_proj", "dense"):
        per_layer[("self_attn", name, "kernel")] = (d, d)
        per_layer[("self_attn", name, "bias")] = (d,)
    per_layer.update({
        ("mlp", "fc1", "kernel"): (d, f), ("mlp", "fc1", "bias"): (f,),
        ("mlp", "fc2", "kernel"): (f, d), ("mlp", "fc2", "bias"): (d,),
    })
    shapes.update({("layers", *k): (c.num_layers, *s) for k, s in per_layer.items()})
    return shapes


def init(c: ModelConfig, key, *, initializer_range: float = 0.02, dtype=jnp.float32):
    """Random weights drawn as transformers initialises `PhiForCausalLM`, in the stacked
    layout of `expected_shapes` (that `checkpoint.params_from_tensors` loads).

    Every kernel (the LM head's too) and `embed_tokens` ~ normal(0, initializer_range),
    with the padding token's embedding row zeroed when the config names one (as
    `nn.Embedding(padding_idx=...)` is); biases 0, LayerNorm scales 1. Leaf i of the
    sorted shapes draws from `fold_in(key, i)` in float32, then is cast to `dtype`.
    """
    std = initializer_range or 0.02  # transformers' fallback for a null initializer_range
    pad = c.pad_token_id if c.pad_token_id is not None and 0 <= c.pad_token_id < c.vocab_size else None

    def zero_pad_row(path, value):
        return value.at[pad].set(0.0) if path == ("embed_tokens",) and pad is not None else value

    return draw_weights(expected_shapes(c), key, lambda path: std, dtype, adjust=zero_pad_row)


def head_params(params) -> dict:
    """The weights `head` reads: the final LayerNorm and the LM head with its bias."""
    return {"final_layernorm": params["final_layernorm"], "lm_head": params["lm_head"]}


def kv_params(p, c: ModelConfig) -> dict:
    """The weights of one layer (stacked layout, one layer's slice) that `kv` reads: the
    input LayerNorm and the K and V projections."""
    attn = p["self_attn"]
    return {"input_layernorm": p["input_layernorm"], "k_proj": attn["k_proj"], "v_proj": attn["v_proj"]}


def embed(params, tokens, positions, c: ModelConfig):
    return params["embed_tokens"][tokens]  # (B, T, D); positions enter through rotary


def _rotary(x, positions, c: ModelConfig):
    """Rotates the first `rotary_dim` dims of each head (half-split layout, like HF)."""
    r = c.rotary_dim
    inv_freq = 1.0 / (c.rope_theta ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r))
    angles = positions[:, None, :, None].astype(jnp.float32) * inv_freq  # (B, 1, T, r/2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    rot, rest = x[..., :r].astype(jnp.float32), x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)


def _kv(attn, h, ctx: Context, c: ModelConfig):
    k = _rotary(split_heads(dense(attn["k_proj"], h), c.num_heads), ctx.positions, c)
    return k, split_heads(dense(attn["v_proj"], h), c.num_heads)


def kv(p, x, ctx: Context, c: ModelConfig):
    """Only the keys/values a layer would cache for input `x` (state propagation)."""
    return _kv(p["self_attn"], layer_norm(p["input_layernorm"], x, c.layer_norm_eps), ctx, c)


def block(p, x, ctx: Context, c: ModelConfig, cache_k=None, cache_v=None):
    """One transformer layer: returns the new hidden state (B, T, D) and its K, V."""
    h = layer_norm(p["input_layernorm"], x, c.layer_norm_eps)
    attn = p["self_attn"]
    q = _rotary(split_heads(dense(attn["q_proj"], h), c.num_heads), ctx.positions, c)
    k, v = _kv(attn, h, ctx, c)
    a = dense(attn["dense"], merge_heads(attend(q, k, v, ctx, cache_k, cache_v)))
    m = dense(p["mlp"]["fc2"], ACTIVATIONS[c.activation](dense(p["mlp"]["fc1"], h)))
    return x + a + m, k, v


def head(params, x, c: ModelConfig):
    """Final LayerNorm and the untied LM head (with bias); float32 logits (B, T, V)."""
    h = layer_norm(params["final_layernorm"], x, c.layer_norm_eps)
    lm = params["lm_head"]
    if "kernel_t" in lm:  # the decode layout stores it (V, D)
        logits = jnp.einsum("btd,vd->btv", h, lm["kernel_t"], preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("btd,dv->btv", h, lm["kernel"], preferred_element_type=jnp.float32)
    return logits + lm["bias"].astype(jnp.float32)


FAMILY = Family(
    name="phi", hf_class="PhiForCausalLM",
    global_weights=GLOBAL_WEIGHTS, layer_weights=LAYER_WEIGHTS, layer_prefix=LAYER_PREFIX,
    optional_prefix=OPTIONAL_PREFIX, transposed=TRANSPOSED,
    layers_key=LAYERS_KEY, heads_key=HEADS_KEY, width_key=WIDTH_KEY, size_keys=SIZE_KEYS,
    optional_size_keys=OPTIONAL_SIZE_KEYS, config_defaults=CONFIG_DEFAULTS, config_from_hf=config_from_hf,
    check_supported=check_supported, expected_shapes=expected_shapes,
    init=init, embed=embed, block=block, kv=kv, head=head, head_params=head_params, kv_params=kv_params,
    lora_targets=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1",
                  "mlp.fc2"),
    learned_positions=False,
)
