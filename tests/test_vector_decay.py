"""decay=vector (GLA): a log decay g [B, N, H, dk] per token, head and key dim. Forward, every gradient
(dg included) and the states against float64; fast decays (per-chunk decays far below 2^-126, where a
factored intra-chunk product would overflow); the reference against the recurrence it stands for; the
scalar decay as the special case of equal dims; the CPU reference path; errors. (Its decode step, packed
sequences and splitting: test_step.py, test_varlen.py, test_kernels.py.)"""
import functools

import pytest
import torch
from conftest import DEVICE, DTYPES
from helpers import check_variant

import lightgen
from lightgen import launch, reference, verify
from lightgen.verify import TOLERANCE, random_inputs, rel_err

SPECS = ["decay=vector,causal,phi=identity,dk=16,dv=16",
         "decay=vector,causal,phi=silu,dk=16,dv=32",
         "decay=vector,causal,lrpe=d,phi=silu,dk=32,dv=16"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS)
def test_matches_float64(spec, dtype):
    """N = 45 is no multiple of the chunk; 16-wide tiles give several dk and dv tiles where dk or dv is 32;
    states in and out (dh0, and the final state's term of dg), LRPE from offset 3."""
    with launch.override({"BK": 16, "BV": 16}):
        check_variant(lightgen.Variant.parse(spec), b=2, n=45, h=2, dtype=dtype, device=DEVICE, states=True,
                      offset=3)


def test_fast_decays_and_forgetting(monkeypatch):
    """Rates near 1 and tokens that forget almost everything (g down to -30 per dim): a chunk's decay
    reaches 2^-1000, so f(k) 2^-cum (the usual factored form) would be inf; such chunks take the exact
    level dots and stay finite and right."""
    monkeypatch.setattr(verify, "random_log_decays", functools.partial(verify.random_log_decays, fast=True))
    errors = check_variant(lightgen.Variant.parse("decay=vector,causal,lrpe=d,phi=silu,dk=16,dv=16"), b=1, n=77,
                           h=2, dtype=DTYPES[0], device=DEVICE, states=True)
    assert all(e == e for e in errors.values())  # no NaN slipped through a comparison


@pytest.mark.parametrize("dtype", DTYPES)
def test_both_forms_of_the_intra_chunk_weights(dtype, monkeypatch):
    """The kernels weigh pairs within a chunk by a factored dot while the chunk's decay stays within the
    dot operands' range (2^-10 in fp16, 2^-100 else) and by the exact level dots below it: head 0 decays
    slowly (g = -0.01, every chunk factored), head 1 fast (g = -20 per token, every chunk by levels)."""
    def decays(b, n, h, generator, dims=None, **_):
        g = torch.full((b, n, h, dims), -0.01)
        g[:, :, 1] = -20.0
        return g * (0.5 + torch.rand(g.shape, generator=generator))

    monkeypatch.setattr(verify, "random_log_decays", decays)
    check_variant(lightgen.Variant.parse("decay=vector,causal,phi=silu,dk=16,dv=16"), b=1, n=50, h=2, dtype=dtype,
                  device=DEVICE, states=True)


