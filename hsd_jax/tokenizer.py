"""A small byte-level BPE trained on a task's own text, for models trained from scratch.

GPT-2's 50,257-token vocabulary makes the embedding and LM head of a small model
most of its cost (a 12 x 256 model: the head alone is 12.9M weights against 9.4M
in all twelve layers). A BPE of a few thousand tokens learned on the training
pairs covers the task as well and leaves the compute to the layers, where layer
skipping acts.

The result is a `GPT2TokenizerFast` (byte-level, no unknown tokens, `<|endoftext|>`
as BOS/EOS/pad-free EOS like GPT-2's), saved with the model so that
`AutoTokenizer.from_pretrained(model_folder)` loads it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from hsd_jax import data as data_lib
from hsd_jax.errors import HsdError

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB = 256 + 1  # the byte alphabet and the EOS


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A GPT2TokenizerFast with a byte-level BPE of `vocab_size` tokens learned on `texts`.

    Deterministic: the same texts in the same order give the same merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    if vocab_size < MIN_VOCAB:
        raise HsdError(f"a byte-level BPE needs at least {MIN_VOCAB} tokens (256 bytes and the EOS), "
                       f"got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                             unk_token=EOS_TOKEN, model_max_length=1024)


def pair_texts(pairs: Sequence[data_lib.Pair]) -> list[str]:
    """The texts a model trained on `pairs` reads: each prompt followed by its target."""
    return [data_lib.format_source(s) + data_lib.format_target(t) for s, t in pairs]

