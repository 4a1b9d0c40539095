"""CALM: run-time early exit inside the compiled decode loop, its eager twin, KV propagation,
per-sequence exits (a row's output does not depend on its batch), the state measure, every=k,
and settings that cannot exit compiling to the plain step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hsd_jax
from hsd_jax import calm, generate
from hsd_jax.calm import (CalmSteps, calm_step, confidence, eager_step, saturation, step_thresholds,
                          layers_tested)
from hsd_jax.errors import HsdError
from hsd_jax.models import FAMILIES, KVCache, context, decode_layout, family, forward
from hsd_jax.models.common import layer_slice
from hsd_jax.schedules import CalmConfig, resolve
from hsd_jax.search import Greedy
from tests.conftest import make_gpt2, make_phi

PROMPTS = [[5, 17, 3, 99, 42, 7, 8], [11, 12, 13], [60, 61, 62, 63, 64]]  # ragged: left-padded inside
NEW = 8
MIXED = [[5, 17, 3, 99, 42, 7, 8], [60, 61, 62, 63, 64]]
# Eight ragged prompts for the batch-independence checks.
EIGHT = [np.random.default_rng(i).integers(0, 120, 2 + i % 6).tolist() for i in range(8)]
# Settings that exit early at some decode steps but not all, on MIXED with these tiny models.
BETWEEN = {1: "calm:lambda=0.3,min_exit=1", 4: "calm:lambda=0.3,min_exit=1"}
STATE = "calm:lambda=0.85,measure=state"  # the state measure, exiting at varied depths on these models
# The batch rule exits when the least confident row is confident: beams need a lower lambda.
BATCH = {1: "calm:lambda=0.3,min_exit=1,exit=batch", 4: "calm:lambda=0.02,min_exit=1,exit=batch"}
# A spec of each new option, to check compiled against eager ("batch": BATCH's).
OPTIONS = [STATE, "calm:lambda=0.8,measure=state,every=2", "calm:lambda=0.2,min_exit=2,every=2", "batch",
           "calm:lambda=0.8,measure=state,exit=batch"]


@pytest.fixture(scope="module", params=["gpt2", "phi"])
def lm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    (make_gpt2 if request.param == "gpt2" else make_phi)(folder, initializer_range=0.3)
    return hsd_jax.load(folder)


def run(lm, spec, num_beams=1, prompts=PROMPTS, **kw):
    return generate(lm, input_ids=prompts, schedule=spec, num_beams=num_beams, max_new_tokens=NEW,
                    eos_token_id=None, **kw)


def replay_mask(layers: list[int], num_layers: int) -> np.ndarray:
    """The static mask that runs, at each decode step, the layers a CALM row ran there."""
    per_step = np.asarray(layers[1:] + [num_layers])  # decode step t made token t + 1
    return np.arange(num_layers)[None, :] < per_step[:, None]


@pytest.mark.parametrize("num_beams", [1, 4])
def test_lambda_above_one_never_exits_and_is_vanilla(lm, num_beams):
    vanilla = run(lm, "vanilla", num_beams)
    calm = run(lm, "calm:lambda=1.5", num_beams)
    L = lm.config.num_layers
    assert calm.sequences == vanilla.sequences
    assert all(layers == [L] * NEW for layers in calm.layers_per_token)
    assert calm.avg_layers == L
    assert calm.schedule == "calm:lambda=1.5,tau=4,min_exit=1"


@pytest.mark.parametrize("spec", ["calm:lambda=0,min_exit=2", "calm:lambda=0,min_exit=2,measure=state"])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_lambda_zero_exits_at_min_exit_every_step(lm, num_beams, spec):
    L = lm.config.num_layers
    compiled = run(lm, spec, num_beams)
    eager = run(lm, spec, num_beams, mode="eager")
    assert all(layers == [L] + [2] * (NEW - 1) for layers in compiled.layers_per_token)  # prefill: all layers
    assert compiled.avg_layers == pytest.approx((L + 2 * (NEW - 1)) / NEW)
    assert eager.sequences == compiled.sequences and eager.layers_per_token == compiled.layers_per_token
    # The same layers as a static schedule (a skipped layer passes the hidden state through).
    static = run(lm, replay_mask(compiled.layers_per_token[0], L), num_beams)
    assert static.sequences == compiled.sequences


@pytest.mark.parametrize("num_beams", [1, 4])
def test_eager_twin_gives_the_same_tokens_and_layers(lm, num_beams):
    for prompts, spec in ((PROMPTS, "calm:lambda=0.3,min_exit=1"), (MIXED, BETWEEN[num_beams])):
        compiled = run(lm, spec, num_beams, prompts=prompts)
        eager = run(lm, spec, num_beams, prompts=prompts, mode="eager")
        assert eager.sequences == compiled.sequences
        assert eager.layers_per_token == compiled.layers_per_token


@pytest.mark.parametrize("spec", OPTIONS)
@pytest.mark.parametrize("num_beams", [1, 4])
def test_each_option_compiled_equals_eager(lm, spec, num_beams):
    spec = BATCH[num_beams] if spec == "batch" else spec
    compiled = run(lm, spec, num_beams, prompts=MIXED)
    eager = run(lm, spec, num_beams, prompts=MIXED, mode="eager")
    assert eager.sequences == compiled.sequences
    assert eager.layers_per_token == compiled.layers_per_token
    assert 1 < compiled.avg_layers < lm.config.num_layers  # the option exits, and not always at once


@pytest.mark.parametrize("spec", [BETWEEN[1], STATE])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_a_sequence_decodes_the_same_in_any_batch(lm, spec, num_beams):
    """Per-sequence exits (the default): each of 8 prompts decoded alone gives the tokens and
    layers it gets in the batch of 8, although the rows exit at different layers. (Prompts
    padded to one width, which changes no output, so that one program serves the single rows.)"""
    batch = run(lm, spec, num_beams, prompts=EIGHT, pad_to_multiple_of=8)
    for i, prompt in enumerate(EIGHT):
        alone = run(lm, spec, num_beams, prompts=[prompt], pad_to_multiple_of=8)
        assert alone.sequences[0] == batch.sequences[i], i
        assert alone.layers_per_token[0] == batch.layers_per_token[i], i
    per_step = np.array(batch.layers_per_token)  # (8, NEW): no EOS, so every row is NEW long
    assert any(len(set(column)) > 1 for column in per_step.T[1:])  # rows exited at different layers
    assert batch.avg_layers == pytest.approx(per_step.mean())
    if spec != BETWEEN[1] or num_beams != 1:
        return
    # The t5x rule (one exit per step for the batch) does depend on the batch: the check can fail.
    batched = run(lm, spec + ",exit=batch", num_beams, prompts=EIGHT, pad_to_multiple_of=8)
    assert any(run(lm, spec + ",exit=batch", num_beams, prompts=[p], pad_to_multiple_of=8).layers_per_token[0]
               != batched.layers_per_token[i] for i, p in enumerate(EIGHT))


def check_exits(lm, prompt: list[int], seq: list[int], layers: list[int], spec: str, greedy: bool):
    """The recorded layers follow CALM's rule along the sequence's own history, recomputed
    independently of the decoder by a teacher-forced forward (`forward(..., active=...)`,
    each position running the layers recorded for it, the rest by state propagation):
    at decode step s, every tested depth m below the recorded exit n_s is not confident,
    and n_s is (unless it is the last layer). Greedy: n_s's argmax is the next token."""
    c = resolve(spec, num_layers=lm.config.num_layers, max_new_tokens=NEW)
    L, P, T = lm.config.num_layers, len(prompt), len(seq)
    thr = step_thresholds(c, NEW)
    tested = [l + 1 for l in layers_tested(L, c.min_exit, c.every)]
    base = np.ones((L, P + T - 1), bool)  # tokens: the prompt and seq[:-1] (the last is never fed)
    for s in range(T - 1):
        base[layers[s + 1]:, P + s] = False
    cases = [(s, m) for s in range(T - 1) for m in sorted({*tested, layers[s + 1]}) if m <= layers[s + 1]]
    active = np.repeat(base[None], len(cases), axis=0)
    for i, (s, m) in enumerate(cases):
        active[i, :, P + s] = np.arange(L) < m
    tokens = np.asarray([prompt + seq[:-1]] * len(cases), np.int32)
    logits, _ = forward(lm.stacked_params(), lm.config, jnp.asarray(tokens), active=jnp.asarray(active).transpose(1, 0, 2))
    conf = np.asarray(confidence(logits[np.arange(len(cases)), [P + s for s, _ in cases]]))
    assert layers[0] == L
    checked = 0
    for (s, m), score, row in zip(cases, conf, logits):
        if abs(score - thr[s]) < 1e-4:
            continue  # too close to call across two different programs
        if m < layers[s + 1]:
            assert score < thr[s], (s, m, layers)
        elif m < L:
            assert score >= thr[s], (s, m, layers)
            checked += 1
        if m == layers[s + 1] and greedy:
            assert int(np.argmax(row[P + s])) == seq[s + 1]
    return checked


