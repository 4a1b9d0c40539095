"""The Flax-side models are the transformers models: logits, cache, loading, errors."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import hsd_jax
from hsd_jax.errors import HsdError
from hsd_jax.models import KVCache, decode_step, forward
from tests.conftest import left_padded, make_gpt2, make_phi, torch_logits

ROWS = [[5, 17, 3, 99, 42, 7, 8], [11, 12, 13], [60, 61, 62, 63, 64]]


def rel_err(a, b, mask):
    m = np.asarray(mask, bool)
    a, b = np.asarray(a)[m], np.asarray(b)[m]
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_logits_match_transformers_on_left_padded_batch(model_dir):
    ids, mask = left_padded(ROWS)
    ours = hsd_jax.load(model_dir).forward(ids, attention_mask=mask)
    ref = torch_logits(model_dir, ids, mask)
    assert ours.dtype == jnp.float32 and ours.shape == ref.shape
    assert rel_err(ours, ref, mask) <= 1e-4


def test_left_padding_gives_the_unpadded_logits(model_dir):
    lm = hsd_jax.load(model_dir)
    ids, mask = left_padded(ROWS)
    batch = np.asarray(lm.forward(ids, attention_mask=mask))
    for i, row in enumerate(ROWS):
        alone = np.asarray(lm.forward(np.array([row])))[0]
        np.testing.assert_allclose(batch[i, -len(row):], alone, rtol=1e-5, atol=1e-5)


def test_prefill_then_cached_steps_equal_full_forward(model_dir):
    lm = hsd_jax.load(model_dir)
    ids, mask = left_padded(ROWS)
    full = np.asarray(lm.forward(ids, attention_mask=mask))
    prompt = ids.shape[1] - 3
    cache = KVCache.init(lm.config, len(ROWS), ids.shape[1] + 2)
    logits, cache = forward(lm.params, lm.config, jnp.asarray(ids[:, :prompt]), jnp.asarray(mask[:, :prompt]),
                            cache)
    real = mask[:, prompt - 1] == 1  # a pad position's output is never used
    np.testing.assert_allclose(np.asarray(logits)[real, -1], full[real, prompt - 1], rtol=1e-5, atol=1e-5)
    all_run = (0,) * lm.config.num_layers
    for t in range(prompt, ids.shape[1]):
        step_logits, cache = decode_step(lm.params, lm.config, jnp.asarray(ids[:, t]), cache, all_run)
        np.testing.assert_allclose(np.asarray(step_logits), full[:, t], rtol=1e-5, atol=1e-5)
    assert int(cache.index) == ids.shape[1]


def test_pytorch_bin_loads_like_safetensors(tmp_path, gpt2_dir):
    make_gpt2(tmp_path, safe=False)
    assert (tmp_path / "pytorch_model.bin").exists() and not (tmp_path / "model.safetensors").exists()
    ids, mask = left_padded(ROWS)
    a = hsd_jax.load(tmp_path).forward(ids, attention_mask=mask)
    b = hsd_jax.load(gpt2_dir).forward(ids, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_safetensors_load(tmp_path, gpt2_dir):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(gpt2_dir).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids, mask = left_padded(ROWS)
    np.testing.assert_array_equal(np.asarray(hsd_jax.load(tmp_path).forward(ids, attention_mask=mask)),
                                  np.asarray(hsd_jax.load(gpt2_dir).forward(ids, attention_mask=mask)))


def test_bfloat16_load_runs_close_to_float32(model_dir):
    lm = hsd_jax.load(model_dir, dtype="bfloat16")
    assert lm.params["layers"][next(iter(lm.params["layers"]))]
    leaves = [x.dtype for x in __import__("jax").tree.leaves(lm.params)]
    assert set(leaves) == {jnp.dtype(jnp.bfloat16)}
    ids, mask = left_padded(ROWS)
    low = np.asarray(lm.forward(ids, attention_mask=mask))
    ref = np.asarray(hsd_jax.load(model_dir).forward(ids, attention_mask=mask))
    assert low.dtype == np.float32 and np.isfinite(low).all()
    assert rel_err(low, ref, mask) < 0.1


def test_save_pretrained_round_trips_through_transformers(tmp_path, model_dir):
    lm = hsd_jax.load(model_dir)
    hsd_jax.save_pretrained(lm, tmp_path)
    ids, mask = left_padded(ROWS)
    assert rel_err(torch_logits(tmp_path, ids, mask), np.asarray(lm.forward(ids, attention_mask=mask)), mask) <= 1e-6


def test_tokenizer_loads_from_folder(tmp_path):
    make_gpt2(tmp_path, vocab=50257, tokenizer=True)
    lm = hsd_jax.load(tmp_path)
    assert lm.tokenizer is not None and lm.tokenizer.decode(lm.tokenizer.encode("Hello world")) == "Hello world"
    assert hsd_jax.load(tmp_path, tokenizer=False).tokenizer is None


# --- bad input -------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(HsdError, match="does not exist"):
        hsd_jax.load(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(HsdError, match="no config.json"):
        hsd_jax.load(tmp_path)


def test_unsupported_model_type(tmp_path, gpt2_dir):
    shutil.copytree(gpt2_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HsdError, match="model_type 'llama'.*not supported"):
        hsd_jax.load(tmp_path / "m")


def test_no_weights(tmp_path, gpt2_dir):
    (tmp_path / "config.json").write_text((gpt2_dir / "config.json").read_text())
    with pytest.raises(HsdError, match="holds no weights"):
        hsd_jax.load(tmp_path)


def test_missing_weight(tmp_path, gpt2_dir):
    from safetensors.numpy import load_file, save_file

    (tmp_path / "config.json").write_text((gpt2_dir / "config.json").read_text())
    tensors = load_file(gpt2_dir / "model.safetensors")
    del tensors["transformer.h.2.mlp.c_fc.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(HsdError, match="missing weights: transformer.h.2.mlp.c_fc.weight"):
        hsd_jax.load(tmp_path)


def test_misshaped_weight(tmp_path, gpt2_dir):
    shutil.copytree(gpt2_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["n_inner"] = 100  # the stored MLP is 4 * 32 = 128 wide
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HsdError, match="has shape .* but the config implies"):
        hsd_jax.load(tmp_path / "m")


def test_corrupt_weights(tmp_path, gpt2_dir):
    shutil.copytree(gpt2_dir, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(HsdError, match="corrupt or truncated"):
        hsd_jax.load(tmp_path / "m")


def test_bad_dtype(gpt2_dir):
    with pytest.raises(HsdError, match="dtype 'int8'"):
        hsd_jax.load(gpt2_dir, dtype="int8")


def test_phi_config_in_the_older_flat_format(tmp_path, phi_dir):
    """microsoft/phi-2's config.json keeps rotary settings at the top level."""
    shutil.copytree(phi_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(partial_rotary_factor=rope["partial_rotary_factor"], rope_theta=rope["rope_theta"], rope_scaling=None)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    ids, mask = left_padded(ROWS)
    old = hsd_jax.load(tmp_path / "m")
    assert old.config == hsd_jax.load(phi_dir).config
    assert rel_err(old.forward(ids, attention_mask=mask), torch_logits(phi_dir, ids, mask), mask) <= 1e-4


def test_hub_id_that_cannot_be_fetched_gives_one_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # offline, the one line says why the hub was not asked and how to do without it
    with pytest.raises(HsdError, match="HF_HUB_OFFLINE is set and 'no-such-user/no-such-model' is not in the hub "
                                       "cache .*pass a local model folder, or unset HF_HUB_OFFLINE"):
        hsd_jax.load("no-such-user/no-such-model")
