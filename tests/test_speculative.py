"""Self-speculative decoding (`draft=`, hsd_jax.speculative): greedy tokens identical to
vanilla greedy's for every k and draft, on random-weight GPT-2 and Phi and on the trained
CommonGen model; EOS inside a round; the max_new_tokens cut; batches of ragged rows; the
compiled rounds against the eager reference; its counts; errors; the CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import hsd_jax
from hsd_jax import generate
from hsd_jax.cli import main
from hsd_jax.errors import HsdError
from hsd_jax.speculative import STAT_KEYS
from tests.conftest import make_gpt2, make_phi

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "runs" / "commongen_small"
PROMPTS = [[5, 17, 3, 99, 42, 7, 8], [11, 12, 13], [60, 61, 62, 63, 64], [1]]
NEW = 11  # a multiple of no k + 1 tested: the last round is cut
DRAFTS = ["hsd:s=1,min=0,max=2", "skipdecode:min=1,max=3"]


@pytest.fixture(scope="module", params=["gpt2", "phi"])
def lively(request, tmp_path_factory):
    """A tiny model with larger weights, so greedy outputs vary from token to token (and
    drafts disagree with the full model often enough to exercise rejection)."""
    folder = tmp_path_factory.mktemp(request.param)
    (make_gpt2 if request.param == "gpt2" else make_phi)(folder, initializer_range=0.3, seed=3)
    return hsd_jax.load(folder)


def random_mask(layers: int, steps: int = NEW, seed: int = 0) -> np.ndarray:
    """A non-nested mask: steps run layers an earlier step skipped, so the draft fills KV
    gaps by state propagation (PROPAGATE ops)."""
    mask = np.random.default_rng(seed).random((steps, layers)) < 0.5
    mask[:, -1] = True
    return mask


def vanilla(lm, prompts=PROMPTS, **kw):
    return generate(lm, input_ids=prompts, max_new_tokens=kw.pop("max_new_tokens", NEW), **kw)


def speculative(lm, draft, k, prompts=PROMPTS, **kw):
    return generate(lm, input_ids=prompts, max_new_tokens=kw.pop("max_new_tokens", NEW), draft=draft,
                    num_draft_tokens=k, **kw)


def check_counts(g, k: int):
    """The counts of a speculative run are consistent with each other and with its tokens."""
    s = g.draft_stats
    assert set(s) == set(STAT_KEYS) and s["rounds"] >= 1
    assert 0.0 <= g.acceptance_rate <= 1.0
    assert 1.0 <= g.tokens_per_round <= k + 1
    assert s["round_tokens"] == g.num_steps - 1  # token 0 comes from the prefill
    assert s["drafted"] % k == 0 and s["accepted"] <= s["drafted"]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_tokens_equal_vanilla_greedy(lively, k):
    """Ragged rows in one batch (left-padded), EOS off, 11 tokens: every draft and k gives
    vanilla's tokens, with acceptance well below 1 (so rejection and rollback happen)."""
    ref = vanilla(lively, eos_token_id=None)
    assert all(len(s) == NEW for s in ref.sequences)
    rates = []
    for draft in DRAFTS + [random_mask(lively.config.num_layers)]:
        g = speculative(lively, draft, k, eos_token_id=None)
        assert g.sequences == ref.sequences, (draft, k)
        check_counts(g, k)
        rates.append(g.acceptance_rate)
    assert min(rates) < 0.9, "the drafts should disagree with the full model sometimes"


@pytest.mark.parametrize("k", [1, 3])
def test_each_row_alone_equals_vanilla(lively, k):
    """Batch 1 (where the CPU verifies position by position): no batch minimum, each row's
    own acceptance decides its rounds. Prompts padded to one width share one program."""
    for prompt in PROMPTS:
        ref = vanilla(lively, [prompt], eos_token_id=None, max_new_tokens=9, pad_to_multiple_of=8)
        g = speculative(lively, DRAFTS[0], k, [prompt], eos_token_id=None, max_new_tokens=9, pad_to_multiple_of=8)
        assert g.sequences == ref.sequences
        check_counts(g, k)