@pytest.mark.parametrize("num_beams", [1, 4])
def test_per_row_layers_follow_each_sequence_through_beam_reorders(lm, num_beams):
    """Each output's layers record is its own history's: for beams, the record of the
    beam rows that made its tokens, through every reorder."""
    out = run(lm, BETWEEN[num_beams], num_beams, prompts=MIXED)
    exits = 0
    for prompt, seq, layers in zip(MIXED, out.sequences, out.layers_per_token):
        exits += check_exits(lm, prompt, seq, layers, BETWEEN[num_beams], greedy=num_beams == 1)
    assert exits > 0  # some steps exited early, and were checked
    if num_beams > 1:  # the best hypotheses exited apart from each other
        assert out.layers_per_token[0] != out.layers_per_token[1]


@pytest.mark.parametrize("num_beams", [1, 4])
def test_exits_vary_between_steps_and_match_a_propagating_schedule(lm, num_beams):
    """Some steps exit early and later ones run more layers, reading propagated K/V. A row
    alone (greedy) or the batch rule (beams: every row exits together) gives one row of
    layers per step that a static mask can replay."""
    L = lm.config.num_layers
    spec, prompts = (BETWEEN[1], MIXED[:1]) if num_beams == 1 else (BATCH[4], MIXED)
    calm = run(lm, spec, num_beams, prompts=prompts)
    assert 1 < calm.avg_layers < L
    per_step = calm.layers_per_token[0][1:]
    assert any(a < b for a, b in zip(per_step, per_step[1:])), per_step  # a deeper step after an exit
    # The schedule compiler fills the same KV gaps by propagation (docs/methods.md), independently of CALM.
    mask = replay_mask(calm.layers_per_token[0], L)
    assert resolve(mask, num_layers=L, max_new_tokens=NEW).needs_kv.any()
    static = run(lm, mask, num_beams, prompts=prompts)
    assert static.sequences == calm.sequences


