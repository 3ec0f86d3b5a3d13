"""Command line: lightgen build | show | tune | bench | cache ...   (`lightgen COMMAND --help` for each)."""
from __future__ import annotations

import argparse
import os
import sys
import time

BENCH_NAMES = ("lightgen", "fla", "lightning_attn", "sdpa")
SPEC_HELP = ("variant spec, e.g. 'decay=constant,causal,lrpe=d,phi=silu,dk=128,dv=128' "
             "(keys: decay=none|constant|scalar, causal|noncausal, lrpe=none|d, phi=NAME|EXPR, dk, dv, scale)")
TNL_SPEC = "decay=constant,causal,lrpe=d,phi=silu,dk=128,dv=128,scale=1"


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        # no GPU: run the Triton kernels under the interpreter (must be set before kernels are imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return choice


def cmd_build(args) -> int:
    device = _device(args.device)
    import torch

    from . import configs
    from .spec import Variant
    from .verify import SLACK, TOLERANCE, compare, failures
    from .ops import compile as compile_variant

    variant = Variant.parse(args.spec)
    attn = compile_variant(variant)
    print(f"variant : {variant.canonical()}")
    print(f"kernels : {attn.source_path}")
    if args.no_check:
        return 0
    dtype = configs.torch_dtype(args.dtype or ("bf16" if device == "cuda" else "fp32"))
    if device == "cpu" and dtype == torch.bfloat16:
        raise SystemExit("--dtype bf16: Triton's interpreter computes bf16 dots wrongly; check bf16 on a GPU")
    errors = compare(variant, b=args.batch, n=args.seqlen, h=args.heads, dtype=dtype, device=device)
    tol = TOLERANCE[dtype]
    bad = failures(errors, dtype)
    print(f"check   : B={args.batch} N={args.seqlen} H={args.heads} {dtype} on {device}"
          f"{' (Triton interpreter)' if device == 'cpu' else ''}, relative error vs float64 reference:")
    for name, err in errors.items():
        print(f"  {name:7s} {err:.2e}  {'FAIL' if name in bad else 'ok'}")
    worst = max(errors.values())
    print(f"max error {worst:.2e} (tolerance {tol:g}{', dg x' + format(SLACK['dg'], 'g') if 'dg' in errors else ''}): "
          f"{'FAIL' if bad else 'ok'}")
    return 1 if bad else 0


def cmd_show(args) -> int:
    from . import build
    from .ops import compile as compile_variant

    attn = compile_variant(args.spec)
    sys.stdout.write(attn.source(args.module) if not args.path else f"{build.ensure_source(attn.variant, args.module)}\n")
    return 0


def cmd_inspect(args) -> int:
    import triton

    from . import resources

    config = _config(args.config) if args.config else None
    kernels = args.kernels.split(",") if args.kernels else None
    results = resources.inspect(args.spec, arch=args.arch, dtype=args.dtype, n=_ints(args.seqlen, "--seqlen")[0],
                                kernels=kernels, config=config)
    print(f"{args.spec}: compiled for {args.arch} by Triton {triton.__version__}, {args.dtype}, "
          f"launch configs for N = {args.seqlen}")
    print(resources.table(results))
    if args.dump:
        for path in resources.dump(results, args.dump):
            print(f"wrote {path}")
    return 0


def _config(text: str) -> dict:
    """'C=32,BV=64,num_warps=8' -> {"C": 32, "BV": 64, "num_warps": 8}."""
    config = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--config: {item!r} is not NAME=INTEGER (e.g. C=32,BV=64,num_warps=8,num_stages=3)")
        config[name.strip()] = int(value)
    return config


def _ints(text: str, what: str) -> tuple[int, ...]:
    """'1024,8k,64K' -> (1024, 8192, 65536)."""
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        scale = 1024 if item.endswith("k") else 1
        try:
            value = int(item.removesuffix("k")) * scale
        except ValueError:
            raise ValueError(f"{what}: {item!r} is not an integer (e.g. 1024,8k,64k)") from None
        if value < 1:
            raise ValueError(f"{what}: {item!r} must be positive")
        values.append(value)
    return tuple(values)


def _no_cuda(command: str) -> ValueError:
    return ValueError(f"{command}: no CUDA device is available; it measures GPU kernels"
                      + (" (--device cpu runs a dry run under Triton's interpreter)" if command == "tune" else ""))


