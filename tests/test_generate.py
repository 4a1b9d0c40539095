"""The decode loop: transformers parity, compiled == static == eager, KV propagation, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hsd_jax
from hsd_jax import generate
from hsd_jax.errors import HsdError
from hsd_jax.models import PROPAGATE, RUN, SKIP, KVCache, context, decode_step, family, forward
from hsd_jax.models.common import layer_slice
from hsd_jax.schedules import schedule as make_schedule
from tests.conftest import make_gpt2, make_phi

PROMPTS = [[5, 17, 3, 99, 42, 7, 8], [11, 12, 13], [60, 61, 62, 63, 64], [1]]
NEW = 10


@pytest.fixture(scope="module", params=["gpt2", "phi"])
def lively(request, tmp_path_factory):
    """A tiny model with larger weights, so greedy/beam outputs vary from token to token."""
    folder = tmp_path_factory.mktemp(request.param)
    make = make_gpt2 if request.param == "gpt2" else make_phi
    torch_model = make(folder, initializer_range=0.3, seed=3)
    return torch_model, hsd_jax.load(folder)


def hf_generate(model, prompt, **kw):
    import torch

    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW, **kw)
    return out[0, len(prompt):].tolist()


def cut_after_eos(tokens, eos):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


_EOS: dict = {}


def eos_inside_window(lm, num_beams):
    """A token that, used as EOS, ends some prompt's output before the length limit."""
    key = (id(lm), num_beams)
    if key not in _EOS:
        _EOS[key] = _find_eos(lm, num_beams)
    return _EOS[key]


def _find_eos(lm, num_beams):
    free = generate(lm, input_ids=PROMPTS, max_new_tokens=NEW, num_beams=num_beams, eos_token_id=None)
    candidates = dict.fromkeys(tok for seq in free.sequences for tok in seq[1:])
    for tok in candidates:
        g = generate(lm, input_ids=PROMPTS, max_new_tokens=NEW, num_beams=num_beams, eos_token_id=tok)
        if any(len(s) < NEW for s in g.sequences):
            return tok
    pytest.fail("no token ends any output early")


@pytest.mark.parametrize("num_beams", [1, 4])
def test_vanilla_matches_transformers_one_prompt_at_a_time(lively, num_beams):
    model, lm = lively
    eos = eos_inside_window(lm, num_beams)
    ours = generate(lm, input_ids=PROMPTS, max_new_tokens=NEW, num_beams=num_beams, eos_token_id=eos)
    hit_eos = 0
    for prompt, seq, layers in zip(PROMPTS, ours.sequences, ours.layers_per_token):
        ref = cut_after_eos(hf_generate(model, prompt, num_beams=num_beams, eos_token_id=eos, pad_token_id=eos), eos)
        assert seq == ref
        assert layers == [lm.config.num_layers] * len(seq)
        hit_eos += seq[-1] == eos and len(seq) < NEW
    assert hit_eos >= 1, "the test needs an EOS inside the window for some prompt"
    assert ours.avg_layers == lm.config.num_layers


@pytest.mark.parametrize("length_penalty,early_stopping", [(0.5, True), (2.0, "never")])
def test_beam_search_options_match_transformers(lively, length_penalty, early_stopping):
    model, lm = lively
    eos = eos_inside_window(lm, 4)
    ours = generate(lm, input_ids=PROMPTS, max_new_tokens=NEW, num_beams=4, eos_token_id=eos,
                    length_penalty=length_penalty, early_stopping=early_stopping)
    for prompt, seq in zip(PROMPTS, ours.sequences):
        ref = hf_generate(model, prompt, num_beams=4, eos_token_id=eos, pad_token_id=eos,
                          length_penalty=length_penalty, early_stopping=early_stopping)
        assert seq == cut_after_eos(ref, eos)


