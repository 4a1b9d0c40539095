"""The models as Flax NNX modules: `GPT2LMHeadModel` and `PhiForCausalLM`.

A model is an `nnx.Module` whose weights are `nnx.Param`s named as in the Hugging Face
checkpoint (`print(model)` shows them), so `nnx.split` / `nnx.merge` / `nnx.state`
work as for any NNX model. Its computation is the family's pure functions
(`hsd_jax.models.forward`, `embed` / `block` / `kv` / `head`) over `model.params`,
the plain pytree of those Params' values: the decode engine, the training step and
`jax.jit` take that pytree, as Flax's own Gemma sampler runs over `nnx.state`.

The weights are kept in one of two layouts, and only one at a time (`layout`):

- "stacked": each layer weight is one (L, ...) array, as checkpoints load and as the
  scanned training forward wants;
- "decode": one pytree per layer with dense kernels stored (out, in), which XLA's
  CPU decode loop streams faster (`hsd_jax.models.decode_layout`). The decoder puts
  a model in this layout on its first use, replacing the stacked arrays (freed as
  they are converted, so a model never holds two copies of its weights).

Loading and saving: `hsd_jax.checkpoint` reads a Hugging Face folder into a config, a
parameter pytree and a tokenizer, and writes them back; the classes turn what it reads
into a model (`from_pretrained`, `load`). The checkpoint code knows nothing of these classes.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hsd_jax import checkpoint
from hsd_jax.errors import HsdError
from hsd_jax.models.common import ModelConfig

LAYOUTS = ("stacked", "decode")


class CausalLM(nnx.Module):
    """A causal language model of any registered family, with its tokenizer.

    Build one from a config (`GPT2LMHeadModel(config, rngs=nnx.Rngs(0))` draws the
    family's random initialisation), from weights (`params=`), or load one with
    `from_pretrained` / `hsd_jax.load`.
    """

    family_name: str | None = None  # set by each family's class; None accepts any family

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None, params: Any = None,
                 tokenizer: Any = None, hf_config: dict | None = None, source: str = "", dtype=jnp.float32):
        if self.family_name is not None and config.model_type != self.family_name:
            raise HsdError(f"{type(self).__name__} builds {self.family_name} models, but the config is a "
                           f"{config.model_type} model; use {MODEL_CLASSES[config.model_type].__name__}")
        if params is None:
            if rngs is None:
                raise HsdError(f"{type(self).__name__}(config) needs rngs=nnx.Rngs(seed) for random weights, "
                               "or params=, or use from_pretrained")
            from hsd_jax.models import init_params

            params = jax.tree.map(lambda x: x.astype(dtype), init_params(config, rngs.params()))
        self.config = config
        self.tokenizer = tokenizer
        self.hf_config = dict(hf_config or {})
        self.source = source
        self._decoder = None
        self._names: tuple[str, ...] = ()
        self.set_params(params)

    # ------------------------------------------------------------------ weights

    @property
    def params(self):
        """The weights' values as the pytree the pure functions take (no copy)."""
        return {name: _values(getattr(self, name)) for name in self._names}

    def set_params(self, tree) -> None:
        """Replaces every weight with the values of `tree` (a pytree shaped like `params`)."""
        for name in self._names:
            delattr(self, name)
        self._names = tuple(tree)
        for name, value in tree.items():
            setattr(self, name, nnx.data(_as_params(value)))

    @property
    def layout(self) -> str:
        layers = getattr(self, "layers", None)
        return "decode" if isinstance(layers, (list, tuple)) else "stacked"

    def to_layout(self, layout: str) -> "CausalLM":
        """Converts the weights to `layout` in place (see the module docstring); returns self.

        The old arrays are dropped leaf by leaf as they are converted, so the peak is
        the weights plus their largest single array, not two copies.
        """
        from hsd_jax.models import decode_layout_leaves, stacked_layout

        if layout not in LAYOUTS:
            raise HsdError(f"layout {layout!r} is unknown; use one of {', '.join(LAYOUTS)}")
        if layout == self.layout:
            return self
        tree = self.params
        self.set_params({})  # the model lets go of the old arrays; `tree` is their last holder
        self.set_params(decode_layout_leaves(tree) if layout == "decode" else stacked_layout(tree))
        return self

    def stacked_params(self):
        """The weights in the stacked layout (a converted copy when the model is in the decode layout)."""
        from hsd_jax.models import stacked_layout

        return self.params if self.layout == "stacked" else stacked_layout(self.params)

    @property
    def decoder(self):
        """The model's decode engine (`hsd_jax.engine.Decoder`): it owns the compiled programs."""
        from hsd_jax.engine import Decoder

        if self._decoder is None or self._decoder.config != self.config:
            self._decoder = Decoder(self.config)
        return self._decoder

    # ------------------------------------------------------------------ computation

    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        """float32 logits (B, T, V) from all layers; positions follow the mask."""
        ids = jnp.asarray(input_ids, jnp.int32)
        if ids.ndim != 2:
            raise HsdError(f"input_ids must be (batch, time), got shape {tuple(ids.shape)}")
        mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
        return _jit_forward(self.params, self.config, ids, mask)

    forward = __call__  # the name hsd-jax used before the models were NNX modules

    # ------------------------------------------------------------------ Hugging Face folders

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, dtype: str = "float32", tokenizer: bool = True,
                        layout: str = "stacked") -> "CausalLM":
        """Loads a Hugging Face folder or hub id (see `load`) as a model of its family."""
        read = checkpoint.read_pretrained(model, dtype=dtype, tokenizer=tokenizer, layout=layout)
        built = model_class(read.config)
        if cls.family_name is not None and built is not cls:
            raise HsdError(f"{model} holds a {read.config.model_type} model, not {cls.family_name}; "
                           f"use {built.__name__}.from_pretrained or hsd_jax.load")
        return built(read.config, params=read.params, tokenizer=read.tokenizer, hf_config=read.hf_config,
                     source=read.source)

    def save_pretrained(self, folder: str | os.PathLike):
        """Writes a Hugging Face folder that transformers and `from_pretrained` read."""
        return checkpoint.save_pretrained(self, folder)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 (transformers' `GPT2LMHeadModel`) as an NNX module."""

    family_name = "gpt2"


class PhiForCausalLM(CausalLM):
    """Phi / Phi-2 (transformers' `PhiForCausalLM`) as an NNX module."""

    family_name = "phi"


MODEL_CLASSES: dict[str, type[CausalLM]] = {"gpt2": GPT2LMHeadModel, "phi": PhiForCausalLM}


# The model class every family's module derives from; the name hsd-jax used before its
# models were NNX modules (it still builds a model of any family).
LanguageModel = CausalLM


def model_class(config: ModelConfig) -> type[CausalLM]:
    return MODEL_CLASSES.get(config.model_type, CausalLM)


def load(model: str | os.PathLike, *, dtype: str = "float32", tokenizer: bool = True,
         layout: str = "stacked") -> CausalLM:
    """Loads a Hugging Face GPT-2 or Phi checkpoint (local folder or hub id) as the NNX
    module of its family (`GPT2LMHeadModel`, `PhiForCausalLM`), with its tokenizer.

    `layout="decode"` loads the weights straight into the decode layout (for a model
    that only decodes: no stacked copy is ever made, and the peak memory is the
    weights plus one tensor); "stacked" suits training, and `generate` converts a
    stacked model in place on first use (`CausalLM.to_layout`).

    >>> lm = hsd_jax.load("gpt2")                      # doctest: +SKIP
    >>> logits = lm.forward(ids, attention_mask=mask)  # doctest: +SKIP
    """
    from hsd_jax.platform import explained

    with explained():  # the weights' first device: where a JAX_PLATFORMS JAX cannot serve fails
        return CausalLM.from_pretrained(model, dtype=dtype, tokenizer=tokenizer, layout=layout)


def _as_params(value):
    """A pytree of arrays as NNX Params (dicts and per-layer lists kept as such)."""
    if isinstance(value, dict):
        return {k: _as_params(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_params(v) for v in value]
    return nnx.Param(value)


def _values(node):
    if isinstance(node, dict):
        return {k: _values(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return tuple(_values(v) for v in node)
    return node.get_value() if isinstance(node, nnx.Variable) else node


def _forward_logits(params, config, ids, mask):
    from hsd_jax.models import forward

    return forward(params, config, ids, mask)[0]


_jit_forward = jax.jit(_forward_logits, static_argnums=1)
