"""Distributed TNL training speed (issue 8): sequence and tensor parallel on several GPUs, under torchrun.

    torchrun --nproc-per-node 2 -m tools.bench_dist --config 1b --sp 2 --checkpoint \\
        --contexts 16384,65536,262144,524288,1048576 --json sp2.json
    torchrun --nproc-per-node 2 -m tools.bench_dist --config 1b --tp 2 --batch 4 --contexts 8192 --json tp2.json

The world is laid out as tnl.train_dist lays it out (dp x sp x tp ranks, FSDP2 over the data ranks,
tnl.distributed.parallelize) and a seeded model trains on random tokens. For each context in the order
given: --batch rows (the global batch) of that many tokens, each rank taking its piece (rows by dp,
a contiguous slice of the sequence by sp); a step is forward + loss + backward + gradient clipping +
AdamW, as in tnl.train_dist. Reported per context: step time (median of --steps after --warmup, rank
0's clock; the ranks move in lockstep through their collectives), tokens/s in all and per GPU, the
peak GPU memory of the fullest rank, the loss.

The first context that runs out of memory on any rank ends the sweep, so contexts listed past what
fits find the longest sequence that trains. If only some ranks run out, the others wait in a
collective: --timeout (seconds) ends them then. Results are written to --json after every row, so a
run that ends that way keeps what it measured. Without torchrun the world is this one process.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tnl import TNLConfig, TNLForCausalLM
from tnl.distributed import make_mesh, parallelize
from tnl.distributed.sequence_parallel import METHODS
from tnl.train_dist import global_mean, init_distributed, local_batch
from tools import measure


def parse_args(argv=None):
    p = measure.parser("bench_dist", __doc__.splitlines()[0], contexts="16384,65536")
    p.add_argument("--batch", type=int, default=1, help="rows per step (global), split over the data ranks")
    p.add_argument("--sp", type=int, default=1, help="sequence parallel ranks per sequence")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel ranks (split the heads)")
    p.add_argument("--sp-method", default="states", choices=METHODS, help="see tnl.distributed.sequence_parallel")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing per block")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a rank waits in a collective")
    args = p.parse_args(argv)
    args.contexts = measure.parse_ints(args.contexts, "--contexts")
    measure.check_common(args, positive=("batch", "sp", "tp", "steps"))
    if not args.timeout > 0:
        raise ValueError(f"--timeout={args.timeout}: expected > 0 seconds")
    return args


def mesh_sizes(args, world: int) -> tuple[int, int, int]:
    """(dp, sp, tp): the data ranks are what --sp and --tp leave of the world."""
    if world % (args.sp * args.tp):
        raise ValueError(f"--sp={args.sp} x --tp={args.tp} must divide the world size {world}")
    dp = world // (args.sp * args.tp)
    if args.batch % dp:
        raise ValueError(f"--batch={args.batch} must be a multiple of the data-parallel size {dp}")
    for context in args.contexts:
        if context % args.sp:
            raise ValueError(f"--contexts: {context} is not a multiple of --sp={args.sp}")
    return dp, args.sp, args.tp


def all_ranks_max(value: float, device: torch.device) -> float:
    value = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def train_row(model, optimizer, mesh, context: int, args, device, amp_dtype) -> dict:
    x, y = measure.random_tokens(args.batch, context, model.config.vocab_size, device, args.seed)
    x, y = local_batch(x, y, mesh)

    def step():
        with measure.autocast(device, amp_dtype):
            loss = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    for _ in range(args.warmup):  # the first step compiles the kernels and fills the optimizer state
        step()
    measure.reset_peak_memory(device)
    seconds = []
    for _ in range(args.steps):
        elapsed, loss = measure.timed(step, device)
        seconds.append(elapsed)
    step_s = measure.median(seconds)
    tokens = args.batch * context
    peak = measure.peak_memory_gb(device)
    return {"step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s,
            "tokens_per_s_per_gpu": tokens / step_s / dist.get_world_size(),
            "peak_gb": None if peak is None else all_ranks_max(peak, device),
            "loss": global_mean(loss)}


def report(result: dict) -> str:
    env, mesh = result["environment"], result["mesh"]
    lines = [f"{env['device']} x {result['world']}, {env['date']}; torch {env['torch']}, triton {env['triton']}; "
             f"config {result['config_name']} ({result['parameters'] / 1e6:.1f}M parameters); "
             f"mesh dp {mesh['dp']} x sp {mesh['sp']} x tp {mesh['tp']} (SP method {result['sp_method']}); "
             f"{result['autocast'] or 'fp32'}; checkpointing {'on' if result['checkpoint'] else 'off'}; "
             "step = forward + backward + clip + AdamW"]
    headers = ["context", "batch", "tokens/GPU", "step ms", "tok/s", "tok/s/GPU", "peak GB/GPU", "loss"]
    rows = []
    for row in result["rows"]:
        per_gpu = row["batch"] * row["context"] // (mesh["dp"] * mesh["sp"])
        if "error" in row:
            rows.append([row["context"], row["batch"], per_gpu, row["error"], None, None, None, None])
            continue
        rows.append([row["context"], row["batch"], per_gpu, measure.fmt(row["step_ms"], ",.0f"),
                     measure.fmt(row["tokens_per_s"], ",.0f"), measure.fmt(row["tokens_per_s_per_gpu"], ",.0f"),
                     measure.fmt(row["peak_gb"], ".1f"), measure.fmt(row["loss"], ".4f")])
    return "\n".join([*lines, "", measure.table(headers, rows)])


def run(args) -> dict:
    device = init_distributed(args.device, args.timeout)
    try:
        dp, sp, tp = mesh_sizes(args, dist.get_world_size())
        mesh = make_mesh(dp, sp, tp, device.type)
        amp_dtype = measure.autocast_dtype(device, args.dtype)
        config = TNLConfig.preset(args.config, **({} if args.vocab_size is None else {"vocab_size": args.vocab_size}))
        torch.manual_seed(args.seed)  # the same weights on every rank
        with device:
            model = TNLForCausalLM(config)
        model.gradient_checkpointing = args.checkpoint
        parameters = model.num_parameters()
        model = parallelize(model, mesh, args.sp_method)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        result = {"environment": measure.environment(device), "config_name": args.config, "config": config.to_dict(),
                  "parameters": parameters, "world": dist.get_world_size(), "mesh": {"dp": dp, "sp": sp, "tp": tp},
                  "sp_method": args.sp_method, "checkpoint": args.checkpoint,
                  "autocast": None if amp_dtype is None else args.dtype, "steps": args.steps, "warmup": args.warmup,
                  "rows": []}
        rank0 = dist.get_rank() == 0
        for context in args.contexts:
            row = measure.guarded(lambda: train_row(model, optimizer, mesh, context, args, device, amp_dtype), device)
            failed = all_ranks_max("error" in row, device)  # every rank stops at the same row
            if failed and "error" not in row:
                row = {"error": "OOM on another rank"}
            result["rows"].append({"context": context, "batch": args.batch, **row})
            if rank0:
                print(f"  context {context}: " + (row.get("error") or f"{row['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU"),
                      file=sys.stderr)
                if args.json:
                    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
            if failed:
                break
        # every rank done before any tears the group down: a rank destroying it while another still talks to it
        # ended in std::terminate once (gloo, CI, session 28), as the tests' scenarios guard against too
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()


def main(argv=None) -> dict | None:
    """Rank 0 prints the table and writes --json (measure.main); the other ranks only measure."""
    if int(os.environ.get("RANK", "0")) == 0:
        return measure.main("bench_dist", parse_args, run, report, argv)
    try:
        run(parse_args(argv))
    except ValueError as e:
        raise SystemExit(f"bench_dist: {e}")
    return None


if __name__ == "__main__":
    main()
