"""Compare a compiled variant with the float64 reference on random inputs (used by `lightgen build` and the tests)."""
from __future__ import annotations

import itertools

import torch

from . import reference
from .ops import compile as compile_variant
from .spec import tnl_slopes

# relative error (Frobenius norm) expected against float64, per input dtype: a few units of the
# dtype's rounding, amplified by the sums over N and D
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
# dg[t] (decay=scalar) sums the decayed scores that cross t, which the backward gets as a difference of
# larger sums (f(q).df(q) - f(k).df(k) over the tokens from t on): cancellation gives it a few times the
# error of the other gradients (2-10x on the CPU in fp16, more with faster decays), hence a looser bound
SLACK = {"dg": 2.0}


def failures(errors: dict, dtype, tol=None) -> dict:
    """The entries of `errors` (from compare) above their bound: tol (default TOLERANCE[dtype]) times SLACK."""
    tol = tol or TOLERANCE[dtype]
    return {name: err for name, err in errors.items() if not err <= tol * SLACK.get(name, 1.0)}


def rel_err(actual: torch.Tensor, expected: torch.Tensor, scale=0.0) -> float:
    """||actual - expected|| / (||expected|| + scale): `scale` stands for the size of the terms whose
    difference `expected` is, where that difference may vanish (dg)."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / (expected.norm() + scale).clamp_min(1e-30)).item()


def _dg_scale(q, k, dq, dk, dtype, per_dim=False, variant=None) -> float:
    """The size of the sums dg is the difference of (|f(q) dF(q)| + |f(k) dF(k)| per token, or per token
    and dim under decay=vector, summed from t on), times eps(dtype) / TOLERANCE[dtype]: where they cancel
    (dg is 0 at N = 1 exactly), dg's error may be about the rounding of those sums in the dtype (a few eps
    of them: measured on H100 in bf16, 2.5e-3 of them at N = 1), not a fraction of 0. Per input dim,
    f(x) . dF(x) = phi(x) / phi'(x) * dx (LRPE's cos and sin features share phi(x)); for identity phi (no
    `variant`: the bench's peers take q and k as features) that is x dx, and where phi(0) != 0 (sigmoid,
    elu+1) it is larger than x dx."""
    terms = (_over_slope(variant, q) * dq.double()).abs() + (_over_slope(variant, k) * dk.double()).abs()
    terms = terms if per_dim else terms.sum(-1)
    return torch.finfo(dtype).eps / TOLERANCE[dtype] * terms.flip(1).cumsum(1).flip(1).norm()


def _over_slope(variant, x) -> torch.Tensor:
    """phi(x) / phi'(x) in float64 (x without a variant), 0 where phi' is 0 (there dx is 0 too)."""
    if variant is None:
        return x.double()
    x = x.detach().double().requires_grad_()
    with torch.enable_grad():
        fx = reference.phi(variant, x)
        slope, = torch.autograd.grad(fx.sum(), x)
    return torch.where(slope != 0, fx.detach() / torch.where(slope != 0, slope, 1.0), 0.0)


def random_inputs(variant, b, n, h, dtype, device, seed=0):
    """q, k, v, dO, slopes, theta, g: normal inputs scaled so phi(q).phi(k) sums stay O(1); slopes
    (decay=constant) and theta (lrpe=d) fp32, else None; g fp32 [B, N, H] (decay=scalar), [B, N, H, dk]
    (decay=vector), else None."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, variant.dk, generator=gen) * variant.dk ** -0.25
    k = torch.randn(b, n, h, variant.dk, generator=gen) * variant.dk ** -0.25
    v = torch.randn(b, n, h, variant.dv, generator=gen)
    do = torch.randn(b, n, h, variant.dv, generator=gen)
    slopes = torch.tensor(tnl_slopes(h)) if variant.decay == "constant" else None
    theta = torch.rand(h, variant.dk, generator=gen) * 0.5 if variant.lrpe == "d" else None
    g = random_log_decays(b, n, h, gen) if variant.decay == "scalar" else None
    if variant.decay == "vector":  # one per key dim too
        g = random_log_decays(b, n, h, gen, dims=variant.dk)
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    place = lambda t: None if t is None else t.to(device)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(do), place(slopes), place(theta), place(g)


def random_gate_input(variant, b, n, h, dtype, device, seed=0):
    """u [B, N, H, dv] for gated variants (standard normal, in dtype), else None."""
    if variant.gate == "none":
        return None
    gen = torch.Generator().manual_seed(seed + 2)
    return torch.randn(b, n, h, variant.dv, generator=gen).to(device, dtype)