def cmd_tune(args) -> int:
    import torch

    from . import configs, launch, tune
    from .spec import Variant

    variant = Variant.parse(args.spec)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else None
    if device != "cpu":
        if not torch.cuda.is_available():
            raise _no_cuda("tune")
        count = torch.cuda.device_count()
        if args.gpu != "auto" and not (args.gpu.isdigit() and int(args.gpu) < count):
            raise ValueError(f"--gpu {args.gpu}: expected auto or a device index below {count}")
        device = "cuda" if args.gpu == "auto" else f"cuda:{args.gpu}"
    dry = device == "cpu"  # the trial worker runs the interpreter: tiny shapes, timings only exercise the pipeline
    if args.commit and dry:
        raise ValueError("--commit: dry-run timings on the CPU are not worth shipping")
    try:
        tune._import_optuna()  # fail before any work, with the install hint
    except ImportError as err:
        raise ValueError(str(err)) from None
    seqlens = _ints(args.seqlens, "--seqlens") if args.seqlens else ((32, 64) if dry else tune.SEQLENS)
    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else (("fp32",) if dry else ("bf16", "fp16"))
    kernels = tuple(args.kernels.split(",")) if args.kernels else tune.KERNELS
    tokens = args.tokens or (128 if dry else 65536)
    hidden = args.hidden or (2 * max(variant.dk, variant.dv) if dry else 2048)
    directory = configs.shipped_dir() if args.commit else None
    start = time.monotonic()
    results = tune.tune(variant, seqlens=seqlens, dtypes=dtypes, kernels=kernels, device=device, tokens=tokens,
                        hidden=hidden, trials=args.trials or (3 if dry else 40), time_budget_s=args.time_budget,
                        storage=args.storage, directory=directory, seed=args.seed, trial_timeout_s=args.trial_timeout,
                        jobs=args.jobs)
    print(f"{'kernel':7s} {'dtype':5s} {'N':>6s} {'default ms':>10s} {'best ms':>9s} {'speedup':>7s}  trials  params")
    for r in results:
        head = f"{r['kernel']:7s} {r['dtype']:5s} {r['n']:6d}"
        if "same_as" in r:
            print(f"{head}  launches as N={r['same_as']} does (pieces of {r['walked']}): that study's entry serves")
            continue
        if "ms" not in r:
            print(f"{head}  {r['error']}")
            continue
        base = f"{r['default_ms']:10.4f}" if r["default_ms"] else f"{'-':>10s}"
        gain = f"{r['default_ms'] / r['ms']:6.2f}x" if r["default_ms"] else f"{'-':>7s}"
        tried = f"{r['trials']} ({r['screened']} screened, {r['failed']} failed, {r['wrong']} wrong; {r['seconds']:.0f} s)"
        pieces = f"  (as pieces of {r['walked']}: entry of bucket {r['key'].n_bucket})" if r["walked"] != r["n"] else ""
        print(f"{head} {base} {r['ms']:9.4f} {gain}  {tried}  {r['params']}{pieces}")
    store = directory or configs.user_dir()
    print(f"{sum(r['recorded'] for r in results)} new or faster entries recorded in {store}; "
          f"{sum('seconds' in r for r in results)} studies in {time.monotonic() - start:.0f} s")
    if len(results) < len(seqlens) * len(dtypes) * len([k for k in kernels if k in launch.kernels(variant)]):
        print("time budget reached before every study ran: run the same command again to resume")
    return 0 if all("ms" in r or "same_as" in r for r in results) else 1


def cmd_bench(args) -> int:
    import torch

    from . import bench, configs
    from .spec import Variant

    Variant.parse(args.spec)  # a bad spec is an error before anything else
    if not torch.cuda.is_available():
        raise _no_cuda("bench")
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - set(BENCH_NAMES)
    if unknown:
        raise ValueError(f"--only: unknown {', '.join(sorted(unknown))} (choose from {', '.join(BENCH_NAMES)})")
    dtype = configs.torch_dtype(args.dtype)
    if args.decode:
        other = (only or set()) - {"lightgen", "fla"}
        if other:
            raise ValueError(f"--only: {', '.join(sorted(other))} has no decode step (choose from lightgen, fla)")
        bench.decode(args.spec, batch=args.batch, hidden=args.hidden, dtype=dtype, out_dir=args.out, only=only,
                     sweep=args.sweep)
        return 0
    bench.run(args.spec, tokens=args.tokens, hidden=args.hidden, seqlens=_ints(args.seqlens, "--seqlens"),
              dtype=dtype, out_dir=args.out, only=only)
    return 0


