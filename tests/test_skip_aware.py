"""Schedule-aware training: the teacher-forced forward under a schedule computes exactly
what decoding the same target under that schedule computes, and `--skip-aware` runs
train under drawn schedules reproducibly."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hsd_jax
from hsd_jax import schedules
from hsd_jax.errors import HsdError
from hsd_jax.models import KVCache, decode_layout, decode_step, forward
from hsd_jax.train import TrainConfig, draw_schedule, skip_aware_active, skip_aware_schedules
from tests.test_train import COMMON, log_losses, pairs_file, run_cli, tiny  # noqa: F401 (fixtures)

PROMPTS = [[5, 17, 3, 9], [22, 8, 40, 2, 11, 30, 7]]  # different lengths: per-row decode steps
TARGET_LEN = 9


def _random_nested_mask(num_layers: int, steps: int, seed: int) -> np.ndarray:
    """Each step runs a random subset of the previous step's layers (never empty)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((steps, num_layers), bool)
    row = np.ones(num_layers, bool)
    for t in range(steps):
        keep = row & (rng.random(num_layers) < 0.8)
        if not keep.any():
            keep[np.flatnonzero(row)[-1]] = True
        mask[t] = row = keep
    return mask


def _masks(num_layers: int) -> dict[str, np.ndarray]:
    steps = 16
    hsd = schedules.schedule("hsd:s=1,min=0,max=3,T=8", num_layers=num_layers, max_new_tokens=steps)
    skip = schedules.schedule("skipdecode:min=1,max=4,T=8", num_layers=num_layers, max_new_tokens=steps)
    return {"hsd": hsd.mask, "skipdecode": skip.mask, "random-nested": _random_nested_mask(num_layers, steps, 3)}


def _teacher_forced_decode(params, config, prompt, target, mask):
    """Logits predicting target[0..n-1]: a prefill of the prompt (every layer), then one
    compiled decode step per target token under the schedule's layer ops, fed the
    reference token instead of a sampled one."""
    ops = jnp.asarray(schedules.Schedule(mask, spec="test", name="test").layer_ops(), jnp.int32)
    layout = decode_layout(params)

    @jax.jit
    def run(ids, target):
        cache = KVCache.init(config, 1, ids.shape[1] + target.shape[1], jnp.float32)
        first, cache = forward(layout, config, ids, None, cache, last_only=True)

        def step(cache, xs):
            token, t = xs
            logits, cache = decode_step(layout, config, token[None], cache, ops[t])
            return cache, logits[0]

        _, rest = jax.lax.scan(step, cache, (target[0, :-1], jnp.arange(target.shape[1] - 1)))
        return jnp.concatenate([first[0], rest], axis=0)

    return np.asarray(run(jnp.asarray([prompt], jnp.int32), jnp.asarray([target], jnp.int32)))


@pytest.mark.parametrize("which", ["hsd", "skipdecode", "random-nested"])
def test_training_forward_under_a_schedule_equals_teacher_forced_skip_decoding(model_dir, which):
    lm = hsd_jax.load(model_dir, tokenizer=False)
    config = lm.config
    mask = _masks(config.num_layers)[which]
    assert not mask.all(), "the schedule must skip something for the test to mean anything"
    rng = np.random.default_rng(0)
    targets = [rng.integers(0, config.vocab_size, TARGET_LEN).tolist() for _ in PROMPTS]
    width = max(len(p) for p in PROMPTS) + TARGET_LEN + 3  # right padding, as training batches have
    tokens = np.zeros((len(PROMPTS), width), np.int32)
    attention = np.zeros_like(tokens, bool)
    loss = np.zeros_like(tokens, bool)
    for i, (p, t) in enumerate(zip(PROMPTS, targets)):
        tokens[i, :len(p) + len(t)] = p + t
        attention[i, :len(p) + len(t)] = True
        loss[i, len(p):len(p) + len(t)] = True
    active = skip_aware_active(mask, loss, config.num_layers)
    trained, _ = forward(lm.params, config, jnp.asarray(tokens), jnp.asarray(attention), active=jnp.asarray(active))
    full, _ = forward(lm.params, config, jnp.asarray(tokens), jnp.asarray(attention))
    for i, (p, t) in enumerate(zip(PROMPTS, targets)):
        # Position len(p) - 1 + j predicts target token j.
        ours = np.asarray(trained[i, len(p) - 1:len(p) - 1 + len(t)])
        decoded = _teacher_forced_decode(lm.params, config, p, t, mask)
        np.testing.assert_allclose(ours, decoded, rtol=1e-4, atol=1e-4)
        # And the schedule matters: the full model's logits differ after the prefill.
        assert not np.allclose(np.asarray(full[i, len(p):len(p) - 1 + len(t)]), decoded[1:], atol=1e-3)


