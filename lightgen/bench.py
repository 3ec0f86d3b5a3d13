"""Benchmark a variant against the published kernels and the HBM floor, in one process on one GPU.

Contenders (each skipped with a note when not installed, never faked):
  lightgen        the compiled variant                              layout [B, N, H, D]
  fla             fla-core chunk_simple_gla(g_gamma=-slopes)        layout [B, N, H, D]
                  (decay=scalar: chunk_simple_gla(g=g), the same math with identity phi)
  lightning_attn  OpenNLPLab lightning_attn_func(q, k, v, slopes)   layout [B, H, N, D]
  sdpa            torch SDPA, causal as the variant (FlashAttention-2)  layout [B, H, N, D]
Peers compute constant-decay causal attention with identity phi (fla: per-token decay g for
decay=scalar); for other variants they are a yardstick of the field, not the same math. Floor: bytes moved once (fwd reads q, k, v and writes o;
bwd reads q, k, v, dO and writes dq, dk, dv) at the measured device copy bandwidth.
lightgen's row also breaks one fwd+bwd down by kernel (GPU time each, kernel_times), which shows what keeps
it from the floor. bench.json is rewritten after each row (atomically), so a run cut short keeps the rows it finished.

fla-core's Hopper guard: fla-core 0.6.0 refuses chunk_bwd_dqkwg with a per-token decay g on Hopper with
Triton 3.4 to 3.7.1 (fla issue #640: that Triton miscompiles the kernel at block width BK = 64; fla picks
BK = 128 on Hopper, so it is right at head dim 128 and wrong at 64). For a learned decay run() lifts the
guard (lift_fla_hopper_guard) to time the peer anyway, and records it (fla_guard_lifted).
Agreement check: where fla computes the same math as lightgen (causal, decay constant / scalar / vector,
identity phi, no LRPE, no epilogue), each row runs both once on the timed inputs and records fla's
relative errors against lightgen's (row["fla"]["vs_lightgen"]); above AGREE, the row marks fla's time as
one of wrong results (row["fla"]["wrong"]). lightgen's own correctness is tested elsewhere (verify.py).

decode(): one decode step for B sequences (`lightgen bench SPEC --decode`): lightgen's step kernel
against fla-core's fused_recurrent_simple_gla with one token (g_gamma, or g for decay=scalar; fused_recurrent_gla with
gk for decay=vector), and the floor of reading and writing
the fp32 state once (plus q, k, v, o).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
from pathlib import Path

import torch


# fla's results further than this from lightgen's (relative error of o or of a gradient) are wrong, not
# rounding: two kernels within bf16's tolerance (verify.TOLERANCE, 2.5e-2) of the exact result differ by less
AGREE = 0.05


def write_json(result, path):
    """Write `result` as JSON to `path` atomically: to a temp file in the same folder, then os.replace,
    so a run killed mid-write leaves the previous file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def lift_fla_hopper_guard() -> bool:
    """Let fla-core's chunk_bwd_dqkwg run with a per-token decay g on Hopper with Triton 3.4 to 3.7.1
    (fla issue #640; the guard tests the module-level flag TRITON_ABOVE_3_7_1 of fla.ops.common.chunk_o).
    True when the guard was there and is now lifted; False when fla is not importable or has no guard
    to lift. The results of the lifted kernel are checked against lightgen's (agreement) where they
    compute the same math."""
    try:
        chunk_o = importlib.import_module("fla.ops.common.chunk_o")
    except Exception:  # noqa: BLE001 - no fla-core (or a broken one): nothing to lift
        return False
    if getattr(chunk_o, "TRITON_ABOVE_3_7_1", True):
        return False
    chunk_o.TRITON_ABOVE_3_7_1 = True
    print("note: lifted fla-core's Hopper guard in chunk_bwd_dqkwg (fla #640: Triton 3.4-3.7.1 miscompiles it at "
          "BK=64) for timing; where fla computes the same math, its results are checked against lightgen's below")
    return True


