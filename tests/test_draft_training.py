"""The draft view (`models.draft_forward`): a teacher-forced forward whose skipping path
computes, at every position, what a self-speculative draft step computes there — the
schedule's layers over the full model's K/V of the verified prefix."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hsd_jax
from hsd_jax import schedules
from hsd_jax.models import KVCache, decode_layout, decode_step, draft_forward, forward
from hsd_jax.train import skip_aware_active
from tests.test_train import COMMON, pairs_file, run_cli, tiny  # noqa: F401 (fixtures)

PROMPT = [5, 17, 3, 9]
TARGET_LEN = 8


def _draft_steps(params, config, tokens, positions, ops_per_position):
    """What the draft step at each position q computes: the full model's K/V of
    tokens[:q] (the verified prefix: one full prefill, of which the slots before q are
    kept), then one decode step of tokens[q] under that position's layer ops."""
    layout = decode_layout(params)
    cache = KVCache.init(config, 1, len(tokens), jnp.float32)
    _, cache = forward(layout, config, jnp.asarray([tokens], jnp.int32), None, cache)

    @jax.jit
    def step(q, token, ops):
        prefix = cache.replace(valid=jnp.arange(len(tokens))[None] < q, index=q)
        logits, _ = decode_step(layout, config, token[None], prefix, ops)
        return logits[0]

    return [np.asarray(step(jnp.int32(q), jnp.int32(tokens[q]), ops))
            for q, ops in zip(positions, ops_per_position)]


@pytest.mark.parametrize("spec", ["hsd:s=1,min=0,max=2,T=8", "skipdecode:min=1,max=3,T=8"])
def test_draft_view_equals_the_draft_step_at_every_position(model_dir, spec):
    lm = hsd_jax.load(model_dir, tokenizer=False)
    config = lm.config
    sched = schedules.schedule(spec, num_layers=config.num_layers, max_new_tokens=TARGET_LEN)
    assert not sched.mask.all()
    rng = np.random.default_rng(1)
    tokens = PROMPT + rng.integers(0, config.vocab_size, TARGET_LEN).tolist()
    width = len(tokens) + 2  # right padding, as in training batches
    ids = np.zeros((1, width), np.int32)
    ids[0, :len(tokens)] = tokens
    attention = np.zeros_like(ids, bool)
    attention[0, :len(tokens)] = True
    loss = np.zeros_like(ids, bool)
    loss[0, len(PROMPT):len(tokens)] = True
    active = jnp.asarray(skip_aware_active(sched.mask, loss, config.num_layers))
    full, draft = draft_forward(lm.params, config, jnp.asarray(ids), jnp.asarray(attention), active)
    plain, _ = forward(lm.params, config, jnp.asarray(ids), jnp.asarray(attention))
    np.testing.assert_allclose(np.asarray(full), np.asarray(plain), rtol=1e-5, atol=1e-5)
    ops = jnp.asarray(sched.layer_ops(), jnp.int32)
    skip_decoded, _ = forward(lm.params, config, jnp.asarray(ids), jnp.asarray(attention), active=active)
    differs_from_skip_decoding = False
    positions = [len(PROMPT) + t for t in range(TARGET_LEN)]  # q holds target token t, runs row t
    for q, expected in zip(positions, _draft_steps(lm.params, config, tokens, positions, ops[:TARGET_LEN])):
        np.testing.assert_allclose(np.asarray(draft[0, q]), expected, rtol=1e-4, atol=1e-4)
        differs_from_skip_decoding |= not np.allclose(np.asarray(skip_decoded[0, q]), expected, atol=1e-3)
    # The prompt runs every layer: there the draft is the full model.
    np.testing.assert_allclose(np.asarray(draft[0, :len(PROMPT)]), np.asarray(full[0, :len(PROMPT)]),
                               rtol=1e-5, atol=1e-5)
    # And the view matters: plain skip decoding (skipped K/V in the prefix too) differs.
    assert differs_from_skip_decoding


def test_no_gradient_reaches_the_draft_through_the_full_models_cache(gpt2_dir):
    lm = hsd_jax.load(gpt2_dir, tokenizer=False)
    config = lm.config
    ids = jnp.asarray([[3, 4, 5, 6, 7, 8]], jnp.int32)
    mask = jnp.ones_like(ids, bool)
    active = jnp.zeros((config.num_layers, 1, 6), bool)  # the draft runs no layer at all

    def draft_loss(params):
        _, draft = draft_forward(params, config, ids, mask, active)
        return jnp.sum(draft)

    grads = jax.grad(draft_loss)(lm.params)
    # With every layer skipped the draft reads only embeddings and head; the layers'
    # weights reach it only through the full pass's K/V, which are held fixed.
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["layers"]))
    assert float(jnp.abs(grads["wte"]).max()) > 0


