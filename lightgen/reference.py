"""Naive PyTorch forms of every variant: the ground truth the kernels are tested against.

Written for clarity, not speed, and independent of the kernel code path: the feature map is
evaluated by torch (autograd gives every derivative), not by the generated Triton code.
All functions take the public layout q, k [B, N, H, dk], v [B, N, H, dv] and return o [B, N, H, dv].

    quadratic  o = (scale f(q) f(k)^T  *  W) v            W[t, s] = lambda^|t-s| (masked s <= t if causal)
    recurrent  S_t = lambda S_{t-1} + f(k_t)^T v_t ;  o_t = scale f(q_t) S_t   (and a reverse scan if non-causal)
    epilogue   the fused epilogue (norm=srms, gate=act): SRMSNorm(o) * act(u), applied by quadratic
    step       one token of `recurrent` per sequence (the decode step): q, k [B, H, dk], v [B, H, dv]
decay=scalar (causal): lambda_t = exp(g_t) per token and head, g [B, N, H] (g [B, H] for step), so
W[t, s] = exp(G_t - G_s) with G_t = g_0 + ... + g_t; its gradient comes from autograd like the others'.
decay=vector (causal, GLA): the same per key dim, g [B, N, H, dk]: S_t = diag(exp(g_t)) S_{t-1} + f(k_t)^T v_t,
so the weight sits inside the dot, sum_i f(q_t)_i exp(G_t,i - G_s,i) f(k_s)_i; under LRPE (F = 2 dk) dim i
decays both feature i (cos half) and dk + i (sin half); step decays state row i (and dk + i) by exp(g_i).
Causal forms take an initial state S_{-1} and return the final state S_{N-1} on request; `offset` is
the LRPE position of the first token.
"""
from __future__ import annotations

import sympy
import torch
import torch.nn.functional as F

from .spec import Variant, as_variant
from .symbolic import feature_map, gate_act, x as _x

_KNOWN = {
    "identity": lambda t: t,
    "silu": F.silu,
    "elu+1": lambda t: F.elu(t) + 1,
    "relu": F.relu,
}

_KNOWN_GATES = {"identity": lambda t: t, "sigmoid": torch.sigmoid, "silu": F.silu}

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


def gate(variant: Variant, u: torch.Tensor) -> torch.Tensor:
    """act(u), the output gate's activation."""
    if variant.gate in _KNOWN_GATES:
        return _KNOWN_GATES[variant.gate](u)
    return _evaluate(gate_act(variant.gate), u)


def epilogue(variant: Variant, o: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """The fused epilogue: SRMSNorm of each head's row (norm=srms), then times act(u) (a gate)."""
    variant = as_variant(variant)
    if variant.norm == "srms":
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + variant.eps)
    if variant.gate != "none":
        o = o * gate(variant, u.to(o.dtype))
    return o


