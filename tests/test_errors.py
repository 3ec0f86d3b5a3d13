"""Bad input gets a ValueError/TypeError that names the argument."""
import pytest
import torch
from conftest import DEVICE

import lightgen
from lightgen.cli import main as cli_main

SPEC = "decay=constant,causal,lrpe=d,phi=silu,dk=16,dv=32"


@pytest.mark.parametrize("spec,needle", [
    ("dk=16", "dv"),
    ("dk=48,dv=16", "dk=48"),
    ("dk=16,dv=512", "dv=512"),
    ("decay=exp,dk=16,dv=16", "decay"),
    ("lrpe=x,dk=16,dv=16", "lrpe"),
    ("phi=swoosh,dk=16,dv=16", "phi"),
    ("phi=foo(x),dk=16,dv=16", "foo"),
    ("phi=besselj(0,x),dk=16,dv=16", "phi"),
    ("phi=x*y,dk=16,dv=16", "phi"),
    ("phi=x+,dk=16,dv=16", "phi"),
    ("dk=16,dv=16,,", "stray comma"),
    ("dk=16,dv=16,color=red", "color"),
    ("dk=sixteen,dv=16", "dk"),
    ("scale=-1,dk=16,dv=16", "scale"),
    ("causal=maybe,dk=16,dv=16", "causal"),
    ("phi=Max(x,0,dk=16,dv=16", "unbalanced"),
    ("decay=scalar,noncausal,dk=16,dv=16", "causal only"),
    ("", "spec"),
])
def test_malformed_spec(spec, needle):
    with pytest.raises(ValueError, match=None) as info:
        lightgen.Variant.parse(spec)
    assert needle in str(info.value)


def test_spec_round_trip_and_hash():
    v = lightgen.Variant.parse(" causal , decay=constant, lrpe=d ,phi=silu, dk=16, dv=32 ")
    assert lightgen.Variant.parse(v.canonical()) == v
    assert lightgen.Variant.parse(v.canonical()).hash == v.hash
    # the same math under another name is the same kernel
    assert lightgen.Variant.parse(SPEC.replace("phi=silu", "phi=x*sigmoid(x)")).hash == v.hash
    assert lightgen.Variant.parse(SPEC.replace("causal", "noncausal")).hash != v.hash
    assert lightgen.Variant(dk=16, dv=16).scale == 0.25
    with pytest.raises(TypeError, match="variant"):
        lightgen.compile(42)


def _inputs(b=1, n=20, h=2, dk=16, dv=32, dtype=torch.float32, device=DEVICE):
    return (torch.randn(b, n, h, dk, dtype=dtype, device=device), torch.randn(b, n, h, dk, dtype=dtype, device=device),
            torch.randn(b, n, h, dv, dtype=dtype, device=device))


def test_bad_tensors_name_the_argument():
    attn = lightgen.compile(SPEC)
    q, k, v = _inputs()
    theta = torch.rand(2, 16, device=DEVICE)
    cases = [
        (lambda: attn(q.numpy() if DEVICE == "cpu" else [1], k, v, theta=theta), TypeError, "q"),
        (lambda: attn(q[0], k, v, theta=theta), ValueError, "q"),
        (lambda: attn(*_inputs(dk=32), theta=theta), ValueError, "q"),
        (lambda: attn(q, k[:, :10], v, theta=theta), ValueError, "k"),
        (lambda: attn(q, k, v[..., :16], theta=theta), ValueError, "v"),
        (lambda: attn(q, k, v.double(), theta=theta), TypeError, "v"),
        (lambda: attn(q.int(), k, v, theta=theta), TypeError, "q"),
        (lambda: attn(q, k.half(), v, theta=theta), TypeError, "k"),
        (lambda: attn(q, k, v), ValueError, "theta"),
        (lambda: attn(q, k, v, theta=torch.rand(3, 16)), ValueError, "theta"),
        (lambda: attn(q, k, v, theta=torch.ones(2, 16, dtype=torch.int64, device=DEVICE)), TypeError, "theta"),
        (lambda: attn(q, k, v, theta=theta, slopes=torch.ones(5, device=DEVICE)), ValueError, "slopes"),
        (lambda: attn(q, k, v, theta=theta, slopes=torch.ones(2, device=DEVICE, requires_grad=True)),
         ValueError, "slopes"),
    ]
    if DEVICE == "cuda":
        cases.append((lambda: attn(q, k.cpu(), v, theta=theta), ValueError, "k"))
        cases.append((lambda: attn(q, k, v, theta=theta.cpu()), ValueError, "theta"))
    else:
        cases.append((lambda: attn(q, k.to("meta"), v, theta=theta), ValueError, "k"))
        cases.append((lambda: attn(q, k, v, theta=theta.to("meta")), ValueError, "theta"))
    for call, err, name in cases:
        with pytest.raises(err) as info:
            call()
        assert str(info.value).startswith(name), f"expected the message to start with {name!r}: {info.value}"


