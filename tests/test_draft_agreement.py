"""eval/draft_agreement.py: the teacher-forced k = 1 draft agreement, split by the full model's
confidence (issue 37's question whether CommonGen's drafts are limited by the draft)."""

import numpy as np
import pytest

from tests.conftest import eval_script, make_gpt2


@pytest.fixture(scope="module")
def script():
    return eval_script("draft_agreement")


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """A 4-layer random model, its stacked copy, and greedy continuations of five prompts."""
    import hsd_jax
    from hsd_jax.generate import generate_batched

    folder = tmp_path_factory.mktemp("agreement_model")
    make_gpt2(folder, layers=4)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 120, n).tolist() for n in (3, 7, 5, 9, 4)]
    continuations = generate_batched(hsd_jax.load(folder, tokenizer=False, layout="decode"), prompts,
                                     batch_size=2, max_new_tokens=12).sequences
    return hsd_jax.load(folder, tokenizer=False), prompts, continuations


def test_a_draft_of_every_layer_agrees_everywhere(script, decoded):
    lm, prompts, continuations = decoded
    probs, agree, overlap, reproduced = script.agreement(lm, prompts, continuations, np.ones((12, 4), bool),
                                                         batch_size=2)
    assert reproduced == 1.0  # the teacher-forced pass picks the tokens greedy decoding made
    assert len(probs) == sum(len(c) - 1 for c in continuations)  # the prefill's token is not drafted
    assert agree.all()
    np.testing.assert_allclose(overlap, 1.0, atol=1e-5)  # the same distribution
    assert ((probs > 0) & (probs <= 1)).all()


def test_a_skipping_draft_disagrees_somewhere_and_the_bins_hold_every_position(script, decoded):
    from hsd_jax.schedules import schedule

    lm, prompts, continuations = decoded
    mask = schedule("hsd:s=2,min=0,max=1,T=12", num_layers=4, max_new_tokens=12).mask
    probs, agree, overlap, reproduced = script.agreement(lm, prompts, continuations, mask, batch_size=2)
    assert reproduced == 1.0
    assert 0 < agree.mean() < 1
    assert ((overlap > 0) & (overlap < 1)).all()
    summary = script.summary(probs, agree, overlap)
    assert sum(b["positions"] for b in summary["bins"]) == summary["positions"] == len(probs)
    assert summary["agreement"] == pytest.approx(agree.mean())
    table = script.table([{"draft": "hsd:s=2,min=0,max=1,T=12", **summary, "full_argmax_is_greedy_token": reproduced}])
    assert table.count("\n") == 3