def random_non_nested_mask(num_layers, steps, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random((steps, num_layers)) < 0.5
    mask[:, -1] |= ~mask.any(axis=1)  # every step runs a layer
    return mask


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mask") / "mask.npy"
    mask = random_non_nested_mask(5, NEW)
    assert make_schedule(mask, num_layers=5, max_new_tokens=NEW).needs_kv.any()
    np.save(path, mask)
    return path


SCHEDULES = ["vanilla", "skipdecode:min=1,max=4,warmup=1", "hsd:s=1,min=0,max=3"]


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("spec", SCHEDULES + ["random-mask"])
def test_compiled_static_eager_agree(lively, mask_file, spec, num_beams):
    _, lm = lively
    spec = str(mask_file) if spec == "random-mask" else spec
    runs = {mode: generate(lm, input_ids=PROMPTS, schedule=spec, num_beams=num_beams, max_new_tokens=NEW,
                           mode=mode, eos_token_id=None)
            for mode in ("compiled", "static", "eager")}
    mask = make_schedule(spec, num_layers=lm.config.num_layers, max_new_tokens=NEW).mask
    expected_layers = [lm.config.num_layers] + mask.sum(axis=1)[: NEW - 1].tolist()
    for mode, g in runs.items():
        assert g.sequences == runs["eager"].sequences, mode
        for layers in g.layers_per_token:
            assert layers == expected_layers, mode
        assert g.avg_layers == pytest.approx(np.mean(expected_layers))


def test_skipping_changes_the_output(lively):
    """Guards the comparisons above against a loop that ignores its schedule."""
    _, lm = lively
    a = generate(lm, input_ids=PROMPTS, max_new_tokens=NEW, eos_token_id=None)
    b = generate(lm, input_ids=PROMPTS, schedule="hsd:s=1,min=0,max=1", max_new_tokens=NEW, eos_token_id=None)
    assert a.sequences != b.sequences


@pytest.mark.parametrize("spec", ["hsd:s=1,min=0,max=3", "random-mask"])
def test_decode_equals_teacher_forced_forward_with_layer_masks(lively, mask_file, spec):
    """An independent reference for the schedule compiler, KV propagation included.

    The full forward with per-position layer masks runs each generated position
    through exactly the layers of the step that consumed it, and gives every skipped
    position K/V from its passing hidden state. Its greedy choices must be the decode.
    """
    _, lm = lively
    spec = str(mask_file) if spec == "random-mask" else spec
    sched = make_schedule(spec, num_layers=lm.config.num_layers, max_new_tokens=NEW)
    g = generate(lm, input_ids=PROMPTS, schedule=sched, max_new_tokens=NEW, eos_token_id=None)
    width = max(map(len, PROMPTS))
    ids = np.zeros((len(PROMPTS), width + NEW), np.int32)
    attn = np.zeros_like(ids, dtype=bool)
    for i, (p, s) in enumerate(zip(PROMPTS, g.sequences)):
        ids[i, width - len(p):] = p + s
        attn[i, width - len(p):] = True
    active = np.ones((lm.config.num_layers, len(PROMPTS), width + NEW), bool)
    active[:, :, width:] = sched.mask.T[:, None, :]  # position width + t is consumed by step t
    logits, _ = forward(lm.params, lm.config, jnp.asarray(ids), jnp.asarray(attn), active=jnp.asarray(active))
    predicted = np.asarray(jnp.argmax(logits, axis=-1))[:, width - 1: width + NEW - 1]
    assert predicted.tolist() == g.sequences


@pytest.mark.parametrize("traced", [False, True])
def test_layer_ops_run_propagate_and_skip(model_dir, traced):
    """One decode step by hand: RUN updates h and caches K/V, PROPAGATE caches the K/V
    of the passing hidden state, SKIP leaves both alone; static and traced ops agree."""
    lm = hsd_jax.load(model_dir)
    c, fam = lm.config, family(lm.config)
    ids, mask = jnp.asarray([[3, 4, 5], [0, 6, 7]]), jnp.asarray([[1, 1, 1], [0, 1, 1]], bool)
    cache = KVCache.init(c, 2, 8)
    _, cache = forward(lm.params, c, ids, mask, cache)
    ops = (RUN, PROPAGATE, SKIP, RUN, PROPAGATE)
    tokens = jnp.asarray([9, 10])
    if traced:
        step = jax.jit(lambda cache, ops: decode_step(lm.params, c, tokens, cache, tuple(ops)))
        logits, new = step(cache, jnp.asarray(ops))
    else:
        logits, new = decode_step(lm.params, c, tokens, cache, ops)

    ctx = context(cache, jnp.ones((2, 1), bool))
    p = [layer_slice(lm.params["layers"], l) for l in range(c.num_layers)]
    h = fam.embed(lm.params, tokens[:, None], ctx.positions, c)
    h, k0, _ = fam.block(p[0], h, ctx, c, cache.k[0], cache.v[0])
    k1, _ = fam.kv(p[1], h, ctx, c)
    h, k3, _ = fam.block(p[3], h, ctx, c, cache.k[3], cache.v[3])
    k4, _ = fam.kv(p[4], h, ctx, c)
    slot = 3
    for layer, expected in [(0, k0), (1, k1), (3, k3), (4, k4)]:
        np.testing.assert_allclose(np.asarray(new.k[layer][:, :, slot]), np.asarray(expected[:, :, 0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(fam.head(lm.params, h, c)[:, -1]), atol=1e-5)
    # nothing else of the cache moved
    keep = np.ones(np.shape(new.k), bool)
    keep[[0, 1, 3, 4], :, :, slot] = False
    np.testing.assert_array_equal(np.asarray(new.k)[keep], np.asarray(cache.k)[keep])


def test_a_new_schedule_does_not_recompile(gpt2_dir):
    lm = hsd_jax.load(gpt2_dir)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *a, **k: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    generate(lm, input_ids=PROMPTS, schedule="hsd:s=1,min=0,max=3", max_new_tokens=8, eos_token_id=None)
    before = len(compiles)
    for spec in ["vanilla", "skipdecode:min=1,max=3", "hsd:s=2,min=1,max=2"]:
        g = generate(lm, input_ids=PROMPTS, schedule=spec, max_new_tokens=8, eos_token_id=None)
        assert g.compile_seconds == 0.0
    assert len(compiles) == before


def test_eos_disabled_runs_every_step(gpt2_dir):
    lm = hsd_jax.load(gpt2_dir)
    g = generate(lm, input_ids=PROMPTS, max_new_tokens=7, eos_token_id=None)
    assert [len(s) for s in g.sequences] == [7] * len(PROMPTS) and g.num_steps == 7
    assert g.tokens_per_second > 0 and g.decode_seconds > 0


def test_prompts_are_tokenized_and_texts_decoded(tmp_path):
    make_gpt2(tmp_path, vocab=50257, tokenizer=True)
    lm = hsd_jax.load(tmp_path)
    g = generate(lm, prompts=["Hello there", "A longer prompt than the first"], max_new_tokens=5, eos_token_id=None)
    assert g.texts == [lm.tokenizer.decode(s) for s in g.sequences]
    direct = generate(lm, input_ids=[lm.tokenizer.encode("Hello there")], max_new_tokens=5, eos_token_id=None)
    assert direct.sequences[0] == g.sequences[0]


@pytest.mark.parametrize("kwargs,message", [
    (dict(input_ids=PROMPTS, mode="fast"), "mode 'fast' is unknown"),
    (dict(input_ids=PROMPTS, prompts=["x"]), "exactly one of"),
    (dict(), "exactly one of"),
    (dict(input_ids=[[1, 2], []]), "prompt 1 is empty"),
    (dict(input_ids=[[1, 100000]]), "outside the vocabulary"),
    (dict(input_ids=PROMPTS, num_beams=0), "num_beams"),
    (dict(input_ids=PROMPTS, max_new_tokens=0), "max_new_tokens"),
    (dict(input_ids=PROMPTS, max_new_tokens=500), "exceeds the model's 128 positions"),
    (dict(prompts=["hi"]), "has no tokenizer"),
    (dict(input_ids=PROMPTS, schedule="hsd:s=1"), "min"),
    (dict(input_ids=PROMPTS, early_stopping="sometimes"), "early_stopping"),
])
def test_bad_input(gpt2_dir, kwargs, message):
    lm = hsd_jax.load(gpt2_dir)
    with pytest.raises(HsdError, match=message):
        generate(lm, **kwargs)


def test_padded_array_with_attention_mask_equals_ragged_lists(gpt2_dir):
    lm = hsd_jax.load(gpt2_dir)
    ids = np.zeros((len(PROMPTS), 9), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(PROMPTS):  # right-padded, as a tokenizer might hand it over
        ids[i, : len(p)], mask[i, : len(p)] = p, 1
    a = generate(lm, input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    b = generate(lm, input_ids=PROMPTS, max_new_tokens=6, eos_token_id=None)
    assert a.sequences == b.sequences


def test_a_batch_past_the_device_memory_is_refused_before_anything_is_allocated(phi_dir, monkeypatch):
    """Phi's rotary positions take any max_new_tokens: 10**9 was an out-of-memory kill without
    a word (after a 5 GB schedule table). It is now refused at once, naming what fits; and
    what it names does fit (the device's memory set to just that)."""
    import time

    import jax

    import hsd_jax
    from hsd_jax import platform
    from hsd_jax.errors import HsdError

    lm = hsd_jax.load(phi_dir)
    start = time.perf_counter()
    with pytest.raises(HsdError, match=r"max_new_tokens=1000000000 with 1 row of 3 prompt tokens needs [\d,.]+ GiB "
                                       r"on a CPU device .* at most about \d+ new tokens fit this batch"):
        hsd_jax.generate(lm, input_ids=[[1, 2, 3]], max_new_tokens=10**9)
    assert time.perf_counter() - start < 5

    c = lm.config
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lm.params))
    per_position = 2 * c.num_layers * c.num_heads * c.head_dim * 4  # K and V, float32, a row
    monkeypatch.setattr(platform, "device_memory", lambda device: weights + 2 * 2 * per_position * (3 + 8))
    out = hsd_jax.generate(lm, input_ids=[[1, 2, 3], [4, 5, 6]], num_beams=2, max_new_tokens=8)
    assert len(out.sequences) == 2
    with pytest.raises(HsdError, match="with 4 rows of 3 prompt tokens .* at most about 8 new tokens fit"):
        hsd_jax.generate(lm, input_ids=[[1, 2, 3], [4, 5, 6]], num_beams=2, max_new_tokens=9)