def test_reference_is_the_recurrence():
    """reference.quadratic (and .recurrent) against S_t = diag(exp(g_t)) S_{t-1} + f(k_t)^T v_t,
    o_t = scale f(q_t) S_t written out here, LRPE's sin half decayed by the same g as its cos half."""
    variant = lightgen.Variant.parse("decay=vector,causal,lrpe=d,phi=silu,dk=16,dv=16")
    q, k, v, _, _, theta, g = (None if t is None else t.double() for t in random_inputs(variant, 2, 13, 2,
                                                                                       torch.float32, "cpu"))
    h0 = torch.randn(2, 2, 32, 16, dtype=torch.float64)
    fq, fk = reference.features(variant, q, theta, 5) * variant.scale, reference.features(variant, k, theta, 5)
    state, outs = h0, []
    for t in range(13):
        lam = g[:, t].exp().repeat(1, 1, 2)  # [B, H, 2 dk]: dim i decays rows i and dk + i
        state = lam[..., None] * state + fk[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhf,bhfv->bhv", fq[:, t], state))
    for form in (reference.quadratic, reference.recurrent):
        o, final = form(variant, q, k, v, theta=theta, g=g, initial_state=h0, offset=5, output_final_state=True)
        assert rel_err(o, torch.stack(outs, 1)) < 1e-12 and rel_err(final, state) < 1e-12, form.__name__


def test_equal_dims_are_the_scalar_decay():
    """g the same on every key dim is decay=scalar: the same o, dq, dk, dv, and dg summed over dims."""
    vector = lightgen.compile("decay=vector,causal,phi=silu,dk=16,dv=16")
    scalar = lightgen.compile("decay=scalar,causal,phi=silu,dk=16,dv=16")
    q, k, v, do, _, _, g = random_inputs(scalar.variant, 2, 40, 2, torch.float32, DEVICE)

    def run(attn, g):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
        o, ht = attn(*leaves[:3], g=leaves[3], output_final_state=True)
        return [o, ht, *torch.autograd.grad((o, ht), leaves, (do, torch.ones_like(ht)))]

    out_v, out_s = run(vector, g[..., None].expand(-1, -1, -1, 16)), run(scalar, g)
    out_v[-1] = out_v[-1].sum(-1)
    for name, a, b in zip(["o", "ht", "dq", "dk", "dv", "dg"], out_v, out_s):
        assert rel_err(a, b) < TOLERANCE[torch.float32] * verify.SLACK.get(name, 1.0), name


def test_cpu_reference_path_matches_the_kernels(monkeypatch):
    """LIGHTGEN_CPU_REFERENCE=1 runs lightgen.reference (dg by autograd) instead of the kernels."""
    if DEVICE != "cpu":
        pytest.skip("the reference path is the CPU fallback")
    attn = lightgen.compile("decay=vector,causal,phi=identity,dk=16,dv=16")
    q, k, v, do, _, _, g = random_inputs(attn.variant, 2, 40, 2, torch.float32, DEVICE)
    h0 = torch.randn(2, 2, 16, 16) * 0.3

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, h0, g)]
        o, ht = attn(*leaves[:3], initial_state=leaves[3], output_final_state=True, g=leaves[4])
        return [o, ht, *torch.autograd.grad((o, ht), leaves, (do, torch.ones_like(ht)))]

    kernels = run()
    monkeypatch.setenv("LIGHTGEN_CPU_REFERENCE", "1")
    for name, a, b in zip(["o", "ht", "dq", "dk", "dv", "dh0", "dg"], kernels, run()):
        assert rel_err(a, b) < TOLERANCE[torch.float32] * verify.SLACK.get(name, 1.0), name


def test_errors_and_the_one_backward_path():
    attn = lightgen.compile("decay=vector,causal,dk=16,dv=32")
    q, k = (torch.randn(2, 20, 3, 16, device=DEVICE) for _ in range(2))
    v = torch.randn(2, 20, 3, 32, device=DEVICE)
    g = -torch.rand(2, 20, 3, 16, device=DEVICE)
    for bad in (None, g[..., 0], g[..., :8], g.transpose(1, 2)):
        with pytest.raises(ValueError, match=r"^g: .*\[2, 20, 3, 16\]"):
            attn(q, k, v, g=bad)
    with pytest.raises(ValueError, match=r"^g: expected shape \[2, 20, 3\]"):  # scalar's g is [B, N, H]
        lightgen.compile("decay=scalar,causal,dk=16,dv=32")(q, k, v, g=g)
    with pytest.raises(ValueError, match="^decay=vector: causal only"):
        lightgen.Variant.parse("decay=vector,noncausal,dk=16,dv=16")
    with pytest.raises(ValueError, match=r"^g: expected shape \[1, 20, 3, 16\]"):  # packed: [1, T, H, dk]
        attn(q[:1], k[:1], v[:1], g=g[:1, ..., 0], cu_seqlens=torch.tensor([0, 5, 20], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"^g: expected shape \[2, 3, 16\]"):  # a step's: [B, H, dk]
        attn.step(q[:, 0], k[:, 0], v[:, 0], attn.new_state(2, 3, DEVICE), g=g[:, 0, :, 0])
    # one backward path (no bwd_dkv is generated), whatever is forced
    with launch.backward("fused"):
        assert launch.backward_path(attn.variant, torch.float16, 4096, torch.device(DEVICE)) == "split"
    assert "def bwd_dkv" not in attn.source() and "def step" in attn.source()
    attn(q, k, v, g=g.half())  # any float dtype


def test_tuner_case_has_the_split_kernels_and_dg_parts():
    """The tuner captures the four kernels the module has (no bwd_dkv) and the state passes, with g [B, N, H, dk]
    as an input and the dq kernel's part of dL/dG among its outputs."""
    from lightgen import tune

    case = tune._Case("decay=vector,causal,dk=16,dv=16", "fp32", 40, 2, 2, torch.device(DEVICE))
    assert sorted(launch.kernels(case.attn.variant)) == ["bwd_dk", "bwd_dq", "bwd_dv", "fwd"]
    assert sorted(case.launches) == sorted([*launch.kernels(case.attn.variant), "fwd_state", "bwd_state"])
    default = launch.heuristic(case.attn.variant, "bwd_dq", interpreted=DEVICE == "cpu")
    kernel = case.kernel("bwd_dq", default)
    assert sorted(tuple(t.shape) for t in kernel.outputs) == [(2, 40, 2, 16)] * 2  # dG part, dq
    assert kernel.error(default) == 0
