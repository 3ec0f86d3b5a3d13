"""Sequence splitting: a long sequence with few (batch, head) pairs runs as P pieces of a larger batch,
so that P times more programs walk P times shorter pieces (launch.segments decides P).

Forward: each piece's own state (the pieces module's fwd_state, from k and v alone), then a decayed
prefix sum over pieces gives the state each piece receives; the forward kernel runs on all pieces at
once from those states. Backward, the same in reverse: each piece's outputs send a gradient to the
state before it (bwd_state, from q and dO alone); a decayed suffix sum gives the gradient of the state
after each piece, which the backward kernels of all pieces take as their final state's gradient.
The price: k and v are read once more in the forward, q and dO in the backward. The state passes may
cut the pieces finer still (launch.state_split) so that their programs fill the GPU: the scan walks the
finer pieces and returns one state per piece.

Under decay=constant the state passes walk only the tokens within each head's reach of the boundary
their state crosses (the pieces module's _window): a token d steps away weighs lambda_h**d there, and those
below 2**-reach_bits(dtype) are left out. For the TNL slopes the state passes then read a fraction of k and v.

Packed sequences (cu_seqlens) are cut the same way, into pieces of one length (a sequence's last piece shorter),
which the varlen kernels run as packed sequences of their own (Packed: where each piece is, which are whose, and
the longest first); the scan then walks each sequence's pieces (under decay=constant, each piece's program only
its neighbours within the head's reach).

Here: the views, and the scans over pieces (a kernel of the pieces module: a walk over the P pieces'
[F, dv] fp32 states in order, which are small next to q, k, v, and exponentiates the pieces' decays
itself). Piece p's state E_p is the state after its last token; d_p = the (natural) log decay over piece p.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

# decay=constant's state passes leave out a token whose weight at the boundary is below 2**-reach_bits(dtype): this
# many bits below the rounding of the inputs' dtype (bf16's 2**-8: 2**-24; fp16: 2**-27; fp32's 2**-24: 2**-40).
# A left-out term would have to be 65,536 times larger than the kept ones to move the inputs' rounding, which each
# term of a state already carries. (The states are fp32 sums in every dtype: they round at about 2**-24 anyway.)
REACH_MARGIN_BITS = 16

# The scan's pieces are summed in order, but loaded this many at a time: the loads do not wait on the sum, so
# their latencies overlap (a walk that loads one piece at a time waits one memory latency per piece)
SCAN_UNROLL = 8

# packed_log_decays sums each piece's g in this many parts at once, then adds the parts (a piece of 8K tokens of
# decay=vector's H * dk = 2048 columns is 64 MB: one program per piece and column block would walk 4 MB alone)
PIECE_SUM_PARTS = 8

# State entries per scan program (4 warps: 8 per thread). Measured on H100 (TNL, bf16, 65,536 tokens, H * D = 2048,
# session 17), GPU us of one scan by entries per program 256 / 512 / 1024 / 2048 (8 warps): D = 128, 64K: 11.1 / 8.4 /
# 6.6 / 6.9; 32K: 9.6 / 6.9 / 5.1 / 5.1; 16K: 8.2 / 5.5 / 4.1 / 4.2. D = 64, 64K: 3.6 / 3.5 / 2.8 / 3.4. Fewer, longer
# programs: what costs is each program's walk over its groups, one store and one round of loads after another.
SCAN_BLOCK = 1024


def reach_bits(dtype: torch.dtype) -> float:
    """How many bits below 1 a token's weight at a boundary may fall before decay=constant's state passes leave
    it out, for inputs of `dtype` (see REACH_MARGIN_BITS)."""
    return -math.log2(torch.finfo(dtype).eps / 2) + REACH_MARGIN_BITS  # eps / 2: the dtype's rounding


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


def scan_log_decays(variant, log_decay, shape, segments) -> torch.Tensor | None:
    """The log decays as the scan kernel takes them: the kernels' per-head [H] under decay=constant (the scan
    multiplies by the piece length), None without decay; under learned decays the sum over each piece's
    tokens, [B * P, H] ([B * P, H, dk] under vector), in fp32 as the kernels sum a piece's decays."""
    if not variant.learned_decay:
        return log_decay
    b, n = shape[:2]
    return log_decay.view(b * segments, n // segments, *log_decay.shape[2:]).sum(1)


def scan(module, own, log_decays, segments, length, start=None, reverse=False, last=False, every=1, *, reach,
         out=None):
    """The pieces module's scan over [B * P, H, F, dv] states (see its comment), with start [B, H, F, dv]
    or None and the pieces' log decays d (scan_log_decays; `length` tokens per piece): forward, the state
    each piece starts from, E_(p-1) = exp(d_(p-1)) E_(p-2) + own_(p-1) from E_(-1) = start; reverse, the
    gradient of the state after each piece, dE_p = exp(d_(p+1)) dE_(p+1) + own_(p+1) (own: what each piece
    sends back) from dE_(P-1) = start. every: the P pieces are P / every groups (the state passes' finer
    pieces of the kernels' pieces), and only each group's is returned ([B * P / every, H, F, dv]: the
    state it starts from; reverse, the gradient of the state after it). last (every = 1): also return where
    the walk ends ([B, H, F, dv]: the state after the last piece; reverse, the gradient of the state before
    the first). reach: the state passes' reach_bits (decay=constant: the pieces they left empty are not read).
    out: where the states go (contiguous, the returned shape), else a new tensor."""
    h = own.shape[1]
    b = own.shape[0] // segments
    size, per_dim, block = _scan_blocks(own, log_decays)
    out = own.new_empty(b * (segments // every), *own.shape[1:]) if out is None else out
    end = own.new_empty(b, *own.shape[1:]) if last else None
    # decay=constant (log decays per head): a head whose reach is at most a group computes each out_p apart
    outs = segments // every + last if log_decays is not None and log_decays.dim() == 1 else 1
    module.scan[(b * h, -(-size // block), outs)](
        own, log_decays, start, out, end, segments, h, size, length, every, reach, *per_dim, BLOCK=block,
        UNROLL=SCAN_UNROLL, REVERSE=reverse, HAS_START=start is not None, HAS_LAST=last)
    return (out, end) if last else out


def _scan_blocks(own, log_decays):
    """A scan's entries per state, its per-dim arguments (decay=vector's dk, dv) and its entries per program (many
    programs: each walks the pieces one after another)."""
    size = math.prod(own.shape[2:])  # (not own[0, 0].numel(): indexing is two more torch calls)
    per_dim = (log_decays.shape[-1], own.shape[-1]) if log_decays is not None and log_decays.dim() == 3 else ()
    return size, per_dim, min(SCAN_BLOCK, 1 << (size - 1).bit_length())


class Packed(NamedTuple):
    """Packed sequences as the varlen kernels run them (views of the one int32 tensor that packed_pieces builds): S
    sequences, cut into S' pieces (S' = S: none is cut), which are packed sequences of their own for the kernels."""
    cu: torch.Tensor  # [S' + 1]: the pieces' offsets, as cu_seqlens
    seq_start: torch.Tensor  # [S' + 1]: the row where each piece's sequence starts (-1 past the last)
    first: torch.Tensor  # [S + 1]: sequence s's pieces are first[s] .. first[s + 1] - 1 (at least one: an empty one)
    order: torch.Tensor  # [S']: the pieces, longest first (the order their programs are launched in)
    seq: torch.Tensor | None = None  # [S' + 1]: each piece's sequence (-1 past the last)

    @property
    def count(self) -> int:
        return self.cu.numel() - 1

    @property
    def cut(self) -> bool:
        return self.count > self.first.numel() - 1


def packed_pieces(offsets: list[int], length: int, device) -> torch.Tensor:
    """Packed sequences (their offsets, as cu_seqlens) as pieces of `length` tokens (0: each whole), as one int32
    tensor for the op (unpack_pieces reads it): a sequence's last piece is what is left, an empty sequence one empty
    piece."""
    cuts, starts, first, seq = [], [], [0], []
    for s, (start, end) in enumerate(zip(offsets, offsets[1:])):
        here = range(start, end, length) if length else []
        here = here or [start]
        cuts.extend(here)
        starts.extend([start] * len(here))
        first.append(len(cuts))
        seq.extend([s] * len(here))
    cuts.append(offsets[-1])
    order = sorted(range(len(cuts) - 1), key=lambda i: cuts[i] - cuts[i + 1])  # (stable: ties in packed order)
    return torch.tensor(cuts + starts + [-1] + first + order + seq + [-1], dtype=torch.int32).to(device)


def unpack_pieces(pieces: torch.Tensor, sequences: int) -> Packed:
    """packed_pieces' tensor as views (sequences: S)."""
    count = (pieces.numel() - sequences - 4) // 4
    return Packed(*pieces.split([count + 1, count + 1, sequences + 1, count, count + 1]))


def packed_log_decays(module, variant, log_decay, packed: Packed) -> torch.Tensor | None:
    """The log decays as the packed scan takes them: per head [H] under decay=constant (the scan multiplies by each
    piece's length), None without decay; under learned decays the sums over each piece's tokens, [S', H] ([S', H, dk]
    under vector), in fp32, in token order (the varlen pieces module's piece_sums: deterministic)."""
    if not variant.learned_decay:
        return log_decay
    rows = log_decay[0].reshape(log_decay.shape[1], -1).float().contiguous()  # [T, H (* dk)]
    cols = rows.shape[1]
    parts = rows.new_empty(PIECE_SUM_PARTS, packed.count, *log_decay.shape[2:])
    block = min(128, 1 << (cols - 1).bit_length())
    module.piece_sums[(packed.count, -(-cols // block), PIECE_SUM_PARTS)](
        rows, packed.cu, parts, cols, ROWS=max(16, 4096 // block), BLOCK=block)
    return parts.sum(0)


def packed_scan(module, own, log_decays, packed: Packed, start=None, reverse=False, every=None, reach=None, out=None):
    """The scan of packed pieces (the varlen pieces module's): own [S', H, F, dv] states, start [S, H, F, dv] or
    None; forward, the state each piece starts from; reverse, the gradient of the state after each piece (as scan).
    decay=constant: own holds `every` sub-window states per piece ([S' * every, H, F, dv]) of the state passes'
    `reach` bits (reach_bits), which the scan sums per piece, a program per piece (each walks only as far as the
    head's reach); else a program per sequence walks its pieces in order. out: as scan's."""
    h = own.shape[1]
    size, per_dim, block = _scan_blocks(own, log_decays)
    out = own.new_empty(packed.count, *own.shape[1:]) if out is None else out
    blocks, flags = -(-size // block), dict(BLOCK=block, REVERSE=reverse, HAS_START=start is not None)
    if every is None:
        module.scan[((packed.first.numel() - 1) * h, blocks)](
            own, log_decays, start, out, packed.cu, packed.first, h, size, *per_dim, **flags)
    else:
        module.scan[(packed.count * h, blocks)](
            own, log_decays, start, out, packed.cu, packed.seq, h, size, reach, EVERY=every, **flags)
    return out
