"""Shared test helper: a compiled variant must match the float64 reference within TOLERANCE."""
import json
import os

import torch

from lightgen.verify import SLACK, TOLERANCE, compare, failures


def check_variant(variant, b, n, h, dtype, device, seed=0, tol=None, states=False, offset=0, lengths=None):
    """Forward and every input gradient vs the float64 reference; returns the relative errors.
    lengths: packed sequences (cu_seqlens) instead of b x n."""
    errors = compare(variant, b=b, n=n, h=h, dtype=dtype, device=device, seed=seed, states=states, offset=offset,
                     lengths=lengths)
    if os.environ.get("LIGHTGEN_ERROR_LOG"):  # for reporting the worst error per dtype (GPU runs)
        with open(os.environ["LIGHTGEN_ERROR_LOG"], "a") as f:
            f.write(json.dumps({"variant": str(variant), "n": n, "dtype": str(dtype), **errors}) + "\n")
    tol = tol or TOLERANCE[dtype]
    bad = failures(errors, dtype, tol)
    shape = f"lengths={lengths}" if lengths else f"B={b} N={n}"
    assert not bad, f"{variant}: {shape} H={h} {dtype}: errors above {tol:g} (dg: x{SLACK['dg']:g}): {bad} " \
                    f"(all: {errors})"
    return errors


def train_step_keeping(model, ids):
    """One loss + backward of a causal LM on ids [B, N + 1]: (loss, gradients by name, the bytes autograd
    kept for the backward). Checkpointed blocks keep what they save to themselves, so the count shows
    whether activation checkpointing is on."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}, sum(saved)
