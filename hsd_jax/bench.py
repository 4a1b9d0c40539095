"""Side-by-side decode benchmarks: transformers against hsd-jax, vanilla against schedules.

One `Case` is a model architecture (random weights, nothing to download), a dtype, a
prompt length, a batch size and a beam count. For a case, every `Run` — transformers'
PyTorch `generate`, hsd-jax eager / compiled / static, each schedule — is warmed up
once (that call's compile time is reported apart), then all runs are timed in turn,
`repeats` rounds, together with a memory-bandwidth probe, so every figure of a case
comes from the same minutes of the same machine. A figure is the median of its rounds.

Definitions (docs/benchmarks.md restates them):

- tokens/s = inputs x new tokens / wall seconds of one `generate` call (prefill +
  decode; compile excluded; hsd-jax calls go through the public `generate`).
- weight bytes of a decode step = the LM head (final norm, output matrix and bias)
  plus, per layer, all its weights if the step runs it, its input norm and K/V
  projections if it only propagates K/V, nothing if it skips it. Embedding rows and
  the KV cache are not counted. The prefill reads every weight once and produces
  token 0; step t produces token t + 1, so N new tokens read
  prefill + steps 0 .. N-2.
- ideal speedup of a schedule = weight bytes of the N tokens under vanilla / under
  the schedule (the speedup if time were weight bytes over a fixed bandwidth).
- memory roofline = inputs x bandwidth / vanilla weight bytes per token, with the
  bandwidth measured in the same run (the best median of a matrix-vector product and
  a reduction over an array about the size of the weights).
- the devices run (runner "devices") = compiled vanilla on all N local devices, each
  device the case's batch (N x batch inputs per call, the same prompts N times); its
  speedup = its inputs per second / compiled vanilla's on one device.

The suites (`hsd-jax bench --suite NAME`) are data in `hsd_jax.bench_suites`; a
suite's targets are printed as figures against their target values, and the checks
that must hold are tests (tests/test_bench.py), not verdicts of this module.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

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

RUNNERS = ("transformers", "eager", "compiled", "static", "devices")


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # a key of ARCHS
    prompt_len: int
    batch: int  # inputs
    num_beams: int = 1
    new_tokens: int = 64
    dtype: str = "float32"
    runners: tuple[str, ...] = RUNNERS  # vanilla under each of these
    schedules: tuple[str, ...] = ()  # specs or presets, each under `schedule_runners`
    schedule_runners: tuple[str, ...] = ("compiled", "static")

    @property
    def label(self) -> str:
        search = "greedy" if self.num_beams == 1 else f"beam{self.num_beams}"
        return f"{self.model} {self.dtype} prompt={self.prompt_len} batch={self.batch} {search}"


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

    from hsd_jax.checkpoint import LanguageModel
    from hsd_jax.models import init_params

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


# --- weight bytes and the ideal speedup ----------------------------------------------


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


# --- memory bandwidth ------------------------------------------------------------------


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


# --- runs ----------------------------------------------------------------------------


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


def _prompts(case: Case, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (case.batch, case.prompt_len), dtype=np.int64)


def _hsd_call(lm, ids: np.ndarray, case: Case, mode: str, schedule: str, devices: int = 1):
    from hsd_jax.generate import generate

    def call():  # one device unless asked: the other figures are one device's
        g = generate(lm, input_ids=ids, schedule=schedule, num_beams=case.num_beams, max_new_tokens=case.new_tokens,
                     mode=mode, eos_token_id=None, pad_token_id=0, devices=devices)
        return g.num_tokens, g.compile_seconds, g.sequences, g.avg_layers

    return call


def _torch_call(model, ids: np.ndarray, case: Case):
    import torch

    input_ids = torch.from_numpy(ids)
    mask = torch.ones_like(input_ids)

    def call():
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=case.new_tokens,
                                 min_new_tokens=case.new_tokens, do_sample=False, num_beams=case.num_beams,
                                 eos_token_id=None, pad_token_id=0, early_stopping=False, length_penalty=1.0)
        new = out[:, ids.shape[1]:].numpy()
        return int(new.size), 0.0, new.tolist(), float(lm_layers(model))

    return call


def lm_layers(model) -> int:
    return model.config.num_hidden_layers  # transformers' common name (GPT-2's n_layer is an alias of it)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_case(case: Case, repeats: int, log: Callable[[str], None] = print, backend: str | None = None) -> dict:
    """Times every run of a case side by side; returns the case's JSON record."""
    if isinstance(case, SpeculativeCase):
        return run_speculative_case(case, repeats, log=log)
    if isinstance(case, CalmCase):
        return run_calm_case(case, repeats, log=log)
    import jax

    from hsd_jax.schedules import resolve

    backend = backend or jax.default_backend()
    record: dict[str, Any] = {"case": dataclasses.asdict(case), "label": case.label, "runs": [], "notes": []}
    total = sum(_nbytes_estimate(case.model, case.dtype).values())
    runners = list(case.runners)
    if "transformers" in runners and backend != "cpu":
        runners.remove("transformers")
        record["notes"].append("transformers runs on CPU only here; left out on " + backend)
    devices = len(jax.local_devices())
    if "devices" in runners and devices == 1:
        runners.remove("devices")
        record["notes"].append("devices left out: one local device (the row needs several: a multi-GPU machine, or "
                               "XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU, where they share the cores)")
    available = _available_memory() if backend == "cpu" else None
    if available is not None:
        # JAX weights + their per-layer decode copy + the bandwidth array (+ PyTorch's copy)
        # (+ a copy per further device, which on CPU share the memory).
        need = 3 * total + (total if "transformers" in runners else 0) + \
            ((devices - 1) * total if "devices" in runners else 0)
        if need > available and "transformers" in runners:
            runners.remove("transformers")
            record["notes"].append(f"transformers left out: ~{need / 2**30:.1f} GiB needed, {available / 2**30:.1f} available")
            need -= total
        if need > available:
            record["notes"].append(f"skipped: ~{need / 2**30:.1f} GiB needed, {available / 2**30:.1f} GiB available")
            record["skipped"] = True
            log(f"{case.label}: {record['notes'][-1]}")
            return record

    log(f"{case.label}: building random weights ({total / 2**20:.0f} MiB)")
    lm = random_model(case.model, case.dtype)
    config = lm.config
    ids = _prompts(case, config.vocab_size)
    sizes = weight_bytes(lm)
    vanilla = resolve("vanilla", num_layers=config.num_layers, max_new_tokens=case.new_tokens)
    vanilla_bytes = schedule_bytes(vanilla.layer_ops(), sizes, case.new_tokens)
    record["weights"] = {"total_bytes": _nbytes(lm.params), **{f"{k}_bytes": v for k, v in sizes.items()},
                         "vanilla_bytes_per_token": vanilla_bytes, "num_layers": config.num_layers}

    runs: list[Run] = []
    torch_model_ = None
    if "transformers" in runners:
        torch_model_ = torch_model(lm)
        runs.append(Run("transformers", "vanilla", _torch_call(torch_model_, ids, case)))
    for mode in ("eager", "compiled", "static"):
        if mode in runners:
            runs.append(Run(mode, "vanilla", _hsd_call(lm, ids, case, mode, "vanilla")))
    if "devices" in runners:  # each device the case's batch
        runs.append(Run("devices", "vanilla", _hsd_call(lm, np.tile(ids, (devices, 1)), case, "compiled", "vanilla",
                                                        devices=devices)))
    bytes_of = {"vanilla": vanilla_bytes}
    avg_of = {"vanilla": float(config.num_layers)}
    for spec in case.schedules:
        sched = resolve(spec, num_layers=config.num_layers, max_new_tokens=case.new_tokens)
        if not hasattr(sched, "layer_ops"):
            raise HsdError(f"{spec}: the benchmark times static schedules; CALM has eval/bench_calm.py")
        bytes_of[spec] = schedule_bytes(sched.layer_ops(), sizes, case.new_tokens)
        ops = sched.layer_ops()[: case.new_tokens - 1]
        avg_of[spec] = float((config.num_layers + (ops == 0).sum()) / case.new_tokens)
        for mode in case.schedule_runners:
            runs.append(Run(mode, spec, _hsd_call(lm, ids, case, mode, spec)))

    bandwidth = Bandwidth(int(vanilla_bytes), case.dtype, cap=(1 << 30) if backend == "cpu" else (4 << 30))
    for run in runs:  # warm-up: compiles (hsd-jax) or fills caches (PyTorch)
        start = time.perf_counter()
        run.tokens, run.compile_seconds, run.output, run.avg_layers = run.call()
        run.warmup_seconds = time.perf_counter() - start
        log(f"  warm-up {run.runner:12s} {run.schedule:28s} {run.warmup_seconds:7.2f}s (compile {run.compile_seconds:.2f}s)")
    for r in range(repeats):
        for run in runs:
            start = time.perf_counter()
            _, compile_seconds, _, _ = run.call()
            run.seconds.append(time.perf_counter() - start)
            run.recompiled |= compile_seconds > 0
        bandwidth.measure()
        line = "  ".join(f"{run.runner[:5]}/{run.schedule[:12]} {run.seconds[-1]:.2f}" for run in runs)
        log(f"  round {r + 1}/{repeats}: {line}")
    bw = bandwidth.summary()
    record["bandwidth"] = bw
    inputs = case.batch
    roofline = inputs * bw["bytes_per_second"] / vanilla_bytes * 1.0
    record["roofline_tokens_per_second"] = roofline

    medians = {(run.runner, run.schedule): statistics.median(run.seconds) for run in runs}
    reference = next((run.output for run in runs if run.runner == "compiled" and run.schedule == "vanilla"), None)
    for run in runs:
        seconds = medians[(run.runner, run.schedule)]
        inputs = case.batch * (devices if run.runner == "devices" else 1)
        tps = inputs * case.new_tokens / seconds
        base = medians.get((run.runner, "vanilla"))
        hf = medians.get(("transformers", "vanilla"))
        ideal = vanilla_bytes / bytes_of[run.schedule]
        speedup = base / seconds if base else None
        entry = {
            "runner": run.runner, "schedule": run.schedule, "tokens": run.tokens,
            "seconds_median": seconds, "seconds": run.seconds, "tokens_per_second": tps,
            "spread": max(run.seconds) / min(run.seconds),  # slowest / fastest round: noise of this run
            "compile_seconds": run.compile_seconds, "warmup_seconds": run.warmup_seconds,
            "recompiled_while_timed": run.recompiled,
            "avg_layers": avg_of[run.schedule],
            "weight_bytes_per_token": bytes_of[run.schedule],
            "speedup_vs_transformers": hf / seconds if hf else None,
            "speedup_vs_vanilla": speedup,
            "ideal_speedup": ideal,
            "fraction_of_ideal_saving": (speedup - 1) / (ideal - 1) if speedup and ideal > 1 else None,
            "speedup_over_ideal": speedup / ideal if speedup else None,
            "fraction_of_roofline": tps / (inputs * bw["bytes_per_second"] / bytes_of[run.schedule]),
        }
        if run.runner == "devices":
            one = medians.get(("compiled", "vanilla"))
            entry.update(devices=devices, inputs=inputs, inputs_per_second=inputs / seconds,
                         speedup_vs_one_device=one and (inputs / seconds) / (case.batch / one),
                         speedup_vs_vanilla=None, speedup_vs_transformers=None)
        if reference is not None and run.schedule == "vanilla" and run.runner != "compiled":
            copies = devices if run.runner == "devices" else 1  # the devices run decodes the prompts N times
            same = np.asarray(run.output) == np.tile(np.asarray(reference), (copies, 1))
            entry["tokens_equal_compiled"] = float(same.mean())
        record["runs"].append(entry)
    del runs, torch_model_, lm, bandwidth
    gc.collect()
    return record


