"""hsd-jax: Hierarchical Skip Decoding, SkipDecode and CALM for GPT-2 and Phi in JAX.

    import hsd_jax
    lm = hsd_jax.load("gpt2")
    out = hsd_jax.generate(lm, prompts=["Hello"], schedule="hsd:s=1,min=0,max=6")
"""

from hsd_jax.checkpoint import LanguageModel, load, save_pretrained
from hsd_jax.errors import HsdError
from hsd_jax.models import KVCache, ModelConfig

__all__ = ["HsdError", "KVCache", "LanguageModel", "ModelConfig", "load", "save_pretrained"]
__version__ = "0.1.0"