def test_a_joint_batch_in_the_draft_view_scores_the_draft_half_as_draft_steps(gpt2_dir):
    """token_nll(view="draft") on a joint batch: the full half as `forward`, the schedule's
    half as `draft_forward`'s draft, each weighted by its rows as in the decode view; "both"
    takes the mean of the draft's and the decode view's schedule losses."""
    import types

    from hsd_jax.train import TrainConfig, _add_skip_schedule, skip_aware_schedules, token_nll

    lm = hsd_jax.load(gpt2_dir, tokenizer=False)
    config = lm.config
    rows = skip_aware_schedules(["hsd:s=1,min=0,max=2,T=8"], config.num_layers, max_len=16)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, config.vocab_size, (2, 14)).astype(np.int32)
    attention = np.ones_like(tokens, bool)
    attention[1, 11:] = False
    loss = attention.copy()
    loss[:, :4] = False
    cfg = TrainConfig(model="m", output="o", skip_aware=("x",), skip_aware_prob=0.6, skip_aware_joint=True)
    joint, _ = _add_skip_schedule(types.SimpleNamespace(cfg=cfg, skip_schedules=rows, lm=lm),
                                  {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}, step=3)
    batch = {k: jnp.asarray(v) for k, v in joint.items()}
    total, count = token_nll(lm.params, config, batch, view="draft")

    full, draft = draft_forward(lm.params, config, jnp.asarray(tokens), jnp.asarray(attention),
                                jnp.asarray(joint["active"][:, 2:]))

    def nll(logits):  # per position t, the NLL of token t + 1, counted where loss_mask[t + 1]
        logp = np.asarray(jax.nn.log_softmax(logits[:, :-1]), np.float64)
        picked = np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return -(picked * loss[:, 1:]).sum()

    expected = 2 * 0.4 * nll(full) + 2 * 0.6 * nll(draft)
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert float(count) == pytest.approx(2 * loss[:, 1:].sum(), rel=1e-6)
    decoded, _ = forward(lm.params, config, jnp.asarray(tokens), jnp.asarray(attention),
                         active=jnp.asarray(joint["active"][:, 2:]))
    decode_expected = 2 * 0.4 * nll(full) + 2 * 0.6 * nll(decoded)
    decode_total, _ = token_nll(lm.params, config, batch)
    np.testing.assert_allclose(float(decode_total), decode_expected, rtol=1e-5)
    assert abs(decode_expected - expected) > 1e-3  # the view changes the loss
    both, _ = token_nll(lm.params, config, batch, view="both")
    np.testing.assert_allclose(float(both), 2 * 0.4 * nll(full) + 0.6 * (nll(draft) + nll(decoded)), rtol=1e-5)


def test_draft_view_runs_from_the_cli_and_needs_joint_training(tiny, pairs_file, tmp_path, capsys):
    base = ["--model", tiny, "--train-file", pairs_file, "--epochs", 1, "--devices", 1, *COMMON,
            "--skip-aware", "hsd:s=1,min=0,max=2"]
    assert run_cli(*base, "--skip-aware-view", "draft", "--output", tmp_path / "x") == 2
    assert "--skip-aware-view draft needs --skip-aware-joint" in capsys.readouterr().err
    assert run_cli(*base, "--skip-aware-view", "both", "--output", tmp_path / "x") == 2
    assert "--skip-aware-view both needs --skip-aware-joint" in capsys.readouterr().err
    for view in ("draft", "both"):
        out = tmp_path / view
        assert run_cli(*base, "--skip-aware-joint", "--skip-aware-view", view, "--max-steps", 2, "--output", out) == 0
        assert json.loads((out / "run.json").read_text())["settings"]["skip_aware_view"] == view


def test_the_views_recipe_passes_both_views_and_the_selection_half_to_every_stage(tmp_path):
    """train/commongen_reproduce.sh --views (issue 37's candidate), checked against a stub
    hsd-jax that records each call's arguments: no training."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    # records its arguments and makes its --output folder, as a finished run would
    (bin_dir / "hsd-jax").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$CALLS/$(date +%s%N)"\n'
                                     'while [ $# -gt 0 ]; do [ "$1" = --output ] && mkdir -p "$2"; shift; done\n')
    (bin_dir / "hsd-jax").chmod(0o755)
    env = {**os.environ, "CALLS": str(calls),
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}
    done = subprocess.run([str(root / "train/commongen_reproduce.sh"), str(tmp_path / "out"), "--views"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    runs = [path.read_text().splitlines() for path in sorted(calls.iterdir())]
    outputs = [args[args.index("--output") + 1] for args in runs]
    assert len(runs) == 1 + 4 + 4  # plain, the four stages, the four stages with both views
    views = [args for args, out in zip(runs, outputs) if "schedule_aware_views" in out]
    others = [args for args, out in zip(runs, outputs) if "schedule_aware_views" not in out]
    assert len(views) == 4 and all(out.endswith(f"stage{i}") for i, out in enumerate(outputs[-4:], 1))
    for args in views:  # argparse keeps a flag's last value: the selection half's
        assert args[args.index("--skip-aware-view") + 1] == "both"
        assert args[len(args) - 1 - args[::-1].index("--eval-split") + 1] == "validation:selection"
    assert not any("--skip-aware-view" in args for args in others)


def test_a_view_that_is_not_one_of_the_three_is_refused_from_python_too(tmp_path):
    from hsd_jax.errors import HsdError
    from hsd_jax.train.settings import TrainConfig, _check_config

    cfg = TrainConfig(model="m", output=str(tmp_path / "o"), train_file="p", skip_aware=("x",),
                      skip_aware_joint=True, skip_aware_view="sideways")
    with pytest.raises(HsdError, match="--skip-aware-view must be decode, draft or both, got 'sideways'"):
        _check_config(cfg)
