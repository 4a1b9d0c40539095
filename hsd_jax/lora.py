"""LoRA adapters for the stacked projections, as an NNX module of LoRA parameters.

Why not Flax's `nnx.LoRA` / `nnx.LoRALinear`: they add x @ A @ B inside the call of a
Linear module, and the models' layers are not Linear modules. A model's weights are
`nnx.Param`s in a stacked (L, in, out) layout (or per layer, (out, in), to decode)
that the family's pure functions read, so every forward (the scanned training one,
prefill, each decode step) runs from one pytree; there is no per-projection call to
wrap. What is kept from `nnx.LoRA` is its variable type (`nnx.LoRAParam`, so
`nnx.state(adapters, nnx.LoRAParam)` selects what trains), its maths and its
initialisation: each targeted kernel W (L, in, out) gets factors A (L, in, r),
initialised with NNX's default (`nnx.initializers.he_uniform`, per layer), and
B (L, r, out), zeros, so training starts from the pretrained model exactly. The
forward uses

    W_eff = W + (alpha / r) * A @ B

(the alpha / r scaling of the LoRA paper and PEFT; NNX leaves scaling to the caller),
merged into the kernel before the forward runs, which keeps one forward pass for
every use (and is what export writes). Only the adapter pytree is differentiated and
given optimizer state, so the frozen weights are bit-identical after training.
`LoRAAdapters` is the NNX module; `init` / `merge` are the pure functions over its
values that the jitted training step uses.

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


class LoRAAdapters(nnx.Module):
    """The adapters of a model as an NNX module of `nnx.LoRAParam`s.

        adapters = LoRAAdapters(model, LoraConfig(rank=8), rngs=nnx.Rngs(0))
        trainable = nnx.state(adapters, nnx.LoRAParam)
        merged = adapters.merged(model)   # the weights with W + scale * A @ B
    """

    def __init__(self, model, lora: LoraConfig, *, rngs: nnx.Rngs):
        self.lora = lora
        factors = init(rngs.params(), model.stacked_params(), model.config, lora)
        self.factors = nnx.data(jax.tree.map(nnx.LoRAParam, factors))

    @property
    def values(self) -> dict:
        """The factors as the plain pytree `merge` takes."""
        return jax.tree.map(lambda v: v.get_value(), self.factors, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def merged(self, model):
        """`model`'s weights (stacked layout) with every targeted kernel merged."""
        return merge(model.stacked_params(), self.values, self.lora.scale)