def test_arguments_the_variant_does_not_take():
    plain = lightgen.compile("decay=none,causal,dk=16,dv=32")
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="^slopes"):
        plain(q, k, v, slopes=torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="^theta"):
        plain(q, k, v, theta=torch.ones(2, 16, device=DEVICE))


def test_bad_log_decays_name_g():
    """decay=scalar takes g [B, N, H] (a step: [B, H]); the other decays take no g."""
    attn = lightgen.compile("decay=scalar,causal,dk=16,dv=32")
    q, k, v = _inputs(b=2, n=20, h=3)
    g = -torch.rand(2, 20, 3, device=DEVICE)
    other = "meta" if DEVICE == "cpu" else "cpu"
    cases = [
        (lambda: attn(q, k, v), ValueError),
        (lambda: attn(q, k, v, g=g[:, :, :2]), ValueError),
        (lambda: attn(q, k, v, g=g[..., None]), ValueError),
        (lambda: attn(q, k, v, g=g.transpose(0, 1)), ValueError),
        (lambda: attn(q, k, v, g=g.long()), TypeError),
        (lambda: attn(q, k, v, g=g.tolist()), TypeError),
        (lambda: attn(q, k, v, g=g.to(other)), ValueError),
        (lambda: attn.step(q[:, 0], k[:, 0], v[:, 0], attn.new_state(2, 3, DEVICE)), ValueError),
        (lambda: attn.step(q[:, 0], k[:, 0], v[:, 0], attn.new_state(2, 3, DEVICE), g=g), ValueError),
        (lambda: attn.step(q[:, 0], k[:, 0], v[:, 0], attn.new_state(2, 3, DEVICE),
                           g=g[:, 0].clone().requires_grad_()), ValueError),
        (lambda: lightgen.compile("decay=constant,causal,dk=16,dv=32")(q, k, v, g=g), ValueError),
        (lambda: lightgen.compile("decay=none,causal,dk=16,dv=32")(q, k, v, g=g), ValueError),
    ]
    for call, err in cases:
        with pytest.raises(err) as info:
            call()
        assert str(info.value).startswith("g"), f"expected the message to start with 'g': {info.value}"
    with pytest.raises(ValueError, match="^slopes.*takes g"):
        attn(q, k, v, g=g, slopes=torch.ones(3, device=DEVICE))
    attn(q, k, v, g=g.half())  # any float dtype


@pytest.mark.parametrize("decay", ["constant", "scalar"])
def test_empty_sequence(decay):
    attn = lightgen.compile(f"decay={decay},causal,dk=16,dv=32")
    q, k, v = (t.requires_grad_() for t in _inputs(n=0))
    g = torch.zeros(1, 0, 2, device=DEVICE, requires_grad=True) if decay == "scalar" else None
    o = attn(q, k, v, g=g)
    assert o.shape == v.shape
    o.sum().backward()
    assert q.grad.shape == q.shape
    assert g is None or g.grad.shape == g.shape


def test_cli_reports_bad_spec(capsys):
    assert cli_main(["show", "dk=48,dv=16"]) == 2
    assert "dk=48" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["build", "--help"])
    assert "interpreter" in capsys.readouterr().out


def test_cpu_reference_path_without_interpreter(monkeypatch):
    """CPU tensors without TRITON_INTERPRET run the PyTorch reference, gradients included."""
    import copy
    import pickle

    monkeypatch.setenv("LIGHTGEN_CPU_REFERENCE", "1")
    attn = lightgen.compile(SPEC)
    assert pickle.loads(pickle.dumps(attn)) is attn and copy.deepcopy(attn) is attn
    q, k, v = (t.requires_grad_() for t in _inputs(device="cpu"))
    theta = torch.rand(2, 16, requires_grad=True)
    o = attn(q, k, v, theta=theta)
    assert o.is_contiguous()
    o.square().sum().backward()
    expected = lightgen.reference.quadratic(attn.variant, q, k, v, torch.tensor(lightgen.tnl_slopes(2)), theta)
    torch.testing.assert_close(o, expected)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v, theta))


def test_bad_states_name_the_argument():
    attn = lightgen.compile(SPEC)
    q, k, v = _inputs()
    theta = torch.rand(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="^initial_state"):
        attn(q, k, v, theta=theta, initial_state=torch.zeros(1, 2, 16, 32, device=DEVICE))  # LRPE: F = 2 dk
    with pytest.raises(TypeError, match="^initial_state"):
        attn(q, k, v, theta=theta, initial_state=torch.zeros(1, 2, 32, 32, dtype=torch.int32, device=DEVICE))
    for offset in (-1, 1.5, True):
        with pytest.raises(ValueError, match="^offset"):
            attn(q, k, v, theta=theta, offset=offset)
    noncausal = lightgen.compile("decay=constant,noncausal,dk=16,dv=32")
    with pytest.raises(ValueError, match="^initial_state, output_final_state"):
        noncausal(q, k, v, output_final_state=True)