def _nbytes_estimate(arch: str, dtype: str) -> dict[str, int]:
    """Parameter bytes from the config alone (before anything is allocated)."""
    from hsd_jax.models import family

    _, config = model_config(arch)
    item = 4 if dtype == "float32" else 2
    shapes = family(config).expected_shapes(config)
    return {"/".join(k): int(np.prod(v)) * item for k, v in shapes.items()}


# --- self-speculative decoding --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpeculativeCase:
    """Vanilla compiled greedy against self-speculative greedy (`draft=`, hsd_jax.speculative),
    timed side by side on a trained model: acceptance is a property of the weights, so random
    ones say nothing about speed (an ARCHS key still runs, for --dry-run).

    Prompts are `hsd_jax.data.format_source` of the first `num_prompts` distinct sources of
    `dataset` (a dataset name, or a .jsonl/.json/.csv file; "{model}" in it stands for the
    model folder), decoded in batches of `batch` rows, EOS on (both runs stop at the same
    tokens). Every run decodes all of them once per round.
    """

    model: str  # a Hugging Face folder, or an ARCHS key (random weights)
    batch: int
    drafts: tuple[str, ...]
    num_draft_tokens: tuple[int, ...]
    dataset: str | None = "common_gen"  # None: random token prompts
    split: str = "validation"
    num_prompts: int = 16
    new_tokens: int = 32
    dtype: str = "float32"
    kind: str = "speculative"

    @property
    def label(self) -> str:
        name = self.model if self.model in ARCHS else os.path.basename(os.path.normpath(self.model))
        return f"{name} {self.dtype} speculative greedy batch={self.batch} new={self.new_tokens}"


def _speculative_model(case: SpeculativeCase):
    if case.model in ARCHS:
        return random_model(case.model, case.dtype)
    import hsd_jax

    return hsd_jax.load(case.model, dtype=case.dtype)


def _speculative_prompts(case: SpeculativeCase, lm) -> list[list[int]]:
    """Token rows of the case's prompts (random 8-token rows without a dataset or tokenizer)."""
    if case.dataset is None or lm.tokenizer is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, lm.config.vocab_size, (case.num_prompts, 8)).tolist()
    from hsd_jax.data import format_source, load_dataset_pairs, read_pairs

    where = case.dataset.format(model=case.model)
    pairs = read_pairs(where) if os.path.splitext(where)[1] else load_dataset_pairs(where, case.split)
    sources = list(dict.fromkeys(src for src, _ in pairs))[: case.num_prompts]
    return [lm.tokenizer.encode(format_source(src)) for src in sources]


