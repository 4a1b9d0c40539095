"""What every benchmark case kind shares: the architectures and their models with random
weights, the weight bytes a decode step reads (and so the ideal speedup), the
memory-bandwidth probe, a timed `Run`, loops of jitted calls timed per round, and the
table cells' formatting.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import numpy as np

from hsd_jax.errors import HsdError

# Architectures, as Hugging Face config keys. Weights are random, drawn by the family's
# `init` as transformers draws them, which does not change how long a forward pass takes.
ARCHS: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12},
    "gpt2-medium": {"model_type": "gpt2", "n_layer": 24, "n_embd": 1024, "n_head": 16},
    "gpt2-large": {"model_type": "gpt2", "n_layer": 36, "n_embd": 1280, "n_head": 20},
    "phi-2": {"model_type": "phi", "num_hidden_layers": 32, "hidden_size": 2560, "num_attention_heads": 32,
              "intermediate_size": 10240, "vocab_size": 51200, "partial_rotary_factor": 0.4,
              "max_position_embeddings": 2048},
    # Tiny stand-ins for smoke tests and --dry-run.
    "tiny-gpt2": {"model_type": "gpt2", "n_layer": 4, "n_embd": 64, "n_head": 4, "vocab_size": 512},
    "tiny-phi": {"model_type": "phi", "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
                 "intermediate_size": 128, "vocab_size": 512, "partial_rotary_factor": 0.5,
                 "max_position_embeddings": 2048},
}
TINY = {"gpt2": "tiny-gpt2", "phi": "tiny-phi"}  # --dry-run swaps each model for the tiny one of its family


# --- models with random weights -----------------------------------------------------


def hf_config(arch: str):
    """The transformers config object of an architecture (no weights)."""
    if arch not in ARCHS:
        raise HsdError(f"unknown model {arch!r}; choose from {', '.join(ARCHS)}")
    from transformers import AutoConfig

    keys = dict(ARCHS[arch], bos_token_id=None, eos_token_id=None)  # EOS disabled in every benchmark
    return AutoConfig.for_model(keys.pop("model_type"), **keys)


def model_config(arch: str):
    """(the config.json dict, the `ModelConfig`) of an architecture."""
    from hsd_jax.models import FAMILIES

    hf = hf_config(arch).to_dict()
    return hf, FAMILIES[hf["model_type"]].config_from_hf(hf)


def random_model(arch: str, dtype: str = "float32", seed: int = 0):
    """A `LanguageModel` of the architecture with random weights, drawn in JAX by its
    family's initialiser (`hsd_jax.models.init_params`)."""
    import jax
    import jax.numpy as jnp

    from hsd_jax.models import init_params
    from hsd_jax.models.modules import LanguageModel

    hf, config = model_config(arch)
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    params = init_params(config, jax.random.PRNGKey(seed), initializer_range=hf.get("initializer_range") or 0.02,
                         dtype=jdtype)
    jax.block_until_ready(params)
    return LanguageModel(config=config, params=params, hf_config=hf, source=f"random {arch}")


