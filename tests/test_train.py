"""Training: prompt format, data, LoRA, the loop, resume, export, data parallel, errors.

The runs use one tiny GPT-2 (5 layers, width 32) with the real GPT-2 tokenizer, on 256
CommonGen pairs from ../shared/data (or a handful of pairs written here when that
folder is absent), batch 8, learning rate 1e-3, on CPU.

Why the tiny model's embeddings are scaled by 10: LoRA leaves the (tied) embeddings and
the final LayerNorm frozen, and the logits are ln_f(h) @ wte.T with |ln_f(h)| fixed by
the norm, so with transformers' init (std 0.02, width 32) no logit can move more than
about 0.7 nats and LoRA cannot lower the loss by even 10% (measured: 10.84 -> 10.73
over 2 epochs, 10.68 at best with lr 1e-2). Embeddings at the scale of a trained
model's (GPT-2's are ~0.1-0.2 per entry) give LoRA the room it has on real checkpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hsd_jax import cli, data, lora
from hsd_jax.errors import HsdError
from tests.conftest import SHARED_DATA, make_gpt2, save, torch_logits

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--batch-size", "8", "--learning-rate", "1e-3", "--no-progress"]
FALLBACK_PAIRS = [
    ("dog frisbee catch throw", "A dog leaps to catch a frisbee thrown by its owner."),
    ("ski mountain skier", "A skier skis down the mountain."),
    ("cat sit mat", "The cat sits on the mat."),
    ("bread bake oven", "She bakes bread in the oven."),
    ("ball kick goal", "He kicks the ball into the goal."),
    ("guitar play stage", "A man plays the guitar on stage."),
    ("water drink glass", "The boy drinks a glass of water."),
    ("car drive road", "A woman drives her car down the road."),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    model = make_gpt2(folder, vocab=50257, tokenizer=True)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(10.0)  # see the module docstring
    save(model, folder, True)
    return folder


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    folder = SHARED_DATA / "commongen"
    src, tgt = folder / "commongen.train.src_alpha.txt", folder / "commongen.train.tgt.txt"
    if src.exists() and tgt.exists():
        pairs = list(zip(src.read_text().splitlines()[:256], tgt.read_text().splitlines()[:256]))
    else:
        pairs = FALLBACK_PAIRS * 32
    return data.write_jsonl(pairs, tmp_path_factory.mktemp("pairs") / "commongen.jsonl")


def run_cli(*args) -> int:
    return cli.main(["train", *map(str, args)])


def log_losses(folder) -> dict[int, float]:
    from hsd_jax.train import read_log

    return {r["step"]: r["loss"] for r in read_log(folder)}


def tensors(folder) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.fixture(scope="module")
def full_run(tiny, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    assert run_cli("--model", tiny, "--train-file", pairs_file, "--mode", "full", "--epochs", 2, "--devices", 1,
                   *COMMON, "--output", out) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(tiny, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert run_cli("--model", tiny, "--train-file", pairs_file, "--mode", "lora", "--epochs", 2, *COMMON,
                   "--output", out) == 0
    return out


# ---------------------------------------------------------------- prompt format and data


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny))


def test_pair_is_prompt_then_target_then_eos(tokenizer):
    ids, n = data.encode_pair(tokenizer, "dog frisbee catch", "A dog catches a frisbee.", 64)
    assert ids[:n] == data.encode_source(tokenizer, "dog frisbee catch", 64)
    assert tokenizer.decode(ids[:n]) == data.format_source("dog frisbee catch")
    assert tokenizer.decode(ids[n:-1]) == data.format_target("A dog catches a frisbee.")
    assert ids[-1] == tokenizer.eos_token_id
    batch = data.make_batch(data.encode_pairs(tokenizer, [("dog frisbee catch", "A dog catches a frisbee.")], 64),
                            np.array([0]), 2)
    assert batch["loss_mask"][0].sum() == len(ids) - n  # target tokens and EOS only
    assert not batch["attention_mask"][1].any()  # a filler row


def test_long_source_is_cut_and_target_never(tokenizer):
    source, target = "word " * 200, "A short target sentence."
    ids, n = data.encode_pair(tokenizer, source, target, 40)
    assert len(ids) == 40
    assert tokenizer.decode(ids[n:-1]) == data.format_target(target)
    assert ids[:n] == data.encode_source(tokenizer, source, n)
    with pytest.raises(HsdError, match="cannot fit"):
        data.encode_pair(tokenizer, "src", "word " * 50, 40)


def test_batch_plan_covers_every_row_once_and_buckets_lengths():
    lengths = np.random.default_rng(0).integers(5, 300, size=1001)
    plan = data.batch_plan(lengths, 8, seed=3, epoch=1)
    assert len(plan) == data.steps_per_epoch(1001, 8) == 126
    assert sorted(np.concatenate(plan).tolist()) == list(range(1001))
    assert sorted(len(b) for b in plan)[:2] == [1, 8]  # one short batch, the rest full
    spread = np.mean([np.ptp(lengths[b]) for b in plan])
    assert spread < 0.2 * np.ptp(lengths)  # rows of similar length share a batch
    same = data.batch_plan(lengths, 8, seed=3, epoch=1)
    assert all((a == b).all() for a, b in zip(plan, same))
    other = data.batch_plan(lengths, 8, seed=3, epoch=2)
    assert any((a != b).any() for a, b in zip(plan, other) if len(a) == len(b))


def test_local_files_and_their_errors(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"source": "a b", "target": "x"}\n{"source": "c", "target": ["y", "z"]}\n')
    assert data.read_pairs(tmp_path / "p.jsonl") == [("a b", "x"), ("c", "y"), ("c", "z")]
    (tmp_path / "p.csv").write_text("mr,ref\n\"name[A], area[B]\",A is in B.\n")
    assert data.read_pairs(tmp_path / "p.csv", "mr", "ref") == [("name[A], area[B]", "A is in B.")]
    with pytest.raises(HsdError, match="no field 'source'.*mr, ref"):
        data.read_pairs(tmp_path / "p.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(HsdError, match="empty"):
        data.read_pairs(tmp_path / "empty.jsonl")
    with pytest.raises(HsdError, match="unknown dataset 'cnn'.*cnn_dailymail"):
        data.load_dataset_pairs("cnn")


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is absent (a user's clone has none)")
def test_shared_commongen_and_e2e_files():
    train = data.load_dataset_pairs("common_gen", "train")
    assert len(train) > 39000 and train[0][0] == "chicken cheese pizza broccoli"
    e2e = data.read_pairs(SHARED_DATA / "e2e" / "devset.csv", "mr", "ref")
    assert len(e2e) > 4600 and e2e == data.load_dataset_pairs("e2e_nlg", "validation")
    dev = data.read_pairs(SHARED_DATA / "commongen" / "commongen.dev.jsonl", "concept_set", "scene")
    assert len(dev) == len(data.load_dataset_pairs("common_gen", "dev"))  # one pair per reference


# ---------------------------------------------------------------- LoRA


def test_lora_starts_at_the_base_model_and_merges_low_rank(tiny):
    import jax
    import jax.numpy as jnp

    import hsd_jax

    lm = hsd_jax.load(tiny, tokenizer=False)
    cfg = lora.LoraConfig(rank=4, alpha=8)
    adapters = lora.init(jax.random.key(0), lm.params, lm.config, cfg)
    assert lora.targets_of(adapters) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    merged = lora.merge(lm.params, adapters, cfg.scale)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(lm.params)))
    ab = adapters["attn"]["c_proj"]
    ab["b"] = jnp.ones_like(ab["b"])
    delta = lora.merge(lm.params, adapters, cfg.scale)["layers"]["attn"]["c_proj"]["kernel"] \
        - lm.params["layers"]["attn"]["c_proj"]["kernel"]
    assert np.linalg.matrix_rank(np.asarray(delta[0])) <= 4
    only_c_proj = lora.resolve_targets(lm.params, lm.config, lora.LoraConfig(targets=("c_proj",)))
    assert only_c_proj == ["attn.c_proj", "mlp.c_proj"]
    with pytest.raises(HsdError, match="q_proj.*attn.c_attn"):
        lora.resolve_targets(lm.params, lm.config, lora.LoraConfig(targets=("q_proj",)))


# ---------------------------------------------------------------- training runs


def check_export(folder, original):
    """transformers loads the folder, with hsd_jax.load's logits; returns the tensors."""
    import hsd_jax

    ids = np.array([[464, 3290, 318, 257, 1332, 13, 50256, 198]])
    mask = np.ones_like(ids)
    ours = np.asarray(hsd_jax.load(folder).forward(ids, attention_mask=mask))
    ref = torch_logits(folder, ids, mask)
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) <= 1e-4
    return tensors(folder), tensors(original)