def features(variant: Variant, x: torch.Tensor, theta: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """f(x): phi, then LRPE-d [phi(x) cos(t theta), phi(x) sin(t theta)] on the last dim (t = offset + index)."""
    fx = phi(variant, x)
    if variant.lrpe == "none":
        return fx
    n = x.shape[1]
    t = torch.arange(offset, offset + n, device=x.device, dtype=theta.dtype)
    return _rotate(fx, t[:, None, None] * theta)  # angles [N, H, dk]


def _rotate(fx, angle):
    """LRPE-d: [fx cos(angle), fx sin(angle)] on the last dim."""
    return torch.cat([fx * torch.cos(angle), fx * torch.sin(angle)], dim=-1)


def decay_weights(variant: Variant, n: int, slopes: torch.Tensor | None, dtype, device, g=None) -> torch.Tensor:
    """W[h, t, s]: lambda_h^|t-s| (1 without decay), zero above the diagonal if causal.
    decay=scalar: W[b, h, t, s] = exp(G_t - G_s) for s <= t, G the cumulative sum of g [B, N, H]."""
    i = torch.arange(n, device=device)
    if variant.decay == "scalar":
        big = g.to(device=device, dtype=torch.float64).cumsum(1).transpose(1, 2)  # G [B, H, N], summed in float64
        # masked before exp: above the diagonal G_t - G_s may be large and positive
        return torch.where(i[:, None] >= i[None, :], big[..., :, None] - big[..., None, :], -torch.inf).exp().to(dtype)
    dist = (i[:, None] - i[None, :]).abs().to(dtype)
    if variant.decay == "constant":
        w = torch.exp(-slopes.to(device=device, dtype=dtype)[:, None, None] * dist)
    else:
        w = torch.ones(1, n, n, dtype=dtype, device=device)
    if variant.causal:
        w = w * (i[:, None] >= i[None, :]).to(dtype)
    return w


def _log_decays(variant, slopes, g, shape, dtype, device):
    """log lambda per token and head, broadcastable to `shape` ([B, N, H] or, for a step, [B, H])."""
    if variant.decay == "scalar":
        return g.to(device=device, dtype=dtype)
    if variant.decay == "constant":
        return -slopes.to(device=device, dtype=dtype)
    return torch.zeros(shape[-1], dtype=dtype, device=device)


def _feature_log_decays(variant, slopes, g, shape, dtype, device):
    """log lambda [B, N, H, 1] per token and head, or [B, N, H, F] per feature (decay=vector: g's dim i
    for feature i and, under LRPE, for feature dk + i too); `shape` = [B, N, H] (a step's: [B, H])."""
    if variant.decay == "vector":
        g = g.to(device=device, dtype=dtype)
        return torch.cat([g, g], -1) if variant.lrpe == "d" else g
    return _log_decays(variant, slopes, g, shape, dtype, device).expand(shape)[..., None]


def _vector_decayed_scores(variant, fq, fk, g, budget=2**28):
    """decay=vector: scores[b, h, t, s] = sum_i fq[t, i] exp(G_t,i - G_s,i) fk[s, i] for s <= t, else 0.
    The weights [B, t, s, H, F] are built for a block of rows t at a time, about `budget` elements each."""
    b, n, h, f = fq.shape
    big = _feature_log_decays(variant, None, g, fq.shape[:3], torch.float64, fq.device).cumsum(1)  # G [B, N, H, F]
    i = torch.arange(n, device=fq.device)
    rows = max(1, budget // max(1, b * n * h * f))
    blocks = []
    for t0 in range(0, n, rows):
        t = slice(t0, t0 + rows)
        causal = (i[t, None] >= i[None, :])[None, :, :, None, None]
        # masked before exp: above the diagonal G_t - G_s may be large and positive
        w = torch.where(causal, big[:, t, None] - big[:, None], -torch.inf).exp().to(fq.dtype)  # [B, t, s, H, F]
        blocks.append(torch.einsum("bthf,bshf,btshf->bhts", fq[:, t], fk, w))
    return torch.cat(blocks, 2) if blocks else fq.new_zeros(b, h, 0, n)


def quadratic(variant, q, k, v, slopes=None, theta=None, initial_state=None, offset=0, output_final_state=False,
              g=None, cu_seqlens=None, u=None):
    """o (and the final state [B, H, F, dv] if asked), F = dk, or 2 dk under LRPE.

    With states (causal only): S_t = lambda_t S_{t-1} + f(k_t)^T v_t from S_{-1} = initial_state,
    o_t = scale f(q_t) S_t, final state S_{N-1}. Variants with an epilogue return epilogue(o, u)
    (u [B, N, H, dv] for a gate); the final state is that of the attention itself.
    cu_seqlens [S + 1]: B = 1 holds S sequences back to back (rows cu_seqlens[i] .. cu_seqlens[i+1] - 1),
    each computed alone as above, from position offset; states [S, H, F, dv].
    """
    variant = as_variant(variant)
    if variant.epilogue:
        out = quadratic(variant.without_epilogue, q, k, v, slopes, theta, initial_state, offset, output_final_state, g,
                        cu_seqlens)
        return (epilogue(variant, out[0], u), out[1]) if output_final_state else epilogue(variant, out, u)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for i, part in enumerate(slice(a, b) for a, b in zip(bounds, bounds[1:])):
            out = quadratic(variant, q[:, part], k[:, part], v[:, part], slopes, theta,
                            None if initial_state is None else initial_state[i:i + 1], offset, output_final_state,
                            g=None if g is None else g[:, part])
            outs.append(out[0] if output_final_state else out)
            finals.append(out[1] if output_final_state else None)
        o = torch.cat(outs, dim=1)
        return (o, torch.cat(finals)) if output_final_state else o
    fq = features(variant, q, theta, offset) * variant.scale
    fk = features(variant, k, theta, offset)
    if variant.decay == "vector":
        scores = _vector_decayed_scores(variant, fq, fk, g)
    else:
        scores = torch.einsum("bthd,bshd->bhts", fq, fk)
        scores = scores * decay_weights(variant, q.shape[1], slopes, scores.dtype, q.device, g)
    o = torch.einsum("bhts,bshd->bthd", scores, v.to(scores.dtype))
    if initial_state is None and not output_final_state:
        return o
    # log decays (summed in float64: no cancellation) from the state before token 0 to token t, from
    # token s to the last token, and over the whole sequence
    # (per feature: the last dim is 1, or F under decay=vector)
    log_lam = _feature_log_decays(variant, slopes, g, q.shape[:3], torch.float64, q.device)
    into, total = log_lam.cumsum(1), log_lam.sum(1)  # [B, N, H, 1 or F], [B, H, 1 or F]
    to_end = total[:, None] - into
    if initial_state is not None:
        s0 = initial_state.to(fq.dtype)
        o = o + torch.einsum("bthf,bhfv->bthv", fq * into.exp().to(fq.dtype), s0)
    if not output_final_state:
        return o
    final = torch.einsum("bshf,bshv->bhfv", fk * to_end.exp().to(fq.dtype), v.to(fq.dtype))
    if initial_state is not None:
        final = final + total.exp().to(fq.dtype)[..., None] * initial_state.to(fq.dtype)
    return o, final


def recurrent(variant, q, k, v, slopes=None, theta=None, initial_state=None, offset=0, output_final_state=False,
              g=None):
    """Token-by-token scans with a [H, F, dv] state per sequence (slow; for tests)."""
    variant = as_variant(variant)
    fq = features(variant, q, theta, offset) * variant.scale
    fk = features(variant, k, theta, offset)
    v = v.to(fq.dtype)
    b, n, h, _ = fq.shape
    lams = _feature_log_decays(variant, slopes, g, fq.shape[:3], fq.dtype, q.device).exp()  # [B, N, H, 1 or F]

    def scan(order, inclusive, state):
        out = []
        for t in order:
            lam = lams[:, t, :, :, None]
            update = torch.einsum("bhk,bhv->bhkv", fk[:, t], v[:, t])
            if inclusive:
                state = lam * state + update
                out.append(torch.einsum("bhk,bhkv->bhv", fq[:, t], state))
            else:  # the state holds tokens strictly after t, decayed to t
                out.append(torch.einsum("bhk,bhkv->bhv", fq[:, t], lam * state))
                state = lam * state + update
        return out, state

    state = fq.new_zeros(b, h, fq.shape[-1], v.shape[-1])
    if initial_state is not None:
        state = initial_state.to(fq.dtype)
    out, final = scan(range(n), True, state)
    o = torch.stack(out, dim=1) if out else fq.new_zeros(b, 0, h, v.shape[-1])
    if not variant.causal:
        back, _ = scan(range(n - 1, -1, -1), False, torch.zeros_like(state))
        o = o + torch.stack(back[::-1], dim=1)
    return (o, final) if output_final_state else o


def step(variant, q, k, v, state, slopes=None, theta=None, positions=0, g=None):
    """One token per sequence: S' = lambda S + f(k)^T v, o = scale f(q) S'. Returns (o, S'); `state`
    is left as it was. q, k [B, H, dk], v [B, H, dv], state [B, H, F, dv]; positions: the LRPE
    position, an int for every row or a tensor [B] (one per row); g: the token's log decay, [B, H] (decay=scalar)
    or [B, H, dk] (decay=vector)."""
    variant = as_variant(variant)
    fq, fk = phi(variant, q) * variant.scale, phi(variant, k)
    if variant.lrpe == "d":
        t = torch.as_tensor(positions, device=q.device).to(theta.dtype).reshape(-1, 1, 1)  # [B or 1, 1, 1]
        fq, fk = _rotate(fq, t * theta), _rotate(fk, t * theta)
    lam = _feature_log_decays(variant, slopes, g, q.shape[:2], fq.dtype, q.device).exp()[..., None]  # [B, H, 1 or F, 1]
    new_state = lam * state.to(fq.dtype) + fk[..., :, None] * v.to(fq.dtype)[..., None, :]
    return torch.einsum("bhf,bhfv->bhv", fq, new_state), new_state
