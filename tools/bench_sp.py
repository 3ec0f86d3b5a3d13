"""Sequence parallelism on one rank (issue 7): its code path against the plain model, same weights.

    PYTHONPATH=$PWD python -m tools.bench_sp --config 385m --contexts 8192,32768 --json sp_bench.json

One process makes a process group of one rank (NCCL on a GPU, gloo on the CPU; an in-memory store,
no torchrun). One seeded TNL model runs forward + backward on the same batch three ways: plain, and
through tnl.distributed.sequence_parallel with each --methods (the path tnl.train_dist takes with
--sp > 1: each layer's own kernel pass, the all-gather of states, the earlier ranks' contribution,
here a zero state). First the losses and gradients are compared (relative differences: loss, and
the largest over parameters of |g_sp - g_plain| / |g_plain|), then the paths are timed, taking turns
step by step so that clock drift hits them alike: tokens/s (median over --steps after --warmup),
the ratio SP / plain (1.0: SP costs nothing) and peak GPU memory. The optimizer step is left out:
it is the same in both. bf16 autocast on a GPU (--dtype), fp32 on the CPU.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

from tnl import TNLConfig, TNLForCausalLM
from tnl.distributed import enable_sequence_parallel, split_sequence
from tnl.distributed.sequence_parallel import METHODS
from tnl.train_dist import SAFE_ENVIRONMENT
from tools import measure

PLAIN = "plain"


def parse_args(argv=None):
    p = measure.parser("bench_sp", __doc__.splitlines()[0], contexts="8192,32768", tokens_per_batch=32768)
    p.add_argument("--methods", default=",".join(METHODS), help=f"SP methods to run: {', '.join(METHODS)}")
    p.add_argument("--tolerance", type=float, default=1e-2,
                   help="largest relative difference of loss and gradients called agreement")
    args = p.parse_args(argv)
    args.contexts = measure.parse_ints(args.contexts, "--contexts")
    args.methods = measure.names_list(args.methods, "methods", METHODS)
    measure.check_common(args)
    if not args.tolerance > 0:
        raise ValueError(f"--tolerance={args.tolerance}: expected > 0")
    for context in args.contexts:
        if args.tokens_per_batch % context:
            raise ValueError(f"--contexts: {context} does not divide --tokens-per-batch={args.tokens_per_batch}")
    return args


@contextmanager
def one_rank_group(device: torch.device):
    """The default process group as a world of this one process; destroyed on exit."""
    if dist.is_initialized():
        raise ValueError("a torch.distributed process group already exists; run bench_sp in its own process")
    for name, value in SAFE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    alone = dict(store=dist.HashStore(), rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **alone)
    else:
        dist.init_process_group("gloo", **alone)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def use_path(model, group, path: str) -> None:
    """Route every token mixer through sequence parallelism with `path`'s method, or not (plain)."""
    if path == PLAIN:
        for block in model.layers:
            block.token_mixer.sequence_parallel = None  # the GLA hook's off state
    else:
        enable_sequence_parallel(model, group, path)


def rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().norm().item() or 1.0  # a zero reference: the absolute difference
    return (actual.double() - expected.double()).norm().item() / scale


