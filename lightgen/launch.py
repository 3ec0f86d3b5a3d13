"""Launch parameters for one kernel call: a tuned entry when tuned_configs has one, else a heuristic.

Parameters: C (chunk length), BK / BV (head-dim tile of the output), num_warps, num_stages.
N is never a compile-time constant: a new sequence length picks a tuned entry by N bucket (the length a
program walks: a piece's, under sequence splitting) and reuses the compiled kernel.

Order of precedence in params():
  1. an override (`with launch.override(p): ...`), used by the tuner to time one config;
  2. under Triton's interpreter (CPU tensors): the heuristic, nothing is looked up;
  3. on a CUDA device: configs.lookup (nearest N bucket; this GPU's entries, else another GPU's of its
     arch) when it has a sane entry;
  4. else the heuristic, with a LaunchConfigWarning once per (variant, kernel, dtype, device).
"""
from __future__ import annotations

import contextlib
import re
import warnings

import torch

from . import configs, render

PARAM_NAMES = ("C", "BK", "BV", "num_warps", "num_stages")


class LaunchConfigWarning(UserWarning):
    """No usable tuned config for a launch: lightgen runs with its heuristic default."""


def capability(arch: str) -> int | None:
    """A CUDA arch's compute capability: "sm90" (or "sm_90a") -> 90; None for anything else ("cpu")."""
    match = re.fullmatch(r"sm_?(\d{2,3})a?", arch)
    return None if match is None else int(match[1])


def mma_sync_only(arch: str) -> bool:
    """Whether a CUDA arch ("sm80") has only mma.sync for its tensor-core products: before Hopper, and sm120
    (consumer Blackwell). Hopper's wgmma (sm90) and Blackwell's tcgen05 (sm100-sm110) read an operand from shared
    memory; with mma.sync every operand and result of a product lives in registers."""
    cc = capability(arch)
    return cc is not None and not 90 <= cc < 120


def heuristic(variant, kernel: str, interpreted: bool, arch: str = "sm90") -> dict:
    """Defaults that are correct everywhere and reasonable on an H100 (`arch`: the GPU's, e.g. "sm80")."""
    if kernel == "step":
        return _step_heuristic(variant, interpreted)
    bk, bv = min(variant.dk, 64), min(variant.dv, 64)
    if kernel == "fwd" and variant.norm != "none":
        bv = variant.dv  # the fused norm needs the whole output row in one program
    if interpreted:  # Triton's interpreter: big numpy blocks are fastest, the GPU limits do not apply
        return {"C": 32, "BK": bk, "BV": bv, "num_warps": 4, "num_stages": 1}
    # Triton 3.6 on H100 miscompiles some chunk-64 kernels whose output tile is narrower than 64
    # (wrong results or illegal accesses, e.g. C=64, BV=32, 4 warps): narrow tiles get 32-token chunks.
    chunk = 64 if min(bk, bv) >= 64 else 32
    if variant.decay == "vector":  # H100, D = 128, N = 4K, tiles of 64, 4 warps: fwd 2.18 ms at C = 16, 3.31 at 32, 10.6 at 64
        # and 3 stages: what tuning picked for all four kernels (D = 128, bf16; bwd_dq 1.71 ms against 2.11 at 2 stages)
        return {"C": 16, "BK": bk, "BV": bv, "num_warps": 4, "num_stages": 3}
    if variant.lrpe == "d" and variant.dk <= 128 and variant.dv <= 128:
        # LRPE doubles the state ([2 dk, dv] fp32): short chunks leave registers for it. Measured on H100 (D = 128,
        # constant decay, silu, N = 4K, bf16, ms): fwd 1.88 at C = 16, BV = 128, 8 warps (2.34 at C = 32);
        # bwd_dq / bwd_dk 2.45 / 2.47 at C = 16, tile 64, 4 warps (bwd_dq 3.3 at C = 32, 8 warps); bwd_dv 1.78
        if kernel in ("fwd", "bwd_dkv", "bwd_dv"):
            return {"C": 16, "BK": bk, "BV": variant.dv, "num_warps": 8, "num_stages": 2}
        return {"C": 16, "BK": bk, "BV": bv, "num_warps": 4, "num_stages": 2}
    if variant.dk == 128 and variant.dv == 128 and not variant.learned_decay:
        # what tuning picked on H100 for TNL and decay=none at D = 128 (tuned_configs/sm90.json, the transposed
        # walk): the whole head per program, 8 warps, 3 stages; 64-token chunks, but 32 for the fused reverse sweep
        # (its two products through one [dk, dv] state: C = 64 spills). bf16, 4K, ms: fwd 0.378, bwd_dq 0.380,
        # bwd_dkv 0.744, bwd_dk 0.380 and bwd_dv 0.386
        tile = {"BK": 128} if kernel in ("bwd_dq", "bwd_dk") else {"BV": 128}
        if mma_sync_only(arch):
            # without wgmma those 64-token chunks spill in every kernel: sm80, Triton 3.6, TNL (`lightgen inspect`),
            # 368-384 bytes a thread and ~290 spill loads and stores in each chunk's loop; at 32-token chunks none but
            # bwd_dkv's (silu too; decay=none's bwd_dq 40). Chosen by compile, not timed (no such GPU here)
            return {"C": 32, "BK": bk, "BV": bv, **tile, "num_warps": 8, "num_stages": 3}
        return {"C": 32 if kernel == "bwd_dkv" else 64, "BK": bk, "BV": bv, **tile, "num_warps": 8, "num_stages": 3}
    # what tuning picked on H100 at D = 64 (TNL, decay=none): 64-token chunks (32 for bwd_dkv), 4 warps, 3 stages
    return {"C": 32 if kernel == "bwd_dkv" else chunk, "BK": bk, "BV": bv, "num_warps": 4, "num_stages": 3}