def _eos_inside_a_round(lm, k: int):
    """A token that vanilla greedy emits mid-sequence, as EOS, ending some row at a position
    that is not the last of a round when every draft is accepted (vanilla as the draft:
    rounds of k + 1 tokens after the prefill's token 0)."""
    free = vanilla(lm, eos_token_id=None)
    for tok in dict.fromkeys(t for seq in free.sequences for t in seq[1:-1]):
        ends = [seq.index(tok) for seq in free.sequences if tok in seq]
        if any(e >= 1 and (e - 1) % (k + 1) != k for e in ends):
            return tok
    pytest.fail("no token ends a row inside a round")


@pytest.mark.parametrize("k", [2, 4])
def test_eos_inside_a_draft(lively, k):
    eos = _eos_inside_a_round(lively, k)
    ref = vanilla(lively, eos_token_id=eos)
    assert any(len(s) < NEW and s[-1] == eos for s in ref.sequences), "the test needs a row ended by EOS"
    for draft in ["vanilla", *DRAFTS]:
        g = speculative(lively, draft, k, eos_token_id=eos)
        assert g.sequences == ref.sequences, draft
        assert [len(x) for x in g.layers_per_token] == [len(s) for s in g.sequences]
        check_counts(g, k)


def test_vanilla_as_draft_accepts_everything(lively):
    """The full model drafting for itself: every draft is accepted, each round emits k + 1
    tokens (the last one cut by max_new_tokens), and the layers add up by the stated rule:
    the prefill's L, then per round k draft steps of L plus the verify pass's L."""
    k, layers = 3, lively.config.num_layers
    g = speculative(lively, "vanilla", k, eos_token_id=None)
    assert g.sequences == vanilla(lively, eos_token_id=None).sequences
    s = g.draft_stats
    assert g.acceptance_rate == 1.0
    assert s["rounds"] == -(-(NEW - 1) // (k + 1))
    for row in g.layers_per_token:
        assert row[0] == layers
        assert sum(row) == pytest.approx(layers + s["rounds"] * (k + 1) * layers)
        assert row[1] == pytest.approx((k + 1) * layers / (k + 1))


def test_layers_per_token_spread_each_round(lively):
    """A skipping draft: each round's draft + verify layers spread over its tokens, so the
    record sums to the prefill's L + rounds x L + the draft steps' layers."""
    k, sched = 2, hsd_jax.schedule(DRAFTS[0], num_layers=lively.config.num_layers, max_new_tokens=NEW)
    g = speculative(lively, DRAFTS[0], k, eos_token_id=None)
    total = sum(g.layers_per_token[0])
    rounds, layers = g.draft_stats["rounds"], lively.config.num_layers
    draft_layers = total - layers - rounds * layers
    per_step = sched.layers_per_step
    assert k * rounds * per_step.min() - 1e-3 <= draft_layers <= k * rounds * per_step.max() + 1e-3
    assert all(row == g.layers_per_token[0] for row in g.layers_per_token)  # rows share the batch's rounds


@pytest.mark.parametrize("k", [1, 2])
def test_compiled_equals_eager_reference(lively, k):
    """The jitted rounds and the eager reference (host acceptance, row by row) agree on
    tokens, layers and counts; static mode runs the compiled program."""
    eos = _eos_inside_a_round(lively, k)
    draft = random_mask(lively.config.num_layers, seed=1)
    runs = {mode: speculative(lively, draft, k, eos_token_id=eos, mode=mode) for mode in ("compiled", "eager",
                                                                                            "static")}
    ref = vanilla(lively, eos_token_id=eos)
    for mode, g in runs.items():
        assert g.sequences == ref.sequences, mode
        assert g.draft_stats == runs["eager"].draft_stats, mode
        for a, b in zip(g.layers_per_token, runs["eager"].layers_per_token):
            assert a == pytest.approx(b), mode


@pytest.mark.parametrize("form", ["rows", "positions"])
def test_both_verify_forms(lively, form, monkeypatch):
    """The verify pass as one product of k + 1 rows per matrix ("rows", the GPU's form) or
    layer by layer over one-row products ("positions", the CPU's): the same tokens."""
    import hsd_jax.speculative as speculative_module

    monkeypatch.setattr(speculative_module, "default_verify_form", lambda rows: form)
    eos = _eos_inside_a_round(lively, 2)
    ref = vanilla(lively, eos_token_id=eos)
    for k in (1, 2, 4):
        g = speculative(lively, DRAFTS[0], k, eos_token_id=eos)
        assert g.sequences == ref.sequences, k
        check_counts(g, k)


def test_verify_forms_agree(lively):
    """One pass in each form over the same cache: the same argmax, logits and K/V within float
    rounding, the same slots written and marked valid."""
    import jax.numpy as jnp

    from hsd_jax.models import KVCache
    from hsd_jax.speculative import verify

    config = lively.config
    params = lively.to_layout("decode").params
    cache = KVCache.init(config, 2, 24)
    cache = cache.replace(valid=cache.valid.at[0, 2:9].set(True).at[1, 5:9].set(True),  # ragged rows
                          index=jnp.asarray(9, jnp.int32))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 4)), jnp.int32)
    a, ca = verify(params, config, tokens, cache, "rows")
    b, cb = verify(params, config, tokens, cache, "positions")
    assert np.array_equal(np.argmax(a, -1), np.argmax(b, -1))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert int(ca.index) == int(cb.index) == 13 and np.array_equal(ca.valid, cb.valid)
    for x, y in zip(ca.k + ca.v, cb.k + cb.v):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    with pytest.raises(HsdError, match="unknown"):
        verify(params, config, tokens, cache, "columns")


