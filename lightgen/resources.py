"""What a variant's kernels compile to on a GPU that need not be here (`lightgen inspect SPEC --arch sm90`).

Device time is scarce and a kernel's registers, spills and instruction mix explain most of its time, so this
compiles each launch-tuned kernel (and the state passes, fwd_state and bwd_state, of a causal variant or a
non-causal one with a decay) for the target as a launch would: the arguments of a forward + backward
(ops.record_launches on small CPU tensors, nothing runs), Triton's own argument specialization for that target, and
the launch config that GPU takes (its arch's tuned entry, else the heuristic; or one given).
Triton compiles through its own ptxas; the report reads the cubin with the CUDA tools Triton ships:
  regs      registers per thread (255 is the most a thread can have)
  stack     the stack frame in bytes per thread: registers spilled (at 255 registers), or a local array (under 255:
            e.g. the slow path of sin / cos for arguments past 1e5, which LRPE's kernels hold and rarely take)
  smem      shared memory per program, KB
  HGMMA     wgmma instructions (Hopper's asynchronous tensor-core products)
  wait0     WARPGROUP.DEPBAR ... 0x0: waits until no wgmma is in flight (each one serializes the products)
  UTCMMA    tcgen05 instructions (Blackwell's products, sm100: accumulators in tensor memory)
  HMMA      mma.sync instructions (the older synchronous tensor-core products)
  MUFU      special-function instructions (exp2, tanh, reciprocal): 16 per clock per SM against 128 FP32
  LDL/STL   local-memory loads and stores in the code (a count of instructions, not of executions)
The installed Triton compiles, so the code is that version's (the GPU machine's Triton may schedule
differently); the tuned entries are looked up for the target arch in any Triton version, the installed
one first.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from . import configs, launch, render

# SASS instruction classes counted, by the report's column name: a regex over nvdisasm's lines
COUNTED = {
    "HGMMA": re.compile(r"\bHGMMA\."),
    "wait0": re.compile(r"\bWARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b"),
    "UTCMMA": re.compile(r"\bUTC\w*MMA\b"),
    "HMMA": re.compile(r"\bHMMA\."),
    "MUFU": re.compile(r"\bMUFU\."),
    "LDL/STL": re.compile(r"\b(LDL|STL)(\.|\s)"),
}
# the recorded forward + backward: 16 heads (a multiple of 16, as in real launches, so that Triton
# specializes their strides alike), one sequence of 64 tokens (N is never specialized)
HEADS, TOKENS = 16, 64


class Resources(NamedTuple):
    kernel: str
    params: dict
    source: str  # where params came from
    regs: int
    stack: int  # stack frame, bytes per thread
    smem: int  # bytes per program
    counts: dict  # COUNTED name -> instructions in the SASS
    asm: dict  # Triton's stages: "ttgir", "ptx", "sass"


def target(arch: str):
    """'sm90' -> Triton's GPUTarget for that CUDA compute capability."""
    from triton.backends.compiler import GPUTarget

    cc = launch.capability(arch)
    if cc is None:
        raise ValueError(f"arch={arch!r}: expected a CUDA arch like sm80, sm90 or sm100")
    return GPUTarget("cuda", cc, 32)


