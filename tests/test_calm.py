"""CALM: run-time early exit inside the compiled decode loop, its eager twin, KV propagation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import hsd_jax
from hsd_jax import generate
from hsd_jax import calm
from hsd_jax.calm import calm_step, confidence, eager_step, step_thresholds
from hsd_jax.errors import HsdError
from hsd_jax.models import KVCache, decode_layout, family, forward
from hsd_jax.models.common import layer_slice
from hsd_jax.schedules import CalmConfig, resolve
from tests.conftest import make_gpt2, make_phi

PROMPTS = [[5, 17, 3, 99, 42, 7, 8], [11, 12, 13], [60, 61, 62, 63, 64]]  # ragged: left-padded inside
NEW = 8
MIXED = [[5, 17, 3, 99, 42, 7, 8], [60, 61, 62, 63, 64]]
# Settings that exit early at some decode steps but not all, on MIXED with these tiny models
# (beams need a lower lambda: the least confident of 8 rows decides).
BETWEEN = {1: "calm:lambda=0.3,min_exit=1", 4: "calm:lambda=0.02,min_exit=1"}


@pytest.fixture(scope="module", params=["gpt2", "phi"])
def lm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    (make_gpt2 if request.param == "gpt2" else make_phi)(folder, initializer_range=0.3)
    return hsd_jax.load(folder)


def run(lm, spec, num_beams=1, prompts=PROMPTS, **kw):
    return generate(lm, input_ids=prompts, schedule=spec, num_beams=num_beams, max_new_tokens=NEW,
                    eos_token_id=None, **kw)


def replay_mask(g, num_layers: int) -> np.ndarray:
    """The static mask that runs, at each decode step, the layers a CALM run ran there."""
    per_step = np.asarray(g.layers_per_token[0][1:] + [num_layers])  # decode step t made token t + 1
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


@pytest.mark.parametrize("num_beams", [1, 4])
def test_lambda_zero_exits_at_min_exit_every_step(lm, num_beams):
    L = lm.config.num_layers
    compiled = run(lm, "calm:lambda=0,min_exit=2", num_beams)
    eager = run(lm, "calm:lambda=0,min_exit=2", num_beams, mode="eager")
    assert all(layers == [L] + [2] * (NEW - 1) for layers in compiled.layers_per_token)  # prefill: all layers
    assert compiled.avg_layers == pytest.approx((L + 2 * (NEW - 1)) / NEW)
    assert eager.sequences == compiled.sequences and eager.layers_per_token == compiled.layers_per_token
    # The same layers as a static schedule (a skipped layer passes the hidden state through).
    static = run(lm, replay_mask(compiled, L), num_beams)
    assert static.sequences == compiled.sequences


@pytest.mark.parametrize("num_beams", [1, 4])
def test_eager_twin_gives_the_same_tokens_and_layers(lm, num_beams):
    for prompts, spec in ((PROMPTS, "calm:lambda=0.3,min_exit=1"), (MIXED, BETWEEN[num_beams])):
        compiled = run(lm, spec, num_beams, prompts=prompts)
        eager = run(lm, spec, num_beams, prompts=prompts, mode="eager")
        assert eager.sequences == compiled.sequences
        assert eager.layers_per_token == compiled.layers_per_token


@pytest.mark.parametrize("num_beams", [1, 4])
def test_exits_vary_between_steps_and_match_a_propagating_schedule(lm, num_beams):
    """Some steps exit early and later ones run more layers, reading propagated K/V."""
    L = lm.config.num_layers
    calm = run(lm, BETWEEN[num_beams], num_beams, prompts=MIXED)
    assert 1 < calm.avg_layers < L
    per_step = calm.layers_per_token[0][1:]
    assert any(a < b for a, b in zip(per_step, per_step[1:])), per_step  # a deeper step after an exit
    # The schedule compiler fills the same KV gaps by propagation (docs/methods.md), independently of CALM.
    mask = replay_mask(calm, L)
    assert resolve(mask, num_layers=L, max_new_tokens=NEW).needs_kv.any()
    static = run(lm, mask, num_beams, prompts=MIXED)
    assert static.sequences == calm.sequences


def test_propagation_matters(lm, monkeypatch):
    """Zeroing the propagated K/V (a deliberately wrong CALM) changes the greedy tokens."""
    right = run(lm, BETWEEN[1], prompts=MIXED, mode="eager")
    fam = family(lm.config)
    kv = fam.kv
    monkeypatch.setattr(fam, "kv", lambda *a: tuple(jnp.zeros_like(x) for x in kv(*a)))
    wrong = run(lm, BETWEEN[1], prompts=MIXED, mode="eager")
    assert wrong.sequences != right.sequences


def test_finished_greedy_rows_do_not_hold_back_the_exit(lm, monkeypatch):
    """Row A emits EOS as its first token and only pads from then on: row B must then
    exit as it does next to a copy of itself (same shapes, so the same arithmetic)."""
    A, B = [11, 12, 13, 14, 15], [60, 61, 62, 63, 64]
    eos = run(lm, "vanilla", prompts=[A]).sequences[0][0]
    kw = dict(eos_token_id=eos, pad_token_id=lm.config.vocab_size - 2)  # pad != EOS: rows are told apart by state
    spec = BETWEEN[1]

    def row_b(prompts, mode):
        g = generate(lm, input_ids=prompts, schedule=spec, max_new_tokens=NEW, mode=mode, **kw)
        return g.sequences[1], g.layers_per_token[1]

    alone = row_b([B, B], "eager")
    assert len(alone[0]) > 1 and 1 < np.mean(alone[1]) < lm.config.num_layers  # B runs on, exiting at varied depths
    for mode in ("compiled", "eager"):
        assert row_b([A, B], mode) == alone, mode
    # The old rule (least confident of all rows, finished ones too) lets A's pad steps decide.
    monkeypatch.setattr(calm, "confident", lambda logits, threshold, live: jnp.all(confidence(logits) >= threshold))
    assert row_b([A, B], "eager") != alone


def test_static_mode_runs_the_compiled_program(lm):
    compiled = run(lm, BETWEEN[4], 4)
    static = run(lm, BETWEEN[4], 4, mode="static")
    assert static.sequences == compiled.sequences and static.layers_per_token == compiled.layers_per_token
    assert static.compile_seconds == 0.0  # the same executable; lambda etc. are arguments
    again = run(lm, "calm:lambda=0.02,tau=2,min_exit=3", 4)
    assert again.compile_seconds == 0.0


@pytest.mark.parametrize("eager", [False, True])
def test_propagated_cache_entries_are_kv_of_the_exit_state(lm, eager):
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
        logits, out, n = eager_step(layout, config, tokens, cache, 0.0, 2, live)
    else:
        step = calm_step(config, jnp.zeros((NEW,), jnp.float32), jnp.asarray(2))
        logits, out, n = step(layout, tokens, cache, 0, live)
    assert int(n) == 2

    from hsd_jax.models import context
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


def test_thresholds_decay_with_the_endpoint_rules():
    n = 10
    thr = step_thresholds(CalmConfig(lam=0.02), n)
    expected = np.clip(0.9 * 0.02 + 0.1 * np.exp(-4 * np.arange(n) / n), 0, 1)
    np.testing.assert_allclose(thr, expected, rtol=1e-6)
    assert thr.dtype == np.float32 and np.all(np.diff(thr) < 0)
    assert np.all(step_thresholds(CalmConfig(lam=0.0), n) == 0)  # lambda 0: exit as early as allowed
    assert np.all(np.isinf(step_thresholds(CalmConfig(lam=1.5), n)))  # lambda > 1: never exit
    lam1 = step_thresholds(CalmConfig(lam=1.0), n)  # reaches the clip ceiling only at t = 0
    assert np.isinf(lam1[0]) and np.all(lam1[1:] < 1)


def test_confidence_is_the_top_two_probability_gap():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    np.testing.assert_allclose(confidence(logits), [0.2, 0.7], rtol=1e-5)


def test_presets_and_bad_specs(lm):
    g = run(lm, "calm-0.02")
    assert g.schedule == "calm:lambda=0.02,tau=4,min_exit=1" and len(g.layers_per_token) == len(PROMPTS)
    with pytest.raises(HsdError, match="min_exit"):
        run(lm, f"calm:lambda=0.1,min_exit={lm.config.num_layers + 1}")
    with pytest.raises(HsdError, match="lambda"):
        run(lm, "calm:lambda=-1")