class StepCosts:
    """What a round is made of, timed in the same rounds as the runs: a one-token decode step
    of all layers (the compiled program's step: a `lax.switch` per layer), a draft step of
    each draft (its row for the middle decode step), and the verify pass over k + 1
    positions for each k in both its forms (`hsd_jax.speculative.verify`: "rows", one
    product of k + 1 rows per matrix; "positions", k + 1 one-row products per matrix,
    layer by layer); each a jitted loop of `n` calls, in milliseconds per call."""

    def __init__(self, lm, batch: int, width: int, new_tokens: int, drafts, ks, n: int = 50):
        import jax
        import jax.numpy as jnp

        from hsd_jax.engine import schedule_step
        from hsd_jax.models import KVCache
        from hsd_jax.schedules import resolve
        from hsd_jax.speculative import VERIFY_FORMS, verify

        params, config = lm.to_layout("decode").params, lm.config
        cache = KVCache.init(config, batch, width + new_tokens + max(ks) + 1, jax.tree.leaves(params)[0].dtype)
        self.cache = cache.replace(valid=cache.valid.at[:, :width].set(True), index=jnp.asarray(width, jnp.int32))
        self.params, self.n = params, n
        middle = new_tokens // 2

        def steps(ops, t):
            step = schedule_step(config, lambda t: ops[t])

            def run(params, cache, ops):
                def body(_, c):
                    tok, cache = c
                    logits, new, _ = step(params, tok, cache, t, jnp.ones(tok.shape, bool))
                    return jnp.argmax(logits, -1).astype(jnp.int32), new.replace(index=cache.index, valid=cache.valid)
                return jax.lax.fori_loop(0, n, body, (jnp.zeros((batch,), jnp.int32), cache))
            return jax.jit(run), jnp.asarray(ops, jnp.int32)

        def verifies(k, form):
            def run(params, cache):
                def body(_, c):
                    tok, cache = c
                    logits, new = verify(params, config, tok, cache, form)
                    return jnp.argmax(logits, -1).astype(jnp.int32), new.replace(index=cache.index, valid=cache.valid)
                return jax.lax.fori_loop(0, n, body, (jnp.zeros((batch, k + 1), jnp.int32), cache))
            return jax.jit(run)

        vanilla = resolve("vanilla", num_layers=config.num_layers, max_new_tokens=new_tokens).layer_ops()
        self.probes: dict[str, Callable[[], Any]] = {}
        fn, ops = steps(vanilla, middle)
        self.probes["step"] = lambda fn=fn, ops=ops: fn(self.params, self.cache, ops)
        self.draft_layers = {}
        for draft in drafts:
            table = resolve(draft, num_layers=config.num_layers, max_new_tokens=new_tokens).layer_ops()
            self.draft_layers[draft] = int((table[middle] == 0).sum())
            fn, ops = steps(table, middle)
            self.probes[f"draft {draft}"] = lambda fn=fn, ops=ops: fn(self.params, self.cache, ops)
        for k in ks:
            for form in VERIFY_FORMS:
                fn = verifies(k, form)
                self.probes[f"verify {form} {k + 1}"] = lambda fn=fn: fn(self.params, self.cache)
        self.samples: dict[str, list[float]] = {key: [] for key in self.probes}
        self.measure(record=False)  # compiles

    def measure(self, record: bool = True) -> None:
        import jax

        for key, probe in self.probes.items():
            start = time.perf_counter()
            jax.block_until_ready(probe())
            if record:
                self.samples[key].append((time.perf_counter() - start) / self.n * 1e3)

    def summary(self) -> dict:
        ms = {key: statistics.median(v) for key, v in self.samples.items() if v}
        return {"step_ms": ms["step"],
                "draft_step_ms": {k[6:]: v for k, v in ms.items() if k.startswith("draft ")},
                "draft_step_layers": self.draft_layers,
                "verify_ms": {form: {int(k.split()[2]): v for k, v in ms.items() if k.startswith(f"verify {form} ")}
                              for form in ("rows", "positions")},
                "samples": self.samples}