def test_active_mask_rows_follow_each_rows_decode_steps():
    mask = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1]], bool)  # steps 0..2; later steps repeat the last
    loss = np.array([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0]], bool)
    active = skip_aware_active(mask, loss, 3)  # (L, B, W)
    assert active.shape == (3, 2, 7)
    row0 = active[:, 0].T  # (W, L)
    assert row0[:2].all()  # the prompt: the prefill runs every layer
    assert (row0[2:5] == mask).all() and (row0[5:] == mask[-1]).all()
    row1 = active[:, 1].T
    assert row1[:1].all() and (row1[1:4] == mask).all()
    assert skip_aware_active(None, loss, 3).all()


def test_schedules_groups_and_draws():
    rows = skip_aware_schedules(["paper", "hsd:s=1,min=0,max=2,T=72"], num_layers=12, max_len=64)
    specs = [s.spec for s in rows]
    assert not any(s.startswith(("calm", "vanilla")) for s in specs)  # the group's runtime / full rows
    assert len(specs) == len(set(specs)) == 9  # 2 SkipDecode + 6 HSD + the extra row
    assert all(s.mask.shape == (64, 12) for s in rows)
    with pytest.raises(HsdError, match="CALM decides its exits at run time"):
        skip_aware_schedules(["calm:lambda=0.1"], num_layers=12, max_len=64)
    draws = [draw_schedule(rows, 0.5, seed=0, step=i) for i in range(400)]
    assert draws == [draw_schedule(rows, 0.5, seed=0, step=i) for i in range(400)]  # a pure function
    full = sum(d is None for d in draws)
    assert 150 < full < 250  # about half the batches train every layer
    assert {d.spec for d in draws if d is not None} == set(specs)  # every schedule is drawn


