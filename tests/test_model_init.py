"""Random initialisation lives with the model family: `gpt2.init`, `phi.init` and
`models.init_params` draw weights as transformers initialises each architecture, in
the layout a loaded checkpoint has; `hsd-jax train --model random:<config.json>` uses
them for either family."""

from __future__ import annotations

import hashlib
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from hsd_jax import cli
from hsd_jax.checkpoint import params_from_tensors, tensors_from_params
from hsd_jax.errors import HsdError
from hsd_jax.models import FAMILIES, forward, init_params


def _config(folder):
    hf = json.loads((folder / "config.json").read_text())
    return FAMILIES[hf["model_type"]].config_from_hf(hf)


def test_init_has_the_layout_of_a_loaded_checkpoint(model_dir):
    from safetensors.numpy import load_file

    config = _config(model_dir)
    loaded = params_from_tensors(load_file(model_dir / "model.safetensors"), config)
    drawn = init_params(config, jax.random.key(0))
    assert jax.tree.structure(drawn) == jax.tree.structure(loaded)
    for a, b in zip(jax.tree.leaves(drawn), jax.tree.leaves(loaded)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(drawn).items()}
    assert shapes == FAMILIES[config.model_type].expected_shapes(config)
    # The checkpoint name map takes the drawn weights there and back, and they run.
    back = params_from_tensors(tensors_from_params(drawn, config), config)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(drawn), jax.tree.leaves(back)))
    logits, _ = forward(drawn, config, np.array([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, config.vocab_size) and np.isfinite(np.asarray(logits)).all()


def _transformers_model(model_type: str, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    if model_type == "gpt2":
        hf = GPT2Config(vocab_size=1000, n_positions=64, n_embd=128, n_layer=4, n_head=4, initializer_range=0.05)
        return GPT2LMHeadModel(hf).eval()
    hf = PhiConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                   num_attention_heads=4, initializer_range=0.05, pad_token_id=3)
    return PhiForCausalLM(hf).eval()


@pytest.mark.parametrize("model_type", ["gpt2", "phi"])
def test_init_draws_each_weight_as_transformers_does(model_type):
    """Weight by weight, the drawn values have the spread transformers gives them
    (initializer_range 0.05 here, so the default would be caught; GPT-2's c_proj kernels
    0.05 / sqrt(2 x 4)); biases are zero and norm scales one in both; Phi's padding row is
    zero in both."""
    model = _transformers_model(model_type, seed=0)
    hf = model.config.to_dict()
    config = FAMILIES[model_type].config_from_hf(hf)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    theirs = traverse_util.flatten_dict(params_from_tensors(state, config))
    ours = traverse_util.flatten_dict(init_params(config, jax.random.key(1), initializer_range=0.05))
    assert set(ours) == set(theirs)
    stds = {}
    for path, mine in ours.items():
        mine, ref = np.asarray(mine, np.float64), np.asarray(theirs[path], np.float64)
        if path[-1] in ("scale", "bias"):
            expected = 1.0 if path[-1] == "scale" else 0.0
            assert (mine == expected).all() and (ref == expected).all(), path
            continue
        if path == ("embed_tokens",):  # the padding token's row
            assert not mine[3].any() and not ref[3].any()
            mine, ref = np.delete(mine, 3, axis=0), np.delete(ref, 3, axis=0)
        stds[path] = mine.std()
        assert abs(mine.std() / ref.std() - 1) < 0.1, (path, mine.std(), ref.std())
        assert abs(mine.mean()) < 5 * mine.std() / np.sqrt(mine.size), path
    if model_type == "gpt2":
        assert stds[("layers", "mlp", "c_proj", "kernel")] == pytest.approx(0.05 / np.sqrt(8), rel=0.1)
        assert stds[("layers", "mlp", "c_fc", "kernel")] == pytest.approx(0.05, rel=0.1)


def test_gpt2_init_draws_what_it_always_drew():
    """A seed gives the weights it gave before init moved into the family (a resumed
    run compares them): the digest below is of the old `train.init_gpt2_params`."""
    config = FAMILIES["gpt2"].config_from_hf(dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16))
    flat = jax.tree_util.tree_flatten_with_path(init_params(config, jax.random.key(0)))[0]
    digest = hashlib.sha256()
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.asarray(leaf, np.float32).tobytes())
    assert digest.hexdigest() == "3c369f9dd501201143555db76e0175957b013a688414727a98a04832d2db55a4"


def test_init_in_bfloat16():
    config = FAMILIES["phi"].config_from_hf(dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                                                 intermediate_size=64, vocab_size=64))
    params = init_params(config, jax.random.key(0), dtype=jax.numpy.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jax.numpy.dtype("bfloat16")}


PAIRS = [("cat sit mat", "The cat sits on the mat."), ("dog run park", "A dog runs in the park."),
         ("bread bake oven", "She bakes bread in the oven."), ("ball kick goal", "He kicks the ball.")] * 4


def test_random_phi_config_trains_and_exports(tmp_path):
    """`random:<config.json>` with model_type "phi": Phi's defaults fill the rest, the
    family's init draws the weights, and the run exports a folder transformers loads."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "phi", "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "hidden_size": 32, "intermediate_size": 64, "vocab_size": 320,
                                  "max_position_embeddings": 64}))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in PAIRS))
    out = tmp_path / "run"
    assert cli.main(["train", "--model", f"random:{config}", "--tokenizer", "bpe:300", "--train-file", str(pairs),
                     "--max-steps", "2", "--batch-size", "8", "--learning-rate", "1e-3", "--no-progress",
                     "--output", str(out)]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    assert abs(log[0]["loss"] - np.log(320)) < 0.5  # random weights start near uniform
    hf = json.loads((out / "config.json").read_text())
    assert (hf["model_type"], hf["num_hidden_layers"], hf["hidden_size"]) == ("phi", 2, 32)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "PhiForCausalLM" and not info["missing_keys"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_random_config_of_another_family_is_one_line(tmp_path):
    from hsd_jax.tokenizer import train_bpe
    from hsd_jax.train import random_gpt2

    tokenizer = train_bpe([s + " " + t for s, t in PAIRS], 300)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    with pytest.raises(HsdError, match="drawn for model_type 'gpt2' or 'phi'.*has model_type 'llama'"):
        random_gpt2(str(config), tokenizer, 0)
    config.write_text(json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 32, "initializer_range": "wide"}))
    with pytest.raises(HsdError, match="initializer_range in .* is 'wide'"):
        random_gpt2(str(config), tokenizer, 0)
    config.write_text(json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 320}))
    lm = random_gpt2(str(config), tokenizer, 0)  # no model_type: GPT-2, as before
    assert lm.config.model_type == "gpt2" and lm.hf_config["architectures"] == ["GPT2LMHeadModel"]
