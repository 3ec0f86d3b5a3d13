"""lightgen: a compiler for fast linear attention (spec -> sympy -> Jinja -> Triton -> PyTorch op).

    import lightgen
    attn = lightgen.compile("decay=constant,causal,lrpe=d,phi=silu,dk=128,dv=128")
    o = attn(q, k, v, theta=theta)          # [B, N, H, D] layout, autograd, torch.compile-able
"""
__version__ = "0.1.0"

from . import reference  # noqa: E402
from .ops import LinearAttention, compile  # noqa: E402
from .spec import Variant, tnl_slopes  # noqa: E402

__all__ = ["Variant", "compile", "LinearAttention", "reference", "tnl_slopes", "__version__"]