def run_speculative_case(case: SpeculativeCase, repeats: int, log: Callable[[str], None] = print) -> dict:
    """Times vanilla compiled greedy and every (draft, k) side by side; returns the case's record.

    Per run: tokens/s, speedup over vanilla (same rounds), acceptance, tokens per round,
    layers per token (docs/methods.md's rule), the fraction of rows whose tokens equal
    vanilla's (must be 1.0), and `model_speedup`: what the step costs measured in the same
    rounds predict, tokens per round x step / (k x draft step + verify pass), which leaves
    out the prefill and the per-call overhead that both runs pay."""
    from hsd_jax.generate import generate
    from hsd_jax.speculative import default_verify_form

    record: dict[str, Any] = {"kind": "speculative", "case": dataclasses.asdict(case), "label": case.label,
                              "runs": [], "notes": []}
    lm = _speculative_model(case)
    rows = _speculative_prompts(case, lm)
    batches = [rows[i:i + case.batch] for i in range(0, len(rows) - case.batch + 1, case.batch)]
    if not batches:
        raise HsdError(f"{case.label}: {len(rows)} prompts make no batch of {case.batch}")
    eos = lm.config.eos_token_id
    log(f"{case.label}: {len(batches)} batches of {case.batch} prompts from {case.dataset or 'random tokens'}")

    def call_of(draft, k):
        def call():
            return [generate(lm, input_ids=b, max_new_tokens=case.new_tokens, eos_token_id=eos, pad_to_multiple_of=32,
                             draft=draft, num_draft_tokens=k, devices=1) for b in batches]  # one device's figures
        return call

    runs = [Run("compiled", "vanilla", call_of(None, None))]
    for draft in case.drafts:
        for k in case.num_draft_tokens:
            runs.append(Run("speculative", f"{draft} k={k}", call_of(draft, k)))
    for run in runs:
        start = time.perf_counter()
        run.output = run.call()
        run.compile_seconds = sum(g.compile_seconds for g in run.output)
        run.warmup_seconds = time.perf_counter() - start
        log(f"  warm-up {run.schedule:44s} {run.warmup_seconds:7.2f}s (compile {run.compile_seconds:.2f}s)")
    width = max(-(-max(map(len, b)) // 32) * 32 for b in batches)
    costs = StepCosts(lm, case.batch, width, case.new_tokens, case.drafts, case.num_draft_tokens)
    for r in range(repeats):
        for run in runs:
            start = time.perf_counter()
            out = run.call()
            run.seconds.append(time.perf_counter() - start)
            run.recompiled |= any(g.compile_seconds > 0 for g in out)
        costs.measure()
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{run.schedule} {run.seconds[-1]:.2f}s" for run in runs))
    cost = costs.summary()
    form = default_verify_form(case.batch)  # the form generate's rounds ran
    record["costs"] = {**cost, "verify_form": form}
    reference = [s for g in runs[0].output for s in g.sequences]
    base = statistics.median(runs[0].seconds)
    for run in runs:
        seconds = statistics.median(run.seconds)
        gens = run.output
        tokens = sum(g.num_tokens for g in gens)
        sequences = [s for g in gens for s in g.sequences]
        entry = {
            "runner": run.runner, "schedule": run.schedule, "tokens": tokens, "seconds_median": seconds,
            "seconds": run.seconds, "tokens_per_second": tokens / seconds,
            "spread": max(run.seconds) / min(run.seconds), "compile_seconds": run.compile_seconds,
            "warmup_seconds": run.warmup_seconds, "recompiled_while_timed": run.recompiled,
            "speedup_vs_vanilla": base / seconds,
            "avg_layers": sum(sum(map(sum, g.layers_per_token)) for g in gens) / tokens,
            "tokens_equal_vanilla": float(np.mean([a == b for a, b in zip(sequences, reference)])),
        }
        if run.runner == "speculative":
            draft, k = gens[0].draft, gens[0].num_draft_tokens
            stats = {key: sum(g.draft_stats[key] for g in gens) for key in gens[0].draft_stats}
            spec = run.schedule.rsplit(" k=", 1)[0]
            tpr = stats["round_tokens"] / stats["rounds"]
            round_ms = k * cost["draft_step_ms"][spec] + cost["verify_ms"][form][k + 1]
            entry.update(draft=draft, num_draft_tokens=k, draft_stats=stats,
                         acceptance_rate=stats["accepted"] / stats["drafted"],
                         kept_rate=(stats["round_tokens"] - stats["rounds"]) / (k * stats["rounds"]),
                         tokens_per_round=tpr, model_speedup=tpr * cost["step_ms"] / round_ms,
                         verify_over_step=cost["verify_ms"][form][k + 1] / cost["step_ms"],
                         draft_step_over_step=cost["draft_step_ms"][spec] / cost["step_ms"])
        record["runs"].append(entry)
    spec_runs = [r for r in record["runs"] if r["runner"] == "speculative"]
    if spec_runs:
        best = max(spec_runs, key=lambda r: r["speedup_vs_vanilla"])
        record["best"] = {"schedule": best["schedule"], "speedup_vs_vanilla": best["speedup_vs_vanilla"]}
        same = min(r["tokens_equal_vanilla"] for r in record["runs"])
        record["notes"].append(f"best (draft, k): {best['schedule']}: {best['speedup_vs_vanilla']:.2f}x vanilla "
                               f"greedy's tokens/s, tokens equal to vanilla's in {100 * same:.0f}% of rows (every run)")
    del runs, costs  # the runs hold the model (their calls close over it)
    gc.collect()
    return record


# --- the suite -----------------------------------------------------------------------


def environment() -> dict:
    import jax

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__, "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(),
    }
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def run_suite(cases: Sequence[Case], repeats: int, json_path=None, log: Callable[[str], None] = print,
              suite: str = "custom", max_seconds: float | None = None, targets: Sequence[dict] = ()) -> dict:
    """Runs the cases in order, rewriting `json_path` (atomically) after each one.

    `targets` (a suite's, see `hsd_jax.bench_suites`) are reported as figures against
    their target values under the result's "targets"."""
    from hsd_jax.io import write_json

    check_targets(targets)  # a malformed one fails now, not after the timing runs
    definitions = __doc__.split("Definitions (docs/benchmarks.md restates them):")[1].split("\n\n")[0].strip()
    result = {"suite": suite, "repeats": repeats, "environment": environment(), "cases": [],
              "definitions": definitions}
    start = time.perf_counter()
    for case in cases:
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            result["cases"].append({"case": dataclasses.asdict(case), "label": case.label, "runs": [],
                                    "skipped": True, "notes": [f"skipped: past --max-seconds {max_seconds:g}"]})
            continue
        result["cases"].append(run_case(case, repeats, log=log))
        result["targets"] = target_figures(result, targets)
        result["environment"]["load_average_end"] = environment().get("load_average")
        if json_path is not None:
            write_json(json_path, result)
    result["targets"] = target_figures(result, targets)
    if json_path is not None:
        write_json(json_path, result)
    return result


_TARGET_KEYS = {"name", "case", "run", "value", "target", "unit", "over"}


def check_targets(targets: Sequence[dict]) -> None:
    """Each target has the form `hsd_jax.bench_suites` describes, or an HsdError says what is wrong."""
    for i, t in enumerate(targets):
        what = f"target {i + 1} ({t.get('name', 'unnamed')!r})" if isinstance(t, dict) else f"target {i + 1}"
        if not isinstance(t, dict) or not {"name", "case", "run", "value", "target"} <= set(t) or set(t) - _TARGET_KEYS:
            raise HsdError(f"{what}: give name, case, run, value and target (and optionally over, unit), "
                           "as in hsd_jax/bench_suites.py")
        pairs = [t["run"]] + ([t["over"]] if "over" in t else [])
        if not isinstance(t["case"], dict) or any(not isinstance(r, (list, tuple)) or len(r) != 2 for r in pairs):
            raise HsdError(f"{what}: case is a dict of case fields, run and over are (runner, schedule) pairs")
        if isinstance(t["target"], bool) or not isinstance(t["target"], (int, float)) or not t["target"] > 0:
            raise HsdError(f"{what}: target is a number above 0, got {t['target']!r}")
        if t.get("unit", "x") not in ("x", "%"):
            raise HsdError(f"{what}: unit is 'x' or '%', got {t['unit']!r}")


def target_figures(result: dict, targets: Sequence[dict]) -> list[dict]:
    """Each target's figure on every case and run it applies to: the figure, the target and
    `of_target` (figure / target). Information for the report; a run without the figure
    (e.g. no transformers run to compare with) gives no line."""
    figures = []
    for rec in result["cases"]:
        if rec.get("skipped"):
            continue
        runs = {(r["runner"], r["schedule"]): r for r in rec["runs"]}
        for t in targets:
            if any(rec["case"].get(k) != v for k, v in t["case"].items()):
                continue
            runner, schedule = t["run"]
            for (r_runner, r_schedule), run in runs.items():
                if runner not in ("*", r_runner):
                    continue
                if schedule != r_schedule and not (schedule == "*" and r_schedule != "vanilla"):
                    continue
                value = run.get(t["value"])
                if "over" in t:
                    base = (runs.get(tuple(t["over"])) or {}).get(t["value"])
                    value = value / base if value is not None and base else None
                if value is None:
                    continue
                named = f"{r_runner} {r_schedule} " if "*" in (runner, schedule) else ""
                figures.append({"name": f"{rec['label']}: {named}{t['name']}", "value": value, "target": t["target"],
                                "unit": t.get("unit", "x"), "of_target": value / t["target"]})
    return figures


# --- printing ----------------------------------------------------------------------


def case_rows(rec: dict) -> list[list[str]]:
    """One table row per run of a case."""
    if rec.get("kind") == "speculative":
        return _speculative_rows(rec)
    if rec.get("kind") == "calm":
        return _calm_rows(rec)
    rows = []
    for r in rec["runs"]:
        devices = r["runner"] == "devices"  # its speedup is over compiled vanilla on one device
        rows.append([
            f"devices x{r['devices']}" if devices else r["runner"], _short(r["schedule"]), f"{r['avg_layers']:.2f}",
            f"{r['tokens_per_second']:.2f}" + ("*" if r.get("spread", 1.0) > NOISY else ""),
            _fmt(r["speedup_vs_transformers"], "x"),
            _fmt(r["speedup_vs_one_device"], "x") if devices else
            _fmt(r["speedup_vs_vanilla"], "x") if r["schedule"] != "vanilla" else "",
            _fmt(r["ideal_speedup"], "x") if r["schedule"] != "vanilla" else "",
            _fmt(r["speedup_over_ideal"], "", pct=True) if r["schedule"] != "vanilla" else "",
            _fmt(r["fraction_of_roofline"], "", pct=True),
            f"{r['compile_seconds']:.1f}" if r["runner"] in ("compiled", "static", "devices") else "",
        ])
    return rows


NOISY = 1.5  # a run whose slowest round took this many times its fastest is starred in the table
HEADER = ["runner", "schedule", "avg layers", "tok/s", "vs HF", "speedup", "ideal", "of ideal", "roofline",
          "compile s"]
SPECULATIVE_HEADER = ["runner", "draft, k", "layers/tok", "tok/s", "speedup", "accept", "kept", "tok/round",
                      "verify/step", "draft/step", "model", "same", "compile s"]


def _header(rec: dict) -> list[str]:
    return {"speculative": SPECULATIVE_HEADER, "calm": CALM_HEADER}.get(rec.get("kind"), HEADER)


def _speculative_rows(rec: dict) -> list[list[str]]:
    """A speculative case's rows: speed against vanilla, acceptance (each row's agreeing prefix),
    kept (the drafts the batch kept: its minimum), the step costs and the speedup they predict."""
    rows = []
    for r in rec["runs"]:
        spec = r["runner"] == "speculative"
        rows.append([
            r["runner"], _short(r["schedule"]), f"{r['avg_layers']:.2f}",
            f"{r['tokens_per_second']:.1f}" + ("*" if r.get("spread", 1.0) > NOISY else ""),
            _fmt(r["speedup_vs_vanilla"], "x") if spec else "",
            _fmt(r.get("acceptance_rate"), "", pct=True) if spec else "",
            _fmt(r.get("kept_rate"), "", pct=True) if spec else "",
            f"{r['tokens_per_round']:.2f}" if spec else "",
            _fmt(r.get("verify_over_step"), "x") if spec else "",
            _fmt(r.get("draft_step_over_step"), "x") if spec else "",
            _fmt(r.get("model_speedup"), "x") if spec else "",
            f"{100 * r['tokens_equal_vanilla']:.0f}%",
            f"{r['compile_seconds']:.1f}",
        ])
    return rows


def _short(spec: str) -> str:
    return spec.replace(",T=64", "").replace(",warmup=0", "")


def _fmt(value, unit: str, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if pct else f"{value:.2f}{unit}"


def _by_int(item) -> int:
    return int(item[0])  # JSON keys are strings: "10" after "9"


def _case_title(rec: dict) -> str:
    if rec.get("skipped"):
        return rec["label"]
    if rec.get("kind") == "calm":
        w = rec["weights"]
        return (f"{rec['label']}: LM head {w['head_bytes'] / 2**20:.1f} MiB = {w['head_over_layer']:.1f} layers' "
                f"weights")
    if rec.get("kind") == "speculative":
        c = rec["costs"]
        forms = "; ".join(f"{form} " + ", ".join(f"{t}: {ms:.2f}" for t, ms in sorted(by_t.items(), key=_by_int))
                          for form, by_t in c["verify_ms"].items())
        return (f"{rec['label']}: one-token step {c['step_ms']:.2f} ms; verify pass over T positions, ms by T: "
                f"{forms} (the runs used {c['verify_form']})")
    bw = rec["bandwidth"]
    return (f"{rec['label']}: bandwidth {bw['bytes_per_second'] / 1e9:.2f} GB/s ({bw['probe']}), "
            f"roofline {rec['roofline_tokens_per_second']:.2f} tok/s")


def format_table(result: dict) -> str:
    """The results as plain text: one table per case, then the figures against their targets."""
    lines = [f"hsd-jax bench: {result['suite']} on {result['environment']['device']}, "
             f"medians of {result['repeats']}"]
    for rec in result["cases"]:
        lines += ["", _case_title(rec)]
        lines += [f"  {note}" for note in rec.get("notes", [])]
        if not rec["runs"]:
            continue
        header = _header(rec)
        rows = [header] + case_rows(rec)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for n, row in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                          for i, (c, w) in enumerate(zip(row, widths))).rstrip())
            if n == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
    if _any_noisy(result):
        lines += ["", _NOISY_NOTE]
    if result.get("targets"):
        lines += ["", "targets:"] + ["  " + _target_line(f) for f in result["targets"]]
    return "\n".join(lines)