def compare_row(model, group, context: int, args, device, amp_dtype) -> dict:
    batch = args.tokens_per_batch // context
    x, y = measure.random_tokens(batch, context, model.config.vocab_size, device, args.seed)

    def forward_backward(path):
        use_path(model, group, path)
        model.zero_grad(set_to_none=True)
        if path != PLAIN:  # this rank's piece of the sequence, as tnl.train_dist feeds it (the whole, on one rank)
            inputs, targets = split_sequence(x, group), split_sequence(y, group)
        else:
            inputs, targets = x, y
        with measure.autocast(device, amp_dtype):
            loss = model.loss(inputs, targets)
        loss.backward()
        return loss.detach()

    paths = [PLAIN, *args.methods]
    row = {"context": context, "batch": batch, **{path: {} for path in paths}}
    # agreement: the plain gradients, then each method's against them
    row[PLAIN]["loss"] = forward_backward(PLAIN).item()
    expected = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    for path in args.methods:
        loss = forward_backward(path).item()
        grad_diffs = [rel_diff(p.grad, expected[name]) for name, p in model.named_parameters()]
        row[path].update(loss=loss, loss_rel_diff=abs(loss - row[PLAIN]["loss"]) / abs(row[PLAIN]["loss"]),
                         max_grad_rel_diff=max(grad_diffs))
        row[path]["agree"] = max(row[path]["loss_rel_diff"], row[path]["max_grad_rel_diff"]) <= args.tolerance
    del expected
    # speed: the paths take turns step by step
    for _ in range(args.warmup):
        for path in paths:
            forward_backward(path)
    seconds = {path: [] for path in paths}
    peaks = {path: [] for path in paths}
    for _ in range(args.steps):
        for path in paths:
            measure.reset_peak_memory(device)
            seconds[path].append(measure.timed(lambda: forward_backward(path), device)[0])
            peaks[path].append(measure.peak_memory_gb(device))
    for path in paths:
        step_s = measure.median(seconds[path])
        row[path].update(step_ms=step_s * 1e3, tokens_per_s=batch * context / step_s,
                         peak_gb=None if peaks[path][0] is None else max(peaks[path]))
    for path in args.methods:
        row[path]["vs_plain"] = row[path]["tokens_per_s"] / row[PLAIN]["tokens_per_s"]
    model.zero_grad(set_to_none=True)
    use_path(model, group, PLAIN)
    return row


def report(result: dict) -> str:
    env = result["environment"]
    lines = [f"{env['device']}, {env['date']}; torch {env['torch']}, triton {env['triton']}; "
             f"TNL attention: {env['tnl_attention']}; config "
             f"{result['config_name']} ({result['parameters'] / 1e6:.1f}M parameters); "
             f"{result['autocast'] or 'fp32'}; one rank ({result['backend']}); forward + backward"]
    headers = ["context", "batch", "path", "tok/s", "vs plain", "peak GB", "loss", "loss rel diff",
               "max grad rel diff", "agree"]
    rows = []
    for row in result["rows"]:
        if "error" in row:
            rows.append([row["context"], row["batch"], "all", "OOM" if row["error"] == "OOM" else "error",
                         *[None] * 6])
            continue
        for path in [PLAIN, *result["methods"]]:
            r = row[path]
            agree = None if "agree" not in r else ("yes" if r["agree"] else "NO")
            rows.append([row["context"], row["batch"], path, measure.fmt(r["tokens_per_s"], ",.0f"),
                         measure.fmt(r.get("vs_plain"), ".3f"), measure.fmt(r["peak_gb"], ".1f"),
                         measure.fmt(r["loss"], ".5f"), measure.fmt(r.get("loss_rel_diff"), ".1e"),
                         measure.fmt(r.get("max_grad_rel_diff"), ".1e"), agree])
    lines += ["", measure.table(headers, rows),
              f"(agree: both relative differences <= {result['tolerance']:g}; vs plain: tokens/s ratio, 1.0 = no cost)"]
    return "\n".join(lines)


def run(args) -> dict:
    device = measure.pick_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    amp_dtype = measure.autocast_dtype(device, args.dtype)
    config = TNLConfig.preset(args.config, **({} if args.vocab_size is None else {"vocab_size": args.vocab_size}))
    torch.manual_seed(args.seed)
    with device:
        model = TNLForCausalLM(config)
    result = {"environment": measure.environment(device), "config_name": args.config, "config": config.to_dict(),
              "parameters": model.num_parameters(), "methods": args.methods,
              "backend": "nccl" if device.type == "cuda" else "gloo",
              "autocast": None if amp_dtype is None else args.dtype, "tokens_per_batch": args.tokens_per_batch,
              "steps": args.steps, "warmup": args.warmup, "tolerance": args.tolerance, "rows": []}
    with one_rank_group(device) as group:
        for context in args.contexts:
            row = measure.guarded(lambda: compare_row(model, group, context, args, device, amp_dtype), device)
            row = {"context": context, "batch": args.tokens_per_batch // context, **row}
            result["rows"].append(row)
            print(f"  context {context}: " + ("; ".join(
                f"{path} {row[path]['tokens_per_s']:,.0f} tokens/s" for path in [PLAIN, *args.methods])
                if "error" not in row else row["error"]), file=sys.stderr)
    return result


def main(argv=None) -> dict:
    return measure.main("bench_sp", parse_args, run, report, argv)


if __name__ == "__main__":
    main()
