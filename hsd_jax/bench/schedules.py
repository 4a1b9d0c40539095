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
from hsd_jax.bench.calm import calm_step_costs
from hsd_jax.bench.common import (NOISY, Bandwidth, Run, _fmt, _nbytes, _short, hbm_peak, last_program_control_flow,
                                  model_config, random_model, schedule_bytes, torch_model, weight_bytes)
from hsd_jax.bench.speculative import SpeculativeCase, _speculative_rows, run_speculative_case

RUNNERS = ("transformers", "transformers-static", "eager", "compiled", "static", "devices")
# transformers' runners and the `cache_implementation` each passes to `generate`
TRANSFORMERS_CACHES = {"transformers": "dynamic", "transformers-static": "static"}
# CALM state-measure thresholds are searched in 1 - lambda between these (log scale) for
# `Case.calm_depth`; random weights saturate anywhere in this range.
CALM_SEARCH = (1e-5, 0.5)


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # a key of ARCHS
    prompt_len: int
    batch: int  # inputs
    num_beams: int = 1
    new_tokens: int = 64
    dtype: str = "float32"
    runners: tuple[str, ...] = RUNNERS  # vanilla under each of these
    schedules: tuple[str, ...] = ()  # specs or presets, each under `schedule_runners` (CALM: compiled only)
    schedule_runners: tuple[str, ...] = ("compiled", "static")
    # CALM with the state measure at the lambda whose Avg. Layer comes nearest this fraction
    # of the depth, searched in the case (random weights exit wherever they saturate)
    calm_depth: float | None = None
    estimate_seconds: float | None = None  # how long the case should take, for --max-seconds (`run_suite`)
    part: str = ""  # which share of a setting's runs, where a suite splits them ("static schedules")

    @property
    def label(self) -> str:
        search = "greedy" if self.num_beams == 1 else f"beam{self.num_beams}"
        return f"{self.model} {self.dtype} prompt={self.prompt_len} batch={self.batch} {search}" + \
            (f", {self.part}" if self.part else "")


def _prompts(case: Case, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (case.batch, case.prompt_len), dtype=np.int64)


def _hsd_call(lm, ids: np.ndarray, case: Case, mode: str, schedule: str, devices: int = 1):
    """One `generate` call: (tokens made, compile seconds, token rows, avg layers, the Generation)."""
    from hsd_jax.generate import generate

    def call():  # one device unless asked: the other figures are one device's
        g = generate(lm, input_ids=ids, schedule=schedule, num_beams=case.num_beams, max_new_tokens=case.new_tokens,
                     mode=mode, eos_token_id=None, pad_token_id=0, devices=devices)
        return g.num_tokens, g.compile_seconds, g.sequences, g.avg_layers, g

    return call


def _torch_call(model, ids: np.ndarray, case: Case, cache: str = "dynamic"):
    import torch

    input_ids = torch.from_numpy(ids).to(model.device)
    mask = torch.ones_like(input_ids)
    extra = {} if cache == "dynamic" else {"cache_implementation": cache}

    def call():
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=case.new_tokens,
                                 min_new_tokens=case.new_tokens, do_sample=False, num_beams=case.num_beams,
                                 eos_token_id=None, pad_token_id=0, early_stopping=False, length_penalty=1.0, **extra)
        new = out[:, ids.shape[1]:].cpu().numpy()  # .cpu() waits for the GPU
        return int(new.size), 0.0, new.tolist(), float(lm_layers(model)), torch.get_num_threads()

    return call


def _calm_state_spec(lm, ids: np.ndarray, case: Case, log: Callable[[str], None]) -> tuple[str, list]:
    """The CALM state-measure spec whose Avg. Layer comes nearest `case.calm_depth` of the layers
    on these prompts: a bisection over log(1 - lambda) (Avg. Layer grows with lambda), every try
    one call of the same compiled program (thresholds are its arguments). Returns it and the tries."""
    from hsd_jax.generate import generate

    goal = case.calm_depth * lm.config.num_layers
    lo, hi = np.log10(CALM_SEARCH[0]), np.log10(CALM_SEARCH[1])  # lo: lambda near 1, deep exits
    tries = []
    for _ in range(7):
        mid = (lo + hi) / 2
        spec = f"calm:lambda={1 - 10 ** mid:.6g},measure=state"
        g = generate(lm, input_ids=ids, schedule=spec, num_beams=case.num_beams, max_new_tokens=case.new_tokens,
                     eos_token_id=None, pad_token_id=0, devices=1)
        tries.append({"schedule": spec, "avg_layers": g.avg_layers})
        lo, hi = (mid, hi) if g.avg_layers > goal else (lo, mid)
    best = min(tries, key=lambda t: abs(t["avg_layers"] - goal))
    log(f"  CALM state measure: {best['schedule']} at {best['avg_layers']:.2f} layers (goal {goal:.1f}), "
        f"of {len(tries)} tries")
    return best["schedule"], tries


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