@pytest.fixture(scope="module")
def skip_run(tiny, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "skip"
    assert run_cli("--model", tiny, "--train-file", pairs_file, "--epochs", 1, "--devices", 1, *COMMON,
                   "--max-steps", 12, "--skip-aware", "hsd:s=1,min=0,max=2", "skipdecode:min=1,max=3",
                   "--skip-aware-prob", 0.6, "--output", out) == 0
    return out


def test_skip_aware_run_records_and_logs_its_schedules(skip_run, tiny):
    from hsd_jax.train import read_log

    settings = json.loads((skip_run / "run.json").read_text())["settings"]
    assert settings["skip_aware"] == ["hsd:s=1,min=0,max=2", "skipdecode:min=1,max=3"]
    assert settings["skip_aware_prob"] == 0.6
    trained_under = [r["schedule"] for r in read_log(skip_run)]
    assert len(trained_under) == 12
    assert "vanilla" in trained_under and any(s.startswith("hsd:") for s in trained_under)
    plain = log_losses(skip_run)
    assert all(np.isfinite(v) for v in plain.values())


def test_skip_aware_resume_is_exact_and_keeps_its_settings(skip_run, tiny, pairs_file, tmp_path):
    out = tmp_path / "cut"
    args = ["--model", tiny, "--train-file", pairs_file, "--epochs", 1, "--devices", 1, *COMMON,
            "--skip-aware", "hsd:s=1,min=0,max=2", "skipdecode:min=1,max=3", "--skip-aware-prob", 0.6,
            "--output", out]
    assert run_cli(*args, "--max-steps", 5) == 0
    assert run_cli(*args, "--max-steps", 12, "--resume") == 0
    cut, whole = log_losses(out), log_losses(skip_run)
    for step in range(6, 13):
        assert abs(cut[step] - whole[step]) <= 1e-5, (step, cut[step], whole[step])
    with pytest.raises(HsdError, match="skip_aware_prob"):
        from hsd_jax.train import TrainConfig, train

        train(TrainConfig(model=str(tiny), train_file=str(pairs_file), output=str(out), resume=True, epochs=1,
                          batch_size=8, learning_rate=1e-3, devices=1, progress=False,
                          skip_aware=("hsd:s=1,min=0,max=2", "skipdecode:min=1,max=3"), skip_aware_prob=0.3))


def test_a_joint_batch_weighs_the_full_model_and_the_schedule_by_p(model_dir):
    """--skip-aware-joint: one step's loss is (1 - P) x the full model's mean token loss +
    P x the drawn schedule's, each computed on its own, from one batch of twice the rows."""
    import types

    from hsd_jax.train import _add_skip_schedule, token_nll

    lm = hsd_jax.load(model_dir, tokenizer=False)
    config = lm.config
    rows = skip_aware_schedules(["hsd:s=1,min=0,max=2,T=8"], config.num_layers, max_len=24)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, (3, 20)).astype(np.int32)
    attention = np.ones_like(tokens, bool)
    attention[1, 15:] = False  # a padded row
    loss = attention.copy()
    loss[:, :6] = False
    batch = {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}

    def mean_loss(b):
        total, count = token_nll(lm.params, config, {k: jnp.asarray(v) for k, v in b.items()})
        return float(total / count)

    for p in (0.5, 0.8):
        cfg = TrainConfig(model="m", output="o", skip_aware=("x",), skip_aware_prob=p, skip_aware_joint=True, seed=4)
        run = types.SimpleNamespace(cfg=cfg, skip_schedules=rows, lm=lm)
        joint, trained_under = _add_skip_schedule(run, dict(batch), step=7)
        assert trained_under == f"vanilla+{rows[0].spec}"
        assert joint["tokens"].shape == (6, 20) and joint["active"].shape == (config.num_layers, 6, 20)
        full = mean_loss({**batch, "active": skip_aware_active(None, loss, config.num_layers)})
        skipped = mean_loss({**batch, "active": skip_aware_active(rows[0].mask, loss, config.num_layers)})
        assert abs(full - skipped) > 1e-3, "the schedule must change the loss for the test to mean anything"
        np.testing.assert_allclose(mean_loss(joint), (1 - p) * full + p * skipped, rtol=1e-5)

    # Self-distillation: the schedule's copy also learns the full model's distribution.
    def logits_under(mask):
        active = skip_aware_active(mask, loss, config.num_layers)
        out, _ = forward(lm.params, config, jnp.asarray(tokens), jnp.asarray(attention), active=jnp.asarray(active))
        return np.asarray(out[:, :-1], np.float64)

    teacher, student = logits_under(None), logits_under(rows[0].mask)
    probs = np.exp(teacher - teacher.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    log_student = student - student.max(-1, keepdims=True)
    log_student -= np.log(np.exp(log_student).sum(-1, keepdims=True))
    targets = loss[:, 1:]
    soft = float((-(probs * log_student).sum(-1) * targets).sum() / targets.sum())
    assert abs(soft - skipped) > 1e-3
    # `joint` and `p` are the last loop's (P = 0.8).
    for d in (0.3, 1.0):
        total, count = token_nll(lm.params, config, {k: jnp.asarray(v) for k, v in joint.items()}, distill=d)
        np.testing.assert_allclose(float(total / count), (1 - p) * full + p * ((1 - d) * skipped + d * soft),
                                   rtol=1e-5)


def test_a_joint_run_trains_both_paths_each_step_and_resumes_exactly(tiny, pairs_file, tmp_path, capsys):
    from hsd_jax.train import read_log

    out = tmp_path / "joint"
    args = ["--model", tiny, "--train-file", pairs_file, "--epochs", 1, "--devices", 1, *COMMON,
            "--skip-aware", "hsd:s=1,min=0,max=2", "skipdecode:min=1,max=3", "--skip-aware-joint",
            "--skip-aware-distill", 0.5, "--output", out]
    assert run_cli(*args, "--max-steps", 3) == 0
    assert run_cli(*args, "--max-steps", 6, "--resume") == 0
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["skip_aware_joint"] is True and settings["skip_aware_prob"] == 0.5
    assert settings["skip_aware_distill"] == 0.5
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 7))
    assert all(r["schedule"].startswith("vanilla+") for r in log)
    whole = tmp_path / "whole"
    assert run_cli(*args[:-1], whole, "--max-steps", 6) == 0
    cut, uncut = log_losses(out), log_losses(whole)
    for step in range(4, 7):
        assert abs(cut[step] - uncut[step]) <= 1e-5, (step, cut[step], uncut[step])
    capsys.readouterr()
    assert run_cli(*args[:-4], "--skip-aware-distill", 0.25, "--output", out, "--max-steps", 8, "--resume") == 2
    assert "skip_aware_distill: 0.5 then, 0.25 now" in capsys.readouterr().err  # a resume must repeat it


def test_bad_skip_aware_settings_are_one_clear_error(tiny, pairs_file, tmp_path, capsys):
    base = ["--model", tiny, "--train-file", pairs_file, *COMMON, "--output", tmp_path / "x"]
    assert run_cli(*base, "--skip-aware", "hsd:s=1,min=0,max=2", "--skip-aware-prob", 0) == 2
    assert "--skip-aware-prob must be above 0" in capsys.readouterr().err
    assert run_cli(*base, "--skip-aware", "calm:lambda=0.1") == 2
    assert "CALM decides its exits at run time" in capsys.readouterr().err
    assert run_cli(*base, "--skip-aware-joint") == 2
    assert "--skip-aware-joint needs the schedules to train under" in capsys.readouterr().err
    assert run_cli(*base, "--skip-aware", "hsd:s=1,min=0,max=2", "--skip-aware-joint", "--skip-aware-prob", 1) == 2
    assert "would give the full model's copy no weight" in capsys.readouterr().err
    assert run_cli(*base, "--skip-aware", "hsd:s=1,min=0,max=2", "--skip-aware-distill", 0.5) == 2
    assert "--skip-aware-distill needs --skip-aware-joint" in capsys.readouterr().err
    assert run_cli(*base, "--skip-aware", "hsd:s=1,min=0,max=2", "--skip-aware-joint", "--skip-aware-distill", 2) == 2
    assert "--skip-aware-distill must be from 0 to 1" in capsys.readouterr().err
