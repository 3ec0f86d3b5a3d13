"""The fused epilogue (norm=srms, gate=act): output, every gradient (du too) vs float64, states,
launch constraints, errors, torch.compile."""
import pytest
import torch
from conftest import DEVICE, DTYPES
from helpers import check_variant

import lightgen
from lightgen import launch, reference, render
from lightgen.verify import random_gate_input, random_inputs

CASES = [
    "decay=constant,causal,lrpe=d,phi=silu,dk=32,dv=32,scale=1,norm=srms,gate=identity",  # TransNormerLLM's
    "decay=constant,causal,dk=16,dv=32,norm=srms",
    "decay=none,noncausal,lrpe=d,dk=32,dv=16,norm=srms",
    "decay=constant,noncausal,phi=elu+1,dk=16,dv=16,gate=sigmoid",
    "decay=none,causal,lrpe=d,phi=silu,dk=64,dv=16,gate=silu",
    "decay=constant,causal,dk=16,dv=64,gate=x**2+tanh(x)",
    "decay=constant,noncausal,lrpe=d,dk=16,dv=32,norm=srms,eps=1e-3,gate=silu",
    "decay=scalar,causal,lrpe=d,phi=silu,dk=32,dv=16,norm=srms,gate=sigmoid",
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", CASES)
def test_epilogue_matches_float64(spec, dtype):
    errors = check_variant(lightgen.Variant.parse(spec), b=2, n=45, h=2, dtype=dtype, device=DEVICE)
    assert ("du" in errors) == ("gate=" in spec)


@pytest.mark.parametrize("spec", ["decay=constant,causal,lrpe=d,phi=silu,dk=16,dv=32,norm=srms,gate=silu",
                                  "decay=scalar,causal,dk=32,dv=16,gate=identity"])
def test_states_are_those_of_the_attention(spec):
    """initial and final states (and their gradients) with an epilogue: the state is o's, before the epilogue."""
    check_variant(lightgen.Variant.parse(spec), b=2, n=45, h=2, dtype=DTYPES[0], device=DEVICE, states=True,
                  offset=5)
    attn, plain = lightgen.compile(spec), lightgen.compile(lightgen.Variant.parse(spec).without_epilogue)
    q, k, v, _, slopes, theta, g = random_inputs(attn.variant, 1, 40, 2, DTYPES[0], DEVICE)
    u = random_gate_input(attn.variant, 1, 40, 2, DTYPES[0], DEVICE)
    _, state = attn(q, k, v, slopes, theta, output_final_state=True, g=g, u=u)
    _, plain_state = plain(q, k, v, slopes, theta, output_final_state=True, g=g)
    torch.testing.assert_close(state, plain_state)


def test_sequence_splitting_with_epilogue(monkeypatch):
    monkeypatch.setattr(launch, "segments", lambda variant, shape, dtype, device: 2)
    check_variant(lightgen.Variant.parse("decay=constant,causal,lrpe=d,phi=silu,dk=16,dv=32,norm=srms,gate=silu"),
                  b=2, n=96, h=2, dtype=DTYPES[0], device=DEVICE, states=True, offset=3)


def test_gate_without_norm_may_tile_the_output():
    """Only the norm needs whole rows: a gate alone runs with several output tiles per head."""
    spec = "decay=constant,causal,dk=16,dv=32,gate=silu"
    assert launch.heuristic(lightgen.Variant.parse(spec), "fwd", interpreted=True)["BV"] == 32
    with launch.override({"BV": 16}):
        check_variant(lightgen.Variant.parse(spec), b=2, n=45, h=2, dtype=DTYPES[0], device=DEVICE)


def test_norm_needs_the_whole_row():
    from lightgen import tune

    variant = lightgen.Variant.parse("decay=constant,causal,dk=64,dv=128,norm=srms")
    for interpreted in (True, False):
        assert launch.heuristic(variant, "fwd", interpreted)["BV"] == 128
    assert launch.heuristic(variant, "bwd_dkv", True)["BV"] == 64  # the backward tiles as without the norm
    params = {**launch.heuristic(variant, "fwd", False), "BV": 64}
    assert "whole output row" in launch.problem(params, variant, "fwd")
    assert launch.problem(params, variant, "bwd_dkv") is None
    assert launch.problem(params, variant.without_epilogue, "fwd") is None

    class Optuna:  # tune.space only reads optuna.distributions.CategoricalDistribution
        class distributions:
            CategoricalDistribution = staticmethod(lambda choices: list(choices))

    assert tune.space(Optuna, variant, "fwd", launch.heuristic(variant, "fwd", False))["BV"] == [128]
    with launch.override({"BV": 64}), pytest.raises(ValueError, match="whole output row"):
        lightgen.compile(variant)(*random_inputs(variant, 1, 8, 1, DTYPES[0], DEVICE)[:3])


def test_spec_text_and_hash():
    v = lightgen.Variant.parse("dk=16,dv=16,gate=silu,norm=srms")
    assert v.canonical().endswith(",norm=srms,eps=1e-06,gate=silu")
    assert lightgen.Variant.parse(v.canonical()) == v
    # the gate is hashed by its expression; eps and the keys themselves are part of the hash
    assert lightgen.Variant.parse("dk=16,dv=16,gate=x*sigmoid(x),norm=srms").hash == v.hash
    others = ["dk=16,dv=16,gate=sigmoid,norm=srms", "dk=16,dv=16,gate=silu,norm=srms,eps=1e-5", "dk=16,dv=16,gate=silu",
              "dk=16,dv=16,norm=srms", "dk=16,dv=16"]
    assert len({v.hash, *(lightgen.Variant.parse(s).hash for s in others)}) == 1 + len(others)
    # without an epilogue nothing changes: no new keys in the text, nothing new in the source
    plain = lightgen.Variant.parse("decay=constant,causal,dk=16,dv=16")
    assert plain.canonical() == "decay=constant,causal,lrpe=none,phi=identity,dk=16,dv=16,scale=0.25"
    assert v.without_epilogue == lightgen.Variant(dk=16, dv=16)
    source = render.render(plain)
    assert "bwd_epilogue" not in source and "_gate" not in source and "U, Y" not in source
    assert "def bwd_epilogue" in render.render(v) and "def _gate_grad" in render.render(v)


def test_step_applies_the_epilogue():
    """The decode step returns what the sequence call returns for the same token."""
    spec = "decay=constant,causal,lrpe=d,phi=silu,dk=16,dv=16,norm=srms,gate=sigmoid"
    attn = lightgen.compile(spec)
    q, k, v, _, slopes, theta, _ = random_inputs(attn.variant, 2, 9, 2, torch.float32, DEVICE)
    u = random_gate_input(attn.variant, 2, 9, 2, torch.float32, DEVICE)
    o = attn(q, k, v, slopes, theta, u=u)
    with torch.no_grad():
        _, state = attn(q[:, :-1], k[:, :-1], v[:, :-1], slopes, theta, output_final_state=True, u=u[:, :-1])
        o_t = attn.step(q[:, -1], k[:, -1], v[:, -1], state, slopes, theta, position=8, u=u[:, -1])
    torch.testing.assert_close(o_t, o[:, -1], rtol=1e-4, atol=1e-5)


def test_reference_epilogue_is_srmsnorm_then_gate():
    variant = lightgen.Variant.parse("dk=16,dv=16,norm=srms,eps=0.5,gate=silu")
    o, u = torch.randn(2, 3, 2, 16, dtype=torch.float64), torch.randn(2, 3, 2, 16, dtype=torch.float64)
    expected = o / (o.square().mean(-1, keepdim=True) + 0.5).sqrt() * u * torch.sigmoid(u)
    torch.testing.assert_close(reference.epilogue(variant, o, u), expected)


@pytest.mark.parametrize("kwargs,needle", [
    ({}, "u: variant has gate=silu, which needs u"),
    ({"u": torch.randn(1, 8, 2, 16)}, "u: expected shape"),
    ({"u": torch.randn(1, 8, 2, 32, dtype=torch.float16)}, "u: expected the dtype of v"),
])
def test_gate_input_errors(kwargs, needle):
    attn = lightgen.compile("decay=constant,causal,dk=16,dv=32,norm=srms,gate=silu")
    q, k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 32)
    with pytest.raises((ValueError, TypeError), match=needle):
        attn(q, k, v, **kwargs)
    with pytest.raises((ValueError, TypeError), match=needle):  # the step checks u the same way
        attn.step(q[:, 0], k[:, 0], v[:, 0], attn.new_state(1, 2), **{n: t[:, 0] for n, t in kwargs.items()})