def _step_heuristic(variant, interpreted: bool) -> dict:
    """The decode step (one token, no chunk: C and BK are unused) runs B*H*(dv/BV) programs, each
    streaming an [F, BV] fp32 state tile in and out once (F*BV*8 bytes) with nothing to pipeline.
    At B*H = 1024 and dv = 128, BV = 32 gives 4096 programs of 32-64 KB (F = 128 or 256): several per
    SM, enough bytes in flight to cover HBM latency, and 128-byte rows (full cache lines)."""
    bv = variant.dv if interpreted else min(variant.dv, 32)
    return {"C": 16, "BK": min(variant.dk, 64), "BV": bv, "num_warps": 4, "num_stages": 1}


# ---- override (the tuner times one config through the normal launch path) --------------------

# Process-wide, not context-local: autograd runs CUDA backwards on its own threads, which a
# context variable would not reach. Meant for the tuner and tests, one block at a time.
_forced: dict = {"params": None, "backward": None, "pieces": None}


@contextlib.contextmanager
def _forcing(name, value):
    before = _forced[name]
    _forced[name] = value
    try:
        yield
    finally:
        _forced[name] = before


def override(params: dict):
    """Within the block, every launch uses `params` (missing names: the heuristic's) and nothing is
    looked up."""
    return _forcing("params", dict(params))


def backward(path: str):
    """Within the block, every backward takes `path` ("fused" or "split", see BACKWARDS)."""
    if path not in BACKWARDS:
        raise ValueError(f"path={path!r}: expected one of {', '.join(BACKWARDS)}")
    return _forcing("backward", path)


def pieces(count: int):
    """Within the block, a batch call cuts each sequence into `count` pieces (segments()), with no finer state pieces,
    on any device: record_launches takes the state passes of a non-causal variant with a decay this way."""
    return _forcing("pieces", count)


# ---- the backward's kernels --------------------------------------------------------------------

# dk and dv come from one reverse sweep (fused: its state R is [F, dv-tile] and serves both) or
# from two (split: bwd_dk holds R transposed and tiles dk, so nothing is summed across tiles, but
# q, k, v, dO are read twice). Measured on H100: fused wins while R fits one program's registers.
BACKWARDS = {"fused": ("bwd_dkv",), "split": ("bwd_dk", "bwd_dv")}