def agreement(ours, theirs, args, do, g=None) -> dict[str, float]:
    """Relative errors (verify.rel_err) of theirs' o, dq, dk, dv (and dg, the gradient of the log decays g
    both functions close over) against ours', each function called once on args = (q, k, v) with the
    output gradient do. dg's error is measured as verify.compare measures it (relative to the size of the
    sums it is the difference of), so rounding where those sums cancel is not counted as a difference."""
    from .verify import _dg_scale, rel_err

    q, k = args[:2]
    wrt = [*args] + ([g] if g is not None else [])
    names = ["o", "dq", "dk", "dv"] + (["dg"] if g is not None else [])
    with torch.enable_grad():  # the bench may be timing under no_grad; torch.autograd.grad leaves .grad alone
        o = ours(*args)
        expected = [o.detach(), *torch.autograd.grad(o, wrt, do)]
        o = theirs(*args)
        actual = [o.detach(), *torch.autograd.grad(o, wrt, do)]
        del o  # theirs' graph goes with it
    scales = {"dg": _dg_scale(q, k, expected[1], expected[2], q.dtype, per_dim=g.dim() == 4)} \
        if g is not None else {}
    return {name: rel_err(a, e, scales.get(name, 0.0)) for name, a, e in zip(names, actual, expected)}


def _worst(errors) -> float:
    """The largest of the errors, NaN first (a NaN is the worst disagreement)."""
    return max(errors.values(), key=lambda e: math.inf if math.isnan(e) else e)