def test_one_program_for_every_draft_of_a_shape(lively):
    """The draft's op table is an argument: another draft of the same shape, or other prompts
    of the same width, run without compiling; another k compiles its own program."""
    speculative(lively, DRAFTS[0], 2, eos_token_id=None)
    before = len(lively.decoder)
    g = speculative(lively, DRAFTS[1], 2, eos_token_id=None)
    assert g.compile_seconds == 0.0 and len(lively.decoder) == before
    speculative(lively, DRAFTS[1], 5, eos_token_id=None)  # a k no other test runs
    assert len(lively.decoder) == before + 1


def test_batched_and_generate_batched(lively):
    """A long list decoded in fixed batches: the same tokens, and the counts summed over batches."""
    from hsd_jax.generate import generate_batched

    prompts = PROMPTS * 3
    ref = vanilla(lively, prompts, eos_token_id=None)
    g = generate_batched(lively, prompts, batch_size=5, max_new_tokens=NEW, eos_token_id=None,
                         draft=DRAFTS[0], num_draft_tokens=2)
    assert g.sequences == ref.sequences
    assert g.draft == hsd_jax.schedule(DRAFTS[0], num_layers=lively.config.num_layers,
                                       max_new_tokens=NEW).spec
    assert 0 <= g.acceptance_rate <= 1 and 1 <= g.tokens_per_round <= 3
    assert g.draft_stats["rounds"] >= 3  # three batches, at least one round each