def kernels(variant) -> tuple:
    """The launch-tuned kernels of the variant's module: decay=vector has no bwd_dkv (its backward is split)."""
    every = ("fwd", "bwd_dq", *(k for path in BACKWARDS.values() for k in path))
    return tuple(k for k in every if not (variant.decay == "vector" and k in BACKWARDS["fused"]))


def backward_path(variant, dtype: torch.dtype, n: int, device: torch.device) -> str:
    """"fused" or "split" ("split" always under decay=vector): forced by `backward(...)`, else the faster by tuned times when every
    kernel of both paths has a tuned entry, else the heuristic (on a GPU, split under LRPE, or at D = 128 with a
    feature map, noncausal with a decay or without wgmma (mma_sync_only); else fused while one dv tile covers dv;
    noncausal without decay fused but under LRPE)."""
    if variant.decay == "vector":
        return "split"  # its only path: bwd_dkv's dual product has no per-feature weight (not rendered)
    forced = _forced["backward"]
    if forced is not None:
        return forced
    if device.type == "cuda":
        times = {}
        for path, kernels in BACKWARDS.items():
            entries = {k: configs.lookup_entry(*_lookup_args(variant, k, dtype, device), n) for k in kernels}
            if all(e is not None and problem(e["params"], variant, k) is None for k, e in entries.items()):
                times[path] = sum(e["ms"] for e in entries.values())
        if len(times) == len(BACKWARDS):
            return min(times, key=times.get)
    if variant.lrpe == "d" and device.type == "cuda":
        return "split"  # LRPE's fused sweep holds two [2 dk, tile] states: 4.8 ms against 2.5 + 1.8 split (H100, D = 128)
    big = variant.dk * variant.dv >= 128 * 128
    if big and device.type == "cuda" and mma_sync_only(configs.current_arch(device)[0]):
        return "split"  # without wgmma the fused sweep spills at every config (sm80, TNL D = 128: 232-616 B a thread)
    if variant.whole_state:
        # the whole-state walks (kernels.py.j2: one sums the state, one applies it, no intra-chunk products). H100,
        # bf16, 4K x 16, ms fwd+bwd (session 23): D = 128 fused 2.09 against 2.24 split, phi=silu 2.33 against 2.63,
        # D = 64 2.08 against 2.26
        return "fused"
    if variant.phi_expr != "x" and big and device.type == "cuda":
        # a feature map's work beside a whole [128, 128] state in the fused sweep's one program: H100, bf16, 4K, ms,
        # phi=silu 1.99 against 0.93 + 0.54 split, elu+1 1.86 against 0.80 + 0.62 (D = 64 silu: fused 0.82 against 1.03)
        return "split"
    if not variant.causal and big and device.type == "cuda":
        # H100, bf16, 4K x 16, ms, default configs (session 22): decay=constant 5.71 fused against 4.57 split (and
        # decay=none 5.65 against 4.22, before its whole-state walks)
        return "split"
    tile = heuristic(variant, "bwd_dkv", interpreted=device.type != "cuda")["BV"]
    return "fused" if tile >= variant.dv else "split"


# ---- validation of tuned entries -------------------------------------------------------------

def _power_of_two(x) -> bool:
    return type(x) is int and x > 0 and x & (x - 1) == 0  # type(): bool is an int subclass


def problem(p: dict, variant, kernel: str | None = None) -> str | None:
    """Why a params dict cannot be launched for this variant's `kernel`, or None when it is sane."""
    missing = [name for name in PARAM_NAMES if name not in p]
    if missing:
        return f"missing {', '.join(missing)}"
    for name in ("C", "BK", "BV", "num_warps"):
        if not _power_of_two(p[name]):
            return f"{name}={p[name]!r} is not a power of two"
    if p["C"] < 16:
        return f"C={p['C']} < 16 (tl.dot needs 16)"
    if variant.dk % p["BK"]:
        return f"BK={p['BK']} does not divide dk={variant.dk}"
    if variant.dv % p["BV"]:
        return f"BV={p['BV']} does not divide dv={variant.dv}"
    if kernel == "fwd" and variant.norm != "none" and p["BV"] != variant.dv:
        return f"BV={p['BV']} < dv={variant.dv}: the fused norm={variant.norm} needs the whole output row (BV = dv)"
    if type(p["num_stages"]) is not int or not 1 <= p["num_stages"] <= 8:
        return f"num_stages={p['num_stages']!r} is not an int in 1..8"
    return None