def copy_bandwidth(device="cuda") -> float:
    """Device-to-device copy rate in bytes/s (read + write counted)."""
    from triton.testing import do_bench

    x = torch.empty(2**28, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=20, rep=200, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


REPEATS = 3  # timings per measurement; the fastest median counts


def eager_time(fn, grad_of=None, do=None):
    """Eager ms of fn (or of fn's backward too, with grad_of): the least of REPEATS medians. At these sizes a
    call's host work (a few hundred microseconds per launch sequence, from Python through the Triton
    launcher) is near its GPU time, so a host hiccup can leave the GPU idle inside a timed call; such noise
    only ever adds (H100, D = 64, 64K: 1.738 / 2.371 / 2.235 ms in one process, 1.712 replayed from a CUDA
    graph). Every contender is timed the same way."""
    from triton.testing import do_bench

    if grad_of is None:
        with torch.no_grad():
            return min(do_bench(fn, warmup=10, rep=60, return_mode="median") for _ in range(REPEATS))

    def step():
        fn().backward(do)
    return min(do_bench(step, warmup=10, rep=60, return_mode="median", grad_to_none=grad_of) for _ in range(REPEATS))


def _step(fn, grad_of=None, do=None):
    """One call of fn, or of fn and its backward (grad_of: the leaves, whose gradients each call writes
    fresh, as grad_to_none gives eager timing)."""
    def step():
        if grad_of is None:
            fn()
            return
        for t in grad_of:
            t.grad = None
        fn().backward(do)
    return step


def kernel_times(fn, grad_of, do, calls=10) -> dict[str, dict]:
    """Where one forward + backward of fn spends its GPU time: {kernel: {"ms": GPU ms per fwd+bwd, "launches":
    per fwd+bwd}}, slowest first, from torch.profiler's CUDA events over `calls` calls (after warm-up). The
    lightgen row's kernels: which of them keeps the call from its floor (each kernel against the bytes it
    moves), and what the host adds (the eager time less their sum)."""
    from torch.profiler import ProfilerActivity, profile

    step = _step(fn, grad_of, do)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    return tally(((e.name, e.device_time_total) for e in prof.events() if e.device_type.name == "CUDA"), calls)


def tally(events, calls) -> dict[str, dict]:
    """(kernel name, GPU microseconds) events of `calls` calls -> kernel_times' table (names cut at 60 characters:
    torch's elementwise kernels have templated names of hundreds)."""
    table: dict[str, dict] = {}
    for name, us in events:
        entry = table.setdefault(name[:60], {"ms": 0.0, "launches": 0})
        entry["ms"] += us / 1e3 / calls
        entry["launches"] += 1
    for entry in table.values():
        entry["launches"] = round(entry["launches"] / calls)
    return dict(sorted(table.items(), key=lambda item: -item[1]["ms"]))


# Contenders never captured. Both failed on the H100 (cudaErrorStreamCaptureInvalidated; torch 2.11, lightning-attn
# 0.0.5, 2026-11-24), and after lightning-attn's failure every later capture and check of the run ran out of memory.
NOT_CAPTURED = {"lightning_attn": "not tried: its capture fails and keeps its memory (lightning-attn 0.0.5, H100)",
                "sdpa": "not tried: its capture fails (torch 2.11, H100)"}


def _graph_time(fn, grad_of=None, do=None):
    """GPU time of fn (or of fn's backward too, with grad_of), replayed from a CUDA graph: no host
    overhead. As a serving engine runs a decode step (its kernel takes tens of microseconds, about what
    the Python around it takes), and what a call costs inside a model, whose other layers' GPU work
    hides the host's: torch's autograd engine alone takes ~0.35 ms of host per backward on the H100's
    host (an empty mul-and-sum), near a whole split fwd+bwd's GPU time at D = 64."""
    from triton.testing import do_bench

    step = _step(fn, grad_of, do)
    with torch.no_grad() if grad_of is None else contextlib.nullcontext():
        side = torch.cuda.Stream()  # warm up (compile, autotune) off the capture, as CUDA graphs require
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return do_bench(graph.replay, warmup=10, rep=60, return_mode="median")


def _decays(variant, slopes, g):
    """(lightgen's, fla's) decay keyword arguments: slopes / g_gamma, or g ([B, N, H] for decay=scalar,
    [B, N, H, dk] for decay=vector)."""
    if variant.decay in ("scalar", "vector"):
        return {"g": g}, {"g": g}
    return ({"slopes": slopes} if variant.decay == "constant" else {}), ({} if slopes is None else {"g_gamma": -slopes})


def contenders(attn, slopes, theta, g=None):
    """name -> (function of [B,N,H,D] q, k, v returning o, whether it wants [B,H,N,D]). g: the log
    decays of decay=scalar / vector."""
    ours, theirs = _decays(attn.variant, slopes, g)
    out = {"lightgen": (lambda q, k, v: attn(q, k, v, theta=theta, **ours), False)}
    try:  # fla's kernel for the same math: chunk_gla for per-dim decays, else chunk_simple_gla
        if attn.variant.decay == "vector":
            from fla.ops.gla import chunk_gla as fla_chunk
        else:
            from fla.ops.simple_gla import chunk_simple_gla as fla_chunk
        scale = attn.variant.scale
        out["fla"] = (lambda q, k, v: fla_chunk(q, k, v, scale=scale, **theirs)[0], False)
    except Exception as err:  # noqa: BLE001 - report any import failure as a skip
        print(f"note: fla-core not available ({type(err).__name__}: {err}); skipped")
    try:
        from lightning_attn.ops import lightning_attn_func
        out["lightning_attn"] = (lambda q, k, v: lightning_attn_func(q, k, v, slopes[:, None, None]), True)
    except Exception as err:  # noqa: BLE001
        print(f"note: lightning-attn not available ({type(err).__name__}: {err}); skipped")
    causal = attn.variant.causal  # softmax attention over the same rows: a non-causal variant's peer attends to all
    out["sdpa"] = (lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal), True)
    return out


def _theta(variant, heads):
    """TransNormerLLM's LRPE angles 10000^(-2i/(H dk)) as [H, dk] (None without LRPE)."""
    if variant.lrpe != "d":
        return None
    d = heads * variant.dk
    return (10000 ** (-2 * torch.arange(d, device="cuda") / d)).view(heads, variant.dk)


