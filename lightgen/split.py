"""Sequence splitting: a long sequence with few (batch, head) pairs runs as P pieces of a larger batch,
so that P times more programs walk P times shorter pieces (launch.segments decides P).

Forward: each piece's own state (the pieces module's fwd_state, from k and v alone), then a decayed
prefix sum over pieces gives the state each piece receives; the forward kernel runs on all pieces at
once from those states. Backward, the same in reverse: each piece's outputs send a gradient to the
state before it (bwd_state, from q and dO alone); a decayed suffix sum gives the gradient of the state
after each piece, which the backward kernels of all pieces take as their final state's gradient.
The price: k and v are read once more in the forward, q and dO in the backward.

Here: the views and the scans, on [B, P, H, F, dv] fp32 states (tiny next to q, k, v).
Piece p's state E_p is the state after its last token; d_p = the log2 decay over piece p.
"""
from __future__ import annotations

import torch


def as_pieces(t: torch.Tensor | None, segments: int) -> torch.Tensor | None:
    """[B, N, H, ...] -> [B * P, N / P, H, ...] (a view: the pieces of a sequence are consecutive rows)."""
    if t is None:
        return None
    b, n = t.shape[:2]
    return t.view(b * segments, n // segments, *t.shape[2:])


def piece_log2_decays(variant, log2_decay, shape, segments, device) -> torch.Tensor:
    """d [B, P, H] float64: the log2 decay over each piece (decay=scalar: the sum of its tokens')."""
    b, n, h = shape[:3]
    if variant.decay == "scalar":
        return log2_decay.view(b, segments, n // segments, h).double().sum(2)
    if variant.decay == "constant":
        return (log2_decay.double() * (n // segments)).expand(b, segments, h)
    return torch.zeros(b, segments, h, dtype=torch.float64, device=device)


def _between(decays) -> torch.Tensor:
    """w[b, p, j, h] = 2^(sum of d over the pieces strictly between p and j), 0 where j >= p."""
    ends = decays.cumsum(1)
    starts = ends - decays
    p = torch.arange(decays.shape[1], device=decays.device)
    earlier = (p[:, None] > p[None, :])[None, :, :, None]
    # masked before exp2: the rest could overflow
    return torch.where(earlier, starts[:, :, None] - ends[:, None], -torch.inf).exp2().float()


def received(own, decays, h0=None) -> torch.Tensor:
    """The state each piece starts from [B, P, H, F, dv]: E_(p-1) = sum over j < p of 2^(d_(j+1) + ... +
    d_(p-1)) own_j, plus 2^(d_0 + ... + d_(p-1)) h0 (the sequence's initial state)."""
    states = torch.einsum("bpjh,bjhfv->bphfv", _between(decays), own)
    if h0 is not None:
        before = (decays.cumsum(1) - decays).exp2().float()  # from the sequence's start to each piece's
        states = states + before[..., None, None] * h0[:, None]
    return states.contiguous()  # the kernels take [B * P, H, F, dv] states as laid out


def sent_back(own_grads, decays, dht=None) -> torch.Tensor:
    """The gradient of the state after each piece [B, P, H, F, dv]: dE_p = sum over j > p of
    2^(d_(p+1) + ... + d_(j-1)) r_j, r_j the gradient piece j's outputs send to the state before it,
    plus 2^(d_(p+1) + ... + d_(P-1)) dht (the final state's gradient)."""
    flipped = decays.flip(1)
    grads = torch.einsum("bpjh,bjhfv->bphfv", _between(flipped), own_grads.flip(1)).flip(1)
    if dht is not None:
        after = (flipped.cumsum(1) - flipped).exp2().float().flip(1)  # from each piece's end to the sequence's
        grads = grads + after[..., None, None] * dht[:, None]
    return grads.contiguous()