def cmd_cache(args) -> int:
    from . import configs

    if args.action == "list":
        rows = configs.entries()
        for key, value in rows:
            print(f"{key.arch:6s} {key.triton:5s} {key.variant} {key.kernel:7s} dk={key.dk:<4d} dv={key.dv:<4d} "
                  f"{key.dtype:5s} N~{key.n_bucket:<7d} {value['ms']:.4f} ms  {value['params']}")
        print(f"{len(rows)} entries (user store {configs.user_dir()}, shipped {configs.shipped_dir()})")
    elif args.action == "export":
        print(f"exported {configs.export_entries(args.files[0])} entries to {args.files[0]}")
    elif args.action == "import":
        print(f"imported {configs.import_entries(args.files[0])} new or faster entries from {args.files[0]}")
    elif args.action == "merge":
        out = args.output or args.files[0]
        print(f"merged into {out}: {configs.merge_files(args.files[0], args.files[1], out)} entries")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightgen", description="Compile linear-attention variants into Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="render, import and check a variant's kernels against the reference",
                       description="Render and import the variant's kernels, then check forward and gradients "
                                   "against the float64 reference on small random inputs (under Triton's "
                                   "interpreter when there is no GPU).")
    b.add_argument("spec", help=SPEC_HELP)
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default bf16 on a GPU, fp32 on the CPU")
    b.add_argument("--batch", type=int, default=2)
    b.add_argument("--seqlen", type=int, default=77, help="default 77: not a multiple of the chunk")
    b.add_argument("--heads", type=int, default=2)
    b.add_argument("--no-check", action="store_true", help="only render and import")
    b.set_defaults(fn=cmd_build)

    s = sub.add_parser("show", help="print the generated kernel source", description="Print the generated source.")
    s.add_argument("spec", help=SPEC_HELP)
    s.add_argument("--path", action="store_true", help="print only the file's path")
    s.add_argument("--module", choices=("main", "varlen", "pieces", "varlen_pieces"), default="main",
                   help="main: forward, backward and decode step (default); varlen: the same for packed "
                        "sequences; pieces: sequence splitting's state passes; varlen_pieces: the same for "
                        "packed sequences")
    s.set_defaults(fn=cmd_show)

    t = sub.add_parser("tune", help="search launch configs on the GPU (Optuna) and record the fastest",
                       description="Tune the launch configs (chunk C, head-dim tile, num_warps, num_stages) of the "
                                   "variant's kernels (fwd, bwd_dq and the backward's two ways: bwd_dkv, or bwd_dk + bwd_dv) per dtype and sequence "
                                   "length with Optuna; each trial runs in a child process and must match the "
                                   "default config's output. The fastest config per key is recorded in the user "
                                   "store (--commit: the repo's tuned_configs/). Interrupted runs resume from the "
                                   "study journal. Needs: pip install 'lightgen[tune]'.")
    t.add_argument("spec", help=SPEC_HELP)
    t.add_argument("--gpu", default="auto", help="CUDA device index (default: the current device)")
    t.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="cpu: a dry run under Triton's interpreter with tiny shapes (checks the pipeline, not speed)")
    t.add_argument("--seqlens", help="comma-separated sequence lengths, e.g. 1k,8k,64k "
                                     "(default 1k..64k in powers of two; 32,64 on the CPU)")
    t.add_argument("--dtypes", help="comma-separated: fp32, fp16, bf16 (default bf16,fp16; fp32 on the CPU)")
    t.add_argument("--kernels", help="comma-separated subset of fwd,bwd_dq,bwd_dkv,bwd_dk,bwd_dv (default: all)")
    t.add_argument("--tokens", type=int, help="B*N per measurement (default 65536; 128 on the CPU)")
    t.add_argument("--hidden", type=int, help="H*D per measurement (default 2048; 2*D on the CPU)")
    t.add_argument("--trials", type=int,
                   help="finished trials per study, counting resumed ones (default 40; 3 on the CPU)")
    t.add_argument("--time-budget", type=float, default=4 * 3600.0, metavar="S",
                   help="wall-clock seconds for this run (default 14400); run again to resume")
    t.add_argument("--trial-timeout", type=float, default=300.0, metavar="S",
                   help="a trial running longer is killed and failed (default 300)")
    t.add_argument("--storage", metavar="PATH",
                   help="Optuna journal file (default ~/.cache/lightgen/tune/studies.journal)")
    t.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default 0)")
    t.add_argument("--jobs", type=int, metavar="J",
                   help="compile and check every config of the space first in J processes at once (default: one per "
                        "CPU, up to 16; 1 on the CPU's dry run); 1: no warm-up")
    t.add_argument("--commit", action="store_true",
                   help="record into the repo's tuned_configs/ (to commit) instead of the user store")
    t.set_defaults(fn=cmd_tune)

    r = sub.add_parser("bench", help="time the variant against peers and the HBM floor on the GPU",
                       description="Benchmark forward and forward+backward against fla, lightning-attn and SDPA "
                                   "(when installed) and the bytes-moved-once floor; B*N = --tokens, H*D = --hidden. "
                                   "--decode times the decode step instead.")
    r.add_argument("spec", help=SPEC_HELP)
    r.add_argument("--out", metavar="DIR", help="write bench.json and bench.png there (--decode: decode.json)")
    r.add_argument("--seqlens", default="1k,2k,4k,8k,16k,32k,64k", help="comma-separated (default 1k..64k)")
    r.add_argument("--only", help=f"comma-separated subset of {','.join(BENCH_NAMES)}")
    r.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    r.add_argument("--tokens", type=int, default=65536)
    r.add_argument("--hidden", type=int, default=2048, help="H*D (default 2048)")
    r.add_argument("--decode", action="store_true",
                   help="time one decode step (the step kernel, fla's fused_recurrent_simple_gla, or fused_recurrent_gla "
                        "for decay=vector) of --batch sequences against the floor of reading and writing the fp32 "
                        "state once")
    r.add_argument("--batch", type=int, default=64, help="--decode: sequences per step (default 64)")
    r.add_argument("--sweep", action="store_true", help="--decode: also time the step over BV and num_warps")
    r.set_defaults(fn=cmd_bench)

    i = sub.add_parser("inspect", help="compile the kernels for a GPU arch (no GPU needed): registers, spills, "
                                       "wgmma and its waits",
                       description="Compile the variant's launch-tuned kernels and state passes for a CUDA arch "
                                   "as a launch would (that arch's tuned configs, else the heuristic) and report, "
                                   "per kernel: registers, the stack frame (spills), shared memory, and the SASS's "
                                   "wgmma (HGMMA), waits for it with none in flight (wait0), tcgen05 (UTCMMA), "
                                   "mma.sync (HMMA), special functions (MUFU) and local-memory loads and stores "
                                   "(LDL/STL). Needs Triton, not a GPU (lightgen/resources.py).")
    i.add_argument("spec", help=SPEC_HELP)
    i.add_argument("--arch", default="sm90", help="CUDA arch to compile for (default sm90: H100, H200)")
    i.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="bf16")
    i.add_argument("--seqlen", default="4k", help="the length whose tuned launch configs are used (default 4k)")
    i.add_argument("--kernels", help="comma-separated subset of fwd,bwd_dq,bwd_dkv,bwd_dk,bwd_dv,fwd_state,bwd_state "
                                     "(default: all the variant has)")
    i.add_argument("--config", help="launch config for every kernel, e.g. C=32,BV=64,num_warps=8,num_stages=3 "
                                    "(names it leaves out: the heuristic's)")
    i.add_argument("--dump", metavar="DIR", help="also write each kernel's TTGIR, PTX and SASS there")
    i.set_defaults(fn=cmd_inspect)

    c = sub.add_parser("cache", help="tuned launch configs: list | export FILE | import FILE | merge A B",
                       description="Share tuned launch configs: list them, export to a file, import a file "
                                   "(keeping the faster entry per key), merge two files.")
    c.add_argument("action", choices=["list", "export", "import", "merge"])
    c.add_argument("files", nargs="*")
    c.add_argument("-o", "--output", help="merge: output file (default: the first file)")
    c.set_defaults(fn=cmd_cache)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    needed = {"list": 0, "export": 1, "import": 1, "merge": 2}.get(getattr(args, "action", None), 0)
    if args.command == "cache" and len(args.files) != needed:
        p.error(f"cache {args.action} takes {needed} file argument(s)")
    try:
        return args.fn(args)
    except (ValueError, TypeError) as err:
        print(f"lightgen: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
