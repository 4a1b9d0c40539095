"""GPT-2 (`GPT2LMHeadModel`) as pure functions over a stacked parameter pytree.

Parameter names mirror the Hugging Face checkpoint. GPT-2's `Conv1D` already stores
its weight as (in, out), so unlike `nn.Linear` nothing needs transposing.
"""

from __future__ import annotations

import math

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

# Checkpoint name (after "transformer.h.{i}.") -> path in our per-layer pytree.
LAYER_WEIGHTS = {
    "ln_1.weight": ("ln_1", "scale"),
    "ln_1.bias": ("ln_1", "bias"),
    "attn.c_attn.weight": ("attn", "c_attn", "kernel"),
    "attn.c_attn.bias": ("attn", "c_attn", "bias"),
    "attn.c_proj.weight": ("attn", "c_proj", "kernel"),
    "attn.c_proj.bias": ("attn", "c_proj", "bias"),
    "ln_2.weight": ("ln_2", "scale"),
    "ln_2.bias": ("ln_2", "bias"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "kernel"),
    "mlp.c_fc.bias": ("mlp", "c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "kernel"),
    "mlp.c_proj.bias": ("mlp", "c_proj", "bias"),
}
GLOBAL_WEIGHTS = {
    "transformer.wte.weight": ("wte",),
    "transformer.wpe.weight": ("wpe",),
    "transformer.ln_f.weight": ("ln_f", "scale"),
    "transformer.ln_f.bias": ("ln_f", "bias"),
}
LAYER_PREFIX = "transformer.h.{}."
# The original OpenAI checkpoints on the hub name weights without "transformer.".
OPTIONAL_PREFIX = "transformer."
TRANSPOSED: frozenset[str] = frozenset()  # Conv1D weights are already (in, out)
# config.json keys `load` checks before building a ModelConfig, so a bad value is one clear
# error rather than a crash deep in JAX: the layer count (against the weights), the heads
# and the width they split, and the sizes that must be positive integers (optional ones
# may also be null).
LAYERS_KEY, HEADS_KEY, WIDTH_KEY = "n_layer", "n_head", "n_embd"
SIZE_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")
OPTIONAL_SIZE_KEYS = ("n_inner",)
# config.json of a GPT-2 made from scratch (`random:` in hsd_jax.train): transformers'
# GPT2Config defaults, the keys a config file leaves out.
CONFIG_DEFAULTS = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=50257, n_positions=1024,
                       n_embd=768, n_layer=12, n_head=12, n_inner=None, activation_function="gelu_new",
                       resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5,
                       initializer_range=0.02, bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True)