def test_bad_requests(gpt2_dir):
    lm = hsd_jax.load(gpt2_dir)
    cases = [
        (dict(draft="hsd:s=1,min=0,max=2", num_beams=4), "greedy only"),
        (dict(draft="hsd:s=1,min=0,max=2", schedule="hsd:s=1,min=0,max=3"), "schedule must be vanilla"),
        (dict(draft="calm:lambda=0.02"), "static schedule"),
        (dict(num_draft_tokens=2), "needs a draft"),
        (dict(draft="hsd:s=1,min=0,max=2", num_draft_tokens=0), "positive integer"),
        (dict(draft="hsd:s=1,min=0,max=2", num_draft_tokens=2.0), "positive integer"),
        (dict(draft="nonsense:x=1"), "nonsense"),
    ]
    for options, message in cases:
        with pytest.raises(HsdError, match=message):
            generate(lm, input_ids=PROMPTS, max_new_tokens=4, **options)


def test_no_draft_reports_nothing(gpt2_dir):
    g = vanilla(hsd_jax.load(gpt2_dir), max_new_tokens=3)
    assert g.draft is None and g.draft_stats is None
    assert np.isnan(g.acceptance_rate) and np.isnan(g.tokens_per_round)


@pytest.fixture(scope="module")
def gpt2_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2tok")
    make_gpt2(folder, vocab=50257, tokenizer=True, initializer_range=0.3, seed=3)
    return folder


def test_cli_flags(gpt2_tok, capsys):
    base = ["generate", "--model", str(gpt2_tok), "--prompt", "a dog and", "--prompt", "the cat sat on",
            "--max-new-tokens", "9", "--no-eos", "--json"]
    assert main(base) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(base + ["--draft", "skipdecode:min=1,max=3", "--num-draft-tokens", "2"]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in plain]
    assert "draft skipdecode:min=1,max=3" in out.err and "tokens per round" in out.err
    assert main(base + ["--draft", "skipdecode:min=1,max=3", "--num-beams", "2"]) == 2
    assert "greedy only" in capsys.readouterr().err
    assert main(base + ["--num-draft-tokens", "2"]) == 2
    assert "needs a draft" in capsys.readouterr().err


@pytest.mark.skipif(not TRAINED.is_dir(), reason="no trained model at runs/commongen_small")
@pytest.mark.parametrize("batch", [1, 8])
def test_trained_commongen_model(batch):
    """The trained reproduction model on CommonGen dev concept sets (EOS on, as used): the
    same tokens as vanilla greedy for HSD and SkipDecode drafts at several k."""
    from hsd_jax.data import format_source

    lm = hsd_jax.load(TRAINED)
    sources = ["field stand look", "dog frisbee catch throw", "kid dance room", "sit chair table food",
               "ball hit player", "car drive road", "snow ski mountain", "tree cut man"]
    prompts = [format_source(s) for s in sources[:batch if batch > 1 else 2]]
    chunks = [prompts] if batch > 1 else [[p] for p in prompts]
    runs = [("hsd:s=1,min=0,max=4,warmup=1", 2), ("skipdecode:min=4,max=8", 3)]
    if batch > 1:
        runs.append(("hsd:s=2,min=0,max=4,warmup=1", 4))
    for chunk in chunks:
        ref = generate(lm, prompts=chunk, max_new_tokens=30, pad_to_multiple_of=16)
        for draft, k in runs:
            g = generate(lm, prompts=chunk, max_new_tokens=30, draft=draft, num_draft_tokens=k, pad_to_multiple_of=16)
            assert g.sequences == ref.sequences and g.texts == ref.texts, (draft, k)
            check_counts(g, k)


def test_the_strategy_takes_numpy_integers_and_refuses_other_numbers():
    """SpeculativeSteps checks its own k with errors.positive_int, as generate does."""
    import numpy as np

    from hsd_jax.schedules import resolve
    from hsd_jax.speculative import SpeculativeSteps

    draft = resolve("hsd:s=1,min=0,max=2", num_layers=4, max_new_tokens=8)
    steps = SpeculativeSteps(draft, np.int64(3))
    assert steps.num_draft_tokens == 3 and type(steps.num_draft_tokens) is int
    for bad in (0, True, 2.0):
        with pytest.raises(HsdError, match="num_draft_tokens must be a positive integer"):
            SpeculativeSteps(draft, bad)