def run(spec, tokens=65536, hidden=2048, seqlens=(1024, 2048, 4096, 8192, 16384, 32768, 65536),
        dtype=torch.bfloat16, out_dir=None, only=None) -> dict:
    from .ops import compile as compile_variant
    from .spec import tnl_slopes
    from .verify import random_log_decays

    attn = compile_variant(spec)
    variant = attn.variant
    if variant.dk != variant.dv:
        raise ValueError(f"spec: the benchmark compares square heads; got dk={variant.dk}, dv={variant.dv}")
    d = variant.dk
    heads = hidden // d
    bw = copy_bandwidth()
    result = {"variant": variant.canonical(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "dtype": str(dtype), "copy_GBps": bw / 1e9, "rows": []}
    print(f"{result['device']}: copy {bw / 1e9:.0f} GB/s; {variant.canonical()}; {tokens} tokens, H={heads}, D={d}")
    result["fla_guard_lifted"] = lift_fla_hopper_guard() if variant.learned_decay else False
    # fla computes this variant's math (else it is a yardstick; with decay=none it still gets g_gamma)
    fla_same_math = variant.causal and variant.decay != "none" and variant.lrpe == "none" \
        and variant.phi_expr == "x" and not variant.epilogue
    out = Path(out_dir) if out_dir else None
    slopes = torch.tensor(tnl_slopes(heads), device="cuda")
    theta = _theta(variant, heads)
    capture_failed = None  # after one, no more captures in this process: its memory pool may stay taken
    for n in seqlens:
        b = max(1, tokens // n)
        elems = b * n * heads * d
        nbytes = torch.finfo(dtype).bits // 8
        floor_f = 4 * elems * nbytes / bw * 1e3
        floor_fb = floor_f + 7 * elems * nbytes / bw * 1e3
        row = {"N": n, "B": b, "H": heads, "D": d, "floor_fwd_ms": floor_f, "floor_fwdbwd_ms": floor_fb}
        g = torch.Generator(device="cuda").manual_seed(0)
        base = [torch.randn(b, n, heads, d, device="cuda", dtype=dtype, generator=g) * d ** -0.25 for _ in range(3)]
        do = torch.randn(b, n, heads, d, device="cuda", dtype=dtype, generator=g)
        # decay=scalar: g gets a gradient in every contender that takes it
        dims = d if variant.decay == "vector" else None
        log_decays = random_log_decays(b, n, heads, torch.Generator().manual_seed(0), dims=dims).cuda() \
            .requires_grad_() if variant.decay in ("scalar", "vector") else None
        fns = contenders(attn, slopes, theta, log_decays)
        for name, (fn, head_first) in fns.items():
            if only and name not in only:
                continue
            if name == "sdpa" and n > 16384:
                row[name] = {"skipped": "quadratic; too slow at this N"}
                continue
            tr = (lambda t: t.transpose(1, 2).contiguous()) if head_first else (lambda t: t)
            q, k, v = (tr(t).requires_grad_() for t in base)
            row[name] = {}
            leaves = [q, k, v] + ([log_decays] if log_decays is not None else [])
            try:  # a peer failing at one shape is a result, not a crash; its forward may still count
                row[name]["fwd_ms"] = eager_time(lambda: fn(q, k, v))
                row[name]["fwdbwd_ms"] = eager_time(lambda: fn(q, k, v), do=tr(do), grad_of=leaves)
            except Exception as err:  # noqa: BLE001
                row[name]["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            if name in NOT_CAPTURED or capture_failed:
                row[name]["graph_error"] = NOT_CAPTURED.get(name) or f"not tried: {capture_failed}"
            else:
                try:  # the same from a CUDA graph: the GPU's time, where the eager call's host work sets the pace
                    row[name]["graph"] = {"fwd_ms": _graph_time(lambda: fn(q, k, v)),
                                          "fwdbwd_ms": _graph_time(lambda: fn(q, k, v), do=tr(do), grad_of=leaves)}
                except Exception as err:  # noqa: BLE001 - a peer that cannot be captured keeps its eager times
                    row[name]["graph_error"] = f"{type(err).__name__}: {str(err)[:200]}"
                    capture_failed = f"{name}'s capture failed at N = {n} (a failed capture can keep its memory)"
                    torch.cuda.synchronize()
            if name == "lightgen" and "fwdbwd_ms" in row[name]:
                try:  # a profiler that cannot run (no CUPTI) leaves the timings standing
                    row[name]["kernels"] = kernel_times(lambda: fn(q, k, v), leaves, tr(do))
                except Exception as err:  # noqa: BLE001
                    row[name]["kernels_error"] = f"{type(err).__name__}: {str(err)[:200]}"
            if name == "fla" and fla_same_math and "fwdbwd_ms" in row[name]:
                try:  # the same inputs as timed: is fla's time one of right results?
                    errors = agreement(fns["lightgen"][0], fn, (q, k, v), do, log_decays)
                    row[name].update(vs_lightgen=errors, wrong=not _worst(errors) <= AGREE)
                except Exception as err:  # noqa: BLE001 - an OOM here leaves the timings standing
                    row[name]["vs_lightgen_error"] = f"{type(err).__name__}: {str(err)[:200]}"
                torch.cuda.empty_cache()
            del q, k, v
        result["rows"].append(row)
        _print_row(row)
        if out:
            write_json(result, out / "bench.json")
        torch.cuda.empty_cache()
    if out:
        write_json(result, out / "bench.json")
        plot(result, out / "bench.png")
    return result


def decode(spec, batch=64, hidden=2048, dtype=torch.bfloat16, out_dir=None, only=None, sweep=False,
           position=4096) -> dict:
    """Time one decode step of B = batch sequences with H = hidden // D heads (D = max(dk, dv)).

    Floor: the fp32 state [B, H, F, dv] read and written once, plus q, k, v read and o written, at the
    measured copy bandwidth. fla's state has F = dk (no LRPE): for an LRPE variant it moves half the
    bytes, and only constant decay with identity phi is the same math. sweep=True also times the
    step under a grid of launch parameters (BV, num_warps), to choose the heuristic from."""
    from . import launch
    from .ops import compile as compile_variant
    from .spec import tnl_slopes
    from .verify import random_log_decays, rel_err

    attn = compile_variant(spec)
    variant = attn.variant
    if not variant.causal:
        raise ValueError(f"spec: the decode step needs a causal variant, got {variant.canonical()}")
    heads = hidden // max(variant.dk, variant.dv)
    bw = copy_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(batch, heads, variant.dk, device="cuda", generator=g).mul(variant.dk ** -0.25).to(dtype)
            for _ in range(2))
    v = torch.randn(batch, heads, variant.dv, device="cuda", generator=g).to(dtype)
    state = attn.new_state(batch, heads, "cuda").normal_(generator=g).mul_(0.1)
    slopes = torch.tensor(tnl_slopes(heads), device="cuda") if variant.decay != "none" else None
    g = random_log_decays(batch, 1, heads, torch.Generator().manual_seed(0),
                          dims=variant.dk if variant.decay == "vector" else None)[:, 0].cuda() \
        if variant.learned_decay else None  # the token's log decays [B, H] (vector: [B, H, dk])
    ours_decay, fla_decay = _decays(variant, slopes, g)
    theta = _theta(variant, heads)
    nbytes = torch.finfo(dtype).bits // 8
    floor_bytes = 2 * state.numel() * 4 + batch * heads * (2 * variant.dk + 2 * variant.dv) * nbytes
    result = {"variant": variant.canonical(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "dtype": str(dtype), "copy_GBps": bw / 1e9,
              "B": batch, "H": heads, "state_MB": state.numel() * 4 / 1e6, "floor_ms": floor_bytes / bw * 1e3}
    print(f"{result['device']}: copy {bw / 1e9:.0f} GB/s; {variant.canonical()}; decode step B={batch} H={heads}, "
          f"state {list(state.shape)} fp32 ({result['state_MB']:.1f} MB); floor {result['floor_ms'] * 1e3:.1f} us")

    def ours():
        return attn.step(q, k, v, state, theta=theta, position=position, **ours_decay)

    contenders = {"lightgen": ours}
    if variant.decay == "none":
        print("note: fla's fused_recurrent_simple_gla needs a decay; skipped")
    else:
        try:
            fla_recurrent = _fla_recurrent(variant)
            contenders["fla"] = _fla_step(fla_recurrent, q, k, v, fla_decay, variant.scale, variant.dk)
            if variant.lrpe == "d" or variant.phi_expr != "x":
                print("note: fla computes identity phi without LRPE (a state of F = dk rows): a yardstick here, "
                      "not the same math")
        except Exception as err:  # noqa: BLE001 - report any import failure as a skip
            print(f"note: fla-core not available ({type(err).__name__}: {err}); skipped")
    # ms: replayed from a CUDA graph (the kernels alone, as served); eager_ms: called from Python
    for name, fn in contenders.items():
        if only and name not in only:
            continue
        try:
            eager = eager_time(fn)
            ms = _graph_time(fn)
            result[name] = {"ms": ms, "x_floor": ms / result["floor_ms"], "eager_ms": eager}
        except Exception as err:  # noqa: BLE001 - a peer failing is a result, not a crash
            result[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        print(f"  {name:9s} " + (f"{ms * 1e3:8.1f} us  {ms / result['floor_ms']:.2f}x floor (CUDA graph; "
                                 f"{eager * 1e3:.1f} us called from Python)"
                                 if "ms" in result[name] else result[name]["error"]), flush=True)
    if "ms" in result.get("lightgen", {}) and "ms" in result.get("fla", {}):
        result["fla_over_lightgen"] = result["fla"]["ms"] / result["lightgen"]["ms"]
        print(f"  fla takes {result['fla_over_lightgen']:.2f}x the time of lightgen (CUDA graphs; above 1: "
              f"lightgen is faster)")
    if "ms" in result.get("fla", {}) and variant.lrpe == "none" and variant.phi_expr == "x":
        with torch.no_grad():  # the same math: one step from the same state must agree
            start = state.clone()
            ours_o = attn.step(q, k, v, start.clone(), **ours_decay)
            fla_o = _fla_step(fla_recurrent, q, k, v, fla_decay, variant.scale, variant.dk, start)()
        result["fla_rel_diff"] = rel_err(ours_o, fla_o)
        print(f"  lightgen vs fla output, one step from the same state: relative difference {result['fla_rel_diff']:.1e}")
    if sweep:
        result["sweep"] = []
        default = launch.heuristic(variant, "step", interpreted=False)
        for bv in (t for t in (16, 32, 64, 128) if t <= variant.dv):
            for warps in (1, 2, 4, 8):
                try:
                    with launch.override({"BV": bv, "num_warps": warps}):
                        ms = eager_time(ours)
                except Exception as err:  # noqa: BLE001 - a config that does not compile is a result
                    ms = float("inf")
                    print(f"    BV={bv} num_warps={warps}: {type(err).__name__}: {str(err)[:120]}")
                result["sweep"].append({"BV": bv, "num_warps": warps, "ms": ms})
        print(f"  sweep (default BV={default['BV']}, num_warps={default['num_warps']}), fastest first:")
        for r in sorted(result["sweep"], key=lambda r: r["ms"]):
            print(f"    BV={r['BV']:3d} num_warps={r['num_warps']}  {r['ms'] * 1e3:8.1f} us  "
                  f"{r['ms'] / result['floor_ms']:.2f}x floor")
    if out_dir:
        write_json(result, Path(out_dir) / "decode.json")
    return result


def _fla_recurrent(variant):
    """fla-core's recurrent kernel for the variant's decay, as f(q, k, v, g_gamma= / g=, ...): fused_recurrent_gla
    (its per-key-dim decay is called gk) for decay=vector, else fused_recurrent_simple_gla."""
    if variant.decay == "vector":
        from fla.ops.gla import fused_recurrent_gla
        return lambda q, k, v, g, **kw: fused_recurrent_gla(q, k, v, gk=g, **kw)
    from fla.ops.simple_gla import fused_recurrent_simple_gla
    return fused_recurrent_simple_gla


def _fla_step(fla_recurrent, q, k, v, decay, scale, dk, initial_state=None):
    """fla-core's recurrent kernel (_fla_recurrent) on one token ([B, 1, H, D]) from a fresh fp32 state
    [B, H, dk, dv]; decay: {"g_gamma": [H]} or {"g": [B, H] or [B, H, dk]} (one token's log decays)."""
    q, k, v = (t[:, None] for t in (q, k, v))
    decay = {name: t[:, None] if name == "g" else t for name, t in decay.items()}
    if initial_state is None:
        initial_state = torch.zeros(q.shape[0], q.shape[2], dk, v.shape[-1], device=q.device, dtype=torch.float32)

    def step():
        return fla_recurrent(q, k, v, **decay, scale=scale, initial_state=initial_state,
                             output_final_state=True)[0][:, 0]
    return step


def _print_row(row):
    cells = [f"N={row['N']:6d} B={row['B']:3d} floor {row['floor_fwd_ms']:.3f}/{row['floor_fwdbwd_ms']:.3f} ms"]
    ours = row.get("lightgen", {})
    for name in ("lightgen", "fla", "lightning_attn", "sdpa"):
        r = row.get(name)
        if not r or "fwd_ms" not in r:
            continue
        if "fwdbwd_ms" not in r:  # the forward ran, the backward failed (r["error"] says why)
            cell = f"{name} {r['fwd_ms']:.3f}/- ({r['fwd_ms'] / row['floor_fwd_ms']:.2f}x floor"
            if name != "lightgen" and "fwd_ms" in ours:
                cell += f"; ours {r['fwd_ms'] / ours['fwd_ms']:.2f}x faster; no backward: {r['error'][:60]}"
            cells.append(cell + ")")
            continue
        cell = f"{name} {r['fwd_ms']:.3f}/{r['fwdbwd_ms']:.3f} ({r['fwd_ms'] / row['floor_fwd_ms']:.2f}x/" \
               f"{r['fwdbwd_ms'] / row['floor_fwdbwd_ms']:.2f}x floor"
        if name != "lightgen" and "fwdbwd_ms" in ours:
            cell += f"; ours {r['fwd_ms'] / ours['fwd_ms']:.2f}x/{r['fwdbwd_ms'] / ours['fwdbwd_ms']:.2f}x faster"
        cell += _graph_note(r, ours)
        cell += _agreement_note(r)
        cells.append(cell + ")")
    print(" | ".join(cells), flush=True)
    kernels = ours.get("kernels")
    if kernels:
        total = sum(entry["ms"] for entry in kernels.values())
        print("  lightgen's kernels per fwd+bwd (GPU ms): " + ", ".join(
            f"{name} {entry['ms']:.3f}" + (f" (x{entry['launches']})" if entry["launches"] != 1 else "")
            for name, entry in kernels.items()) + f"; sum {total:.3f} of {ours['fwdbwd_ms']:.3f} eager", flush=True)


def _graph_note(r, ours) -> str:
    """The cell's CUDA-graph times (and, for a peer, lightgen's speed-up by them)."""
    graph, base = r.get("graph"), ours.get("graph")
    if "graph_error" in r:
        return f"; no CUDA graph: {r['graph_error'][:60]}"
    if not graph:
        return ""
    note = f"; graph {graph['fwd_ms']:.3f}/{graph['fwdbwd_ms']:.3f}"
    if base is not None and graph is not base:
        note += f", ours {graph['fwd_ms'] / base['fwd_ms']:.2f}x/{graph['fwdbwd_ms'] / base['fwdbwd_ms']:.2f}x faster"
    return note


def _agreement_note(r) -> str:
    """The cell's words on a peer's agreement check (empty where none ran)."""
    if "vs_lightgen_error" in r:
        return f"; not checked against lightgen: {r['vs_lightgen_error'][:60]}"
    if "vs_lightgen" not in r:
        return ""
    worst = _worst(r["vs_lightgen"])
    if r["wrong"]:
        return f"; !! fla results differ from lightgen's (max rel err {worst:.2g}): its time is of wrong results"
    return f"; agrees with lightgen (max rel err {worst:.1e})"


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not installed; no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("fwd_ms", "fwdbwd_ms"), ("forward", "forward + backward")):
        rows = result["rows"]
        for name in ("lightgen", "fla", "lightning_attn", "sdpa"):
            pts = [(r["N"], r[name][key] * 1e6 / (r["B"] * r["N"])) for r in rows if key in r.get(name, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        floor = "floor_fwd_ms" if key == "fwd_ms" else "floor_fwdbwd_ms"
        ax.plot([r["N"] for r in rows], [r[floor] * 1e6 / (r["B"] * r["N"]) for r in rows], "k--", label="HBM floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N (tokens per batch fixed)")
        ax.set_ylabel("ns per token")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['variant']} -- {result['device']}, {result['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("spec", nargs="?", default="decay=constant,causal,dk=128,dv=128,scale=1")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--seqlens", default="1024,2048,4096,8192,16384,32768,65536")
    p.add_argument("--only", default="")
    a = p.parse_args()
    run(a.spec, seqlens=[int(s) for s in a.seqlens.split(",")], out_dir=a.out,
        only=set(a.only.split(",")) if a.only else None)