def test_lora_lowers_loss_and_touches_only_projections(lora_run, tiny):
    losses = list(log_losses(lora_run).values())
    assert len(losses) == 64  # 256 pairs / 8 x 2 epochs, one log line a step
    assert losses[-1] <= 0.9 * losses[0], losses
    after, before = check_export(lora_run, tiny)
    assert not np.array_equal(after["transformer.h.0.attn.c_attn.weight"], before["transformer.h.0.attn.c_attn.weight"])
    for name in before:
        if "ln_" in name or "wte" in name or "wpe" in name or name.endswith(".bias"):
            assert np.array_equal(after[name], before[name]), name
    run = json.loads((lora_run / "run.json").read_text())
    assert run["trainable_params"] == 5 * 16 * (32 + 96 + 32 + 32 + 32 + 128 + 128 + 32)


def test_full_training_lowers_loss_and_changes_embeddings(full_run, tiny):
    losses = list(log_losses(full_run).values())
    assert len(losses) == 64 and losses[-1] <= 0.9 * losses[0], losses
    after, before = check_export(full_run, tiny)
    assert not np.array_equal(after["transformer.wte.weight"], before["transformer.wte.weight"])
    assert (full_run / "checkpoints" / "64").is_dir()


def test_resume_continues_exactly(full_run, tiny, pairs_file, tmp_path):
    out = tmp_path / "cut"
    args = ["--model", tiny, "--train-file", pairs_file, "--mode", "full", "--epochs", 2, "--devices", 1, *COMMON,
            "--output", out]
    assert run_cli(*args, "--max-steps", 10) == 0
    assert run_cli(*args, "--max-steps", 20, "--resume") == 0
    cut, whole = log_losses(out), log_losses(full_run)
    assert sorted(cut) == list(range(1, 21))
    for step in range(11, 21):  # the schedule spans --epochs, so one --max-steps 20 run logs these too
        assert abs(cut[step] - whole[step]) <= 1e-5, (step, cut[step], whole[step])


