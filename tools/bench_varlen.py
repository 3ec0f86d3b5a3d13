"""Packed sequences (cu_seqlens) on the GPU: lightgen with its long sequences cut into pieces, the same without
(every sequence one program per head, as before session 25), fla-core's `chunk_simple_gla` with the same
cu_seqlens (`chunk_gla` under decay=vector), and the HBM floor, in one process. Non-causal variants (decay=none cut
since session 25, decay=constant since session 28) run without fla, whose kernels are causal. Learned decays take g
from verify.random_log_decays (a gradient in every contender); fla's Hopper guard is lifted as `lightgen bench`
lifts it.

    PYTHONPATH=$PWD python -m tools.bench_varlen --json varlen.json

Each packing holds --tokens tokens (H * D = --hidden, bf16): one sequence; one long and several short; a
long-tailed mix (seeded); equal sequences as short as the pieces (nothing to cut). Times are eager ms (the least
of three do_bench medians; lightgen's call reads the offsets on the host, fla is handed them on the host too,
cu_seqlens_cpu) for the forward and the forward + backward, and each against the floor (q, k, v, o read or
written once forward; q, k, v, dO, dq, dk, dv backward; g read, and dg written, too; at the copy rate of the same
run). lightgen's pieces are checked against its unsplit run and fla's output (relative Frobenius difference of o and
the gradients). Each contender's kernels are also timed alone (the sum of their GPU times in one fwd+bwd,
torch.profiler): eager time less that is the host's.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch

import lightgen
from lightgen import bench, launch
from lightgen.spec import tnl_slopes
from lightgen.verify import random_log_decays, rel_err


def packings(tokens: int, seed: int = 0) -> dict[str, list[int]]:
    """name -> sequence lengths summing to `tokens`."""
    rng = random.Random(seed)
    mix, left = [], tokens
    while left:  # long-tailed: most sequences short, a few long (a pretraining pack of documents)
        n = min(left, max(1, int(rng.lognormvariate(7.0, 1.6))))
        mix.append(n)
        left -= n
    long = tokens * 7 // 8
    return {"one": [tokens], "long+short": [long] + [1024] * ((tokens - long) // 1024),
            "mix": mix, "equal 8K": [8192] * (tokens // 8192)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default="decay=constant,causal,dk=128,dv=128",
                   help="no LRPE, identity phi, no epilogue")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=2048, help="H * D")
    p.add_argument("--packings", help=f"comma-separated subset of {', '.join(packings(1 << 16))}")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--no-unsplit", action="store_true",
                   help="leave out lightgen with nothing cut (slow at long sequences: a program per head walks each)")
    p.add_argument("--no-fla", action="store_true",
                   help="leave out fla (its chunk_gla autotunes over 200 configs on first use: minutes)")
    args = p.parse_args(argv)
    known = packings(args.tokens)
    args.packings = args.packings.split(",") if args.packings else list(known)
    unknown = [name for name in args.packings if name not in known]
    if unknown:
        p.error(f"--packings: unknown {', '.join(unknown)}; expected names from {', '.join(known)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    attn = lightgen.compile(args.spec)
    variant = attn.variant
    if variant.lrpe != "none" or variant.phi_name != "identity" or variant.epilogue:
        raise SystemExit(f"--spec {args.spec}: expected a variant without LRPE, a feature map or an epilogue (the "
                         f"math fla's chunk_simple_gla / chunk_gla compute, causal)")
    heads = args.hidden // variant.dk
    copy_rate = bench.copy_bandwidth()
    slopes = torch.tensor(tnl_slopes(heads), device="cuda") if variant.decay == "constant" else None
    g = None
    if variant.learned_decay:
        dims = variant.dk if variant.decay == "vector" else None
        g = random_log_decays(1, args.tokens, heads, torch.Generator().manual_seed(0), dims=dims).cuda()
        bench.lift_fla_hopper_guard()
    ours_decay, fla_decay = bench._decays(variant, slopes, g)
    run_fla = variant.causal and not args.no_fla
    if not variant.causal:
        print("fla: not run (its kernels are causal only)")
    elif args.no_fla:
        print("fla: not run (--no-fla)")
    elif variant.decay == "vector":
        from fla.ops.gla import chunk_gla as fla_chunk
    else:
        from fla.ops.simple_gla import chunk_simple_gla as fla_chunk

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, args.tokens, heads)
    q, k = (torch.randn(*shape, variant.dk, device="cuda", generator=gen, dtype=torch.bfloat16) * variant.dk ** -0.25
            for _ in range(2))
    v, do = (torch.randn(*shape, variant.dv, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    leaves = [t.requires_grad_() for t in (q, k, v, *([] if g is None else [g]))]
    unit = args.tokens * args.hidden * 2 / copy_rate * 1e3  # ms of one [T, H * D] bf16 pass at the copy rate
    g_unit = 0.0 if g is None else g.numel() * 4 / copy_rate * 1e3  # g (fp32): read forward; read, dg written backward
    floor = {"fwd": 4 * unit + g_unit, "fwdbwd": 11 * unit + 3 * g_unit}
    rows = []
    for name, lengths in packings(args.tokens).items():
        if name not in args.packings:
            continue
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        cu = torch.tensor(offsets, dtype=torch.int32, device="cuda")
        cu_long, cu_cpu = cu.long(), torch.tensor(offsets)
        length = launch.piece_length(variant, sum(lengths), max(lengths), heads, q.device)
        calls = {"lightgen": lambda: attn(q, k, v, cu_seqlens=cu, **ours_decay)}
        if not args.no_unsplit:
            calls["lightgen unsplit"] = lambda: _unsplit(lambda: attn(q, k, v, cu_seqlens=cu, **ours_decay))
        if run_fla:
            calls["fla"] = lambda: fla_chunk(q, k, v, scale=variant.scale, cu_seqlens=cu_long, cu_seqlens_cpu=cu_cpu,
                                             **fla_decay)[0]
        row = {"packing": name, "sequences": len(lengths), "longest": max(lengths), "piece_length": length}
        for who, fn in calls.items():
            began = time.perf_counter()
            row[who] = {"fwd_ms": bench.eager_time(fn), "fwdbwd_ms": bench.eager_time(fn, grad_of=leaves, do=do)}
            kernels = bench.kernel_times(fn, leaves, do)  # the GPU's part of a fwd+bwd (eager adds the host's)
            row[who]["kernels_fwdbwd_ms"] = sum(entry["ms"] for entry in kernels.values())
            if who == "lightgen":
                row[who]["kernels"] = kernels
            # (where a run's time goes, compiles and autotuning included: a run cut short says which contender)
            print(f"  ({name}: {who} compiled and timed in {time.perf_counter() - began:.0f} s)", file=sys.stderr,
                  flush=True)
        row["agreement"] = {other: _agreement(calls["lightgen"], calls[other], leaves, do)
                            for other in calls if other != "lightgen"}
        rows.append(row)
        _print(row, floor)
    result = {"spec": variant.canonical(), "gpu": torch.cuda.get_device_name(), "tokens": args.tokens,
              "hidden": args.hidden, "copy_rate": copy_rate, "floor_ms": floor, "rows": rows}
    if args.json:
        bench.write_json(result, args.json)


def _unsplit(call):
    """call with no packed sequence cut into pieces."""
    saved = launch.piece_length
    launch.piece_length = lambda *a: 0
    try:
        return call()
    finally:
        launch.piece_length = saved


def _agreement(ours, theirs, leaves, do) -> float:
    """The largest relative difference of theirs' o, dq, dk, dv against ours'."""
    out = []
    for fn in (ours, theirs):
        o = fn()
        out.append([o.detach(), *torch.autograd.grad(o, leaves, do)])
    return max(rel_err(a, e) for a, e in zip(out[1], out[0]))


def _print(row, floor) -> None:
    print(f"{row['packing']}: {row['sequences']} sequences, longest {row['longest']}, pieces of "
          f"{row['piece_length'] or '- (none cut)'}")
    for who in ("lightgen", "lightgen unsplit", "fla"):
        if who not in row:
            continue
        t = row[who]
        print(f"  {who:17s} fwd {t['fwd_ms']:.3f} ms ({t['fwd_ms'] / floor['fwd']:.2f}x floor)  fwd+bwd "
              f"{t['fwdbwd_ms']:.3f} ms ({t['fwdbwd_ms'] / floor['fwdbwd']:.2f}x), its kernels "
              f"{t['kernels_fwdbwd_ms']:.3f} ms ({t['kernels_fwdbwd_ms'] / floor['fwdbwd']:.2f}x)")
    agreement = ", ".join(f"{who} {err:.1e}" for who, err in row["agreement"].items())
    print(f"  agreement with lightgen (o and gradients): {agreement}")


if __name__ == "__main__":
    main()