def random_log_decays(b, n, h, generator, fast=False, dims=None) -> torch.Tensor:
    """g [B, N, H] < 0 (dims: [B, N, H, dims], decay=vector's): around the constant-decay tests' rates
    (-tnl_slopes per head), each token's (and dim's) rate scaled by e^N(0,1), so the decay is
    data-dependent and spans the range of the constant tests.
    fast=True: rates near 1 instead, and 3% of the tokens forget almost everything (g down to -30).
    (Fast decays make the LRPE angle gradient a difference of nearly equal sums, whatever the decay
    type: the default keeps random variants within the tolerances.)"""
    shape = (b, n, h) if dims is None else (b, n, h, dims)
    rates = torch.tensor(tnl_slopes(h)) if not fast else torch.ones(h)
    if dims is not None:
        rates = rates[:, None]  # the head's rate for each of its dims
    g = -rates * torch.randn(shape, generator=generator).exp()
    if fast:
        forget = torch.rand(shape, generator=generator) < 0.03
        g = torch.where(forget, -30 * torch.rand(shape, generator=generator), g)
    return g


def compare(variant, b=2, n=45, h=2, dtype=torch.float32, device="cpu", seed=0, states=False, offset=0,
            lengths=None) -> dict[str, float]:
    """Relative errors of o, dq, dk, dv (dtheta under LRPE, dg under decay=scalar, du for a gate) against the
    float64 reference.

    states=True also hands in a random initial state and asks for the final state, compares it
    (ht) and the initial state's gradient (dh0), with the loss seeing the final state too.
    lengths: packed sequences of these lengths instead of b x n (B = 1, passed as cu_seqlens; states per sequence).
    """
    attn = compile_variant(variant)
    variant = attn.variant
    cu_seqlens = None
    if lengths is not None:
        b, n = 1, sum(lengths)
        cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    q, k, v, do, slopes, theta, g = random_inputs(variant, b, n, h, dtype, device, seed)
    u = random_gate_input(variant, b, n, h, dtype, device, seed)
    h0 = dht = None
    if states:
        gen = torch.Generator().manual_seed(seed + 1)
        shape = (b if lengths is None else len(lengths), h, variant.state_rows, variant.dv)
        h0 = (torch.randn(shape, generator=gen) * 0.3).to(device)
        dht = torch.randn(shape, generator=gen).to(device)

    def run(fn, work, slopes):
        """Output(s) and gradients of fn; inputs in `work` dtype (None: q, k, v as given, theta, g and
        the state in fp32, as a caller would pass them)."""
        leaves = [None if t is None else t.to(work or t.dtype).clone().requires_grad_() for t in (q, k, v, u)]
        extra = [None if t is None else t.to(work or torch.float32).clone().requires_grad_() for t in (theta, h0, g)]
        out = fn(*leaves[:3], slopes, extra[0], initial_state=extra[1], output_final_state=states, offset=offset,
                 g=extra[2], cu_seqlens=cu_seqlens, u=leaves[3])
        o, ht = out if states else (out, None)
        outputs, grads_out = [o], [do.to(work or do.dtype)]
        if states:
            outputs.append(ht)
            grads_out.append(dht.to(ht.dtype))
        wrt = [t for t in leaves + extra if t is not None]
        return [o, ht], torch.autograd.grad(outputs, wrt, grads_out)

    (o, ht), grads = run(attn, None, slopes)
    if o.dtype != v.dtype or o.shape != v.shape:
        raise AssertionError(f"output {o.dtype} {tuple(o.shape)}, expected {v.dtype} {tuple(v.shape)}")
    ref_slopes = slopes.double() if slopes is not None else None
    (ref_o, ref_ht), ref_grads = run(lambda *a, **kw: reference.quadratic(variant, *a, **kw), torch.float64,
                                     ref_slopes)
    names = ["dq", "dk", "dv"] + (["du"] if u is not None else []) + (["dtheta"] if theta is not None else []) \
        + (["dh0"] if states else []) + (["dg"] if g is not None else [])
    errors = {"o": rel_err(o, ref_o)}
    if states:
        errors["ht"] = rel_err(ht, ref_ht)
    scales = {"dg": _dg_scale(q, k, *ref_grads[:2], dtype, per_dim=g.dim() == 4, variant=variant)} if g is not None else {}
    errors.update({name: rel_err(a, e, scales.get(name, 0.0)) for name, a, e in zip(names, grads, ref_grads)})
    return errors
