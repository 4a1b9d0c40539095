"""hsd-jax: Hierarchical Skip Decoding, SkipDecode and CALM for GPT-2 and Phi in JAX.

    import hsd_jax
    lm = hsd_jax.load("gpt2")          # a GPT2LMHeadModel: a Flax NNX module, with its tokenizer
    out = hsd_jax.generate(lm, prompts=["Hello"], schedule="hsd:s=1,min=0,max=6")
"""

import logging

# The default install has no torch (BERTScore's extra brings it) and hsd-jax uses only
# transformers' tokenizers and configs; transformers' "PyTorch was not found. Models won't
# be available" would open every command and every `import hsd_jax`. Set before it loads.
logging.getLogger("transformers").addFilter(lambda record: "PyTorch was not found" not in record.getMessage())

from hsd_jax.checkpoint import save_pretrained  # noqa: E402
from hsd_jax.errors import HsdError  # noqa: E402
from hsd_jax.generate import Generation, generate, generate_batched  # noqa: E402
from hsd_jax.models import KVCache, ModelConfig  # noqa: E402
from hsd_jax.models.modules import CausalLM, GPT2LMHeadModel, LanguageModel, PhiForCausalLM, load  # noqa: E402
from hsd_jax.schedules import CalmConfig, Schedule, list_presets, schedule  # noqa: E402

__all__ = [
    "CalmConfig", "CausalLM", "GPT2LMHeadModel", "Generation", "HsdError", "KVCache", "LanguageModel", "ModelConfig",
    "PhiForCausalLM", "Schedule",
    "generate", "generate_batched", "list_presets", "load", "save_pretrained", "schedule",
]
__version__ = "0.1.0"