def run_case(case: Case, repeats: int, log: Callable[[str], None] = print, backend: str | None = None,
             models: dict | None = None) -> dict:
    """Times every run of a case side by side; returns the case's JSON record.

    `models` (optional) keeps the models between cases, by architecture and dtype: a later
    case of the same model then reuses its compiled programs (`run_suite` passes one on a GPU)."""
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
    torch_device = "cpu" if backend == "cpu" else "cuda"
    if backend != "cpu" and any(r in TRANSFORMERS_CACHES for r in runners) and not _torch_cuda():
        runners = [r for r in runners if r not in TRANSFORMERS_CACHES]
        record["notes"].append(f"transformers left out: PyTorch has no CUDA device here (JAX runs on {backend})")
    devices = len(jax.local_devices())
    if "devices" in runners and devices == 1:
        runners.remove("devices")
        record["notes"].append("devices left out: one local device (the row needs several: a multi-GPU machine, or "
                               "XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU, where they share the cores)")
    available = _available_memory() if backend == "cpu" else None
    if available is not None:
        # JAX weights + their per-layer decode copy + the bandwidth array (+ PyTorch's copy)
        # (+ a copy per further device, which on CPU share the memory).
        need = 3 * total + (total if any(r in TRANSFORMERS_CACHES for r in runners) else 0) + \
            ((devices - 1) * total if "devices" in runners else 0)
        if need > available and "transformers" in runners:
            runners = [r for r in runners if r not in TRANSFORMERS_CACHES]
            record["notes"].append(f"transformers left out: ~{need / 2**30:.1f} GiB needed, {available / 2**30:.1f} available")
            need -= total
        if need > available:
            record["notes"].append(f"skipped: ~{need / 2**30:.1f} GiB needed, {available / 2**30:.1f} GiB available")
            record["skipped"] = True
            log(f"{case.label}: {record['notes'][-1]}")
            return record

    key = (case.model, case.dtype)
    lm = (models or {}).get(key)
    if lm is None:
        log(f"{case.label}: building random weights ({total / 2**20:.0f} MiB)")
        lm = random_model(case.model, case.dtype)
        if models is not None:
            models[key] = lm
    config = lm.config
    ids = _prompts(case, config.vocab_size)
    sizes = weight_bytes(lm)
    vanilla = resolve("vanilla", num_layers=config.num_layers, max_new_tokens=case.new_tokens)
    vanilla_bytes = schedule_bytes(vanilla.layer_ops(), sizes, case.new_tokens)
    # K and V of every layer at every position a step attends to, per row: the prefill's
    # prompt, then step t's prompt + t + 1 (mean over the tokens made; the cache is bf16/f32 like the weights)
    kv_position_bytes = 2 * config.num_layers * config.hidden_size * {"float32": 4, "bfloat16": 2}[case.dtype]
    mean_positions = case.prompt_len + (case.new_tokens - 1) / 2
    record["weights"] = {"total_bytes": _nbytes(lm.params), **{f"{k}_bytes": v for k, v in sizes.items()},
                         "vanilla_bytes_per_token": vanilla_bytes, "num_layers": config.num_layers,
                         "kv_bytes_per_row_step": kv_position_bytes * mean_positions}

    runs: list[Run] = []
    torch_model_ = None
    if any(r in TRANSFORMERS_CACHES for r in runners):
        torch_model_ = (models or {}).get(("torch", *key)) or torch_model(lm, torch_device)
        if models is not None:
            models[("torch", *key)] = torch_model_
        if torch_device != "cpu":
            record["notes"].append("transformers: its own random weights on cuda (speed does not depend on values)")
    for runner, cache in TRANSFORMERS_CACHES.items():
        if runner in runners:
            runs.append(Run(runner, "vanilla", _torch_call(torch_model_, ids, case, cache)))
    for mode in ("eager", "compiled", "static"):
        if mode in runners:
            runs.append(Run(mode, "vanilla", _hsd_call(lm, ids, case, mode, "vanilla")))
    if "devices" in runners:  # each device the case's batch
        runs.append(Run("devices", "vanilla", _hsd_call(lm, np.tile(ids, (devices, 1)), case, "compiled", "vanilla",
                                                        devices=devices)))
    bytes_of = {"vanilla": vanilla_bytes}
    avg_of = {"vanilla": float(config.num_layers)}
    specs = list(case.schedules)
    if case.calm_depth is not None:
        spec, record["calm_search"] = _calm_state_spec(lm, ids, case, log)
        specs.append(spec)
    for spec in specs:
        sched = resolve(spec, num_layers=config.num_layers, max_new_tokens=case.new_tokens)
        if not hasattr(sched, "layer_ops"):  # CALM: decided at run time, one program ("static" runs it too)
            if "compiled" in case.schedule_runners:
                runs.append(Run("compiled", spec, _hsd_call(lm, ids, case, "compiled", spec)))
            continue
        bytes_of[spec] = schedule_bytes(sched.layer_ops(), sizes, case.new_tokens)
        ops = sched.layer_ops()[: case.new_tokens - 1]
        avg_of[spec] = float((config.num_layers + (ops == 0).sum()) / case.new_tokens)
        for mode in case.schedule_runners:
            runs.append(Run(mode, spec, _hsd_call(lm, ids, case, mode, spec)))

    bandwidth = Bandwidth(int(vanilla_bytes), case.dtype, cap=(1 << 30) if backend == "cpu" else (4 << 30))
    flows, threads = {}, {}
    for run in runs:  # warm-up: compiles (hsd-jax) or fills caches (PyTorch; a static cache compiles on CUDA)
        start = time.perf_counter()
        run.tokens, run.compile_seconds, run.output, run.avg_layers, extra = run.call()
        run.warmup_seconds = time.perf_counter() - start
        if run.runner in TRANSFORMERS_CACHES:
            threads[run.runner] = extra
            run.compile_seconds = run.warmup_seconds  # what the first call cost, compile or not
        elif run.runner != "eager":
            flows[(run.runner, run.schedule)] = last_program_control_flow(lm)
        if run.schedule not in bytes_of:  # CALM: what its steps read, from the layers each row ran
            step_bytes, _ = calm_step_costs([extra], run.schedule, sizes, config.num_layers, case.new_tokens)
            bytes_of[run.schedule], avg_of[run.schedule] = step_bytes / case.new_tokens, run.avg_layers
        log(f"  warm-up {run.runner:12s} {run.schedule:28s} {run.warmup_seconds:7.2f}s (compile {run.compile_seconds:.2f}s)")
    for r in range(repeats):
        for run in runs:
            start = time.perf_counter()
            _, compile_seconds, *_ = run.call()
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
    peak = hbm_peak(str(jax.devices()[0].device_kind)) if backend == "gpu" else None
    record["hbm_peak_bytes_per_second"] = peak

    medians = {(run.runner, run.schedule): statistics.median(run.seconds) for run in runs}
    reference = next((run.output for run in runs if run.runner == "compiled" and run.schedule == "vanilla"), None)
    for run in runs:
        seconds = medians[(run.runner, run.schedule)]
        inputs = case.batch * (devices if run.runner == "devices" else 1)
        tps = inputs * case.new_tokens / seconds
        base = medians.get((run.runner, "vanilla"))
        hf = medians.get(("transformers", "vanilla"))
        hf_static = medians.get(("transformers-static", "vanilla"))
        ideal = vanilla_bytes / bytes_of[run.schedule]
        speedup = base / seconds if base else None
        entry = {
            "runner": run.runner, "schedule": run.schedule, "tokens": run.tokens,
            "seconds_median": seconds, "seconds": run.seconds, "tokens_per_second": tps,
            "spread": max(run.seconds) / min(run.seconds),  # slowest / fastest round: noise of this run
            "compile_seconds": run.compile_seconds, "warmup_seconds": run.warmup_seconds,
            "recompiled_while_timed": run.recompiled,
            "ms_per_step": seconds / case.new_tokens * 1e3,  # the prefill's share included
            "avg_layers": avg_of[run.schedule],
            "weight_bytes_per_token": bytes_of[run.schedule],
            "speedup_vs_transformers": hf / seconds if hf else None,
            "speedup_vs_transformers_static": hf_static / seconds if hf_static else None,
            "speedup_vs_vanilla": speedup,
            "ideal_speedup": ideal,
            "fraction_of_ideal_saving": (speedup - 1) / (ideal - 1) if speedup and ideal > 1 else None,
            "speedup_over_ideal": speedup / ideal if speedup else None,
            "fraction_of_roofline": tps / (inputs * bw["bytes_per_second"] / bytes_of[run.schedule]),
        }
        # weights + the KV cache a step reads (its layers' share), over the device's peak HBM bandwidth
        kv = inputs * case.num_beams * record["weights"]["kv_bytes_per_row_step"] * avg_of[run.schedule] / config.num_layers
        entry["fraction_of_hbm_peak"] = (bytes_of[run.schedule] + kv) / (seconds / case.new_tokens) / peak if peak else None
        if run.runner in TRANSFORMERS_CACHES:
            entry.update(cache_implementation=TRANSFORMERS_CACHES[run.runner], torch_threads=threads[run.runner])
        if (run.runner, run.schedule) in flows:
            entry["control_flow"] = flows[(run.runner, run.schedule)]
        if run.runner == "devices":
            one = medians.get(("compiled", "vanilla"))
            entry.update(devices=devices, inputs=inputs, inputs_per_second=inputs / seconds,
                         speedup_vs_one_device=one and (inputs / seconds) / (case.batch / one),
                         speedup_vs_vanilla=None, speedup_vs_transformers=None)
        same_weights = run.runner not in TRANSFORMERS_CACHES or torch_device == "cpu"
        if reference is not None and run.schedule == "vanilla" and run.runner != "compiled" and same_weights:
            copies = devices if run.runner == "devices" else 1  # the devices run decodes the prompts N times
            same = np.asarray(run.output) == np.tile(np.asarray(reference), (copies, 1))
            entry["tokens_equal_compiled"] = float(same.mean())
        record["runs"].append(entry)
    del runs, torch_model_, lm, bandwidth
    gc.collect()
    return record


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _nbytes_estimate(arch: str, dtype: str) -> dict[str, int]:
    """Parameter bytes from the config alone (before anything is allocated)."""
    from hsd_jax.models import family

    _, config = model_config(arch)
    item = 4 if dtype == "float32" else 2
    shapes = family(config).expected_shapes(config)
    return {"/".join(k): int(np.prod(v)) * item for k, v in shapes.items()}


