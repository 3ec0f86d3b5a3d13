"""The decode step: T steps from a state equal the chunk kernel over the same T tokens, and the
float64 reference; per-row positions; the state updated in place; bad input named."""
import pytest
import torch
from conftest import DEVICE, DTYPES

import lightgen
from lightgen import launch, reference
from lightgen.verify import TOLERANCE, random_inputs, rel_err

SPECS = ["decay=constant,causal,lrpe=d,phi=silu,dk=16,dv=32",
         "decay=none,causal,phi=identity,dk=32,dv=16",
         "decay=constant,causal,phi=elu+1,dk=16,dv=16,scale=0.5",
         "decay=none,causal,lrpe=d,phi=silu,dk=32,dv=32",
         "decay=scalar,causal,lrpe=d,phi=silu,dk=16,dv=32",
         "decay=vector,causal,lrpe=d,phi=silu,dk=16,dv=32"]


def _setup(spec, b, n, h, dtype, seed=0):
    """The compiled variant, inputs [B, N, H, D], a random initial state [B, H, F, dv] fp32 and the log
    decays g [B, N, H] (decay=scalar), [B, N, H, dk] (decay=vector), else None."""
    attn = lightgen.compile(spec)
    variant = attn.variant
    q, k, v, _, slopes, theta, g = random_inputs(variant, b, n, h, dtype, DEVICE, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    h0 = (torch.randn(attn.new_state(b, h).shape, generator=gen) * 0.3).to(DEVICE)
    return attn, q, k, v, slopes, theta, h0, g


def _f64(t):
    return None if t is None else t.double()


def _at(g, t):
    """The log decays of token t, [B, H] or [B, H, dk] (None without a learned decay)."""
    return None if g is None else g[:, t]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", SPECS)
def test_steps_equal_the_chunk_kernel(spec, dtype):
    """T steps from h0 at positions offset.. = one chunk call with initial_state=h0, offset=offset."""
    b, n, h, offset = 2, 6, 2, 5
    attn, q, k, v, slopes, theta, h0, g = _setup(spec, b, n, h, dtype)
    state = h0.clone()
    with torch.no_grad():
        steps = torch.stack([attn.step(q[:, t], k[:, t], v[:, t], state, slopes, theta, position=offset + t,
                                       g=_at(g, t)) for t in range(n)], dim=1)
        chunk, final = attn(q, k, v, slopes, theta, initial_state=h0, output_final_state=True, offset=offset, g=g)
    ref, ref_final = reference.quadratic(attn.variant, q.double(), k.double(), v.double(), _f64(slopes),
                                         _f64(theta), h0.double(), offset, output_final_state=True, g=_f64(g))
    assert steps.dtype == v.dtype and steps.shape == v.shape
    tol = TOLERANCE[dtype]
    errors = {"o vs chunk": rel_err(steps, chunk), "state vs chunk": rel_err(state, final),
              "o vs float64": rel_err(steps, ref), "state vs float64": rel_err(state, ref_final)}
    assert all(e < tol for e in errors.values()), f"{spec} {dtype}: tolerance {tol:g}, errors {errors}"


def test_rows_at_different_positions():
    """A position per batch row: each row as if stepped alone at its position; tiles of BV = 8."""
    spec = "decay=constant,causal,lrpe=d,phi=silu,dk=16,dv=32"
    attn, q, k, v, slopes, theta, h0, _ = _setup(spec, b=3, n=1, h=2, dtype=DTYPES[0])
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    positions = torch.tensor([0, 7, 100], device=DEVICE)
    state = h0.clone()
    with torch.no_grad(), launch.override({"BV": 8}):
        o = attn.step(q, k, v, state, slopes, theta, position=positions)
        for row, pos in enumerate(positions.tolist()):
            alone = h0[row:row + 1].clone()
            o_row = attn.step(q[row:row + 1], k[row:row + 1], v[row:row + 1], alone, slopes, theta, position=pos)
            torch.testing.assert_close(o[row:row + 1], o_row, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(state[row:row + 1], alone, rtol=1e-6, atol=1e-6)
    ref, ref_state = reference.step(attn.variant, q.double(), k.double(), v.double(), h0.double(), _f64(slopes),
                                    _f64(theta), positions)
    assert rel_err(o, ref) < TOLERANCE[DTYPES[0]] and rel_err(state, ref_state) < TOLERANCE[DTYPES[0]]
    # positions matter: the same token at position 0 everywhere gives another output
    with torch.no_grad():
        assert rel_err(attn.step(q, k, v, h0.clone(), slopes, theta, position=0), o) > 1e-2


def test_state_is_updated_in_place():
    attn, q, k, v, slopes, theta, h0, _ = _setup("decay=constant,causal,phi=silu,dk=16,dv=16", b=2, n=1, h=2,
                                              dtype=DTYPES[0])
    state = h0.clone()
    address = state.data_ptr()
    with torch.no_grad():
        o = attn.step(q[:, 0], k[:, 0], v[:, 0], state, slopes)
    assert state.data_ptr() == address and o.data_ptr() != address
    _, expected = reference.step(attn.variant, q[:, 0].double(), k[:, 0].double(), v[:, 0].double(), h0.double(),
                                 slopes.double())
    assert not torch.equal(state, h0) and rel_err(state, expected) < TOLERANCE[DTYPES[0]]


@pytest.mark.skipif(DEVICE == "cuda", reason="the kernel side runs on CPU tensors under the interpreter only")
@pytest.mark.parametrize("spec", ["decay=constant,causal,lrpe=d,phi=silu,dk=16,dv=16", "decay=scalar,causal,dk=16,dv=16",
                                  "decay=vector,causal,lrpe=d,dk=16,dv=16"])
def test_cpu_reference_path(spec, monkeypatch):
    """CPU tensors without the interpreter take lightgen.reference.step: same result, same in-place update."""
    attn, q, k, v, slopes, theta, h0, g = _setup(spec, b=2, n=1, h=2, dtype=torch.float32)
    q, k, v, g = q[:, 0], k[:, 0], v[:, 0], _at(g, 0)
    kernel_state, ref_state = h0.clone(), h0.clone()
    with torch.no_grad():
        o_kernel = attn.step(q, k, v, kernel_state, slopes, theta, position=3, g=g)
        monkeypatch.setenv("LIGHTGEN_CPU_REFERENCE", "1")
        o_ref = attn.step(q, k, v, ref_state, slopes, theta, position=3, g=g)
    torch.testing.assert_close(o_ref, o_kernel, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_state, kernel_state, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_argument():
    attn = lightgen.compile("decay=constant,causal,lrpe=d,phi=silu,dk=16,dv=32")
    q, k = torch.randn(2, 2, 3, 16, device=DEVICE)
    v = torch.randn(2, 3, 32, device=DEVICE)
    theta = torch.rand(3, 16, device=DEVICE)
    state = attn.new_state(2, 3, DEVICE)
    cases = [
        (dict(q=q[None]), ValueError, "q"),
        (dict(k=k[:, :2]), ValueError, "k"),
        (dict(v=v[..., :16]), ValueError, "v"),
        (dict(v=v.half()), TypeError, "k, v"),
        (dict(state=state[:, :, :16]), ValueError, "state"),  # LRPE: F = 2 dk
        (dict(state=state[:1]), ValueError, "state"),
        (dict(state=state.double()), TypeError, "state"),
        (dict(state=state.transpose(2, 3).contiguous().transpose(2, 3)), ValueError, "state"),
        (dict(state=None), TypeError, "state"),
        (dict(theta=None), ValueError, "theta"),
        (dict(slopes=torch.ones(2, device=DEVICE)), ValueError, "slopes"),
        (dict(position=-1), ValueError, "position"),
        (dict(position=2.0), ValueError, "position"),
        (dict(position=torch.zeros(3, dtype=torch.long, device=DEVICE)), ValueError, "position"),
        (dict(position=torch.zeros(2, device=DEVICE)), TypeError, "position"),
        (dict(q=q.clone().requires_grad_()), ValueError, "q"),
        (dict(state=state.clone().requires_grad_()), ValueError, "state"),
        (dict(theta=theta.clone().requires_grad_()), ValueError, "theta"),
    ]
    good = dict(q=q, k=k, v=v, state=state, theta=theta)
    for change, err, name in cases:
        with pytest.raises(err) as info:
            attn.step(**{**good, **change})
        assert str(info.value).startswith(name), f"{change}: expected the message to start with {name!r}: {info.value}"
    with torch.no_grad():  # inference: inputs that require grad are fine without grad mode
        attn.step(q.clone().requires_grad_(), k, v, state, theta=theta.clone().requires_grad_())
    noncausal = lightgen.compile("decay=constant,noncausal,dk=16,dv=32")
    with pytest.raises(ValueError, match="non-causal"):
        noncausal.step(q, k, v, noncausal.new_state(2, 3, DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="4096 steps need a GPU (the interpreter takes minutes)")
@pytest.mark.parametrize("spec", ["decay=constant,causal,lrpe=d,phi=silu,dk=128,dv=128,scale=1",
                                  "decay=none,causal,phi=elu+1,dk=64,dv=128",
                                  "decay=scalar,causal,phi=identity,dk=128,dv=128,scale=1",
                                  "decay=vector,causal,phi=identity,dk=128,dv=128,scale=1"])
def test_4096_steps_after_chunked_prefill_match_the_parallel_forward(spec):
    """bf16: a prefill of 1000 tokens in two chunks hands its state to 4096 decode steps; outputs and the
    final state match the parallel forward over all 5096 tokens (the bf16 kernels) and float64."""
    prompt, steps, split = 1000, 4096, 600
    attn, q, k, v, slopes, theta, _, g = _setup(spec, b=2, n=prompt + steps, h=4, dtype=torch.bfloat16)

    def piece(start, end):  # the log decays of tokens start..end-1 (None without a learned decay)
        return None if g is None else g[:, start:end]

    with torch.no_grad():
        whole, whole_final = attn(q, k, v, slopes, theta, output_final_state=True, g=g)
        _, state = attn(q[:, :split], k[:, :split], v[:, :split], slopes, theta, output_final_state=True,
                        g=piece(0, split))
        first, state = attn(q[:, split:prompt], k[:, split:prompt], v[:, split:prompt], slopes, theta,
                            initial_state=state, output_final_state=True, offset=split, g=piece(split, prompt))
        by_token = [t.transpose(0, 1).contiguous() for t in (q, k, v)]  # [N, B, H, D]: one contiguous row per step
        out = [attn.step(qt, kt, vt, state, slopes, theta, position=prompt + i, g=_at(g, prompt + i))
               for i, (qt, kt, vt) in enumerate(zip(*(t[prompt:] for t in by_token)))]
        decoded = torch.stack(out, dim=1)
        ref, ref_final = reference.quadratic(attn.variant, q.double(), k.double(), v.double(), _f64(slopes),
                                             _f64(theta), output_final_state=True, g=_f64(g))
    tol = TOLERANCE[torch.bfloat16]
    errors = {"prefill vs parallel": rel_err(first, whole[:, split:prompt]),
              "decode vs parallel": rel_err(decoded, whole[:, prompt:]),
              "decode vs float64": rel_err(decoded, ref[:, prompt:]),
              "last 256 steps vs float64": rel_err(decoded[:, -256:], ref[:, -256:]),
              "final state vs parallel": rel_err(state, whole_final), "final state vs float64": rel_err(state, ref_final)}
    assert all(e < tol for e in errors.values()), f"{spec}: tolerance {tol:g}, errors {errors}"
