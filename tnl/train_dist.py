"""Train a TransNormerLLM on many ranks:  torchrun --nproc-per-node 4 -m tnl.train_dist --mesh 2,2

--mesh DP,TP and --sp N lay the world out as dp x sp x tp ranks (tnl.distributed): FSDP2 over dp,
tensor parallel heads over tp, sequence parallel (LASP-style state exchange) over sp. Same corpus,
tokenizer, optimizer and schedule as tnl.train; --batch-size is the global batch (split over dp),
--seq-len the whole sequence (split over sp). NCCL on GPUs (one per rank), gloo on CPU, where
lightgen's attention runs its PyTorch reference. Checkpoints are DCP folders (<out>/checkpoint) that
--resume reads on any mesh; --export writes a one-GPU save_pretrained folder (<out>/model) at the end.
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set unless the
environment already sets them.

    torchrun --nproc-per-node 8 -m tnl.train_dist --config 385m --mesh 2,2 --sp 2 --seq-len 8192
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import data
from .config import PRESETS, TNLConfig
from .distributed import checkpoint, make_mesh, parallelize
from .distributed.sequence_parallel import METHODS
from .model import TNLForCausalLM
from .train import add_schedule_args, lr_at, make_optimizer

# NVLink multicast (NVLS) can take a shared host's GPUs out of service: off unless the caller's
# environment says otherwise. NCCL and PyTorch read these when they create communicators / symmetric
# memory, so setting them before init_process_group is enough.
SAFE_ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
CHECKPOINT = "checkpoint"
# FSDP2 warns that the root returns a view (the gathered logits); model.loss never changes it in place
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def parse_mesh(text: str) -> tuple[int, int]:
    try:
        dp, tp = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected DP,TP (two ints, e.g. 2,2)") from None
    if dp < 1 or tp < 1:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: sizes must be >= 1")
    return dp, tp


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tnl-train-dist", description=__doc__.splitlines()[0])
    p.add_argument("--mesh", type=parse_mesh, default=None,
                   help="DP,TP (default: all ranks data parallel, i.e. WORLD/SP,1)")
    p.add_argument("--sp", type=int, default=1, help="sequence parallel ranks per sequence")
    p.add_argument("--sp-method", default="states", choices=METHODS,
                   help="how a rank adds the earlier ranks' state (tnl.distributed.sequence_parallel)")
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS), help="model size preset")
    p.add_argument("--num-heads", type=int, default=None, help="override the preset's head count (TP splits heads)")
    p.add_argument("--out", default="runs/tnl-dist")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (rows), split over dp")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row, split over sp")
    p.add_argument("--checkpoint", action="store_true",
                   help="activation checkpointing: each block keeps its input and recomputes the rest in the backward")
    add_schedule_args(p)
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint (any mesh)")
    p.add_argument("--export", action="store_true", help="write <out>/model (save_pretrained) at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: one GPU per rank (NCCL) if there are GPUs, else CPU (gloo)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per rank")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for name in ("sp", "steps", "batch_size", "seq_len", "eval_every", "eval_batches", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive int")
    return args


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> torch.device:
    """The default process group from torchrun's environment (without torchrun: a world of this one
    process); returns this rank's device. NCCL with one GPU per rank, or gloo on the CPU. A
    collective that waits longer than timeout_s (default: torch's) ends the process."""
    for name, value in SAFE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    options = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
    if timeout_s is not None:
        options["timeout"] = datetime.timedelta(seconds=timeout_s)
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        rank_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(rank_device)
        dist.init_process_group("nccl", device_id=rank_device, **options)
    else:
        rank_device = torch.device("cpu")
        dist.init_process_group("gloo", **options)
    return rank_device


def setup(args):
    """Process group, device and mesh from torchrun's environment."""
    device = init_distributed(args.device)
    world = dist.get_world_size()
    dp, tp = args.mesh or (world // args.sp, 1)
    mesh = make_mesh(dp, args.sp, tp, device.type)
    if args.batch_size % dp:
        raise ValueError(f"--batch-size={args.batch_size} must be a multiple of dp={dp}")
    if args.seq_len % args.sp:
        raise ValueError(f"--seq-len={args.seq_len} must be a multiple of --sp={args.sp}")
    return device, mesh


def local_batch(x, y, mesh):
    """This rank's rows (by dp rank) and contiguous piece of the sequence (by sp rank)."""
    dp, sp = mesh["dp"], mesh["sp"]
    rows = x.shape[0] // dp.size()
    cols = x.shape[1] // sp.size()
    r, c = dp.get_local_rank() * rows, sp.get_local_rank() * cols
    return x[r:r + rows, c:c + cols], y[r:r + rows, c:c + cols]


def global_mean(value: torch.Tensor) -> float:
    """Mean over all ranks (tp ranks hold equal values, so this is the mean over dp x sp)."""
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(model, eval_tokens, args, mesh, device, autocast):
    model.eval()
    losses = []
    for x, y in data.eval_batches(eval_tokens, args.eval_batches, args.batch_size, args.seq_len):
        x, y = local_batch(x, y, mesh)
        with autocast():
            losses.append(global_mean(model.loss(x.to(device), y.to(device))))
    model.train()
    return sum(losses) / len(losses)


def train(args) -> dict:
    device, mesh = setup(args)
    rank0 = dist.get_rank() == 0
    out = Path(args.out)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the same initial weights on every rank

    tok = data.ByteTokenizer()
    if rank0:  # one download, if the corpus is not cached yet
        data.load_corpus(args.data_dir)
    dist.barrier()
    text = data.load_corpus(args.data_dir)
    if args.max_bytes:
        text = text[:args.max_bytes]
    train_tokens, eval_tokens = data.split(tok.encode(text), args.eval_fraction)

    overrides = {"vocab_size": tok.vocab_size}
    if args.num_heads:
        overrides["num_heads"] = args.num_heads
    config = TNLConfig.preset(args.config, **overrides)
    model = TNLForCausalLM(config).to(device)
    model.gradient_checkpointing = args.checkpoint
    num_parameters = model.num_parameters()
    model = parallelize(model, mesh, args.sp_method)
    optimizer = make_optimizer(model, args)
    step, history = 0, {"train": [], "eval": []}
    # one generator on every rank: all draw the same global batch, then take their piece
    generator = torch.Generator().manual_seed(args.seed)
    if args.resume and (out / CHECKPOINT).exists():
        state = checkpoint.load(out / CHECKPOINT, model, optimizer)
        step, history = state["step"], state["history"]
        generator.set_state(state["generator"])
        if rank0:
            print(f"resumed from {out / CHECKPOINT} at step {step}")
    elif args.resume and rank0:
        print(f"no checkpoint in {out / CHECKPOINT}: starting fresh")
    if rank0:
        sizes = {name: mesh[name].size() for name in mesh.mesh_dim_names}
        print(f"model {args.config}: {num_parameters / 1e6:.2f}M parameters; mesh {sizes} "
              f"on {device.type}; {len(train_tokens):,} train / {len(eval_tokens):,} held-out bytes")

    def autocast():  # bf16 on GPUs; the CPU path stays fp32
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def save():
        checkpoint.save(out / CHECKPOINT, model, optimizer, {
            "step": step, "history": history, "generator": generator.get_state(), "args": vars(args)})

    if not history["eval"]:
        history["eval"].append((step, evaluate(model, eval_tokens, args, mesh, device, autocast)))
    bar = tqdm(total=args.steps, initial=step, disable=args.quiet or not rank0, desc="train", dynamic_ncols=True)
    start, start_step = time.time(), step
    while step < args.steps:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = local_batch(*data.random_batch(train_tokens, args.batch_size, args.seq_len, generator), mesh)
        with autocast():
            loss = model.loss(x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # FSDP averages the gradients over dp (and sp); TP's are complete per shard
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        history["train"].append((step, global_mean(loss)))
        bar.update(1)
        bar.set_postfix(loss=f"{history['train'][-1][1]:.3f}", lr=f"{lr:.2e}")
        if step % args.eval_every == 0 or step == args.steps:
            history["eval"].append((step, evaluate(model, eval_tokens, args, mesh, device, autocast)))
            tokens_per_s = (step - start_step) * args.batch_size * args.seq_len / (time.time() - start)
            if rank0:
                bar.write(f"step {step}: eval loss {history['eval'][-1][1]:.4f} ({tokens_per_s:,.0f} tokens/s)")
        if step % args.save_every == 0 or step == args.steps:
            save()
    bar.close()
    if rank0:
        (out / "metrics.json").write_text(json.dumps(history))
    if args.export:
        checkpoint.export_pretrained(model, out / "model")
        if rank0:
            print(f"one-device model: {out / 'model'} (TNLForCausalLM.from_pretrained)")
    dist.destroy_process_group()
    return history


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except ValueError as e:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(f"tnl-train-dist: {e}")


if __name__ == "__main__":
    main()
