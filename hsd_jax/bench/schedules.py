"""Side-by-side decode benchmarks of schedules: transformers against hsd-jax, vanilla against
schedules.

One `Case` is a model architecture (random weights, nothing to download), a dtype, a
prompt length, a batch size and a beam count. For a case, every `Run` — transformers'
PyTorch `generate`, hsd-jax eager / compiled / static, each schedule — is warmed up
once (that call's compile time is reported apart), then all runs are timed in turn,
`repeats` rounds, together with a memory-bandwidth probe, so every figure of a case
comes from the same minutes of the same machine. A figure is the median of its rounds.

The figures of a case's record (tokens/s, weight bytes, ideal speedup, roofline, the
devices run) are defined in `hsd_jax.bench.suite`, whose docstring every result carries.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any, Callable

import numpy as np

from hsd_jax.bench.calm import CalmCase, _calm_rows, run_calm_case
from hsd_jax.bench.common import (NOISY, Bandwidth, Run, _fmt, _nbytes, _short, model_config, random_model,
                                  schedule_bytes, torch_model, weight_bytes)
from hsd_jax.bench.speculative import SpeculativeCase, _speculative_rows, run_speculative_case
from hsd_jax.errors import HsdError

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


# --- the table ----------------------------------------------------------------------


HEADER = ["runner", "schedule", "avg layers", "tok/s", "vs HF", "speedup", "ideal", "of ideal", "roofline",
          "compile s"]


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
