"""Timing and reporting shared by the tnl benchmarks (tools/bench_tnl.py, tools/bench_sp.py).

Wall-clock time between two device synchronisations: a step of a training run or a decoded token
is what the user waits for, and on the CPU the same code times the smoke tests. Each row of a
benchmark runs through `guarded`, so one that runs out of memory (or fails otherwise) is recorded
as such and the others still run.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

import lightgen
from lightgen.configs import DTYPE_NAMES, torch_dtype


def parse_ints(text: str, option: str, allow_empty: bool = False) -> list[int]:
    """'2048,8192' -> [2048, 8192]; errors name the option. '' -> [] where allow_empty."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts and not allow_empty:
        raise ValueError(f"{option}={text!r}: expected comma-separated positive ints, e.g. 2048,8192")
    values = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"{option}={text!r}: {part!r} is not an int") from None
        if value < 1:
            raise ValueError(f"{option}={text!r}: {value} is not a positive int")
        values.append(value)
    return values


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name}: no CUDA device is available")
    return device


def autocast_dtype(device: torch.device, dtype_name: str):
    """The autocast dtype: the asked one on a GPU; None (plain fp32) on the CPU or for fp32."""
    dtype = torch_dtype(dtype_name)
    return None if device.type != "cuda" or dtype == torch.float32 else dtype


def autocast(device: torch.device, dtype):
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(seconds, fn()) between synchronisations before and after the call."""
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return time.perf_counter() - start, value


def median(values) -> float:
    return statistics.median(values)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device):
    """Peak allocated GPU memory since the last reset, in GB; None on the CPU (not tracked)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(run_row, device: torch.device) -> dict:
    """run_row() -> dict of results; out of memory gives {"error": "OOM"}, another failure
    {"error": "<type>: <message>"} (traceback on stderr). Memory is released before the next row."""
    try:
        result = run_row()
    except torch.cuda.OutOfMemoryError:
        result = {"error": "OOM"}
    except Exception as err:  # noqa: BLE001 - one failing row is a result; the other rows still run
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    # the exception (and the frames holding the row's tensors) is gone once the except clause ends
    free_memory(device)
    return result


def attention_path(device: torch.device) -> str:
    """Where lightgen's attention runs for tensors on this device (lightgen.ops' own rule)."""
    from lightgen.ops import _use_kernels

    if not _use_kernels(torch.empty(0, device=device)):
        return "PyTorch reference"
    return "Triton kernels" if device.type == "cuda" else "Triton kernels, interpreter"


def environment(device: torch.device) -> dict:
    """Where and when: for the JSON and the table's header."""
    import triton

    return {"tnl_attention": attention_path(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "lightgen": lightgen.__version__,
    }


def random_tokens(batch: int, length: int, vocab: int, device: torch.device, seed: int):
    """Inputs and next-token targets [batch, length], drawn on the device."""
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length + 1), device=device, generator=generator)
    return ids[:, :-1], ids[:, 1:]


def table(headers: list[str], rows: list[list]) -> str:
    """Plain text, columns right-aligned; None prints as '-'."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value, spec: str):
    """format(value, spec), or None for a missing value (table prints '-')."""
    return None if value is None else format(value, spec)


def main(tool: str, parse_args, run, report, argv=None) -> dict:
    """A benchmark tool's command line: parse, run, print the report, write --json; bad arguments
    (ValueError) end with the tool's name and the message."""
    try:
        args = parse_args(argv)
        result = run(args)
    except ValueError as e:
        raise SystemExit(f"{tool}: {e}")
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"results: {args.json}")
    return result


def parser(tool: str, description: str, contexts: str, tokens_per_batch: int | None = None) -> argparse.ArgumentParser:
    """The options every tnl benchmark takes; each tool adds its own. --tokens-per-batch only where
    the tool sizes its batch by it (tokens_per_batch: its default)."""
    from tnl import PRESETS

    p = argparse.ArgumentParser(prog=tool, description=description)
    p.add_argument("--config", default="385m", choices=sorted(PRESETS), help="tnl size preset")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary (256 bytes)")
    p.add_argument("--contexts", default=contexts, help="training context lengths")
    if tokens_per_batch is not None:
        p.add_argument("--tokens-per-batch", type=int, default=tokens_per_batch, help="batch = this / context")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (and path)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (or decoded tokens) before timing")
    p.add_argument("--dtype", default="bf16", choices=DTYPE_NAMES, help="autocast dtype on a GPU (the CPU runs fp32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    return p


def names_list(text: str, option: str, known) -> list[str]:
    """A comma-separated option of names, each one of `known`."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or set(names) - set(known):
        raise ValueError(f"--{option}={','.join(names)!r}: expected one or more of {', '.join(known)}")
    return names


def check_common(args, positive=("tokens_per_batch", "steps")) -> None:
    """The shared options' ranges (see parser)."""
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive int")
    if args.warmup < 0:
        raise ValueError(f"--warmup={args.warmup}: expected an int >= 0")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise ValueError(f"--vocab-size={args.vocab_size}: expected a positive int")