def torch_model(lm):
    """The same weights in transformers' PyTorch model, for the baseline (float32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hsd_jax.checkpoint import tensors_from_params

    config = hf_config_from_dict(lm.hf_config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in tensors_from_params(lm.params, lm.config).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    missing = [m for m in missing if "lm_head" not in m]  # tied to wte for GPT-2
    if missing or unexpected:
        raise HsdError(f"weights did not map onto transformers' model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_config_from_dict(hf: dict):
    from transformers import AutoConfig

    keys = {k: v for k, v in hf.items() if k not in ("model_type", "transformers_version", "architectures")}
    return AutoConfig.for_model(hf["model_type"], **keys)


# --- weight bytes and the ideal speedup ---------------------------------------------


def _nbytes(tree) -> int:
    """Bytes of the arrays (or `jax.ShapeDtypeStruct`s) of a pytree."""
    import jax

    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def weight_bytes(lm) -> dict[str, int]:
    """Bytes a decode step reads: `head` always, per layer `layer` (run) or `kv` (propagate).

    The family says which weights its `head` and its `kv` read (`head_params`,
    `kv_params`); the K/V part is sized by shape alone (`jax.eval_shape`), nothing is
    sliced. `lm.params` is the stacked layout."""
    import jax

    from hsd_jax.models import family

    p, c = lm.params, lm.config
    fam = family(c)
    layers = p["layers"]
    one_layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), layers)
    kv = _nbytes(jax.eval_shape(lambda layer: fam.kv_params(layer, c), one_layer))
    return {"head": _nbytes(fam.head_params(p)), "layer": _nbytes(layers) // c.num_layers, "kv": kv}


def schedule_bytes(ops: np.ndarray, sizes: dict[str, int], new_tokens: int) -> float:
    """Mean weight bytes per generated token: the prefill (all layers) then steps 0 .. N-2."""
    from hsd_jax.schedules import PROPAGATE, RUN

    full = sizes["head"] + ops.shape[1] * sizes["layer"]
    steps = ops[: new_tokens - 1]
    per_step = sizes["head"] + (steps == RUN).sum(axis=1) * sizes["layer"] + (steps == PROPAGATE).sum(axis=1) * sizes["kv"]
    return float((full + per_step.sum()) / new_tokens)


# --- memory bandwidth ---------------------------------------------------------------


class Bandwidth:
    """Streams an array about the size of the model's weights, three ways.

    `gemv` (x @ W, W read as (in, out)), `gemv_t` (x @ W.T, W read as (out, in)) and
    `reduce` (sum of W); the bandwidth is the best of their medians, the highest rate
    this machine showed for reading that many bytes, so the roofline is not flattered.
    """

    def __init__(self, nbytes: int, dtype: str, cap: int):
        import jax
        import jax.numpy as jnp

        jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
        item = jnp.dtype(jdtype).itemsize
        rows = 4096
        cols = max(1024, min(nbytes, cap) // (rows * item))
        self.array = jax.random.normal(jax.random.PRNGKey(0), (rows, cols), jnp.float32).astype(jdtype)
        self.nbytes = rows * cols * item
        x, xt = jnp.ones((1, rows), jdtype), jnp.ones((1, cols), jdtype)
        gemv, gemv_t = jax.jit(lambda x, w: x @ w), jax.jit(lambda x, w: jnp.einsum("bi,oi->bo", x, w))
        reduce = jax.jit(lambda w: jnp.sum(w, dtype=jnp.float32))
        self.probes = {
            "gemv": lambda: gemv(x, self.array),
            "gemv_t": lambda: gemv_t(xt, self.array),
            "reduce": lambda: reduce(self.array),
        }
        self.samples: dict[str, list[float]] = {k: [] for k in self.probes}
        self.measure(record=False)  # compile and touch the pages

    def measure(self, record: bool = True) -> None:
        import jax

        for name, probe in self.probes.items():
            start = time.perf_counter()
            jax.block_until_ready(probe())
            seconds = time.perf_counter() - start
            if record:
                self.samples[name].append(self.nbytes / seconds)

    def summary(self) -> dict:
        medians = {k: statistics.median(v) for k, v in self.samples.items() if v}
        best = max(medians, key=medians.get)
        return {"bytes_per_second": medians[best], "probe": best, "array_bytes": self.nbytes,
                "medians": medians, "samples": self.samples}


# --- runs ---------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    runner: str
    schedule: str
    call: Callable[[], Any]  # one generate call; returns (tokens made, compile seconds, token rows, avg layers)
    seconds: list[float] = dataclasses.field(default_factory=list)
    compile_seconds: float = 0.0
    warmup_seconds: float = 0.0
    avg_layers: float = float("nan")
    tokens: int = 0
    recompiled: bool = False
    output: Any = None


class TimedLoops:
    """Jitted loops of `n` calls, one per key of `probes`, timed once per round (`measure`):
    `samples[key]` holds each round's milliseconds per call. A subclass fills `probes`,
    `samples` and `n`, then calls `measure(record=False)` to compile them."""

    n: int
    probes: dict[Any, Callable[[], Any]]
    samples: dict[Any, list[float]]

    def measure(self, record: bool = True) -> None:
        import jax

        for key, probe in self.probes.items():
            start = time.perf_counter()
            jax.block_until_ready(probe())
            if record:
                self.samples[key].append((time.perf_counter() - start) / self.n * 1e3)

    def medians(self) -> dict:
        """Median milliseconds per call, of each key measured at least once."""
        return {key: statistics.median(v) for key, v in self.samples.items() if v}


# --- the prompts of a case -------------------------------------------------------------


def model_name(model: str) -> str:
    """How a case's model is named in its title: an ARCHS key as it is, a folder by its name."""
    return model if model in ARCHS else os.path.basename(os.path.normpath(model))


def case_prompts(lm, model: str, dataset: str | None, split: str, num_prompts: int,
                 random_len: int) -> list[list[int]]:
    """Token rows of a case's prompts: the first `num_prompts` distinct sources of `dataset`
    (a dataset name, or a pairs file where "{model}" stands for the model folder) as
    training formats them; random rows of `random_len` tokens without a dataset or tokenizer."""
    if dataset is None or lm.tokenizer is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, lm.config.vocab_size, (num_prompts, random_len)).tolist()
    from hsd_jax.data import format_source, load_dataset_sources, read_pairs

    where = dataset.format(model=model)
    # a named dataset's sources need no references: its test split serves as well as dev
    sources = [src for src, _ in read_pairs(where)] if os.path.splitext(where)[1] \
        else load_dataset_sources(where, split)
    sources = list(dict.fromkeys(sources))[:num_prompts]
    return [lm.tokenizer.encode(format_source(src)) for src in sources]


# --- table cells --------------------------------------------------------------------


NOISY = 1.5  # a run whose slowest round took this many times its fastest is starred in the table


def _short(spec: str) -> str:
    return spec.replace(",T=64", "").replace(",warmup=0", "")


def _fmt(value, unit: str, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if pct else f"{value:.2f}{unit}"