# --- the table ----------------------------------------------------------------------


HEADER = ["runner", "schedule", "avg layers", "tok/s", "ms/step", "vs HF", "vs HF static", "speedup", "ideal",
          "of ideal", "roofline", "of HBM peak", "compile s"]


def case_rows(rec: dict) -> list[list[str]]:
    """One table row per run of a case."""
    if rec.get("kind") == "speculative":
        return _speculative_rows(rec)
    if rec.get("kind") == "calm":
        return _calm_rows(rec)
    rows = []
    for r in rec["runs"]:
        devices = r["runner"] == "devices"  # its speedup is over compiled vanilla on one device
        skip = r["schedule"] != "vanilla"
        rows.append([
            f"devices x{r['devices']}" if devices else r["runner"], _short(r["schedule"]), f"{r['avg_layers']:.2f}",
            f"{r['tokens_per_second']:.2f}" + ("*" if r.get("spread", 1.0) > NOISY else ""),
            _fmt(r.get("ms_per_step"), ""),
            _fmt(r["speedup_vs_transformers"], "x"), _fmt(r.get("speedup_vs_transformers_static"), "x"),
            _fmt(r["speedup_vs_one_device"], "x") if devices else _fmt(r["speedup_vs_vanilla"], "x") if skip else "",
            _fmt(r["ideal_speedup"], "x") if skip else "",
            _fmt(r["speedup_over_ideal"], "", pct=True) if skip else "",
            _fmt(r["fraction_of_roofline"], "", pct=True), _fmt(r.get("fraction_of_hbm_peak"), "", pct=True),
            f"{r['compile_seconds']:.1f}" if r["runner"] != "eager" else "",
        ])
    return rows


def control_flow_line(rec: dict) -> str | None:
    """What one decode step of each mode runs as control flow (the most over its runs), from the
    compiled programs' HLO: a report line, or None where no run recorded it."""
    parts = []
    for mode in ("compiled", "static"):
        flows = [r["control_flow"] for r in rec.get("runs", []) if r["runner"] == mode and r.get("control_flow")]
        if flows:
            parts.append(f"{mode} {max(f['conditionals_per_step'] for f in flows)} conditionals per decode step "
                         f"and {max(f['top_level_whiles'] for f in flows)} while loops")
    return "HLO: " + "; ".join(parts) if parts else None
