"""The contract of a model family: everything hsd-jax needs to know about an architecture.

A family is one module in this package (`gpt2.py`, `phi.py`) that ends with
`FAMILY = Family(...)`, plus one line in the registry (`FAMILIES` in
`hsd_jax/models/__init__.py`); `modules.CausalLM` holds a model of any family (a named
subclass such as `GPT2LMHeadModel` in `modules.py` is optional). Nothing outside
`hsd_jax/models` branches on the model type: it asks the family.

To add a family (say a Llama-style model with grouped-query attention), write
`llama.py` with:

- the weight-name maps between the Hugging Face checkpoint and the parameter pytree
  (`global_weights`, `layer_weights`, `layer_prefix`, `transposed` for `nn.Linear`
  weights stored (out, in));
- the config.json facts: `config_from_hf` (to a `ModelConfig`), `check_supported`
  (options it does not implement), the keys `load` validates, `expected_shapes`;
- `init(config, key, *, initializer_range, dtype)`: random weights as transformers
  initialises the architecture, and `config_defaults` for a `random:<config.json>`;
- the computation, pure functions over the pytree: `embed`, `block` (one layer, also
  returning the K/V it caches), `kv` (only the K/V: state propagation; for GQA return
  the cached heads, and let `block`'s attention repeat them), `head` (final norm and
  LM head, float32 logits), and `head_params` / `kv_params` (the weights those read,
  for the benchmark's byte counts);
- `lora_targets`: the projections LoRA adapts by default;
- `learned_positions`: True when positions come from a table of `max_position` rows
  (prompt + new tokens must fit it), False for rotary embeddings.

The KV cache stores `config.num_heads` heads; a GQA family would add its KV head
count to `ModelConfig` and size the cache from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from hsd_jax.models.common import Context, ModelConfig

Params = Any  # a nested dict of arrays: global weights, and "layers" (stacked or per layer)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # config.json's model_type
    hf_class: str  # transformers' class name (the NNX class has the same)

    # checkpoint names <-> pytree paths
    global_weights: Mapping[str, tuple[str, ...]]  # full checkpoint name -> path
    layer_weights: Mapping[str, tuple[str, ...]]  # name after `layer_prefix` -> path in a layer
    layer_prefix: str  # e.g. "transformer.h.{}."
    optional_prefix: str | None  # a prefix some checkpoints leave out (GPT-2's "transformer.")
    transposed: frozenset[str]  # names stored (out, in) in the checkpoint

    # config.json
    layers_key: str
    heads_key: str
    width_key: str
    size_keys: tuple[str, ...]  # must be positive integers
    optional_size_keys: tuple[str, ...]  # may also be null
    config_defaults: Mapping[str, Any]  # keys a `random:<config.json>` may leave out
    config_from_hf: Callable[[dict], ModelConfig]
    check_supported: Callable[[dict], list[str]]  # options this port does not implement
    expected_shapes: Callable[[ModelConfig], dict[tuple, tuple]]  # stacked layout

    # weights and computation
    init: Callable[[ModelConfig, Any], Params]  # (config, jax key) -> stacked pytree
    embed: Callable[[Params, Any, Any, ModelConfig], Any]  # (params, tokens, positions, config) -> h
    block: Callable[..., tuple]  # (layer, h, ctx, config, cache_k, cache_v) -> (h, k, v)
    kv: Callable[[Params, Any, Context, ModelConfig], tuple]  # (layer, h, ctx, config) -> (k, v)
    head: Callable[[Params, Any, ModelConfig], Any]  # (params, h, config) -> float32 logits
    head_params: Callable[[Params], Params]  # the weights `head` reads (for the bench's byte counts)
    kv_params: Callable[[Params, ModelConfig], Params]  # the weights of one layer `kv` reads
    lora_targets: tuple[str, ...]  # default LoRA projections (paths inside a layer, dotted)
    learned_positions: bool  # a position table of config.max_position rows bounds prompt + new tokens