def config_from_hf(hf: dict) -> ModelConfig:
    d = hf["n_embd"]
    return ModelConfig(
        model_type="gpt2",
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        hidden_size=d,
        intermediate_size=hf.get("n_inner") or 4 * d,
        vocab_size=hf["vocab_size"],
        max_position=hf["n_positions"],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=hf.get("activation_function", "gelu_new"),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def check_supported(hf: dict) -> list[str]:
    """Config options this port does not implement (each would silently change outputs)."""
    problems = []
    if hf.get("scale_attn_by_inverse_layer_idx"):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if hf.get("scale_attn_weights") is False:
        problems.append("scale_attn_weights=False")
    if hf.get("add_cross_attention"):
        problems.append("add_cross_attention=True")
    if hf.get("tie_word_embeddings") is False:  # transformers would use a separate lm_head; `head` reads wte
        problems.append("tie_word_embeddings=False")
    return problems


def expected_shapes(c: ModelConfig) -> dict[tuple, tuple]:
    d, f = c.hidden_size, c.intermediate_size
    shapes = {
        ("wte",): (c.vocab_size, d),
        ("wpe",): (c.max_position, d),
        ("ln_f", "scale"): (d,),
        ("ln_f", "bias"): (d,),
    }
    per_layer = {
        ("ln_1", "scale"): (d,), ("ln_1", "bias"): (d,),
        ("attn", "c_attn", "kernel"): (d, 3 * d), ("attn", "c_attn", "bias"): (3 * d,),
        ("attn", "c_proj", "kernel"): (d, d), ("attn", "c_proj", "bias"): (d,),
        ("ln_2", "scale"): (d,), ("ln_2", "bias"): (d,),
        ("mlp", "c_fc", "kernel"): (d, f), ("mlp", "c_fc", "bias"): (f,),
        ("mlp", "c_proj", "kernel"): (f, d), ("mlp", "c_proj", "bias"): (d,),
    }
    shapes.update({("layers", *k): (c.num_layers, *v) for k, v in per_layer.items()})
    return shapes


def init(c: ModelConfig, key, *, initializer_range: float = 0.02, dtype=jnp.float32):
    """Random weights drawn as transformers initialises `GPT2LMHeadModel`, in the stacked
    layout of `expected_shapes` (that `checkpoint.params_from_tensors` loads).

    Kernels, `wte` and `wpe` ~ normal(0, initializer_range); the residual projections
    (`attn.c_proj` and `mlp.c_proj` kernels) ~ normal(0, initializer_range / sqrt(2 L)),
    GPT-2's scaled init; biases 0, LayerNorm scales 1. Leaf i of the sorted shapes draws
    from `fold_in(key, i)` in float32 (then cast to `dtype`), so a seed gives the same
    weights as it always has (a resumed run checks them).
    """
    std = initializer_range or 0.02  # transformers' fallback for a null initializer_range
    residual = std / math.sqrt(2 * c.num_layers)
    return draw_weights(expected_shapes(c), key, lambda path: residual if path[-2:] == ("c_proj", "kernel") else std,
                        dtype)


def head_params(params) -> dict:
    """The weights `head` reads: the final LayerNorm and the tied output matrix, `wte`."""
    return {"ln_f": params["ln_f"], "wte": params["wte"]}


def kv_params(p, c: ModelConfig) -> dict:
    """The weights of one layer (stacked layout, one layer's slice) that `kv` reads:
    `ln_1` and the K/V columns of `c_attn` with their bias."""
    a = p["attn"]["c_attn"]
    return {"ln_1": p["ln_1"], "c_attn": {"kernel": a["kernel"][:, c.hidden_size:], "bias": a["bias"][c.hidden_size:]}}


def embed(params, tokens, positions, c: ModelConfig):
    return params["wte"][tokens] + params["wpe"][positions]  # (B, T, D)


def _qkv(p, x, c: ModelConfig):
    h = layer_norm(p["ln_1"], x, c.layer_norm_eps)
    q, k, v = jnp.split(dense(p["attn"]["c_attn"], h), 3, axis=-1)
    return split_heads(q, c.num_heads), split_heads(k, c.num_heads), split_heads(v, c.num_heads)


def kv(p, x, ctx: Context, c: ModelConfig):
    """Only the keys/values a layer would cache for input `x` (state propagation)."""
    h = layer_norm(p["ln_1"], x, c.layer_norm_eps)
    k, v = jnp.split(dense(p["attn"]["c_attn"], h, out=slice(c.hidden_size, None)), 2, axis=-1)
    return split_heads(k, c.num_heads), split_heads(v, c.num_heads)


def block(p, x, ctx: Context, c: ModelConfig, cache_k=None, cache_v=None):
    """One transformer layer: returns the new hidden state (B, T, D) and its K, V."""
    q, k, v = _qkv(p, x, c)
    a = merge_heads(attend(q, k, v, ctx, cache_k, cache_v))
    x = x + dense(p["attn"]["c_proj"], a)
    h = layer_norm(p["ln_2"], x, c.layer_norm_eps)
    x = x + dense(p["mlp"]["c_proj"], ACTIVATIONS[c.activation](dense(p["mlp"]["c_fc"], h)))
    return x, k, v


def head(params, x, c: ModelConfig):
    """Final LayerNorm and the tied LM head; float32 logits (B, T, V)."""
    h = layer_norm(params["ln_f"], x, c.layer_norm_eps)
    return jnp.einsum("btd,vd->btv", h, params["wte"], preferred_element_type=jnp.float32)


FAMILY = Family(
    name="gpt2", hf_class="GPT2LMHeadModel",
    global_weights=GLOBAL_WEIGHTS, layer_weights=LAYER_WEIGHTS, layer_prefix=LAYER_PREFIX,
    optional_prefix=OPTIONAL_PREFIX, transposed=TRANSPOSED,
    layers_key=LAYERS_KEY, heads_key=HEADS_KEY, width_key=WIDTH_KEY, size_keys=SIZE_KEYS,
    optional_size_keys=OPTIONAL_SIZE_KEYS, config_defaults=CONFIG_DEFAULTS, config_from_hf=config_from_hf,
    check_supported=check_supported, expected_shapes=expected_shapes,
    init=init, embed=embed, block=block, kv=kv, head=head, head_params=head_params, kv_params=kv_params,
    lora_targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    learned_positions=True,
)