def launch_config(variant, kernel: str, arch: str, dtype: torch.dtype, n: int, config: dict | None = None
                  ) -> tuple[dict, str]:
    """(params, where they came from) for `kernel` on a GPU of `arch` at sequence length n: `config` over the
    GPU heuristic when given; else the arch's tuned entry (nearest N bucket; the installed Triton's entries
    first, else the newest version's; the GPU with the most entries); else the GPU heuristic. A state pass
    takes what its kernel's config gives it (launch.BORROWED, launch.state_pass_params)."""
    if kernel in launch.BORROWED and not config:
        params, source = launch_config(variant, launch.BORROWED[kernel], arch, dtype, n)
        return launch.state_pass_params(variant, params), f"{source}, as {launch.BORROWED[kernel]}'s"
    default = launch.heuristic(variant, kernel, interpreted=False, arch=arch)
    if config:
        unknown = sorted(set(config) - set(launch.PARAM_NAMES))
        if unknown:
            raise ValueError(f"config: unknown {', '.join(unknown)}: "
                             f"expected names from {', '.join(launch.PARAM_NAMES)}")
        params = {**default, **config}
        why = launch.problem(params, variant, kernel)
        if why is not None:
            raise ValueError(f"config: {why} ({kernel} of {variant})")
        return params, "given"
    key = render.kernel_key(variant, kernel)
    dtype = configs.dtype_name(dtype)
    groups: dict[tuple[str, str], int] = {}
    for k, _ in configs.entries():
        if (k.arch, k.variant, k.kernel, k.dk, k.dv, k.dtype) == (arch, key, kernel, variant.dk, variant.dv, dtype):
            groups[(k.triton, k.gpu)] = groups.get((k.triton, k.gpu), 0) + 1
    if groups:
        installed = configs.triton_version()
        triton, gpu = max(groups, key=lambda g: (g[0] == installed, _version(g[0]), groups[g], g[1]))
        entry = configs.lookup_entry(arch, gpu, triton, key, kernel, variant.dk, variant.dv, dtype, n)
        if entry is not None and launch.problem(entry["params"], variant, kernel) is None:
            return dict(entry["params"]), f"tuned ({gpu}, Triton {triton})"
    return default, "heuristic"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def inspect(spec, arch: str = "sm90", dtype: str = "bf16", n: int = 4096, kernels=None, config: dict | None = None
            ) -> list[Resources]:
    """Compile the variant's kernels (launch.kernels and the state passes, or `kernels`) for `arch` and read what
    they became. Needs Triton's compiler, not a GPU; not under TRITON_INTERPRET=1 (the kernels would be the
    interpreter's)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("lightgen inspect compiles for a GPU: run it without TRITON_INTERPRET=1")
    from . import ops
    from .tune import _Case

    gpu = target(arch)
    case = _Case(spec, dtype, TOKENS, 1, HEADS, torch.device("cpu"))
    variant = case.attn.variant
    names = tuple(kernels) if kernels else tuple(case.launches)
    unknown = [k for k in names if k not in case.launches]
    if unknown:
        raise ValueError(f"kernels: {', '.join(unknown)}: expected names from {', '.join(case.launches)}")
    out = []
    for name in names:
        params, source = launch_config(variant, name, arch, configs.torch_dtype(dtype), n, config)
        args, kwargs = case.launches[name]
        calls = []
        with launch.override(params):  # the launch as ops makes it, its kernel call kept instead of run
            ops._launch(_Recorder(args[0], calls), *args[1:], **kwargs)
        fn, call_args, call_kwargs = calls[0]
        out.append(_read(name, params, source, _compile(fn, call_args, call_kwargs, gpu)))
    return out


class _Recorder:
    """A generated module whose kernels record their launch, `kernel[grid](*args, **kwargs)`, instead of running."""

    def __init__(self, module, calls: list):
        self._module, self._calls = module, calls

    def __getattr__(self, name):
        fn = getattr(self._module, name)
        return _Indexable(lambda *args, **kwargs: self._calls.append((fn, args, kwargs)))


class _Indexable:
    def __init__(self, call):
        self._call = call

    def __getitem__(self, grid):
        return self._call


def _compile(fn, args, kwargs, gpu):
    """Triton's compile of one launch for the target `gpu`, specialized as JITFunction.run specializes it
    (its binder and _pack_args: Triton 3.6 and 3.9 have both), without a driver."""
    import triton
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(gpu)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__)


def _read(name, params, source, compiled) -> Resources:
    """The cubin's registers and stack frame (cuobjdump), and the SASS's counted instructions (nvdisasm)."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{name}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = _tool(knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(cubin))
        sass = _tool(knobs.nvidia.nvdisasm.path, str(cubin))
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    if regs is None or stack is None:
        raise RuntimeError(f"cuobjdump gave no REG / STACK for {name}:\n{usage}")
    lines = sass.splitlines()
    counts = {column: sum(1 for line in lines if pattern.search(line)) for column, pattern in COUNTED.items()}
    return Resources(name, params, source, int(regs[1]), int(stack[1]), compiled.metadata.shared, counts,
                     {"ttgir": compiled.asm["ttgir"], "ptx": compiled.asm["ptx"], "sass": sass})


def _tool(path: str, *args: str) -> str:
    result = subprocess.run([path, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(path).name} {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def table(results: list[Resources]) -> str:
    """The report: one row per kernel."""
    head = ["kernel", "C", "BK", "BV", "warps", "stages", "regs", "stack", "smem KB", *COUNTED, "config"]
    rows = [[r.kernel, *(str(r.params[p]) for p in launch.PARAM_NAMES), str(r.regs), str(r.stack),
             f"{r.smem / 1024:.1f}", *(str(r.counts[c]) for c in COUNTED), r.source] for r in results]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *rows])


def dump(results: list[Resources], folder) -> list[Path]:
    """Each kernel's TTGIR, PTX and SASS as <folder>/<kernel>.<stage>, for reading."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for r in results:
        for stage, text in r.asm.items():
            path = folder / f"{r.kernel}.{stage}"
            path.write_text(text)
            written.append(path)
    return written
