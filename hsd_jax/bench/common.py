"""What every benchmark case kind shares: the architectures and their models with random
weights, the weight bytes a decode step reads (and so the ideal speedup), the
memory-bandwidth probe, a timed `Run`, loops of jitted calls timed per round, and the
table cells' formatting.
"""

from __future__ import annotations

import dataclasses
import os
import re
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


def torch_model(lm, device: str = "cpu"):
    """transformers' PyTorch model of the same architecture, for the baseline: on the CPU the same
    weights in float32; on a GPU its own random weights in the model's dtype, made on the device
    (the speed does not depend on the values, and the copy through the host would cost minutes)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hsd_jax.checkpoint import tensors_from_params

    config = hf_config_from_dict(lm.hf_config)
    if device != "cpu":
        import jax

        torch.manual_seed(0)
        dtype = getattr(torch, str(jax.tree.leaves(lm.params)[0].dtype))
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        state = {k: torch.from_numpy(np.array(v)) for k, v in tensors_from_params(lm.params, lm.config).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        model.tie_weights()
        missing = [m for m in missing if "lm_head" not in m]  # tied to wte for GPT-2
        if missing or unexpected:
            raise HsdError(f"weights did not map onto transformers' model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
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


# --- the machine: other processes' load, threads, peak memory bandwidth -------------------


def _proc_stat() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat's first line."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user time
    return total - idle, total


def other_load(seconds: float = 1.0) -> float | None:
    """Cores' worth of CPU time that *other* processes used over a window of `seconds`: the
    machine's busy time (/proc/stat) minus this process's own CPU time, both over the window.
    (/proc/loadavg would count this process's threads too, and lags by minutes.) None where
    /proc/stat is missing."""
    first, own0, start = _proc_stat(), os.times(), time.perf_counter()
    if first is None:
        return None
    time.sleep(seconds)  # the window: nothing of ours runs in it but idle threads
    second, own1, wall = _proc_stat(), os.times(), time.perf_counter() - start
    busy, total = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return None
    machine = busy / total * (os.cpu_count() or 1)
    own = (own1.user + own1.system - own0.user - own0.system) / wall
    return max(0.0, machine - own)


def busy_machine_note(loads: dict, threads: int) -> str | None:
    """A warning line when other processes left fewer free cores than the runs had threads, before
    or after a case; None when the machine was quiet enough (or the load is unknown)."""
    cores = os.cpu_count() or 1
    known = [x for x in (loads.get("before"), loads.get("after")) if x is not None]
    if not known or max(known) <= cores - threads + 0.25:
        return None
    shown = ", ".join(f"{x:.1f} {when}" for when, x in loads.items() if x is not None)
    return (f"UNRELIABLE: other processes kept cores busy ({shown} this case, of {cores}) while the runs used "
            f"{threads} threads each, so the ratios here measure the neighbours; rerun on an idle machine or with "
            "--threads set to the free cores")


def apply_threads(threads: int | None) -> dict:
    """Gives XLA's CPU backend and PyTorch the same thread count: XLA sizes its thread pool by the
    CPUs this process may run on (sched_getaffinity, read when the backend starts), so the process
    is pinned to `threads` of them; PyTorch gets `torch.set_num_threads`. None keeps every CPU the
    process may use. Returns what each framework got: `xla_threads` is None where JAX's backend
    had started before (its pool is then already sized)."""
    try:  # a private helper of JAX's: where it is gone, assume the backend has not started
        from jax._src.xla_bridge import backends_are_initialized

        started = backends_are_initialized()
    except (ImportError, AttributeError):
        started = False
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    count = len(allowed) if allowed else (os.cpu_count() or 1)
    if threads is not None:
        if threads < 1:
            raise HsdError(f"--threads must be at least 1, got {threads}")
        if threads > count:
            raise HsdError(f"--threads {threads} is more than the {count} CPUs this process may use; "
                           f"give at most {count}")
        if allowed and not started:
            os.sched_setaffinity(0, allowed[:threads])
        count = threads
    info = {"threads": count, "xla_threads": None if started else count, "torch_threads": None}
    try:
        import torch
    except ImportError:
        return info
    torch.set_num_threads(count)
    info["torch_threads"] = torch.get_num_threads()
    return info


# Peak HBM bandwidth by device name (NVIDIA's data sheets: H100 SXM, H200), for the roofline of a
# GPU; elsewhere the roofline uses the bandwidth the `Bandwidth` probe measured.
HBM_PEAK = {"H200": 4.8e12, "H100": 3.35e12}


def hbm_peak(device_kind: str) -> float | None:
    return next((peak for name, peak in HBM_PEAK.items() if name in device_kind), None)


# --- control flow in a compiled program -------------------------------------------------

_CALLED = re.compile(r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
                     r"|branch_computations=\{([^}]*)\}")


def control_flow(hlo: str) -> dict:
    """Counts `conditional` and `while` instructions in a compiled program's HLO text
    (`compiled.as_text()`): in all, the top-level while loops (the decode loop, or static mode's
    one loop per segment), and the conditionals one iteration of a top-level loop executes (its
    body and what it calls: a layer's `lax.switch` is one), the most over the loops. On a GPU each
    conditional, and each while iteration's predicate, is read back by the host before it goes on
    (docs/performance.md), unless XLA puts it in a CUDA graph's conditional node."""
    computations: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split("(")[0].split()
            name = head[-1].lstrip("%")
            computations[name] = []
            if head[0] == "ENTRY":
                entry = name
        elif name is not None and line.startswith(" "):
            computations[name].append(line)

    def called(line: str) -> list[str]:
        names = []
        for one, many in _CALLED.findall(line):
            names += [one] if one else [n.strip().lstrip("%") for n in many.split(",")]
        return [n for n in names if n in computations]

    def reached(root: str) -> set[str]:
        seen, todo = set(), [root]
        while todo:
            c = todo.pop()
            if c not in seen:
                seen.add(c)
                todo += [n for line in computations[c] for n in called(line)]
        return seen

    def count(lines, op):
        return sum(f" {op}(" in line for line in lines)

    every = [line for lines in computations.values() for line in lines]
    loops = [line for line in computations.get(entry, []) if " while(" in line]
    per_step = [sum(count(computations[c], "conditional") for c in reached(n)) for line in loops
                for n in called(line)]
    return {"conditionals": count(every, "conditional"), "whiles": count(every, "while"),
            "top_level_whiles": len(loops), "conditionals_per_step": max(per_step, default=0)}


def last_program_control_flow(lm) -> dict | None:
    """`control_flow` of the program the model's last compiled or static `generate` ran: the
    decoder moves the program it used to the end of its cache."""
    programs = getattr(lm.decoder, "_programs", None)
    if not programs:
        return None
    return control_flow(next(reversed(programs.values())).as_text())
