"""Naive PyTorch forms of every variant: the ground truth the kernels are tested against.

Written for clarity, not speed, and independent of the kernel code path: the feature map is
evaluated by torch (autograd gives every derivative), not by the generated Triton code.
All functions take the public layout q, k [B, N, H, dk], v [B, N, H, dv] and return o [B, N, H, dv].

    quadratic  o = (scale f(q) f(k)^T  *  W) v            W[t, s] = lambda^|t-s| (masked s <= t if causal)
    recurrent  S_t = lambda S_{t-1} + f(k_t)^T v_t ;  o_t = scale f(q_t) S_t   (and a reverse scan if non-causal)
"""
from __future__ import annotations

import sympy
import torch
import torch.nn.functional as F

from .spec import Variant, as_variant
from .symbolic import feature_map, x as _x

_KNOWN = {
    "identity": lambda t: t,
    "silu": F.silu,
    "elu+1": lambda t: F.elu(t) + 1,
    "relu": F.relu,
}

_TORCH_FUNCS = {"exp": torch.exp, "log": torch.log, "sin": torch.sin, "cos": torch.cos,
                "Abs": torch.abs, "sign": torch.sign, "sigmoid": torch.sigmoid}


def _evaluate(expr, value: torch.Tensor) -> torch.Tensor:
    """Evaluate a sympy expression in x on a tensor, with torch ops (for user-written phi)."""
    if expr == _x:
        return value
    if expr.is_Number:
        return torch.full_like(value, float(expr))
    if isinstance(expr, sympy.Piecewise):
        out = _evaluate(expr.args[-1][0], value)
        for value_expr, cond in reversed(expr.args[:-1]):
            out = torch.where(_evaluate(cond, value).bool(), _evaluate(value_expr, value), out)
        return out
    args = [_evaluate(a, value) for a in expr.args]
    name = type(expr).__name__
    if expr.is_Add:
        return sum(args[1:], args[0])
    if expr.is_Mul:
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    if expr.is_Pow:
        return torch.pow(args[0], args[1])
    if name in _TORCH_FUNCS:
        return _TORCH_FUNCS[name](args[0])
    if name in ("Max", "Min"):
        fn = torch.maximum if name == "Max" else torch.minimum
        out = args[0]
        for a in args[1:]:
            out = fn(out, a)
        return out
    if expr.is_Relational:
        ops = {">": torch.gt, ">=": torch.ge, "<": torch.lt, "<=": torch.le}
        return ops[expr.rel_op](args[0], args[1])
    raise ValueError(f"reference cannot evaluate {name} in phi")


def phi(variant: Variant, x: torch.Tensor) -> torch.Tensor:
    if variant.phi in _KNOWN:
        return _KNOWN[variant.phi](x)
    return _evaluate(feature_map(variant.phi), x)


def features(variant: Variant, x: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
    """f(x): phi, then LRPE-d [phi(x) cos(t theta), phi(x) sin(t theta)] on the last dim."""
    fx = phi(variant, x)
    if variant.lrpe == "none":
        return fx
    n = x.shape[1]
    angle = torch.arange(n, device=x.device, dtype=theta.dtype)[:, None, None] * theta  # [N, H, dk]
    return torch.cat([fx * torch.cos(angle), fx * torch.sin(angle)], dim=-1)


def decay_weights(variant: Variant, n: int, slopes: torch.Tensor | None, dtype, device) -> torch.Tensor:
    """W[h, t, s]: lambda_h^|t-s| (1 without decay), zero above the diagonal if causal."""
    i = torch.arange(n, device=device)
    dist = (i[:, None] - i[None, :]).abs().to(dtype)
    if variant.decay == "constant":
        w = torch.exp(-slopes.to(device=device, dtype=dtype)[:, None, None] * dist)
    else:
        w = torch.ones(1, n, n, dtype=dtype, device=device)
    if variant.causal:
        w = w * (i[:, None] >= i[None, :]).to(dtype)
    return w


def quadratic(variant, q, k, v, slopes=None, theta=None) -> torch.Tensor:
    variant = as_variant(variant)
    fq = features(variant, q, theta) * variant.scale
    fk = features(variant, k, theta)
    scores = torch.einsum("bthd,bshd->bhts", fq, fk)
    w = decay_weights(variant, q.shape[1], slopes, scores.dtype, q.device)
    return torch.einsum("bhts,bshd->bthd", scores * w, v.to(scores.dtype))


def recurrent(variant, q, k, v, slopes=None, theta=None) -> torch.Tensor:
    """Token-by-token scans with a [H, dk, dv] state per sequence (slow; for tests)."""
    variant = as_variant(variant)
    fq = features(variant, q, theta) * variant.scale
    fk = features(variant, k, theta)
    v = v.to(fq.dtype)
    b, n, h, _ = fq.shape
    lam = torch.ones(h, dtype=fq.dtype, device=q.device)
    if variant.decay == "constant":
        lam = torch.exp(-slopes.to(device=q.device, dtype=fq.dtype))
    lam = lam[None, :, None, None]

    def scan(order, inclusive):
        state = fq.new_zeros(b, h, fq.shape[-1], v.shape[-1])
        out = []
        for t in order:
            update = torch.einsum("bhk,bhv->bhkv", fk[:, t], v[:, t])
            if inclusive:
                state = lam * state + update
                out.append(torch.einsum("bhk,bhkv->bhv", fq[:, t], state))
            else:  # the state holds tokens strictly after t, decayed to t
                out.append(torch.einsum("bhk,bhkv->bhv", fq[:, t], lam * state))
                state = lam * state + update
        return out

    o = torch.stack(scan(range(n), inclusive=True), dim=1)
    if not variant.causal:
        o = o + torch.stack(scan(range(n - 1, -1, -1), inclusive=False)[::-1], dim=1)
    return o