def test_propagation_matters(lm, monkeypatch):
    """Zeroing the propagated K/V (a deliberately wrong CALM) changes the greedy tokens."""
    right = run(lm, BETWEEN[1], prompts=MIXED, mode="eager")
    fam = family(lm.config)
    wrong_kv = dataclasses.replace(fam, kv=lambda *a: tuple(jnp.zeros_like(x) for x in fam.kv(*a)))
    monkeypatch.setitem(FAMILIES, fam.name, wrong_kv)
    wrong = run(lm, BETWEEN[1], prompts=MIXED, mode="eager")
    assert wrong.sequences != right.sequences


@pytest.mark.parametrize("rule", ["row", "batch"])
def test_finished_greedy_rows_do_not_hold_back_the_exit(lm, monkeypatch, rule):
    """Row A emits EOS as its first token and only pads from then on: row B must then
    exit as it does next to a copy of itself (same shapes, so the same arithmetic)."""
    A, B = [11, 12, 13, 14, 15], [60, 61, 62, 63, 64]
    eos = run(lm, "vanilla", prompts=[A]).sequences[0][0]
    kw = dict(eos_token_id=eos, pad_token_id=lm.config.vocab_size - 2)  # pad != EOS: rows are told apart by state
    spec = BETWEEN[1] + f",exit={rule}"

    def row_b(prompts, mode):
        g = generate(lm, input_ids=prompts, schedule=spec, max_new_tokens=NEW, mode=mode, **kw)
        return g.sequences[1], g.layers_per_token[1]

    alone = row_b([B, B], "eager")
    assert len(alone[0]) > 1 and 1 < np.mean(alone[1]) < lm.config.num_layers  # B runs on, exiting at varied depths
    for mode in ("compiled", "eager"):
        assert row_b([A, B], mode) == alone, mode
    if rule == "batch":  # counting finished rows as live lets A's pad steps decide for the batch
        monkeypatch.setattr(Greedy, "live", lambda self, state: jnp.ones_like(state.finished))
        assert row_b([A, B], "eager") != alone