# ---- lookup --------------------------------------------------------------------------------

# (variant, kernel, dtype, device) -> the configs.lookup arguments but n: the hot path costs one
# dict lookup here plus configs' stat check (the kernel's key and the device's arch are not free).
# Entries are keyed by the generated kernel's code (render.kernel_key), not the variant's hash: a
# template change makes the kernels it touches new, and their old tuned entries no longer apply.
_keys: dict[tuple, tuple] = {}
_warned: set[tuple] = set()


def _lookup_args(variant, kernel, dtype, device) -> tuple:
    key = (variant, kernel, dtype, device)
    args = _keys.get(key)
    if args is None:
        arch, gpu = configs.current_arch(device)
        args = (arch, gpu, configs.triton_version(), render.kernel_key(variant, kernel), kernel, variant.dk, variant.dv,
                dtype)
        _keys[key] = args
    return args


# sequence splitting's state passes (the pieces module) launch like the kernel whose walk they are
BORROWED = {"fwd_state": "fwd", "bwd_state": "bwd_dv"}

# ... but under decay=vector, whose kernels take 16-token chunks for their intra-chunk weights, which the state
# passes do not compute: there a chunk's cost is rescaling the state per key dim. Measured on H100 (D = 128,
# bf16, 32K tokens x 2 sequences x 16 heads in 16 pieces, ms fwd_state / bwd_state): 1.48 / 1.49 at C = 16,
# BV = 64 (the forward's config), 0.93 / 0.92 at C = 16, BV = 128, 0.79 / 0.73 at C = 32, BV = 128, 0.89 / 0.86 at
# C = 64; 8 warps slower throughout.
VECTOR_STATE_PASS = {"C": 32, "num_warps": 4, "num_stages": 2}  # and the whole dv row, up to 128


# ... and with 4 warps where the kernels take 8: a state pass has one product per chunk where the kernels have four,
# and 8 warps split it finer than it pays. Measured on H100 (TNL, D = 128, bf16, 65,536 tokens, session 17), GPU us
# of fwd_state / bwd_state at 8 / 4 warps (C = 64, BV = 128, 3 stages): 64K 34.2 / 32.5 and 34.6 / 32.4; 32K 31.2 /
# 30.0 and 31.9 / 30.1; 16K 28.9 / 26.8 and 29.5 / 26.8. Up to 128 x 128 state entries per program (4 warps hold
# them in registers; the full TNL's [2 dk, dv] keeps its 8).
STATE_PASS_WARPS = 4


def state_pass_params(variant, borrowed: dict, gpu: bool = True) -> dict:
    """A state pass's launch params from those of the kernel it borrows from (BORROWED), on a GPU or not."""
    if variant.decay == "vector" and gpu:
        return {**heuristic(variant, "fwd", interpreted=False), **VECTOR_STATE_PASS, "BV": min(variant.dv, 128)}
    if variant.state_rows * borrowed["BV"] <= 128 * 128:
        return {**borrowed, "num_warps": min(borrowed["num_warps"], STATE_PASS_WARPS)}
    return borrowed


