"""Compare a compiled variant with the float64 reference on random inputs (used by `lightgen build` and the tests)."""
from __future__ import annotations

import torch

from . import reference
from .ops import compile as compile_variant
from .spec import tnl_slopes

# relative error (Frobenius norm) expected against float64, per input dtype: a few units of the
# dtype's rounding, amplified by the sums over N and D
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def random_inputs(variant, b, n, h, dtype, device, seed=0):
    """q, k, v, dO, slopes, theta: normal inputs scaled so phi(q).phi(k) sums stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, variant.dk, generator=g) * variant.dk ** -0.25
    k = torch.randn(b, n, h, variant.dk, generator=g) * variant.dk ** -0.25
    v = torch.randn(b, n, h, variant.dv, generator=g)
    do = torch.randn(b, n, h, variant.dv, generator=g)
    slopes = torch.tensor(tnl_slopes(h)) if variant.decay == "constant" else None
    theta = torch.rand(h, variant.dk, generator=g) * 0.5 if variant.lrpe == "d" else None
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    place = lambda t: None if t is None else t.to(device)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(do), place(slopes), place(theta)


def compare(variant, b=2, n=45, h=2, dtype=torch.float32, device="cpu", seed=0) -> dict[str, float]:
    """Relative errors of o, dq, dk, dv (and dtheta under LRPE) against the float64 reference."""
    attn = compile_variant(variant)
    variant = attn.variant
    q, k, v, do, slopes, theta = random_inputs(variant, b, n, h, dtype, device, seed)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    th = theta.clone().requires_grad_() if theta is not None else None
    o = attn(*leaves, slopes=slopes, theta=th)
    if o.dtype != v.dtype or o.shape != v.shape:
        raise AssertionError(f"output {o.dtype} {tuple(o.shape)}, expected {v.dtype} {tuple(v.shape)}")
    grads = torch.autograd.grad(o, leaves + ([th] if th is not None else []), do)

    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_th = theta.double().requires_grad_() if theta is not None else None
    ref_slopes = slopes.double() if slopes is not None else None
    ref_o = reference.quadratic(variant, *ref_leaves, ref_slopes, ref_th)
    ref_grads = torch.autograd.grad(ref_o, ref_leaves + ([ref_th] if ref_th is not None else []), do.double())
    names = ["o", "dq", "dk", "dv", "dtheta"]
    return {name: rel_err(a, e) for name, a, e in zip(names, [o, *grads], [ref_o, *ref_grads])}
