"""Sequence parallelism for TNL's linear attention, in the manner of LASP.

The sequence is split contiguously: rank r of an SP group of P holds tokens [r L, (r+1) L). Only the
token mixer looks across tokens, and it only needs the state of the tokens before, so per layer:

  1. own:  o_r, S_r = attn(q, k, v, output_final_state=True, offset=r L)   the lightgen kernel on
           the chunk alone; S_r [B, H, F, d] sums the chunk's f(k)^T v decayed to its last token
  2. all-gather the states (small: no activations move) and combine the prefix
           S_in(r) = sum over j < r of lambda^(L (r-1-j)) S_j        (lambda^L per rank hop)
  3. add the earlier tokens: o_t += scale lambda^(t+1) f(q_t) S_in(r)     (t counted in the chunk)

The all-gather is differentiable (its backward reduce-scatters the state gradients), so they flow
back to the ranks that made them through autograd. It is a small Function here rather than
torch.distributed.nn.functional.all_gather: that one's backward on gloo emulates reduce-scatter with
scatter calls that take group ranks for global ones, and fails on any SP group that is not the
whole world (torch 2.13). LRPE angles use the absolute position (offset = r L) in the kernel and in
f(q) alike.

Three forms (`method`):
  "states"     (default) as lightgen's own sequence splitting does it: step 1 is only the chunk's state
               (attn.chunk_state: a pass over k and v, no outputs), and the kernel then runs once with
               the incoming state, o, S = attn(q, k, v, initial_state=S_in, output_final_state=True),
               so steps 1 and 3 are one kernel pass plus a state pass. Backward, the mirror: each rank's
               outputs send a gradient to the state before its chunk (attn.state_gradient, from q and
               dO), those are all-gathered and combined in reverse into the gradient of this rank's
               final state, and the kernel's own backward takes it. The first rank sends nothing back
               and the last hands no state on, so they skip those passes: on one rank this is the plain
               attention (measured on H100: see the README).
  "add_state"  the state's contribution as one batched product of f(q) (lightgen's own
               PyTorch feature map, recomputed in the backward by activation checkpointing) with S_in
  "recompute"  a second kernel pass attn(q, k, v, initial_state=S_in, offset=r L) for the output
"add_state" runs the kernel once per chunk in the forward and once in the backward, "recompute"
twice each; the added product is O(L F d) per head, about what the kernel's own inter-chunk step
costs. Measured on 2 CPU ranks (one attention layer, B=1, H=8, d=64, LRPE, forward + backward,
ms per rank; a plain one-pass call on the same chunk for scale):
                                   plain    add_state   recompute
  reference path, L = 1024           942       1028        1934
  reference path, L = 2048          1971       2203        4459
  kernels (interpreter), L = 256    2305       1992        4713
so "add_state" costs about one pass and "recompute" two. Rank 0 has no earlier tokens, yet runs
step 3 with a zero state like every other rank: its graph must reach the all-gather (whose backward
is a collective), and in SPMD the step takes as long as the slowest rank anyway.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from lightgen import reference

METHODS = ("states", "add_state", "recompute")


def split_sequence(tensor: torch.Tensor, group) -> torch.Tensor:
    """This rank's contiguous piece of dim 1 (the sequence) of [B, N, ...]."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if tensor.shape[1] % world:
        raise ValueError(f"sequence length {tensor.shape[1]} must be a multiple of the SP size {world}")
    return tensor.chunk(world, dim=1)[rank]


# the names torch 2.13 prefers, with their older spellings (torch >= 2.5)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """[world, *x.shape] from every rank's x; the backward sums each rank's gradient of its piece."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty(world * x.shape[0], *x.shape[1:])
        _all_gather_single(out, x.contiguous(), group=group)
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx, grad):
        piece = grad.new_empty(grad.shape[1:])
        _reduce_scatter_single(piece, grad.contiguous().flatten(0, 1), group=ctx.group)
        return piece, None


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather: [world, *x.shape]."""
    return _AllGather.apply(x, group)


def _decay(slopes, heads, device):
    """lambda per head [H] (1 without decay)."""
    return torch.ones(heads, device=device) if slopes is None else torch.exp(-slopes.float())


def incoming_state(states: torch.Tensor, rank: int, lam: torch.Tensor, chunk: int) -> torch.Tensor:
    """S_in(rank) = sum over j < rank of lambda^(chunk (rank-1-j)) states[j]; states [P, B, H, F, dv].

    Every gathered state enters, with weight 0 for j >= rank (so rank 0 gets zeros): each rank's
    graph must reach the all-gather, whose backward is a collective that all ranks have to join."""
    return _decayed_sum(states, rank, lam, chunk, earlier=True)


def outgoing_gradient(grads: torch.Tensor, rank: int, lam: torch.Tensor, chunk: int) -> torch.Tensor:
    """The gradient of rank `rank`'s final state: sum over j > rank of lambda^(chunk (j-1-rank)) grads[j],
    grads [P, B, H, F, dv] what each rank's outputs send to the state before its chunk."""
    return _decayed_sum(grads, rank, lam, chunk, earlier=False)


