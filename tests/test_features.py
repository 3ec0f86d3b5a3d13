"""The templates' elementwise helpers that the printed feature maps call, against float64."""
import torch
import triton
import triton.language as tl

import lightgen
from lightgen import build

from conftest import DEVICE


@triton.jit
def _apply(X, Y, FN: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, FN(tl.load(X + i)))


def test_sigmoid_is_within_its_stated_error():
    """A silu variant's module calls _sigmoid: tanh.approx.f32 on a GPU, stated in the template to be within 2**-11
    absolute; the exact form under the interpreter. Swept over [-40, 40): both tails saturate."""
    module = build.load(lightgen.Variant.parse("decay=constant,causal,phi=silu,dk=16,dv=16"))
    x = torch.linspace(-40.0, 40.0, (1 << 16) + 1, device=DEVICE, dtype=torch.float32)[:-1]  # steps of 2**-10 * 1.25: 0 is on it
    y = torch.empty_like(x)
    _apply[(x.numel() // 1024,)](x, y, module._sigmoid, BLOCK=1024)
    err = (y.double() - torch.sigmoid(x.double())).abs().max().item()
    assert err <= (2.0 ** -11 if DEVICE == "cuda" else 1e-6), err
    assert y[x == 0].item() == 0.5 and y.min().item() >= 0.0 and y.max().item() <= 1.0