def today_eager_step(params, config, tokens, cache, threshold, min_exit, live):
    """CALM's step as it was before per-sequence exits (commit 5074b56's `eager_step`): one
    exit per step, when every live row's softmax response reaches the threshold."""
    fam = family(config)
    new_mask = jnp.ones((tokens.shape[0], 1), bool)
    ctx = context(cache, new_mask)
    h = fam.embed(params, tokens[:, None], ctx.positions, config)
    layers, n, logits = params["layers"], config.num_layers, None
    for l in range(config.num_layers):
        h, k, v = fam.block(layers[l], h, ctx, config, cache.k[l], cache.v[l])
        cache = cache.write_layer(l, k, v)
        if l + 1 < min_exit:
            continue
        logits = fam.head(params, h, config)[:, -1]
        if l + 1 == config.num_layers or bool(jnp.all((confidence(logits) >= np.float32(threshold)) | ~live)):
            n = l + 1
            break
    for l in range(n, config.num_layers):
        cache = cache.write_layer(l, *fam.kv(layers[l], h, ctx, config))
    return logits, cache.advance(new_mask), n


@pytest.mark.parametrize("num_beams", [1, 4])
def test_exit_batch_keeps_the_previous_rule(lm, monkeypatch, num_beams):
    """exit=batch decodes as CALM did before (one decision per step, t5x's rule)."""
    compiled = run(lm, BATCH[num_beams], num_beams, prompts=PROMPTS)
    assert 1 < compiled.avg_layers < lm.config.num_layers
    for step in zip(*compiled.layers_per_token):  # every row exits at the same layer at each step
        assert len(set(step)) == 1
    monkeypatch.setattr(CalmSteps, "eager_step", lambda self, params, config, tokens, cache, t, live: today_eager_step(
        params, config, tokens, cache, self._thresholds()[t], self.calm.min_exit, live))
    before = run(lm, BATCH[num_beams].replace(",exit=batch", ""), num_beams, prompts=PROMPTS, mode="eager")
    assert before.sequences == compiled.sequences and before.layers_per_token == compiled.layers_per_token


