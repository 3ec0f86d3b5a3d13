"""Sequence splitting: a long sequence with few (batch, head) pairs runs as P pieces of a larger batch,
so that P times more programs walk P times shorter pieces (launch.segments decides P).

Forward: each piece's own state (the pieces module's fwd_state, from k and v alone), then a decayed
prefix sum over pieces gives the state each piece receives; the forward kernel runs on all pieces at
once from those states. Backward, the same in reverse: each piece's outputs send a gradient to the
state before it (bwd_state, from q and dO alone); a decayed suffix sum gives the gradient of the state
after each piece, which the backward kernels of all pieces take as their final state's gradient.
The price: k and v are read once more in the forward, q and dO in the backward.

Here: the views, and the scans over pieces (a kernel of the pieces module: a sequential walk over the
P pieces' [F, dv] fp32 states, which are small next to q, k, v). Piece p's state E_p is the state after
its last token; d_p = the (natural) log decay over piece p.
"""
from __future__ import annotations

import torch


def as_pieces(t: torch.Tensor | None, segments: int) -> torch.Tensor | None:
    """[B, N, H, ...] -> [B * P, N / P, H, ...] (a view: the pieces of a sequence are consecutive rows)."""
    if t is None:
        return None
    b, n = t.shape[:2]
    return t.view(b * segments, n // segments, *t.shape[2:])


def kernel_log_decay(variant, log_decay, segments):
    """The log decays as the kernels take them for the pieces: per token [B * P, N / P, H] under
    decay=scalar ([..., dk] under vector), else as they are (per head, or None)."""
    return as_pieces(log_decay, segments) if variant.learned_decay else log_decay


def piece_log_decays(variant, log_decay, shape, segments, device) -> torch.Tensor:
    """d [B, P, H] float64: the log decay over each piece (decay=scalar: the sum of its tokens'; decay=vector:
    the same per key dim, [B, P, H, dk])."""
    b, n, h = shape[:3]
    if variant.learned_decay:  # summed in fp32, as the kernels sum a piece's decays: a float64 copy of a
        # [B, N, H, dk] tensor cost 1 ms (H100, D = 128, 65,536 tokens) where this sum costs 0.2
        return log_decay.view(b, segments, n // segments, *log_decay.shape[2:]).sum(2).double()
    if variant.decay == "constant":
        return (log_decay.double() * (n // segments)).expand(b, segments, h)
    return torch.zeros(b, segments, h, dtype=torch.float64, device=device)


def scan(module, own, decays, start=None, reverse=False) -> torch.Tensor:
    """The pieces module's scan over [B * P, H, F, dv] states (see its comment), with start [B, H, F, dv]
    or None and decays d [B, P, H] (log; [B, P, H, dk] under decay=vector): forward, the state each piece
    starts from, E_(p-1) = exp(d_(p-1)) E_(p-2) + own_(p-1) from E_(-1) = start; reverse, the gradient of the
    state after each piece, dE_p = exp(d_(p+1)) dE_(p+1) + own_(p+1) (own: what each piece sends back) from
    dE_(P-1) = start."""
    b, segments, h = decays.shape[:3]
    size = own[0, 0].numel()
    out = torch.empty_like(own)
    per_dim = (decays.shape[3], own.shape[-1]) if decays.dim() == 4 else ()  # the kernel's DK, DV (vector)
    block = min(256, 1 << (size - 1).bit_length())  # many programs: each walks P pieces one after another
    module.scan[(b * h, -(-size // block))](
        own, decays.exp().float().contiguous(), start, out, segments, h, size, *per_dim, BLOCK=block,
        REVERSE=reverse, HAS_START=start is not None)
    return out


def state_factor(decays: torch.Tensor, rows: int) -> torch.Tensor:
    """exp(d) as a factor of [B, H, F, dv] states (F = rows): d [B, H] per state, or [B, H, dk] per key dim
    (decay=vector: state row f belongs to key dim f % dk)."""
    factor = decays.exp().float()
    if factor.dim() == 2:
        return factor[..., None, None]
    return factor.repeat(1, 1, rows // factor.shape[-1])[..., None]