def _decayed_sum(states, rank, lam, chunk, earlier):
    """sum over the ranks j before `rank` (earlier) or after it of lambda^(chunk * ranks between) states[j]."""
    j = torch.arange(states.shape[0], device=states.device)
    between = ((rank - 1 - j) if earlier else (j - 1 - rank)).clamp_min(0).to(torch.float32)
    weights = lam[None, :] ** (chunk * between[:, None]) * ((j < rank) if earlier else (j > rank))[:, None]  # [P, H]
    with torch.autocast(states.device.type, enabled=False):  # states are fp32: keep them so under bf16 autocast
        return torch.einsum("ph,pbhfv->bhfv", weights.float(), states.float())


def _gathered(x: torch.Tensor, group) -> torch.Tensor:
    """[world, *x.shape] from every rank's x (no gradient)."""
    out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])
    _all_gather_single(out, x.contiguous(), group=group)
    return out.view(-1, *x.shape)


class _SendStateGradients(torch.autograd.Function):
    """The identity on o. Its backward turns do into the gradient of this rank's final state (what the
    later ranks' outputs send back, all-gathered) and hands both to the attention's own backward."""

    @staticmethod
    def forward(ctx, o, final, q, slopes, theta, lam, attn, offset, group):
        ctx.save_for_backward(q, slopes, theta, lam)
        ctx.attn, ctx.offset, ctx.group = attn, offset, group
        return o.view_as(o)

    @staticmethod
    def backward(ctx, do):
        q, slopes, theta, lam = ctx.saved_tensors
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        if rank > 0:  # the first rank's outputs have no earlier state to send a gradient to
            sent = ctx.attn.state_gradient(q, do, slopes=slopes, theta=theta, offset=ctx.offset)
        else:
            sent = ctx.attn.new_state(q.shape[0], q.shape[2], q.device)
        grads = _gathered(sent, ctx.group)
        dfinal = outgoing_gradient(grads, rank, lam, q.shape[1]) if rank < world - 1 else None
        return do, dfinal, None, None, None, None, None, None, None


def _attention_by_states(attn, q, k, v, slopes, theta, group):
    """method="states" (see the module's docstring)."""
    rank, world, chunk = dist.get_rank(group), dist.get_world_size(group), q.shape[1]
    offset = rank * chunk
    lam = _decay(slopes, q.shape[2], q.device)
    if rank < world - 1:  # the last rank's state goes nowhere
        own = attn.chunk_state(k, v, slopes=slopes, theta=theta, offset=offset)
    else:
        own = attn.new_state(q.shape[0], q.shape[2], q.device)
    states = _gathered(own, group)  # every rank joins the collective
    state_in = incoming_state(states, rank, lam, chunk) if rank > 0 else None
    o, final = attn(q, k, v, slopes=slopes, theta=theta, initial_state=state_in, output_final_state=True,
                    offset=offset)
    return _SendStateGradients.apply(o, final, q, slopes, theta, lam, attn, offset, group)


def _state_contribution(variant, q, theta, lam, state, offset: int):
    """scale lambda^(t+1) f(q_t) S_in for t in the chunk: [B, L, H, dv] fp32."""
    with torch.autocast(q.device.type, enabled=False):
        fq = reference.features(variant, q.float(), theta, offset) * variant.scale  # [B, L, H, F]
        t = torch.arange(1, q.shape[1] + 1, device=q.device, dtype=torch.float32)
        into = lam[None, :] ** t[:, None]  # [L, H]: the state decayed to token t
        return torch.einsum("blhf,bhfv->blhv", fq * into[None, :, :, None], state)


def sequence_parallel_attention(attn, q, k, v, slopes=None, theta=None, *, group, method="states"):
    """attn (a lightgen LinearAttention, causal) over a sequence split across `group`.
    q, k, v [B, L, H, d] are this rank's chunk; returns this rank's o [B, L, H, dv]."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    if method == "states":
        return _attention_by_states(attn, q, k, v, slopes, theta, group)
    rank, chunk = dist.get_rank(group), q.shape[1]
    offset = rank * chunk
    o, own = attn(q, k, v, slopes=slopes, theta=theta, output_final_state=True, offset=offset)
    states = all_gather(own, group)
    lam = _decay(slopes, q.shape[2], q.device)
    state_in = incoming_state(states, rank, lam, chunk)
    if method == "recompute":
        return attn(q, k, v, slopes=slopes, theta=theta, initial_state=state_in, offset=offset)
    # checkpointed: keep q, theta and the state for the backward, not f(q) (2x q in fp32 under LRPE)
    extra = checkpoint(_state_contribution, attn.variant, q, theta, lam, state_in, offset, use_reentrant=False)
    return (o.float() + extra).to(o.dtype)


def enable_sequence_parallel(model, group, method: str = "states"):
    """Make every token mixer of a TNLForCausalLM attend across `group` (the GLA.sequence_parallel
    hook). Feed each rank its split_sequence of the inputs and targets."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    for block in model.layers:
        block.token_mixer.sequence_parallel = functools.partial(
            sequence_parallel_attention, group=group, method=method)
    return model
