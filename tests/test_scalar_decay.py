"""decay=scalar: a log decay g [B, N, H] per token and head (Mamba2 / simple GLA). Fast decays and
forgetting, cumulative decays far past the float range, the CPU reference path, torch.compile, and on a
GPU a million tokens per sequence against a float64 recurrence. (The variant matrix, states, splitting,
both backward paths and the decode step cover decay=scalar in test_kernels.py and test_step.py.)"""
import functools

import pytest
import torch
from conftest import DEVICE, DTYPES
from helpers import check_variant

import lightgen
from lightgen import launch, reference, verify
from lightgen.verify import TOLERANCE, random_inputs, rel_err


@pytest.mark.parametrize("tile", [16, None])
@pytest.mark.parametrize("path", ["fused", "split"])
def test_fast_decays_and_forgetting(path, tile, monkeypatch):
    """Rates near 1 and tokens that forget almost everything (g down to -30): every weight from
    exp(-30) to 1 in one chunk, with states, both backward paths, one or several output tiles."""
    monkeypatch.setattr(verify, "random_log_decays", functools.partial(verify.random_log_decays, fast=True))
    with launch.backward(path), launch.override({"BK": tile, "BV": tile} if tile else {}):
        check_variant(lightgen.Variant.parse("decay=scalar,causal,phi=silu,dk=32,dv=32"), b=2, n=77, h=2,
                      dtype=DTYPES[0], device=DEVICE, states=True)


def test_cumulative_decay_far_past_the_float_range(monkeypatch):
    """G_t reaches -2e4 (exp(-G) overflows any float long before): the kernels only ever exponentiate
    sums within a chunk, so outputs, gradients and states stay finite and right. The second half decays
    slowly again, so the states carry real information across chunks there."""
    n = 600

    def decays(b, n, h, generator):
        g = -0.02 * torch.rand(b, n, h, generator=generator)
        g[:, : n // 2] = -70.0
        return g

    monkeypatch.setattr(verify, "random_log_decays", decays)
    variant = lightgen.Variant.parse("decay=scalar,causal,phi=identity,dk=16,dv=16")
    check_variant(variant, b=1, n=n, h=2, dtype=DTYPES[0], device=DEVICE, states=True)  # NaN fails too


@pytest.mark.parametrize("kernel_rows", [2048, 0])  # ops.SUFFIX_KERNEL_ROWS: the rule's (the kernel), 0 (torch)
def test_log_decay_grad_by_kernel_and_by_torch(kernel_rows, monkeypatch):
    """dg of a batch from dL/dG (ops._log_decay_grad): each row the sum of its sequence's rows from it on, plus the
    final-state term at the last row, by the pieces module's suffix_sums (sequences of up to SUFFIX_KERNEL_ROWS
    rows; here 300, three of its 128-row steps) or by torch's scan. Against float64."""
    from lightgen import ops

    monkeypatch.setattr(ops, "SUFFIX_KERNEL_ROWS", kernel_rows)
    variant = lightgen.Variant.parse("decay=scalar,causal,dk=16,dv=16")
    g = torch.Generator().manual_seed(5)
    dG, terms = torch.randn(3, 300, 16, generator=g), torch.randn(3, 16, generator=g)
    expected = dG.double().clone()
    expected[:, -1] += terms.double()
    expected = expected.flip(1).cumsum(1).flip(1)
    got = ops._log_decay_grad(variant, dG.to(DEVICE), terms.to(DEVICE))
    assert rel_err(got.cpu(), expected) < 1e-6


@pytest.mark.parametrize("packed", [False, True])
def test_cpu_reference_path_matches_the_kernels(packed, monkeypatch):
    """LIGHTGEN_CPU_REFERENCE=1 runs lightgen.reference instead of the kernels: same o, final state and
    gradients, dg included (by autograd there, from the kernels' dL/dG parts here); packed: three
    sequences, one empty, through cu_seqlens."""
    if DEVICE != "cpu":
        pytest.skip("the reference path is the CPU fallback")
    attn = lightgen.compile("decay=scalar,causal,lrpe=d,phi=silu,dk=16,dv=16")
    batch, cu = (1, torch.tensor([0, 15, 15, 40], dtype=torch.int32)) if packed else (2, None)
    q, k, v, do, _, theta, g = random_inputs(attn.variant, batch, 40, 2, torch.float32, DEVICE)
    h0 = torch.randn(attn.new_state(3 if packed else 2, 2).shape) * 0.3

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, theta, h0, g)]
        o, ht = attn(*leaves[:3], theta=leaves[3], initial_state=leaves[4], output_final_state=True, g=leaves[5],
                     cu_seqlens=cu)
        grads = torch.autograd.grad((o, ht), leaves, (do, torch.ones_like(ht)))
        return [o, ht, *grads]

    kernels = run()
    monkeypatch.setenv("LIGHTGEN_CPU_REFERENCE", "1")
    for name, a, b in zip(["o", "ht", "dq", "dk", "dv", "dtheta", "dh0", "dg"], kernels, run()):
        assert rel_err(a, b) < TOLERANCE[torch.float32] * verify.SLACK.get(name, 1.0), name


