"""Command line: lightgen build | show | cache ...   (`lightgen COMMAND --help` for each)."""
from __future__ import annotations

import argparse
import os
import sys

SPEC_HELP = ("variant spec, e.g. 'decay=constant,causal,lrpe=d,phi=silu,dk=128,dv=128' "
             "(keys: decay=none|constant, causal|noncausal, lrpe=none|d, phi=NAME|EXPR, dk, dv, scale)")
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

    from .spec import Variant
    from .verify import TOLERANCE, compare
    from .ops import compile as compile_variant

    variant = Variant.parse(args.spec)
    attn = compile_variant(variant)
    print(f"variant : {variant.canonical()}")
    print(f"kernels : {attn.source_path}")
    if args.no_check:
        return 0
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype
                                                                               or ("bf16" if device == "cuda" else "fp32")]
    if device == "cpu" and dtype == torch.bfloat16:
        raise SystemExit("--dtype bf16: Triton's interpreter computes bf16 dots wrongly; check bf16 on a GPU")
    errors = compare(variant, b=args.batch, n=args.seqlen, h=args.heads, dtype=dtype, device=device)
    tol = TOLERANCE[dtype]
    print(f"check   : B={args.batch} N={args.seqlen} H={args.heads} {dtype} on {device}"
          f"{' (Triton interpreter)' if device == 'cpu' else ''}, relative error vs float64 reference:")
    for name, err in errors.items():
        print(f"  {name:7s} {err:.2e}  {'ok' if err <= tol else 'FAIL'}")
    worst = max(errors.values())
    print(f"max error {worst:.2e} (tolerance {tol:g}): {'ok' if worst <= tol else 'FAIL'}")
    return 0 if worst <= tol else 1


def cmd_show(args) -> int:
    from .ops import compile as compile_variant

    attn = compile_variant(args.spec)
    sys.stdout.write(attn.source() if not args.path else f"{attn.source_path}\n")
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
    s.set_defaults(fn=cmd_show)

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