def params(variant, kernel: str, dtype: torch.dtype, n: int, device: torch.device) -> dict:
    if kernel in BORROWED:
        borrowed = params(variant, BORROWED[kernel], dtype, n, device)
        if _forced["params"] is not None:
            return borrowed
        return state_pass_params(variant, borrowed, gpu=device.type == "cuda")
    forced = _forced["params"]
    args = _lookup_args(variant, kernel, dtype, device) if device.type == "cuda" else None
    if forced is not None:
        default = heuristic(variant, kernel, interpreted=True) if args is None else \
            heuristic(variant, kernel, interpreted=False, arch=args[0])
        chosen = {**default, **forced}
        why = problem(chosen, variant, kernel)
        if why is not None:
            raise ValueError(f"launch.override: {why} ({kernel} of {variant})")
        return chosen
    if args is None:
        return heuristic(variant, kernel, interpreted=True)
    tuned = configs.lookup(*args, n)
    why = "missing" if tuned is None else problem(tuned, variant, kernel)
    if why is None:
        return tuned
    warned = (why == "missing", variant, kernel, dtype, device)
    if warned not in _warned:  # the message is built only once: this runs on every launch
        _warned.add(warned)
        gpu, triton, name = args[1], args[2], configs.dtype_name(dtype)
        if tuned is None:
            message = (f"lightgen: no tuned launch config for {kernel} of {variant} ({name}, {gpu}, Triton {triton}); "
                       f"using the heuristic default, which may be slow. Tune with: lightgen tune '{variant}'")
        else:
            message = (f"lightgen: the tuned launch config for {kernel} of {variant} ({name}, N~{n}, {gpu}) is "
                       f"invalid ({why}: {tuned}); using the heuristic default. Re-tune: lightgen tune '{variant}'")
        warnings.warn(message, LaunchConfigWarning, stacklevel=3)  # points at the caller of params()
    return heuristic(variant, kernel, interpreted=False, arch=args[0])