def test_every_k_tests_only_at_its_layers(lm):
    L = lm.config.num_layers
    for spec, allowed in (("calm:lambda=0.2,min_exit=2,every=2", {2, 4}), ("calm:lambda=0.2,every=3", {1, 4})):
        g = run(lm, spec, prompts=EIGHT)
        seen = {n for layers in g.layers_per_token for n in layers[1:]}
        assert seen <= allowed | {L}, (spec, seen)
        assert seen & allowed, spec  # it does exit at a tested layer
    assert layers_tested(12, 1, 1) == list(range(11)) and layers_tested(12, 3, 4) == [2, 6, 10]
    assert layers_tested(5, 5, 1) == []


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("measure", ["softmax", "state"])
def test_propagated_cache_entries_are_kv_of_the_exit_state(lm, eager, measure):
    """One decode step with an exit after 2 layers: layers 2.. hold kv() of the layer-2 input."""
    config, params, fam = lm.config, lm.stacked_params(), family(lm.config)
    L = config.num_layers
    ids = jnp.asarray([[5, 17, 3, 99], [0, 11, 12, 13]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1], [0, 1, 1, 1]], bool)
    cache = KVCache.init(config, 2, 6)
    _, cache = forward(params, config, ids, mask, cache)
    tokens, live = jnp.asarray([42, 7], jnp.int32), jnp.ones((2,), bool)
    layout = decode_layout(params)  # what the decode loop runs on
    if eager:
        logits, out, n = eager_step(layout, config, tokens, cache, -np.inf, 2, live, measure=measure)
    else:
        step = calm_step(config, jnp.full((NEW,), -jnp.inf), jnp.asarray(2), measure=measure)
        logits, out, n = step(layout, tokens, cache, 0, live)
    assert np.asarray(n).tolist() == [2, 2]

    ctx = context(cache, jnp.ones((2, 1), bool))
    h = fam.embed(params, tokens[:, None], ctx.positions, config)
    for l in range(2):
        h, _, _ = fam.block(layer_slice(params["layers"], l), h, ctx, config, cache.k[l], cache.v[l])
    np.testing.assert_allclose(logits, fam.head(params, h, config)[:, -1], rtol=1e-5, atol=1e-5)
    slot = int(cache.index)
    for l in range(2, L):
        k, v = fam.kv(layer_slice(params["layers"], l), h, ctx, config)
        np.testing.assert_allclose(out.k[l][:, :, slot], k[:, :, 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.v[l][:, :, slot], v[:, :, 0], rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(out.k[l][:, :, slot]).max()) > 0
    assert int(out.index) == slot + 1 and bool(out.valid[:, slot].all())


@pytest.mark.parametrize("eager", [False, True])
def test_state_measure_exits_where_the_hidden_state_saturates(lm, eager):
    """One step, rows apart: each row exits after the first layer whose input and output
    have cosine similarity >= the threshold, computed here with numpy from `block`; a
    row that never saturates runs every layer; the frozen rows' cache entries are kv()."""
    config, params, fam = lm.config, lm.stacked_params(), family(lm.config)
    L = config.num_layers
    ids = jnp.asarray([[5, 17, 3, 99], [0, 11, 12, 13], [60, 61, 62, 63]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]], bool)
    cache = KVCache.init(config, 3, 6)
    _, cache = forward(params, config, ids, mask, cache)
    tokens, live = jnp.asarray([42, 7, 9], jnp.int32), jnp.ones((3,), bool)
    ctx = context(cache, jnp.ones((3, 1), bool))
    h = fam.embed(params, tokens[:, None], ctx.positions, config)
    states, cos = [h], []
    for l in range(L):
        out, _, _ = fam.block(layer_slice(params["layers"], l), states[-1], ctx, config, cache.k[l], cache.v[l])
        a, b = np.asarray(states[-1][:, 0], np.float64), np.asarray(out[:, 0], np.float64)
        cos.append((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
        states.append(out)
    cos = np.array(cos)  # (L, rows)

    def exits(thr):
        return [next((l + 1 for l in range(L - 1) if cos[l, r] >= thr), L) for r in range(3)]

    # A threshold between two of the similarities (clear of each), at which the rows exit apart.
    values = np.sort(cos[:L - 1].ravel())
    thr = next(float(t) for t in (values[1:] + values[:-1]) / 2
               if len(set(exits(t))) > 1 and np.abs(values - t).min() > 1e-4)
    expected = exits(thr)
    layout = decode_layout(params)
    if eager:
        logits, out, n = eager_step(layout, config, tokens, cache, thr, 1, live, measure="state")
    else:
        step = calm_step(config, jnp.full((NEW,), thr, jnp.float32), 1, measure="state")
        logits, out, n = step(layout, tokens, cache, 0, live)
    assert np.asarray(n).tolist() == expected
    slot = int(cache.index)
    frozen = jnp.stack([states[e][r] for r, e in enumerate(expected)])  # each row's exit state
    np.testing.assert_allclose(logits, fam.head(params, frozen, config)[:, -1], rtol=1e-4, atol=1e-4)
    for l in range(min(expected), L):
        k, _ = fam.kv(layer_slice(params["layers"], l), frozen, ctx, config)
        above = [r for r, e in enumerate(expected) if e <= l]
        np.testing.assert_allclose(out.k[l][above, :, slot], k[above, :, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(saturation(states[0], states[1]), cos[0], rtol=1e-5)


def _count(jaxpr, what) -> int:
    """Equations of a jaxpr, its sub-jaxprs included (cond branches, loops), that `what` accepts."""
    total = 0
    for eqn in jaxpr.eqns:
        total += bool(what(eqn))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _count(inner, what)
    return total


@pytest.mark.parametrize("arch", ["gpt2", "phi"])
def test_a_setting_that_cannot_exit_compiles_no_exit_test(tmp_path, arch):
    """lambda > 1 (and min_exit at the last layer: no test below it) gives vanilla's compiled
    step: one LM-head product, no exit test. The state measure needs no head for its tests;
    softmax one per layer."""
    from hsd_jax.engine import schedule_step

    vocab = 120  # no other product of these models has 120 outputs
    (make_gpt2 if arch == "gpt2" else make_phi)(tmp_path, vocab=vocab, initializer_range=0.3)
    lm = hsd_jax.load(tmp_path)
    config, L = lm.config, lm.config.num_layers
    params = lm.to_layout("decode").params
    cache = KVCache.init(config, 2, 8).replace(index=jnp.asarray(3, jnp.int32))
    tokens, live = jnp.asarray([1, 2], jnp.int32), jnp.ones((2,), bool)

    def trace(step, *arguments):
        return jax.make_jaxpr(lambda p, c, *a: step(p, tokens, c, 0, live))(params, cache, *arguments)

    def counts(spec):
        strategy = CalmSteps(resolve(spec, num_layers=L, max_new_tokens=NEW), NEW, L)
        arguments = strategy.arguments()
        step = strategy.decode(params, config, None, None, lambda params, search, state, step: step, *arguments)
        jaxpr = trace(step, *arguments).jaxpr
        heads = _count(jaxpr, lambda e: e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1] == vocab)
        conds = _count(jaxpr, lambda e: e.primitive.name == "cond")
        return strategy.program_key(), heads, conds, str(jaxpr)

    ops = jnp.zeros((NEW, L), jnp.int32)
    vanilla = str(trace(schedule_step(config, lambda t: ops[t]), ops).jaxpr)
    for spec in ("calm:lambda=1.5", "calm:lambda=1.5,measure=state", "calm:lambda=1,measure=state",
                 f"calm:lambda=0.3,min_exit={L}"):
        key, heads, conds, text = counts(spec)
        assert key == ("calm", "never") and heads == 1 and conds == L, spec  # a lax.switch per layer, as vanilla
        assert text == vanilla, spec  # the very step of vanilla's compiled program
    key, heads, conds, _ = counts("calm:lambda=0.9,measure=state")
    assert key == ("calm", "state", "row") and heads == 1 and conds == L  # a skip cond per layer, no head
    key, heads, conds, _ = counts("calm:lambda=0.3")
    assert key == ("calm", "softmax", "row") and heads == L  # a head per test layer, and the last layer's


def test_static_mode_runs_the_compiled_program(lm):
    compiled = run(lm, BETWEEN[4], 4)
    static = run(lm, BETWEEN[4], 4, mode="static")
    assert static.sequences == compiled.sequences and static.layers_per_token == compiled.layers_per_token
    assert static.compile_seconds == 0.0  # the same executable; lambda etc. are arguments
    again = run(lm, "calm:lambda=0.02,tau=2,min_exit=3,every=2", 4)
    assert again.compile_seconds == 0.0


def test_thresholds_decay_with_the_endpoint_rules():
    n = 10
    thr = step_thresholds(CalmConfig(lam=0.02), n)
    expected = np.clip(0.9 * 0.02 + 0.1 * np.exp(-4 * np.arange(n) / n), 0, 1)
    np.testing.assert_allclose(thr, expected, rtol=1e-6)
    assert thr.dtype == np.float32 and np.all(np.diff(thr) < 0)
    assert np.all(step_thresholds(CalmConfig(lam=0.0), n) == -np.inf)  # lambda 0: exit at the first test
    assert np.all(np.isinf(step_thresholds(CalmConfig(lam=1.5), n)))  # lambda > 1: never exit
    lam1 = step_thresholds(CalmConfig(lam=1.0), n)  # reaches the clip ceiling only at t = 0
    assert np.isinf(lam1[0]) and np.all(lam1[1:] < 1)
    # The state measure decays from the same start towards lambda itself, not 0.9 lambda.
    state = step_thresholds(CalmConfig(lam=0.99, measure="state"), n)
    np.testing.assert_allclose(state, 0.99 + 0.1 * 0.01 * np.exp(-4 * np.arange(n) / n), rtol=1e-6)
    assert state[0] == step_thresholds(CalmConfig(lam=0.99), n)[0] and np.all(state > 0.99)
    assert np.all(np.isinf(step_thresholds(CalmConfig(lam=1.0, measure="state"), n)))  # cos >= 1: never
    assert not calm.can_exit(CalmConfig(lam=1.5, measure="state"), 12, n)
    assert not calm.can_exit(CalmConfig(lam=1.0, measure="state"), 12, n)
    assert calm.can_exit(CalmConfig(lam=1.0), 12, n) and not calm.can_exit(CalmConfig(lam=0.1, min_exit=12), 12, n)


def test_confidence_is_the_top_two_probability_gap():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    np.testing.assert_allclose(confidence(logits), [0.2, 0.7], rtol=1e-5)


def test_specs_show_only_non_default_new_keys():
    def spec(text):
        return resolve(text, num_layers=12, max_new_tokens=8)

    assert spec("calm:lambda=0.02").spec == "calm:lambda=0.02,tau=4,min_exit=1"  # as before: results keep their spec
    assert spec("calm:lambda=0.02,measure=softmax,every=1,exit=row").spec == "calm:lambda=0.02,tau=4,min_exit=1"
    c = spec("calm:lambda=0.9,measure=state,every=2,exit=batch")
    assert (c.measure, c.every, c.exit) == ("state", 2, "batch")
    assert c.spec == "calm:lambda=0.9,tau=4,min_exit=1,measure=state,every=2,exit=batch"
    assert spec(c.spec) == c and c.name == "CALM(lambda=0.9, state, every=2, exit=batch)"
    for bad, message in (("measure=entropy", "measure must be softmax"), ("every=0", "every must be an integer >= 1"),
                         ("every=1.5", "every must be an integer"), ("exit=all", "exit must be row"),
                         ("measure=", "measure must be softmax")):
        with pytest.raises(HsdError, match=message):
            spec(f"calm:lambda=0.1,{bad}")


def test_presets_and_bad_specs(lm):
    g = run(lm, "calm-0.02")
    assert g.schedule == "calm:lambda=0.02,tau=4,min_exit=1" and len(g.layers_per_token) == len(PROMPTS)
    with pytest.raises(HsdError, match="min_exit"):
        run(lm, f"calm:lambda=0.1,min_exit={lm.config.num_layers + 1}")
    with pytest.raises(HsdError, match="lambda"):
        run(lm, "calm:lambda=-1")


def test_bench_counts_what_each_calm_step_reads():
    """`calm_step_costs`: per step the deepest row's layers, K/V projections for the rest, and
    for softmax one LM head per tested layer it reaches (plus the last layer's)."""
    from types import SimpleNamespace

    from hsd_jax.bench import calm_step_costs

    sizes = {"head": 1000, "layer": 100, "kv": 10}
    # Two rows of one call, L = 4, 3 tokens each: the prefill (4), then steps exiting at (2, 1) and (4, 3).
    gens = [SimpleNamespace(layers_per_token=[[4, 2, 4], [4, 1, 3]])]
    prefill = 1000 + 4 * 100
    # softmax, min_exit 1: tests after layers 1, 2, 3. Step 1 reaches 2 (tests 1, 2); step 2 reaches 4 (tests 1-3 + head).
    total, tests = calm_step_costs(gens, "calm:lambda=0.5", sizes, 4, 3)
    assert tests == 2 + 3
    assert total == prefill + (2 * 1000 + 2 * 100 + 2 * 10) + (4 * 1000 + 4 * 100)
    total, tests = calm_step_costs(gens, "calm:lambda=0.5,every=2", sizes, 4, 3)  # tests after layers 1 and 3
    assert tests == 1 + 2 and total == prefill + (1000 + 2 * 100 + 2 * 10) + (3 * 1000 + 4 * 100)
    total, tests = calm_step_costs(gens, "calm:lambda=0.5,measure=state", sizes, 4, 3)  # one head a step
    assert tests == 0 and total == prefill + (1000 + 2 * 100 + 2 * 10) + (1000 + 4 * 100)
    vanilla = [SimpleNamespace(layers_per_token=[[4, 4, 4], [4, 4]])]  # the second row ended (EOS) a step early
    assert calm_step_costs(vanilla, "vanilla", sizes, 4, 3) == (3 * prefill, 0)


def test_bench_calm_suite_runs_side_by_side(tmp_path):
    """`hsd-jax bench --suite calm --dry-run`: every setting at both batch sizes, each row's
    tokens and layers the same at batch 2 as at batch 1, no exit test where none can pass."""
    import json

    from hsd_jax.cli import main

    out = tmp_path / "calm.json"
    assert main(["bench", "--suite", "calm", "--dry-run", "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    for case in result["cases"]:
        assert case["kind"] == "calm" and not case.get("skipped")
        L = case["weights"]["num_layers"]
        runs = {(r["batch"], r["schedule"]): r for r in case["runs"]}
        assert {b for b, _ in runs} == {1, 2} and {"vanilla", "calm:lambda=1.5"} <= {s for _, s in runs}
        for (batch, spec), r in runs.items():
            assert r["tokens"] == 2 * case["case"]["new_tokens"] and r["tokens_per_second"] > 0
            assert r["speedup_vs_vanilla"] > 0 and not r["recompiled_while_timed"]
            if batch == 2:
                assert r["same_as_batch_1"], spec
        never = runs[(1, "calm:lambda=1.5")]
        assert never["avg_layers"] == L and never["tests_per_step"] == 0 and never["ideal_speedup"] == 1.0
        softmax = runs[(1, "calm:lambda=0.02")]  # random weights are never confident: every test runs
        assert softmax["avg_layers"] == L and softmax["tests_per_step"] == L - 1 and "ms_per_test" in softmax
        assert softmax["ideal_speedup"] < 1
        assert runs[(1, "calm:lambda=0.9,measure=state")]["tests_per_step"] == 0
        assert set(case["softmax_test"]) == {"1", "2"} and all(t["ms"] > 0 for t in case["softmax_test"].values())
