"""Launch parameters for one kernel call: a tuned entry when tuned_configs has one, else a heuristic.

Parameters: C (chunk length), BK / BV (head-dim tile of the output), num_warps, num_stages.
N is never a compile-time constant: a new sequence length picks a tuned entry by N bucket and
reuses the compiled kernel.
"""
from __future__ import annotations

import torch


def heuristic(variant, kernel: str, interpreted: bool) -> dict:
    """Defaults that are correct everywhere and reasonable on an H100."""
    if interpreted:  # Triton's interpreter: big numpy blocks are fastest, the GPU limits do not apply
        return {"C": 32, "BK": min(variant.dk, 64), "BV": min(variant.dv, 64), "num_warps": 4, "num_stages": 1}
    bk, bv = min(variant.dk, 64), min(variant.dv, 64)
    # Triton 3.6 on H100 miscompiles some chunk-64 kernels whose output tile is narrower than 64
    # (wrong results or illegal accesses, e.g. C=64, BV=32, 4 warps): narrow tiles get 32-token chunks.
    chunk = 64 if min(bk, bv) >= 64 else 32
    return {"C": chunk, "BK": bk, "BV": bv, "num_warps": 4, "num_stages": 2}


def params(variant, kernel: str, dtype: torch.dtype, n: int, device: torch.device) -> dict:
    return heuristic(variant, kernel, interpreted=device.type != "cuda")