def test_u_without_a_gate_is_refused():
    attn = lightgen.compile("decay=constant,causal,dk=16,dv=16,norm=srms")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="u: variant has gate=none"):
        attn(q, q, q, u=q)


@pytest.mark.parametrize("spec,needle", [
    ("dk=16,dv=16,norm=layer", "norm='layer'"),
    ("dk=16,dv=16,eps=1e-5", "eps=1e-05: the norm's eps, but the variant has norm=none"),
    ("dk=16,dv=16,norm=srms,eps=-1", "eps=-1.0"),
    ("dk=16,dv=16,norm=srms,eps=tiny", "eps expects a number"),
    ("dk=16,dv=16,gate=swoosh", "gate='swoosh'"),
    ("dk=16,dv=16,gate=x*y", "gate='x\\*y': the only free symbol"),
    ("dk=16,dv=16,gate=besselj(0,x)", "gate="),
])
def test_bad_epilogue_spec(spec, needle):
    with pytest.raises(ValueError, match=needle):
        lightgen.Variant.parse(spec)


def test_torch_compile_fullgraph_gated():
    attn = lightgen.compile("decay=constant,causal,lrpe=d,phi=silu,dk=16,dv=16,norm=srms,gate=silu")
    theta = torch.rand(2, 16, device=DEVICE, requires_grad=True)

    def loss(q, k, v, u):
        return (attn(q, k, v, theta=theta, u=u) * 2).square().mean()

    compiled = torch.compile(loss, fullgraph=True)
    inputs = [torch.randn(1, 40, 2, 16, device=DEVICE, requires_grad=True) for _ in range(4)]
    eager = loss(*inputs)
    eager_grads = torch.autograd.grad(eager, (*inputs, theta))
    out = compiled(*inputs)
    grads = torch.autograd.grad(out, (*inputs, theta))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    op = getattr(torch.ops.lightgen, f"attn_{attn.variant.hash}")
    log_decay = -torch.tensor(lightgen.tnl_slopes(2), device=DEVICE)
    q, k, v, u = (t.detach() for t in inputs)
    torch.library.opcheck(op, (q, k, v, log_decay, theta.detach(), None, 0, False, 1, None, u))


def test_cpu_reference_path_with_epilogue(monkeypatch):
    """Without the interpreter the op runs the PyTorch reference: same outputs and gradients (du too)."""
    attn = lightgen.compile("decay=constant,causal,dk=16,dv=16,norm=srms,gate=sigmoid")
    q, k, v, do, slopes, _, _ = random_inputs(attn.variant, 1, 20, 2, torch.float32, "cpu")
    u = random_gate_input(attn.variant, 1, 20, 2, torch.float32, "cpu")
    results = []
    for env in ("0", "1"):
        monkeypatch.setenv("LIGHTGEN_CPU_REFERENCE", env)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, u)]
        o = attn(*leaves[:3], slopes, u=leaves[3])
        results.append([o, *torch.autograd.grad(o, leaves, do)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
