"""The model a run trains, and its tokenizer.

A Hugging Face folder or hub id (`hsd_jax.load`), or `random:<preset|config.json>`
for weights drawn at random by the model family's initialiser (`random_gpt2`); the
tokenizer is the model's, a given folder's, or `bpe:N`, a byte-level BPE learned on the
training pairs (`_learned_tokenizer`).
"""

from __future__ import annotations

import math
from pathlib import Path

from hsd_jax import data as data_lib
from hsd_jax.errors import HsdError
from hsd_jax.train.settings import TrainConfig


# GPT-2 sizes for `random:<name>` (the OpenAI checkpoints' shapes).
GPT2_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


def random_gpt2(spec: str, tokenizer, seed: int):
    """A LanguageModel with random weights, of any family in `hsd_jax.models.FAMILIES`
    (the name is older than that). The weights are drawn as transformers initialises the
    architecture (`hsd_jax.models.init_params`: normal(0, initializer_range), and for
    GPT-2 the residual projections at initializer_range / sqrt(2 L)). `spec` is a
    GPT2_PRESETS name or a config.json path; the file's `model_type` (GPT-2 when it names
    none, or "phi") picks the family, whose `CONFIG_DEFAULTS` fill the keys it leaves out."""
    import jax

    from hsd_jax.checkpoint import _check_built_config, _check_config, _read_json
    from hsd_jax.models import FAMILIES, init_params
    from hsd_jax.models.modules import LanguageModel

    if spec in GPT2_PRESETS:
        overrides = {"model_type": "gpt2", **GPT2_PRESETS[spec]}
    elif Path(spec).is_file():
        overrides = _read_json(Path(spec))  # a JSON object, or one line saying what the file is
    else:
        raise HsdError(f"random:{spec}: give a GPT-2 size ({', '.join(GPT2_PRESETS)}) or a config.json path")
    model_type = overrides.get("model_type", "gpt2")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise HsdError(f"random weights are drawn for model_type {' or '.join(map(repr, FAMILIES))}, and {spec} "
                       f"has model_type {model_type!r}")
    fam = FAMILIES[model_type]
    hf = {**fam.config_defaults, **overrides}
    eos = data_lib.eos_id(tokenizer)
    hf["bos_token_id"] = hf["eos_token_id"] = eos
    # The checks a loaded folder's config.json gets, so a bad size is one line, not a crash in JAX.
    where = Path(spec) if spec not in GPT2_PRESETS else Path(f"random:{spec}")
    _check_config(hf, fam, where)
    std = hf.get("initializer_range")
    if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 <= std < math.inf):
        raise HsdError(f"initializer_range in {where} is {std!r}, not a standard deviation (e.g. 0.02)")
    if len(tokenizer) > hf["vocab_size"]:
        raise HsdError(f"the tokenizer has {len(tokenizer)} tokens but the config's vocab_size is "
                       f"{hf['vocab_size']}; set vocab_size to at least {len(tokenizer)}")
    problems = fam.check_supported(hf)
    if problems:
        raise HsdError(f"config options hsd-jax does not implement: {', '.join(problems)}")
    config = fam.config_from_hf(hf)
    _check_built_config(config, where)
    params = init_params(config, jax.random.key(seed), initializer_range=std or 0.02)
    return LanguageModel(config=config, params=params, tokenizer=tokenizer, hf_config=hf, source=f"random:{spec}")


BPE_PREFIX = "bpe:"


def _learned_tokenizer(spec: str, train_pairs):
    """`bpe:N`: a byte-level BPE of N tokens learned on the training pairs (deterministic,
    so a resumed run learns the same one; the data fingerprint would notice otherwise)."""
    from hsd_jax import tokenizer as tokenizer_lib

    try:
        vocab_size = int(spec[len(BPE_PREFIX):])
    except ValueError:
        raise HsdError(f"--tokenizer {spec}: write bpe:N with N the vocabulary size, e.g. bpe:4096") from None
    if vocab_size < tokenizer_lib.MIN_VOCAB:  # named here as the user wrote it (train_bpe has no flag)
        raise HsdError(f"--tokenizer {spec}: a byte-level BPE needs at least {tokenizer_lib.MIN_VOCAB} tokens "
                       "(256 bytes and the EOS), e.g. bpe:4096")
    return tokenizer_lib.train_bpe(tokenizer_lib.pair_texts(train_pairs), vocab_size)


def _load_model(cfg: TrainConfig, train_pairs):
    from hsd_jax.checkpoint import _load_tokenizer, _resolve_folder
    from hsd_jax.models.modules import load

    tokenizer = None
    if cfg.tokenizer and cfg.tokenizer.startswith(BPE_PREFIX):
        tokenizer = _learned_tokenizer(cfg.tokenizer, train_pairs)
    elif cfg.tokenizer:
        tokenizer = _load_tokenizer(_resolve_folder(cfg.tokenizer))  # a folder or a hub id
        if tokenizer is None:
            raise HsdError(f"{cfg.tokenizer} holds no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    if cfg.model.startswith("random:"):
        if tokenizer is None:
            raise HsdError("random weights need a tokenizer: pass --tokenizer FOLDER (e.g. a GPT-2 model folder)")
        return random_gpt2(cfg.model[len("random:"):], tokenizer, cfg.seed)
    lm = load(cfg.model, tokenizer=tokenizer is None)
    if tokenizer is not None:
        lm.tokenizer = tokenizer
    if lm.tokenizer is None:
        raise HsdError(f"{cfg.model} has no tokenizer files; pass --tokenizer FOLDER")
    return lm
