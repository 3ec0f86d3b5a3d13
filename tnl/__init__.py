"""tnl: TransNormerLLM built on lightgen's linear-attention kernels.

    from tnl import TNLConfig, TNLForCausalLM
    model = TNLForCausalLM(TNLConfig.preset("tiny"))

HF-transformers classes (TNLHFConfig, TNLHFForCausalLM) live in tnl.hf and are imported only when
asked for, so transformers stays optional.
"""
from .config import PRESETS, TNLConfig
from .generation import TNLCache, generate
from .model import TNLForCausalLM

__all__ = ["PRESETS", "TNLCache", "TNLConfig", "TNLForCausalLM", "generate"]

_HF_NAMES = ("TNLHFConfig", "TNLHFForCausalLM")


def __getattr__(name):
    if name in _HF_NAMES:  # lazy: importing tnl must not need transformers
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'tnl' has no attribute {name!r}")