def test_four_devices_give_the_one_device_losses(full_run, tiny, pairs_file, tmp_path):
    out = tmp_path / "dp4"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "hsd_jax.cli", "train", "--model", str(tiny), "--train-file", str(pairs_file),
           "--mode", "full", "--epochs", "2", *COMMON, "--max-steps", "4", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["devices"] == 4
    four, one = log_losses(out), log_losses(full_run)
    for step in range(1, 5):
        assert abs(four[step] - one[step]) <= 1e-4 * abs(one[step]), (step, four[step], one[step])


def test_random_init_bf16_trains_and_exports(tiny, pairs_file, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}))
    out = tmp_path / "scratch"
    assert run_cli("--model", f"random:{config}", "--tokenizer", tiny, "--train-file", pairs_file, "--bf16",
                   "--max-steps", 3, "--eval-file", pairs_file, "--eval-limit", 8, "--limit", 64, *COMMON,
                   "--output", out) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and np.isfinite(log[-1]["eval_loss"])
    # what the validation loss is on: run.json and the log line say (a resume may change it)
    source = f"{Path(pairs_file).resolve()}, first 8 pairs"
    assert json.loads((out / "run.json").read_text())["validation"] == {"data": source, "pairs": 8, "every": 0}
    assert log[-1]["eval_data"] == source and "eval_data" not in log[0]
    assert abs(log[0]["loss"] - np.log(50257)) < 0.5  # random weights start near uniform
    hf = json.loads((out / "config.json").read_text())
    assert (hf["model_type"], hf["n_layer"], hf["n_embd"], hf["vocab_size"]) == ("gpt2", 2, 32, 50257)
    check_export(out, out)


def test_bad_input_is_one_clear_error(full_run, tiny, pairs_file, tmp_path, capsys):
    def error(*args) -> str:
        assert run_cli(*args) == 2
        return capsys.readouterr().err

    base = ["--model", tiny, "--mode", "lora"]
    assert "holds another training run; pass --resume" in error(*base, "--train-file", pairs_file, "--output", full_run)
    assert "unknown dataset 'nope'" in error(*base, "--dataset", "nope", "--output", tmp_path / "a")
    (tmp_path / "empty.jsonl").write_text("")
    assert "is empty" in error(*base, "--train-file", tmp_path / "empty.jsonl", "--output", tmp_path / "b")
    (tmp_path / "odd.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    assert "no field 'source'" in error(*base, "--train-file", tmp_path / "odd.jsonl", "--output", tmp_path / "c")
    (tmp_path / "long.jsonl").write_text(json.dumps({"source": "s", "target": "word " * 200}) + "\n")
    assert "cannot fit" in error(*base, "--train-file", tmp_path / "long.jsonl", "--output", tmp_path / "d")
    assert "--resume must repeat" in error(*base, "--train-file", pairs_file, "--resume", "--output", full_run)
