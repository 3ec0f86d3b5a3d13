"""Issue 4's kernel benchmark over its whole sweep, and its targets judged from the runs.

Runs `lightgen bench` (lightgen, fla-core, lightning-attn, SDPA and the HBM floor, N = 1K..64K, B*N = 65,536,
H*D = 2048, bf16) for the TNL variant (constant decay, identity phi) and decay=none at D = 64 and 128, and the
full TNL variant (LRPE-d + silu, lightgen alone) for its target against the plain one; each variant in its
own process, into OUT/<name>/bench.{json,png}. A variant whose bench.json already has every length is not
run again, so an interrupted sweep resumes. Then prints the report: one markdown table per variant (as in
the README) and every target stated met or not met, with its figures.

    PYTHONPATH=$PWD python -m tools.bench_sweep --out bench_sweep        # on the GPU: run, then report
    PYTHONPATH=$PWD python -m tools.bench_sweep --report bench_sweep     # the report of saved runs

The targets are judged on each cell's lesser time of its eager call and its CUDA-graph replay (where there
is one: lightning-attn and SDPA are not captured). Both only ever overstate the GPU's time: an eager call's
can be the host's (see the README), a replay can meet a clock dip.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# name -> spec; the full TNL runs lightgen alone (the peers compute other math) and is judged against PLAIN
VARIANTS = {
    "tnl_d128": "decay=constant,causal,dk=128,dv=128",
    "tnl_d64": "decay=constant,causal,dk=64,dv=64",
    "none_d128": "decay=none,causal,dk=128,dv=128",
    "none_d64": "decay=none,causal,dk=64,dv=64",
    "full_tnl_d128": "decay=constant,causal,lrpe=d,phi=silu,dk=128,dv=128,scale=1",
}
FULL, PLAIN = "full_tnl_d128", "tnl_d128"
SEQLENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
FWD_X, FWDBWD_X, FLAT, FLA_X, FULL_X = 1.3, 1.6, 1.10, 2.0, 1.10  # the targets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="run the sweep into this folder (a GPU), then report")
    where.add_argument("--report", type=Path, help="only report the runs saved in this folder")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(VARIANTS)}")
    return p.parse_args(argv)


def run(out: Path, names) -> None:
    for name in names:
        saved = load(out / name)
        if saved and {row.get("N") for row in saved["rows"]} >= set(SEQLENS):
            print(f"{name}: done before ({out / name / 'bench.json'})", flush=True)
            continue
        command = [sys.executable, "-m", "lightgen.cli", "bench", VARIANTS[name], "--out", str(out / name),
                   "--seqlens", ",".join(map(str, SEQLENS))] + (["--only", "lightgen"] if name == FULL else [])
        print(f"{name}: {' '.join(command[1:])}", flush=True)
        try:
            subprocess.run(command, check=True)
        except subprocess.CalledProcessError as err:  # the other variants still run; this one's rows so far stay
            print(f"{name}: lightgen bench failed (exit {err.returncode}); the report has the rows it saved", flush=True)


def load(folder: Path) -> dict | None:
    """A run's bench.json, or None where there is none or it cannot be read (warned: the sweep runs it again)."""
    path = folder / "bench.json"
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
        if not isinstance(result.get("rows"), list):
            raise ValueError("no list of rows")
        return result
    except (ValueError, AttributeError) as err:
        print(f"warning: {path}: not a lightgen bench result ({err}); left out", file=sys.stderr)
        return None


def _times(cell: dict) -> dict | None:
    """The cell's {fwd_ms, fwdbwd_ms}: the lesser of its eager and CUDA-graph times (each only ever overstates
    the GPU's: host time in a call, a clock dip in a replay), or None where it has no fwd+bwd time."""
    if "fwdbwd_ms" not in cell:
        return None
    graph = cell.get("graph", cell)
    return {key: min(cell[key], graph[key]) for key in ("fwd_ms", "fwdbwd_ms")}


def _lightgen_times(result: dict) -> dict:
    """N -> lightgen's _times of that row, for the rows that have them."""
    return {row["N"]: times for row in result["rows"] if (times := _times(row.get("lightgen", {})))}