def test_torch_compile_fullgraph_and_opcheck():
    """g is an input with a gradient: the op's schema, fake tensors and autograd (opcheck), and one graph."""
    attn = lightgen.compile("decay=scalar,causal,phi=silu,dk=16,dv=16")
    q, k, v, _, _, _, g = random_inputs(attn.variant, 1, 40, 2, torch.float32, DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]

    def loss(q, k, v, g):
        o, state = attn(q, k, v, g=g, output_final_state=True)
        return o.square().mean() + state.mean()

    eager = torch.autograd.grad(loss(*leaves), leaves)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*leaves), leaves)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    op = getattr(torch.ops.lightgen, f"attn_{attn.variant.hash}")
    log_decay = g.clone().requires_grad_()
    h0 = torch.randn(1, 2, 16, 16, device=DEVICE)
    for segments in (1, 2):  # 2: the sequence as two pieces (the op returns the states they started from)
        torch.library.opcheck(op, (q, k, v, log_decay, None, h0, 0, True, segments))


def _chunked_recurrence(variant, q, k, v, slopes, g, theta=None):
    """The float64 recurrence (S_t = lambda_t S_{t-1} + f(k_t)^T v_t), a piece at a time through
    lightgen.reference.quadratic with states: o [B, N, H, dv] and the final state, on q's device.
    (decay=vector's reference weights are [piece, piece, H, dk]: shorter pieces. LRPE: each piece from its
    own position, the angles t * theta exact in float64.)"""
    b, n, h, _ = q.shape
    piece = 256 if variant.decay == "vector" else 4096
    rows = 2 * variant.dk if variant.lrpe == "d" else variant.dk
    state = torch.zeros(b, h, rows, variant.dv, dtype=torch.float64, device=q.device)
    out = []
    for start in range(0, n, piece):
        part = slice(start, start + piece)
        o, state = reference.quadratic(variant, q[:, part].double(), k[:, part].double(), v[:, part].double(),
                                       None if slopes is None else slopes.double(),
                                       theta=None if theta is None else theta.double(), offset=start,
                                       initial_state=state, output_final_state=True,
                                       g=None if g is None else g[:, part].double())
        out.append(o)
    return torch.cat(out, dim=1), state


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="a million tokens need a GPU")
@pytest.mark.parametrize("decay", ["none", "constant", "scalar", "vector", "constant,lrpe=d"])
def test_a_million_tokens_in_bf16(decay):
    """One sequence of 2^20 tokens (few heads: the sequence is also split into pieces): o, the final state
    and every gradient stay finite, and o on sampled positions and the final state match a float64
    recurrence (lightgen.reference, in pieces, on the GPU). With LRPE the angles reach 5e5 rad."""
    n, h = 2**20, 2
    attn = lightgen.compile(f"decay={decay},causal,phi=identity,dk=64,dv=64")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    theta = torch.rand(h, 64, device=DEVICE, generator=gen) * 0.5 if attn.variant.lrpe == "d" else None
    q, k = (torch.randn(1, n, h, 64, device=DEVICE, generator=gen).mul(64 ** -0.25).bfloat16() for _ in range(2))
    v, do = (torch.randn(1, n, h, 64, device=DEVICE, generator=gen).bfloat16() for _ in range(2))
    slopes = torch.tensor(lightgen.tnl_slopes(h), device=DEVICE) if attn.variant.decay == "constant" else None
    dims = {"scalar": None, "vector": 64}.get(decay, False)  # g per token and head (and key dim)
    g = verify.random_log_decays(1, n, h, torch.Generator().manual_seed(0), dims=dims).to(DEVICE) \
        if dims is not False else None  # G_N is about -5e4
    leaves = [t.requires_grad_() for t in (q, k, v, *([g] if g is not None else []))]
    o, final = attn(q, k, v, slopes=slopes, theta=theta, g=g, output_final_state=True)
    grads = torch.autograd.grad((o, final), leaves, (do, torch.ones_like(final)))
    for name, t in zip(["o", "final state", "dq", "dk", "dv", "dg"], [o, final, *grads]):
        assert torch.isfinite(t).all(), f"{name} is not finite"
    with torch.no_grad():
        ref, ref_final = _chunked_recurrence(attn.variant, q, k, v, slopes, g, theta)
    sampled = torch.cat([torch.randint(0, n, (512,), device=DEVICE, generator=gen), torch.arange(n - 64, n, device=DEVICE)])
    tol = TOLERANCE[torch.bfloat16]
    errors = {"o (sampled)": rel_err(o[:, sampled], ref[:, sampled]), "final state": rel_err(final, ref_final)}
    assert all(e < tol for e in errors.values()), f"decay={decay}: tolerance {tol:g}, errors {errors}"
