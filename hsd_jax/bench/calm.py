"""CALM (early exit) against vanilla: `CalmCase` (one model, every CALM setting at every batch
size), what each step reads (`calm_step_costs`), one softmax exit test timed alone
(`SoftmaxTestCost`), its runs (`run_calm_case`), the figures against the CALM targets
(`calm_figures`) and its table rows.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import time
from typing import Any, Callable

import numpy as np

from hsd_jax.bench.common import (ARCHS, NOISY, Run, TimedLoops, _fmt, _short, case_prompts, model_name, random_model,
                                  weight_bytes)


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
        weights = "random weights" if self.model in ARCHS else "trained"
        return (f"{model_name(self.model)} ({weights}) {self.dtype} CALM, {self.num_prompts} prompts at batch "
                f"{'/'.join(map(str, self.batches))}, new={self.new_tokens}")


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
    rows = case_prompts(lm, case.model, case.dataset, case.split, case.num_prompts, case.prompt_len)
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


class SoftmaxTestCost(TimedLoops):
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

    def summary(self) -> dict[int, float]:
        return self.medians()


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


# --- the table ----------------------------------------------------------------------


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