def epilogue_rows(variant) -> int:
    """Rows per program of bwd_epilogue (each row whole, dv wide): about 4K elements per program,
    a few loads in flight per thread at 4 warps."""
    return max(1, 4096 // variant.dv)


def segments(variant, shape, dtype, device) -> int:
    """How many pieces to cut each sequence into (1: none; lightgen.split runs them). Long sequences with
    few (batch, head) pairs leave SMs idle: each program walks the whole sequence (16 pairs of 64K, D = 128:
    12.4 ms fwd+bwd unsplit). The pieces' state passes read k and v (q and dO backward) once more, so the
    fewest pieces that fill the GPU win: the most with at most one (pair, piece) per SM, none under 1024
    tokens. Measured on H100 (TNL, bf16, 65,536 tokens, H * D = 2048, session 12), fwd / fwd+bwd ms by pieces:
    D = 128, 64 pairs of 16K: 2: 0.501 / 1.741, 4: 0.544 / 1.838, 8: 0.596 / 1.955; 32 pairs of 32K: 2: 0.912 /
    3.227 (64 SMs busy), 4: 0.519 / 1.778, 8: 0.564 / 1.878; 16 pairs of 64K: 4: 0.923 / 3.234, 8: 0.541 / 1.820,
    16: 0.576 / 1.900. D = 64, 32 pairs of 64K: 4: 0.555 / 1.687, 8: 0.563 / 1.695. Learned decays (scalar,
    vector) go on to four (pair, piece)s per SM: their backward kernels tile the head dim (more programs, each
    lighter). decay=scalar, fwd+bwd at (pair, piece)s 256 / 512 / 1024: 3.93 / 3.74 / 3.75 at 16K, 3.95 / 3.74 /
    3.79 at 32K. More dv tiles instead of pieces lose (constant, 16K, fwd and bwd_dv forced to BV = 64,
    fwd / fwd+bwd: 0.750 / 2.933 ms unsplit, against 0.753 / 2.480 as 4 pieces): a program walking the whole
    sequence is the bound. Non-causal without decay reads nothing twice when split (the state pass reads k and v,
    the pieces only q), so at dv = 64, whose programs run two to an SM, it goes on to two (pair, piece)s per SM
    (session 24, graph fwd / fwd+bwd by pieces: 16K 1: 0.413 / 1.361, 2: 0.371 / 1.117, 4: 0.381 / 1.158; 64K 4:
    0.417 / 1.301, 8: 0.373 / 1.130, 16: 0.394 / 1.193); at dv = 128, one (16K 2: 0.379 / 1.161, 4: 0.383 / 1.180;
    64K 8: 0.387 / 1.188, 16: 0.403 / 1.245). Non-causal with a decay (session 28) is split as the causal variants
    are: each piece is handed a state from each side, two state passes and scans each way. (Pairs, not programs: the
    count must not depend on tuned tiles, so that torch.compile can trace it.) Forced by `pieces(...)`."""
    if _forced["pieces"] is not None:
        return _forced["pieces"]
    if device.type != "cuda":
        return 1
    b, n, h, _ = shape
    return _most_cuts(n, 1, _per_sm(variant) * _sm_count(device) // (b * h))


def _per_sm(variant) -> int:
    """(pair, piece)s per SM that sequence splitting aims at (segments() says why)."""
    return 4 if variant.learned_decay else 2 if variant.whole_state and variant.dv <= 64 else 1


def piece_length(variant, tokens: int, longest: int, heads: int, device) -> int:
    """Packed sequences (every variant): the length of the pieces that sequences longer than
    it are cut into (0: none is cut). As segments(): a program walking a long sequence alone is the bound, so the
    pieces are as long as the tokens per SM (all the sequences' tokens times the heads, over (pair, piece)s per SM
    times the SMs: the work of one SM), a power of two of at least 1024 tokens; the short sequences fill the SMs the
    pieces leave. One sequence of 64K, 16 heads: pieces of 8K, as segments() cuts it. tokens: all the sequences';
    longest: the longest one's."""
    if device.type != "cuda":
        return 0
    length = _piece_rule(variant, tokens, heads, device)
    return length if length < longest else 0


def _piece_rule(variant, tokens: int, heads: int, device) -> int:
    """piece_length's length before the test against the longest sequence."""
    per_program = -(-tokens * heads // (_per_sm(variant) * _sm_count(device)))
    return max(1024, 1 << (per_program - 1).bit_length())


def packed_state_split(variant, tokens: int, heads: int, device) -> int:
    """Packed sequences cut into pieces, decay=constant: how many programs share each piece's state-pass window
    (state_split's counterpart; 1: none). One program walking a slow head's whole reach bounds the pass (the TNL
    slopes' slowest: 4,258 tokens in bf16); so, as the batch path cuts its pieces, into sub-windows of at least 1024
    tokens, CONSTANT_STATE_CUTS at most. Measured on H100 (TNL, bf16, 65,536 tokens, H = 16, D = 128, session 26),
    one sequence as 8 pieces of 8K, ms fwd_state / bwd_state / the two scans, 1 -> 8: 0.065 / 0.065 / 0.014 ->
    0.036 / 0.035 / 0.023; the call 0.438 / 1.600 -> 0.417 / 1.576 ms fwd / fwd+bwd."""
    if device.type != "cuda" or variant.decay != "constant":
        return 1
    most = 2 * CONSTANT_STATE_CUTS if variant.state_rows * variant.dv <= SMALL_STATE else CONSTANT_STATE_CUTS
    return min(most, _piece_rule(variant, tokens, heads, device) // 1024)


def state_split(variant, shape, segments, device) -> int:
    """How many finer pieces each of the `segments` pieces is cut into for the state passes (1: none). A state
    pass runs on all pieces but one per sequence, P - 1 programs per pair: with few pairs they leave SMs idle
    (64 pairs of 16K as 2 pieces: 64 programs on 132 SMs). Finer pieces fill them; the scan then sums more
    states, and returns one per piece. As for segments(): the most with at most one program per SM, none under
    1024 tokens. Measured on H100 (bf16, 65,536 tokens, H * D = 2048, session 13), fwd / fwd+bwd ms by finer:
    TNL D = 128, 64 programs (16K): 1: 0.505 / 1.753, 2: 0.475 / 1.696, 4: 0.488 / 1.716, 8: 0.501 / 1.746;
    96 programs (32K): 1: 0.531 / 1.832, 2: 0.535 / 1.812, 4: 0.545 / 1.832; 112 (64K): 1: 0.539 / 1.899,
    2: 0.553 / 1.852. D = 64, 64 programs (32K): 1: 0.532 / 1.645, 2: 0.488 / 1.551, 4: 0.487 / 1.549.
    decay=none D = 128, 16K: 1: 0.487 / 1.685, 2: 0.479 / 1.661. Full TNL (LRPE-d, silu), 16K: 1: 1.771 / 8.118,
    2: 1.536 / 7.746, 4: 1.556 / 7.772; 64K: 1: 1.735 / 8.117, 2: 1.753 / 8.156."""
    if segments == 1 or device.type != "cuda" or _forced["pieces"] is not None:
        return 1
    b, n, h, _ = shape
    if variant.decay == "constant":
        small = variant.state_rows * variant.dv <= SMALL_STATE
        return _most_cuts(n, segments, 2 * CONSTANT_STATE_CUTS if small else CONSTANT_STATE_CUTS)
    return _most_cuts(n, segments, _sm_count(device) // (b * h * (segments - 1)))


# decay=constant's state passes walk only each head's reach of a boundary (split.py), mostly near the end of a piece
# (the start, backward): what is left is spread over many short pieces, whose programs mostly walk nothing, and the
# scan skips their empty states. Measured on H100 (TNL slopes, bf16, 65,536 tokens, H * D = 2048, session 15),
# kernels' GPU ms fwd+bwd by state pieces per piece, D = 128, 16K: 2 (the rule above): 1.614, 4: 1.599, 8: 1.568,
# 16: 1.597; 32K: 1: 1.717, 4: 1.610, 8: 1.596, 16: 1.660; 64K: 1: 1.719, 4: 1.626, 8: 1.641, 16: 1.701; without
# the windows 1.673 / 1.789 / 1.803. D = 64, 64K: 1: 1.461, 8: 1.402, 16: 1.400, 32: 1.428 (1.664 without). Past 8
# the scan, a walk over the state pieces one at a time, costs what the passes save (64K, D = 128: 0.013 ms at 1,
# 0.059 at 8, 0.133 at 16; loading 8 pieces at once was slower still). The price where a head hardly decays
# (slopes / 100, nothing left out), D = 128, 64K: 1.810 at 1, 1.915 at 8.
# Session 16's scan loads 8 pieces at a time (split.SCAN_UNROLL), and the reach follows the dtype (split.reach_bits):
# kernels' GPU ms fwd+bwd by state pieces per piece, bf16: D = 128, 32K: 8: 1.573, 16: 1.580, 32: 1.642; 64K: 8:
# 1.576, 16: 1.602, 32: 1.669 (the scan: 0.026 / 0.046 / 0.088). D = 64, 32K: 8: 1.377, 16: 1.371, 32: 1.369; 64K:
# 8: 1.390, 16: 1.380, 32: 1.383. The scan's cost per piece grows with the state; a state of at most SMALL_STATE
# entries (D = 64's 64 x 64) takes twice the pieces.
CONSTANT_STATE_CUTS = 8
SMALL_STATE = 64 * 64


def _most_cuts(n: int, pieces: int, most: int) -> int:
    """The largest power of two f <= most that cuts each of `pieces` equal pieces of an n-token sequence
    into f equal pieces of at least 1024 tokens (1 if none does)."""
    f = 1
    while 2 * f <= most and n % (2 * f * pieces) == 0 and n // (2 * f * pieces) >= 1024:
        f *= 2
    return f


def walked_length(variant, shape, dtype, device) -> int:
    """The sequence length each program walks for inputs of `shape` [B, N, H, D]: N, or a piece's under
    sequence splitting. Tuned entries are keyed and looked up by its bucket: 16K split into 4 pieces
    launches as 4K does, and takes the 4K entries."""
    return shape[1] // segments(variant, shape, dtype, device)


_SMS: dict = {}


def _sm_count(device) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


# torch.compile runs it when tracing and keeps the number. This is what torch.compiler.
# assume_constant_result(_sm_count) does; calling that at import would import torch._dynamo and with it
# Triton, before the CLI can choose Triton's interpreter (TRITON_INTERPRET is read at Triton's import).
_sm_count._dynamo_marked_constant = True
