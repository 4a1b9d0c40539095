"""Self-speculative decoding against vanilla greedy: `SpeculativeCase` (a trained model at a
batch size, every draft x k), its step costs timed in the same rounds (`StepCosts`), its
runs (`run_speculative_case`) and its table rows.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any, Callable

import numpy as np

from hsd_jax.bench.common import ARCHS, NOISY, Run, TimedLoops, _fmt, _short, case_prompts, model_name, random_model
from hsd_jax.errors import HsdError


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
        return f"{model_name(self.model)} {self.dtype} speculative greedy batch={self.batch} new={self.new_tokens}"


def _speculative_model(case: SpeculativeCase):
    if case.model in ARCHS:
        return random_model(case.model, case.dtype)
    import hsd_jax

    return hsd_jax.load(case.model, dtype=case.dtype)


class StepCosts(TimedLoops):
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

    def summary(self) -> dict:
        ms = self.medians()
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
    rows = case_prompts(lm, case.model, case.dataset, case.split, case.num_prompts, random_len=8)
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


# --- the table ----------------------------------------------------------------------


SPECULATIVE_HEADER = ["runner", "draft, k", "layers/tok", "tok/s", "speedup", "accept", "kept", "tok/round",
                      "verify/step", "draft/step", "model", "same", "compile s"]


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
