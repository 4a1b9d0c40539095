"""LoRA adapters as a pytree beside the frozen stacked parameters.

Why not Flax NNX's `nnx.LoRA`: it is a module that wraps a module (`base_module`), and
our models are pure functions over a stacked parameter pytree with no modules to wrap,
so it cannot be dropped in. What is kept from it is its maths and its initialisation:
each targeted kernel W (L, in, out) gets factors A (L, in, r), initialised with NNX's
default (`nnx.initializers.he_uniform`, per layer), and B (L, r, out), zeros, so
training starts from the pretrained model exactly. The forward uses

    W_eff = W + (alpha / r) * A @ B

(the alpha / r scaling of the LoRA paper and PEFT; NNX leaves scaling to the caller),
merged into the kernel before the forward runs, which keeps one forward pass for
every use (and is what export writes). Only the adapter pytree is differentiated and
given optimizer state, so the frozen weights are bit-identical after training.

Cost of merging rather than adding x @ A @ B inside each projection: the merged kernels
and their gradient are materialised (once per step, like full fine-tuning's gradient
for those kernels); optimizer state and checkpoints stay adapter-sized.

Targets are names of kernels relative to a layer, e.g. "attn.c_attn" (GPT-2) or
"self_attn.q_proj" (Phi); a name also matches as a suffix ("c_proj" = attention and
MLP output projections) or prefix ("attn" = every attention projection).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from hsd_jax.errors import HsdError
from hsd_jax.models import ModelConfig, family



@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] | None = None  # None: the family's `lora_targets`

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def layer_kernels(params) -> list[str]:
    """Dotted names of every kernel in a layer, e.g. ["attn.c_attn", "attn.c_proj", ...]."""
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params["layers"])[0]:
        keys = [k.key for k in path]
        if keys[-1] == "kernel":
            names.append(".".join(keys[:-1]))
    return names


def resolve_targets(params, config: ModelConfig, lora: LoraConfig) -> list[str]:
    """The kernels the adapters attach to; an unknown target is an error naming the known ones."""
    if lora.rank < 1:
        raise HsdError(f"LoRA rank must be at least 1, got {lora.rank}")
    available = layer_kernels(params)
    wanted = lora.targets or family(config).lora_targets
    chosen = []
    for target in wanted:
        hits = [n for n in available if n == target or n.endswith("." + target) or n.startswith(target + ".")]
        if not hits:
            raise HsdError(f"LoRA target {target!r} matches no projection of this {config.model_type} model; "
                           f"its projections are {', '.join(available)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _get(tree, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def targets_of(adapters: dict) -> list[str]:
    """Dotted names of the kernels an adapter tree holds factors for."""
    if set(adapters) == {"a", "b"}:
        return [""]
    return [f"{k}.{n}".rstrip(".") for k, sub in adapters.items() for n in targets_of(sub)]


def init(key: jax.Array, params, config: ModelConfig, lora: LoraConfig) -> dict:
    """Adapters mirroring the targeted kernels: {"attn": {"c_attn": {"a": (L, in, r), "b": (L, r, out)}}}."""
    a_init = nnx.initializers.he_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    adapters: dict = {}
    for i, name in enumerate(resolve_targets(params, config, lora)):
        num_layers, fan_in, fan_out = _get(params["layers"], name)["kernel"].shape
        node = adapters
        for key_ in name.split("."):
            node = node.setdefault(key_, {})
        node["a"] = a_init(jax.random.fold_in(key, i), (num_layers, fan_in, lora.rank), jnp.float32)
        node["b"] = jnp.zeros((num_layers, lora.rank, fan_out), jnp.float32)
    return adapters


def merge(params, adapters: dict, scale: float):
    """params with each targeted kernel replaced by W + scale * A @ B (in W's dtype)."""
    layers = jax.tree.map(lambda x: x, params["layers"])  # a fresh dict tree; leaves shared
    for name in targets_of(adapters):
        node, ab = _get(layers, name), _get(adapters, name)
        w = node["kernel"]
        delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
        node["kernel"] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return {**params, "layers": layers}


def num_params(adapters: dict) -> int:
    return sum(x.size for x in jax.tree.leaves(adapters))