_NOISY_NOTE = (f"* its slowest round took over {NOISY}x its fastest: the machine was busy; "
               "the rounds are in the JSON (`seconds`)")


def _any_noisy(result: dict) -> bool:
    return any(r.get("spread", 1.0) > NOISY for rec in result["cases"] for r in rec.get("runs", []))


def _target_line(f: dict) -> str:
    """One target's figure as the report prints it, e.g. "...: 1.42x, target 2.00x (71% of it)"."""
    def show(x):
        return f"{100 * x:.0f}%" if f["unit"] == "%" else f"{x:.2f}{f['unit']}"

    return f"{f['name']}: {show(f['value'])}, target {show(f['target'])} ({100 * f['of_target']:.0f}% of it)"


def print_table(result: dict) -> None:
    """Rich tables on a terminal wide enough for every number; else `format_table`, whose
    plain lines a log, a pipe or a narrow terminal keeps whole (rich would cut columns)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_table(result))
        return
    console = Console()
    tables = [_rich_table(rec, Table) for rec in result["cases"]]
    unbounded = console.options.update_width(1 << 20)  # console.measure alone stops at the console width
    too_wide = any(console.measure(t, options=unbounded).minimum > console.width for t in tables)
    if not console.is_terminal or too_wide:
        print(format_table(result))
        return
    console.print(f"hsd-jax bench: {result['suite']} on {result['environment']['device']}, "
                  f"medians of {result['repeats']}", markup=False)
    for rec, table in zip(result["cases"], tables):
        console.print(table)
        for note in rec.get("notes", []):
            console.print(f"  {note}", markup=False)
    if _any_noisy(result):
        console.print(_NOISY_NOTE, markup=False)
    if result.get("targets"):
        console.print("targets:", markup=False)
    for f in result.get("targets", []):
        console.print("  " + _target_line(f), markup=False)


def _rich_table(rec: dict, table_type):
    """A case's rich table: headers and the schedule may fold onto more lines, a number
    keeps its whole width."""
    table = table_type(title=_case_title(rec), title_justify="left")
    rows = case_rows(rec)
    for i, h in enumerate(_header(rec)):
        widest = max((len(r[i]) for r in rows), default=0)
        table.add_column(h, justify="left" if h in ("runner", "schedule", "draft, k") else "right", overflow="fold",
                         min_width=None if h in ("schedule", "draft, k") else widest)
    for row in rows:
        table.add_row(*row)
    return table


# --- suites --------------------------------------------------------------------------


def load_suites(path=None) -> tuple[dict, dict]:
    """(SUITES, SCHEDULES): the package's (`hsd_jax.bench_suites`, installed with it), or
    those of the Python file `path` that defines them in the same form."""
    import importlib.util
    from pathlib import Path

    if path is None:
        from hsd_jax import bench_suites

        return bench_suites.SUITES, bench_suites.SCHEDULES
    path = Path(path)
    if not path.is_file():
        raise HsdError(f"suites file {path} does not exist")
    spec = importlib.util.spec_from_file_location("hsd_jax_bench_suites", path)
    if spec is None:  # Python imports only .py files
        raise HsdError(f"suites file {path} is not a Python file; give a .py file like hsd_jax/bench_suites.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise HsdError(f"suites file {path}:{err.lineno}: {err.msg}") from None
    if not isinstance(getattr(module, "SUITES", None), dict):
        raise HsdError(f"suites file {path} defines no SUITES dict (see hsd_jax/bench_suites.py for the form)")
    return module.SUITES, getattr(module, "SCHEDULES", {})


def _tiny_schedule(spec: str, model: str, tiny_specs: list[str], new_tokens: int) -> str:
    """The first of `tiny_specs` with the method (hsd, skipdecode, ...) that `spec` has on `model`."""
    from hsd_jax.schedules import resolve

    layers = model_config(model)[1].num_layers
    method = resolve(spec, num_layers=layers, max_new_tokens=new_tokens).spec.partition(":")[0]
    return next((s for s in tiny_specs if s.partition(":")[0] == method), spec)


def build_cases(suite: dict, schedules: dict, *, models=None, prompts=None, batches=None, beams=None,
                runners=None, schedule_specs=None, dtype=None, new_tokens=None, dry_run=False) -> list[Case]:
    """The cases of a suite, with any axis replaced by the given overrides."""
    if suite.get("kind") == "calm":
        if prompts or (beams and set(beams) != {1}) or runners:
            raise HsdError("a CALM suite takes its prompts from its models' settings, decodes greedily in compiled "
                           "mode: leave out --prompt, --beams and --runners (--schedules gives the CALM specs)")
        return build_calm_cases(suite, models=models, batches=batches, schedule_specs=schedule_specs, dtype=dtype,
                                new_tokens=new_tokens, dry_run=dry_run)
    if suite.get("kind") == "speculative":
        if prompts or (beams and set(beams) != {1}) or runners:
            raise HsdError("a speculative suite takes its prompts from its dataset, decodes greedily and "
                           "times vanilla compiled greedy against its drafts: leave out --prompt, --beams and "
                           "--runners (--schedules gives the drafts)")
        return build_speculative_cases(suite, schedules, models=models, batches=batches, drafts=schedule_specs,
                                       dtype=dtype, new_tokens=new_tokens, dry_run=dry_run)
    models = list(models or suite["models"])
    prompts = list(prompts or suite["prompts"])
    settings = [tuple(s) for s in suite["settings"]]
    sched_settings = [tuple(s) for s in suite.get("schedule_settings", settings)]
    if batches or beams:
        settings = [(b, k) for b in (batches or sorted({s[0] for s in settings}))
                    for k in (beams or sorted({s[1] for s in settings}))]
        sched_settings = settings
    runners = tuple(runners or suite["runners"])
    for r in runners:
        if r not in RUNNERS:
            raise HsdError(f"unknown runner {r!r}; choose from {', '.join(RUNNERS)}")
    dtype = dtype or suite.get("dtype", "float32")
    new_tokens = new_tokens or suite.get("new_tokens", 64)
    for model in models:
        if model not in ARCHS:
            raise HsdError(f"unknown model {model!r}; choose from {', '.join(ARCHS)}")
    schedule_runners = tuple(suite.get("schedule_runners", ("compiled", "static")))

    def case(model, prompt, setting):
        specs = schedule_specs if schedule_specs is not None else suite.get("schedules", schedules.get(model, []))
        if schedule_specs is None and "schedule_count" in suite:
            specs = specs[: suite["schedule_count"]]
        arch = TINY[ARCHS[model]["model_type"]] if dry_run else model
        if dry_run and schedule_specs is None:  # the tiny model's schedule of the same method, for each
            specs = [_tiny_schedule(spec, model, schedules.get(arch, []), new_tokens) for spec in specs]
        specs = list(dict.fromkeys(specs))  # each once
        batch, k = setting
        return Case(model=arch, prompt_len=prompt, batch=batch, num_beams=k, new_tokens=new_tokens, dtype=dtype,
                    runners=runners, schedules=tuple(specs) if setting in sched_settings else (),
                    schedule_runners=schedule_runners)

    if suite.get("order") == "settings":  # every model at the first setting, then the next...
        return [case(m, p, s) for s in settings for p in prompts for m in models]
    return [case(m, p, s) for m in models for p in prompts for s in settings]


def build_speculative_cases(suite: dict, schedules: dict, *, models=None, batches=None, drafts=None, dtype=None,
                            new_tokens=None, dry_run=False) -> list[SpeculativeCase]:
    """The cases of a speculative suite (`"kind": "speculative"` in `hsd_jax.bench_suites`): its
    models (Hugging Face folders) x batch sizes, each timing vanilla against every draft x k.
    --dry-run swaps each model for tiny random GPT-2, its drafts for the tiny model's
    schedules and its prompts for a few random ones."""
    drafts = list(drafts if drafts else suite["drafts"])
    if not drafts:
        raise HsdError("a speculative suite needs at least one draft schedule (--schedules SPEC ...)")
    new_tokens = new_tokens or suite.get("new_tokens", 32)
    cases = []
    for model in models or suite["models"]:
        for batch in batches or suite["batches"]:
            case = SpeculativeCase(model=model, batch=batch, drafts=tuple(drafts),
                                   num_draft_tokens=tuple(suite["num_draft_tokens"]),
                                   dataset=suite.get("dataset"), split=suite.get("split", "validation"),
                                   num_prompts=suite.get("num_prompts", 16), new_tokens=new_tokens,
                                   dtype=dtype or suite.get("dtype", "float32"))
            if dry_run:
                tiny = list(dict.fromkeys(schedules.get("tiny-gpt2", ["hsd:s=1,min=0,max=2"])))
                case = dataclasses.replace(case, model="tiny-gpt2", dataset=None, num_prompts=2 * batch,
                                           drafts=tuple(tiny[:2]), num_draft_tokens=case.num_draft_tokens[:2])
            elif model not in ARCHS and not os.path.isdir(model):
                raise HsdError(f"{model} is not a model folder; the speculative suite times a trained model "
                               "(e.g. hsd-jax demo's, or train/commongen_small.sh's): pass --model FOLDER")
            cases.append(case)
    return cases


# --- CALM: early exit against vanilla -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalmCase:
    """CALM settings against vanilla on one model, at every batch size, side by side.

    Every run decodes the same `num_prompts` prompts per call, `batch` rows at a time
    (compiled mode, greedy, all prompts padded to one width), so each batch size decodes
    the same sequences: with per-sequence exits (the default) they get the same tokens and
    layers at every batch size, which the record checks (`same_as_batch_1`). Prompts are
    random token ids (`prompt_len` each, EOS off) for an ARCHS key, or
    `hsd_jax.data.format_source` of the first distinct sources of `dataset` for a trained
    model folder (EOS on: the model's own stopping, as in evaluation).
    """

    model: str  # an ARCHS key (random weights) or a Hugging Face folder (a trained model)
    schedules: tuple[str, ...]  # CALM specs, each timed against vanilla
    batches: tuple[int, ...] = (1, 8)
    dataset: str | None = None  # trained models: a dataset name for `load_dataset_pairs`
    split: str = "validation"
    num_prompts: int = 8
    prompt_len: int = 32  # random prompts
    new_tokens: int = 64
    dtype: str = "float32"
    kind: str = "calm"

    @property
    def label(self) -> str:
        name = self.model if self.model in ARCHS else os.path.basename(os.path.normpath(self.model))
        weights = "random weights" if self.model in ARCHS else "trained"
        return (f"{name} ({weights}) {self.dtype} CALM, {self.num_prompts} prompts at batch "
                f"{'/'.join(map(str, self.batches))}, new={self.new_tokens}")


def _calm_prompts(case: CalmCase, lm) -> list[list[int]]:
    if case.dataset is None or lm.tokenizer is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, lm.config.vocab_size, (case.num_prompts, case.prompt_len)).tolist()
    from hsd_jax.data import format_source, load_dataset_pairs

    sources = list(dict.fromkeys(src for src, _ in load_dataset_pairs(case.dataset, case.split)))
    return [lm.tokenizer.encode(format_source(src)) for src in sources[: case.num_prompts]]


def calm_step_costs(gens, spec: str, sizes: dict[str, int], num_layers: int, max_new_tokens: int) -> tuple:
    """(weight bytes, LM-head exit tests) a CALM (or vanilla) run's decode read, summed over
    the `Generation`s of one call, from the layers each row ran at each step.

    A step's program runs layer l for the whole batch while any row is below its exit, so
    it runs the deepest row's n layers and propagates the K/V of the other L - n; the
    softmax measure runs the LM head at every tested layer up to n (and after the last
    layer when n = L); the state measure and vanilla run it once. Finished rows (after
    their EOS) have no record and exit at their first test, so they add nothing.
    """
    from hsd_jax.calm import can_exit, layers_tested
    from hsd_jax.schedules import CalmConfig, resolve

    calm = resolve(spec, num_layers=num_layers, max_new_tokens=max_new_tokens)
    tested = []
    if isinstance(calm, CalmConfig) and calm.measure == "softmax" and can_exit(calm, num_layers, max_new_tokens):
        tested = [l + 1 for l in layers_tested(num_layers, calm.min_exit, calm.every)]
    total, tests = 0.0, 0
    for g in gens:
        rows = [r for r in g.layers_per_token if r]
        for s in range(max(map(len, rows), default=0)):
            n = max(r[s] for r in rows if len(r) > s)
            step_tests = sum(m <= n for m in tested) if s > 0 else 0  # the prefill runs no test
            heads = step_tests + (1 if n == num_layers or not tested else 0)
            total += heads * sizes["head"] + n * sizes["layer"] + (num_layers - n) * sizes["kv"]
            tests += step_tests
    return total, tests


def run_calm_case(case: CalmCase, repeats: int, log: Callable[[str], None] = print) -> dict:
    """Times vanilla and every CALM setting at each batch size, side by side; returns the record.

    Rounds alternate their order (forwards, then backwards) so that a drifting machine
    weighs on every run alike, and `speedup_vs_vanilla` is the median over rounds of the
    run's tokens/s over the same round's vanilla tokens/s (the same batch size; tokens/s,
    not time, because early exits can change how long the outputs run before their EOS).
    Per run also: Avg. Layer, the weight bytes per token its steps read
    (`calm_step_costs`) and the ideal speedup they give, LM-head exit tests per decode
    step, the rows whose tokens equal vanilla's, and whether each row's tokens and layers
    equal those it got at batch 1. What one softmax exit test costs is measured twice:
    alone, in the same rounds (`SoftmaxTestCost`: `record["softmax_test"]`), and inside
    the loop by softmax runs that never exit (`ms_per_test`: their extra time over
    vanilla's per test run); each also over a vanilla decode step (`test_over_step`).
    """
    from hsd_jax.generate import generate

    record: dict[str, Any] = {"kind": "calm", "case": dataclasses.asdict(case), "label": case.label, "runs": [],
                              "notes": []}
    if case.model not in ARCHS and not os.path.isdir(case.model):
        record.update(skipped=True, notes=[f"skipped: no model folder {case.model} (train/commongen_small.sh "
                                           "makes the reproduction's)"])
        log(f"{case.label}: {record['notes'][0]}")
        return record
    if case.model in ARCHS:
        lm = random_model(case.model, case.dtype)
    else:
        import hsd_jax

        lm = hsd_jax.load(case.model, dtype=case.dtype)
    L = lm.config.num_layers
    sizes = weight_bytes(lm)  # before generate puts the model in the decode layout
    record["weights"] = {**{f"{k}_bytes": v for k, v in sizes.items()}, "num_layers": L,
                         "head_over_layer": sizes["head"] / sizes["layer"]}
    rows = _calm_prompts(case, lm)
    eos = lm.config.eos_token_id
    log(f"{case.label}: {len(rows)} prompts from {case.dataset or 'random tokens'}, EOS {'on' if eos is not None else 'off'}")

    def call_of(batch, spec):
        def call():
            return [generate(lm, input_ids=rows[i:i + batch], schedule=spec, max_new_tokens=case.new_tokens,
                             eos_token_id=eos, pad_token_id=0, pad_to_multiple_of=32, devices=1)  # one device's
                    for i in range(0, len(rows), batch)]
        return call

    runs = [Run(f"batch {b}", spec, call_of(b, spec)) for b in case.batches for spec in ("vanilla", *case.schedules)]
    for run in runs:
        start = time.perf_counter()
        run.output = run.call()
        run.compile_seconds = sum(g.compile_seconds for g in run.output)
        run.warmup_seconds = time.perf_counter() - start
        log(f"  warm-up {run.runner:9s} {run.schedule:44s} {run.warmup_seconds:7.2f}s "
            f"(compile {run.compile_seconds:.2f}s)")
    test_cost = SoftmaxTestCost(lm, case.batches)
    for r in range(repeats):
        for run in (runs if r % 2 == 0 else runs[::-1]):
            start = time.perf_counter()
            out = run.call()
            run.seconds.append(time.perf_counter() - start)
            run.recompiled |= any(g.compile_seconds > 0 for g in out)
        test_cost.measure()
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{run.runner[6:]}/{_short(run.schedule)} {run.seconds[-1]:.2f}s"
                                                     for run in runs))
    vanilla = {run.runner: run for run in runs if run.schedule == "vanilla"}
    record["softmax_test"] = {}
    for batch, ms in test_cost.summary().items():  # one test, over a vanilla decode step (prefill and calls spread)
        base = vanilla[f"batch {batch}"]
        step = statistics.median(base.seconds) / sum(g.num_steps - 1 for g in base.output)
        record["softmax_test"][str(batch)] = {"ms": ms, "test_over_step": ms / 1e3 / step,
                                              "samples": test_cost.samples[batch]}
    first = {run.schedule: run for run in runs if run.runner == runs[0].runner}
    for run in runs:
        gens, base = run.output, vanilla[run.runner]
        batch = int(run.runner.split()[1])
        tokens = sum(g.num_tokens for g in gens)
        seconds = statistics.median(run.seconds)
        step_bytes, tests = calm_step_costs(gens, run.schedule, sizes, L, case.new_tokens)
        base_bytes, _ = calm_step_costs(base.output, "vanilla", sizes, L, case.new_tokens)
        base_tokens = sum(g.num_tokens for g in base.output)
        sequences = [s for g in gens for s in g.sequences]
        layers = [x for g in gens for x in g.layers_per_token]
        decode_steps = sum(g.num_steps - 1 for g in gens)  # steps after the prefill, per call
        entry = {
            "runner": "compiled", "batch": batch, "schedule": run.schedule, "tokens": tokens,
            "seconds_median": seconds, "seconds": run.seconds, "tokens_per_second": tokens / seconds,
            "spread": max(run.seconds) / min(run.seconds), "compile_seconds": run.compile_seconds,
            "warmup_seconds": run.warmup_seconds, "recompiled_while_timed": run.recompiled,
            "avg_layers": sum(map(sum, layers)) / tokens,
            # tokens/s over vanilla's, per round: CALM may change the outputs' lengths (EOS on)
            "speedup_vs_vanilla": statistics.median((tokens / s) / (base_tokens / b)
                                                    for b, s in zip(base.seconds, run.seconds)),
            "weight_bytes_per_token": step_bytes / tokens,
            "ideal_speedup": (base_bytes / base_tokens) / (step_bytes / tokens),
            "tests_per_step": tests / decode_steps if decode_steps else 0.0,
            "tokens_equal_vanilla": float(np.mean([a == b for a, b in zip(sequences, [s for g in base.output
                                                                                      for s in g.sequences])])),
        }
        if run.runner != runs[0].runner:
            ref = first[run.schedule].output
            entry["same_as_batch_1"] = sequences == [s for g in ref for s in g.sequences] and \
                layers == [x for g in ref for x in g.layers_per_token]
        if tests and entry["avg_layers"] == L:  # tests that never exited: their cost alone
            per_step = statistics.median(base.seconds) / sum(g.num_steps - 1 for g in base.output)
            entry["ms_per_test"] = 1e3 * (seconds - statistics.median(base.seconds)) / tests
            entry["test_over_step"] = entry["ms_per_test"] / 1e3 / per_step
        record["runs"].append(entry)
    record["notes"] += calm_figures(record)
    del runs, lm
    gc.collect()
    return record


class SoftmaxTestCost:
    """One softmax-response exit test alone — the LM head on a (batch, 1, D) hidden state
    and the top-1 minus top-2 gap — at each batch size: a jitted loop of `n` tests (each
    made to depend on the last, so none is hoisted), timed once per round, in
    milliseconds per test."""

    def __init__(self, lm, batches, n: int = 50):
        import jax
        import jax.numpy as jnp

        from hsd_jax.calm import confidence
        from hsd_jax.models import family

        params, config = lm.to_layout("decode").params, lm.config
        fam, dtype = family(config), jax.tree.leaves(params)[0].dtype
        self.n = n

        def tests(params, h):
            def body(_, h):
                c = confidence(fam.head(params, h, config)[:, -1])
                return h + (0 * c[:, None, None]).astype(h.dtype)  # x * 0 is not folded for floats
            return jax.lax.fori_loop(0, n, body, h)

        program = jax.jit(tests)
        self.probes = {b: (lambda h=jnp.ones((b, 1, config.hidden_size), dtype): program(params, h))
                       for b in batches}
        self.samples: dict[int, list[float]] = {b: [] for b in batches}
        self.measure(record=False)  # compiles

    def measure(self, record: bool = True) -> None:
        import jax

        for b, probe in self.probes.items():
            start = time.perf_counter()
            jax.block_until_ready(probe())
            if record:
                self.samples[b].append((time.perf_counter() - start) / self.n * 1e3)

    def summary(self) -> dict[int, float]:
        return {b: statistics.median(v) for b, v in self.samples.items() if v}


def calm_figures(rec: dict) -> list[str]:
    """The issue's CPU targets, as figures for the report (batch 1 = the smallest batch)."""
    runs = [r for r in rec["runs"] if r["batch"] == min(r["batch"] for r in rec["runs"])]
    L = rec["weights"]["num_layers"]
    from hsd_jax.calm import can_exit
    from hsd_jax.schedules import CalmConfig, resolve

    def calm(r):
        c = resolve(r["schedule"], num_layers=L, max_new_tokens=rec["case"]["new_tokens"])
        return c if isinstance(c, CalmConfig) else None

    lines = []
    state = [r for r in runs if calm(r) and calm(r).measure == "state"]
    shallow = [r for r in state if r["avg_layers"] <= 0.6 * L]
    if shallow:
        best = max(shallow, key=lambda r: r["speedup_vs_vanilla"])
        lines.append(f"state measure at <= 60% of the layers, batch {best['batch']}: {best['speedup_vs_vanilla']:.2f}x "
                     f"vanilla at {best['avg_layers']:.2f} layers ({_short(best['schedule'])}), target 1.30x")
    if state:
        worst = min(state, key=lambda r: r["speedup_vs_vanilla"])
        lines.append(f"slowest state-measure setting: {worst['speedup_vs_vanilla']:.2f}x vanilla "
                     f"({_short(worst['schedule'])}, {worst['avg_layers']:.2f} layers), target >= 0.80x")
    for r in runs:
        c = calm(r)
        if c and not can_exit(c, L, rec["case"]["new_tokens"]):
            lines.append(f"{_short(r['schedule'])} (cannot exit, no test): {r['speedup_vs_vanilla']:.2f}x vanilla, "
                         "target >= 0.90x")
        if "ms_per_test" in r:
            lines.append(f"{_short(r['schedule'])} (never exits): each exit test cost {r['ms_per_test']:.2f} ms in the "
                         f"loop, {100 * r['test_over_step']:.0f}% of a vanilla step; {r['tests_per_step']:.1f} tests "
                         "per step")
    for batch, t in rec.get("softmax_test", {}).items():
        lines.append(f"softmax exit test alone (LM head, {rec['weights']['head_over_layer']:.1f} layers' weights), "
                     f"batch {batch}: {t['ms']:.2f} ms, {100 * t['test_over_step']:.0f}% of a vanilla step")
    return lines


CALM_HEADER = ["batch", "schedule", "avg layers", "tok/s", "speedup", "ideal", "tests/step", "same b1", "=vanilla",
               "compile s"]


def _calm_rows(rec: dict) -> list[list[str]]:
    rows = []
    for r in rec["runs"]:
        calm = r["schedule"] != "vanilla"
        same = r.get("same_as_batch_1")
        rows.append([
            str(r["batch"]), _short(r["schedule"]), f"{r['avg_layers']:.2f}",
            f"{r['tokens_per_second']:.1f}" + ("*" if r.get("spread", 1.0) > NOISY else ""),
            _fmt(r["speedup_vs_vanilla"], "x") if calm else "", _fmt(r["ideal_speedup"], "x") if calm else "",
            f"{r['tests_per_step']:.1f}" if calm else "", "" if same is None else ("yes" if same else "NO"),
            f"{100 * r['tokens_equal_vanilla']:.0f}%" if calm else "", f"{r['compile_seconds']:.1f}",
        ])
    return rows


def build_calm_cases(suite: dict, *, models=None, batches=None, schedule_specs=None, dtype=None, new_tokens=None,
                     dry_run=False) -> list[CalmCase]:
    """The cases of a CALM suite (`"kind": "calm"` in `hsd_jax.bench_suites`): each model of
    `models` (name -> its settings: schedules, dataset, new_tokens, prompt_len) at every
    batch size. --model takes the suite's settings for a model it names (and needs
    --schedules for another); --dry-run runs tiny random GPT-2 on two prompts."""
    known = suite["models"]
    cases = []
    for model in models or list(known):
        settings = dict(known.get(model, {}))
        specs = schedule_specs if schedule_specs else settings.get("schedules")
        if not specs:
            raise HsdError(f"the CALM suite has no settings for {model}; give its CALM specs with --schedules")
        case = CalmCase(model=model, schedules=tuple(dict.fromkeys(specs)),
                        batches=tuple(batches or suite.get("batches", (1, 8))), dataset=settings.get("dataset"),
                        split=settings.get("split", "validation"), num_prompts=suite.get("num_prompts", 8),
                        prompt_len=settings.get("prompt_len", 32),
                        new_tokens=new_tokens or settings.get("new_tokens", 64),
                        dtype=dtype or suite.get("dtype", "float32"))
        if dry_run:
            case = dataclasses.replace(case, model="tiny-gpt2", dataset=None, num_prompts=2, batches=(1, 2),
                                       prompt_len=8, new_tokens=min(case.new_tokens, 8),
                                       schedules=tuple(suite.get("dry_run_schedules", case.schedules)))
        cases.append(case)
    return cases