def _n(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def table(result: dict) -> str:
    """The README's table of one run."""
    lines = ["| N | lightgen eager | from a graph | x floor (eager; graph) | fla / lightgen (graph) | "
             "lightning-attn / lightgen | SDPA / lightgen |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ours = row.get("lightgen", {})
        if "fwdbwd_ms" not in ours:
            lines.append(f"| {_n(row['N'])} | {ours.get('error', 'no time')[:60]} | | | | | |")
            continue
        graph = ours.get("graph")
        cells = [f"**{ours['fwd_ms']:.3f} / {ours['fwdbwd_ms']:.3f}**",
                 f"{graph['fwd_ms']:.3f} / {graph['fwdbwd_ms']:.3f}" if graph else "–"]
        floor = (row["floor_fwd_ms"], row["floor_fwdbwd_ms"])
        ratios = f"{ours['fwd_ms'] / floor[0]:.2f}x / {ours['fwdbwd_ms'] / floor[1]:.2f}x"
        if graph:
            ratios += f"; {graph['fwd_ms'] / floor[0]:.2f}x / {graph['fwdbwd_ms'] / floor[1]:.2f}x"
        cells.append(ratios)
        for peer in ("fla", "lightning_attn", "sdpa"):
            theirs = row.get(peer, {})
            if "fwdbwd_ms" not in theirs:
                cells.append("–")
                continue
            cell = f"{theirs['fwd_ms'] / ours['fwd_ms']:.2f} / {theirs['fwdbwd_ms'] / ours['fwdbwd_ms']:.2f}"
            if "graph" in theirs and graph:
                cell += f" ({theirs['graph']['fwd_ms'] / graph['fwd_ms']:.2f} / " \
                        f"{theirs['graph']['fwdbwd_ms'] / graph['fwdbwd_ms']:.2f})"
            cells.append(cell)
        lines.append(f"| {_n(row['N'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shown(x: float, limit: float) -> str:
    """x to 2 decimals, or 3 where 2 would print the limit itself for a figure on the other side of it (1.102
    against at most 1.10): a figure never reads as contradicting its verdict."""
    return f"{x:.3f}" if f"{x:.2f}" == f"{limit:.2f}" and x != limit else f"{x:.2f}"


def _verdict(what: str, cells: list[tuple[str, float]], ok, limit: float) -> str:
    """'what: met (figures)' or 'what: NOT met: the failing cells'."""
    if not cells:
        return f"- {what}: no measurement"
    bad = [(where, x) for where, x in cells if not ok(x)]
    span = f"{_shown(min(x for _, x in cells), limit)}-{_shown(max(x for _, x in cells), limit)}"
    if not bad:
        return f"- {what}: met ({span})"
    return f"- {what}: NOT met: " + ", ".join(f"{_shown(x, limit)} at {where}" for where, x in bad) + f" (all: {span})"


def targets(results: dict) -> list[str]:
    """Every target of the issue that the runs measure, one line each."""
    lines = []
    for name in (n for n in VARIANTS if n != FULL and n in results):
        ours = _lightgen_times(results[name])
        rows = [row for row in results[name]["rows"] if row["N"] in ours]
        for key, floor, limit, label in (("fwd_ms", "floor_fwd_ms", FWD_X, "forward"),
                                         ("fwdbwd_ms", "floor_fwdbwd_ms", FWDBWD_X, "forward+backward")):
            lines.append(_verdict(f"{name}: {label} within {limit}x of the floor (x floor)",
                                  [(_n(row["N"]), ours[row["N"]][key] / row[floor]) for row in rows],
                                  lambda x, limit=limit: x <= limit, limit))
        for key, label in (("fwd_ms", "forward"), ("fwdbwd_ms", "forward+backward")):
            per_token = {row["N"]: ours[row["N"]][key] / (row["B"] * row["N"]) for row in rows}
            if per_token:
                top, low = max(per_token, key=per_token.get), min(per_token, key=per_token.get)
                ratio = per_token[top] / per_token[low]
                lines.append(f"- {name}: {label} time per token flat over N, max / min at most {FLAT}: "
                             f"{'met' if ratio <= FLAT else 'NOT met'}: {_shown(ratio, FLAT)} ({_n(top)} over {_n(low)})")
        for peer, label, need in (("fla", f"fla's chunk_simple_gla / lightgen, fwd+bwd, at least {FLA_X}x", FLA_X),
                                  ("lightning_attn", "lightning-attn / lightgen, fwd and fwd+bwd, above 1", 1.0),
                                  ("sdpa", "SDPA / lightgen, fwd and fwd+bwd, above 1", 1.0)):
            cells = []
            for row in rows:
                theirs, mine = _times(row.get(peer, {})), ours[row["N"]]
                if theirs is None:
                    continue
                keys = ("fwdbwd_ms",) if peer == "fla" else ("fwd_ms", "fwdbwd_ms")
                cells += [(f"{_n(row['N'])} {k[:-3]}", theirs[k] / mine[k]) for k in keys]
            lines.append(_verdict(f"{name}: {label}", cells,
                                  (lambda x: x >= need) if peer == "fla" else (lambda x: x > need), need))
    if FULL in results and PLAIN in results:
        plain, full = _lightgen_times(results[PLAIN]), _lightgen_times(results[FULL])
        cells = [(f"{_n(n)} {k[:-3]}", full[n][k] / plain[n][k]) for n in full if n in plain for k in ("fwd_ms", "fwdbwd_ms")]
        lines.append(_verdict(f"{FULL}: the full TNL's time over the plain TNL's, at most {FULL_X}x", cells,
                              lambda x: x <= FULL_X, FULL_X))
    return lines


def report(results: dict) -> str:
    parts = []
    for name, result in results.items():
        parts.append(f"{name}: {result['variant']}, {result['device']}, torch {result['torch']}, Triton "
                     f"{result['triton']}, {result['dtype']}, copy rate {result['copy_GBps'] / 1e3:.2f} TB/s\n\n"
                     + table(result))
    parts.append("Targets (each cell's lesser of its eager and CUDA-graph times):\n"
                 + "\n".join(targets(results)))
    return "\n\n".join(parts)


def main(argv=None) -> str:
    args = parse_args(argv)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--only: {', '.join(unknown)}: expected names from {', '.join(VARIANTS)}")
    folder = args.out or args.report
    if args.out:
        run(folder, names)
    results = {name: result for name in names if (result := load(folder / name))}
    if not results:
        raise SystemExit(f"--report {folder}: no <variant>/bench.json there (variants: {', '.join(names)})")
    text = report(results)
    print(text)
    return text


if __name__ == "__main__":
    main()
