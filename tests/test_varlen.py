"""Packed sequences (cu_seqlens): q, k, v [1, T, H, D] hold S sequences back to back, each attended on its
own with its own states [S, H, F, dv]. Forward and every gradient vs the float64 reference, per-sequence
independence, both backward paths and several tiles, the op registration, errors. (The CPU reference path:
test_scalar_decay.py.)"""
import functools
import itertools

import pytest
import torch
from conftest import DEVICE, DTYPES
from helpers import check_variant
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lightgen
from lightgen import launch, reference
from lightgen.verify import TOLERANCE, random_inputs, rel_err

# empty (first, so its offset is 0 and the next starts at 0 too), one token, a partial chunk before a full
# one (C = 32 on CPU, 64 on GPU), exactly two chunks, a partial one
LENGTHS = [0, 1, 45, 64, 17]
CASES = ["decay=none,causal,dk=16,dv=32", "decay=constant,causal,lrpe=d,phi=silu,dk=32,dv=16",
         "decay=scalar,causal,lrpe=d,phi=silu,dk=16,dv=32", "decay=constant,noncausal,lrpe=d,phi=elu+1,dk=16,dv=32",
         "decay=none,noncausal,dk=32,dv=16", "decay=vector,causal,lrpe=d,phi=silu,dk=16,dv=32"]


def _check(spec, dtype=DTYPES[0], lengths=LENGTHS):
    causal = "noncausal" not in spec
    check_variant(lightgen.Variant.parse(spec), b=1, n=None, h=2, dtype=dtype, device=DEVICE, states=causal,
                  offset=3 if causal else 0, lengths=lengths)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", CASES)
def test_against_reference(spec, dtype):
    """o, dq, dk, dv (dtheta, dg), and for causal variants the states in and out, with an LRPE offset."""
    _check(spec, dtype)


@pytest.mark.parametrize("tile", [16, None])
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("spec", ["decay=scalar,causal,lrpe=d,phi=silu,dk=32,dv=32",
                                  "decay=constant,noncausal,phi=silu,dk=32,dv=32",
                                  "decay=vector,causal,phi=silu,dk=32,dv=32"])
def test_backward_paths_and_tiles(spec, path, tile):
    with launch.backward(path), launch.override({"BK": tile, "BV": tile} if tile else {}):
        _check(spec, lengths=[17, 0, 40, 0])  # empty sequences in the middle and last too


@pytest.mark.parametrize("length", [16, 40])
@pytest.mark.parametrize("spec", CASES + ["decay=none,noncausal,lrpe=d,phi=silu,dk=16,dv=32,gate=silu",
                                          "decay=constant,causal,lrpe=d,phi=silu,dk=16,dv=16,scale=1,norm=srms,eps=0.01,"
                                          "gate=silu"])
def test_long_sequences_cut_into_pieces(spec, length, monkeypatch):
    """Packed sequences longer than launch.piece_length (forced here) run as pieces, packed sequences of their own,
    from the states the scan hands them (non-causal without decay: the sum of all its sequence's pieces' own; with a
    decay, one from each side, two state passes and scans each way): the same outputs, gradients and states. Pieces of 16: a sequence of 45 as 16 + 16 + 13, of 17 as 16 + 1; of 40: 45
    as 40 + 5, 17 whole. Both ends empty; LRPE positions go on across the pieces from the offset."""
    from lightgen import ops

    monkeypatch.setattr(launch, "piece_length", lambda variant, tokens, longest, heads, device: length)
    passes = []
    handed = ops._packed_handed_states
    monkeypatch.setattr(ops, "_packed_handed_states", lambda variant, kernel, *a: passes.append(kernel)
                        or handed(variant, kernel, *a))
    _check(spec, lengths=[0, *LENGTHS[1:], 0])
    assert passes == ["fwd_state", "bwd_state"]  # (the forward's and the backward's; each makes both sides)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decay=st.sampled_from(["none", "constant", "scalar", "vector"]), causal=st.booleans(),
       lrpe=st.sampled_from(["none", "d"]), lengths=st.lists(st.integers(0, 70), min_size=1, max_size=4),
       piece=st.sampled_from([0, 8, 16, 24]), states=st.booleans(), seed=st.integers(0, 2**16))
def test_random_packings(decay, causal, lrpe, lengths, piece, states, seed):
    """Drawn packings (empty sequences anywhere, lengths on and off the pieces' multiples), pieces of a drawn length
    (0: none cut), every decay, causal or not, with or without the caller's states: forward and every gradient
    against float64, as the fixed cases above."""
    assume(causal or decay in ("none", "constant"))
    assume(sum(lengths) > 0)
    variant = lightgen.Variant(decay=decay, causal=causal, lrpe=lrpe, dk=16, dv=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch, "piece_length", lambda variant, tokens, longest, heads, device: piece)
        check_variant(variant, b=1, n=None, h=2, dtype=DTYPES[0], device=DEVICE, seed=seed, states=causal and states,
                      offset=3 if causal else 0, lengths=lengths)


@pytest.mark.parametrize("spec", ["decay=constant,causal,lrpe=d,phi=silu,dk=32,dv=16", "decay=none,causal,dk=16,dv=32",
                                  "decay=constant,noncausal,lrpe=d,phi=elu+1,dk=16,dv=32",
                                  "decay=scalar,causal,dk=16,dv=32", "decay=vector,causal,lrpe=d,dk=16,dv=16"])
def test_edge_pieces_handed_nothing(spec, monkeypatch):
    """Packed sequences cut into pieces (forced), without the caller's states: the pieces at each sequence's edges
    (its first, from the left; its last, from the right) start from zeros, which the scan does not store and the
    kernels do not read (EDGES). The scan's output starts as NaN here: its edge slots stay NaN, every other one is
    written, and the results still match: under learned decays dg too, whose final-state terms leave those
    pieces out."""
    from lightgen import split

    monkeypatch.setattr(launch, "piece_length", lambda variant, tokens, longest, heads, device: 16)
    scan, scans = split.packed_scan, []

    def poisoned(module, own, log_decays, packed, start=None, reverse=False, out=None, **kwargs):
        if out is None:
            out = own.new_empty(packed.count, *own.shape[1:])
        out.fill_(float("nan"))
        scan(module, own, log_decays, packed, start, reverse, out=out, **kwargs)
        edge = torch.zeros(packed.count, dtype=torch.bool)
        edge[(packed.first[1:] - 1 if reverse else packed.first[:-1]).long().cpu()] = True
        unwritten = out.isnan().flatten(1).all(1).cpu()
        assert start is not None or torch.equal(unwritten, edge), (reverse, unwritten, edge)
        scans.append(reverse)
        return out

    monkeypatch.setattr(split, "packed_scan", poisoned)
    check_variant(lightgen.Variant.parse(spec), b=1, n=None, h=2, dtype=DTYPES[0], device=DEVICE, states=False,
                  lengths=[0, *LENGTHS[1:], 0])
    assert sorted(scans) == sorted([False, True] * (2 if "noncausal" in spec else 1))  # (both sides: two each way)


def test_pieces_windows_cut_over_programs(monkeypatch):
    """decay=constant: each piece's state-pass window cut over several programs (launch.packed_state_split, 3
    forced), a state per sub-window, the scan weighing and adding them. Pieces of 24 (forced): 50 as 24 + 24 + 2,
    96 as four; sub-windows of 8 rows (of 1 in the piece of 2). Fast decays: head 0 reaches 18 tokens (three
    sub-windows), head 1 reaches 4 (the others out of reach: not walked, not read), head 2 does not decay (every
    one: the scan's programs walk back to the sequence's edge and its initial state), head 3 reaches 34 (the scan
    walks two pieces, decaying the second). From initial states, to the final ones, with an LRPE offset: output,
    final states and every gradient (the initial states' too) against the float64 reference. In fp32 on every
    device: the test is about which tokens the windows leave out (below 2**-40 there), not rounding."""
    monkeypatch.setattr(launch, "piece_length", lambda variant, tokens, longest, heads, device: 24)
    monkeypatch.setattr(launch, "packed_state_split", lambda variant, tokens, heads, device: 3)
    attn = lightgen.compile("decay=constant,causal,lrpe=d,phi=silu,dk=16,dv=32")
    lengths = [0, 50, 7, 96, 0]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)
    q, k, v, do, _, theta, _ = random_inputs(attn.variant, 1, sum(lengths), 4, torch.float32, DEVICE, seed=7)
    slopes = torch.tensor([1.5, 6.0, 0.0, 0.8], device=DEVICE)
    start = torch.randn(len(lengths), 4, 32, 32, device=DEVICE)
    dht = torch.randn_like(start)

    def run(fn, work):
        leaves = [t.to(work).clone().requires_grad_() for t in (q, k, v, theta, start)]
        o, ht = fn(*leaves[:3], slopes=slopes.to(work), theta=leaves[3], initial_state=leaves[4], offset=1,
                   output_final_state=True, cu_seqlens=cu)
        return [o, ht, *torch.autograd.grad((o, ht), leaves, (do.to(work), dht.to(work)))]

    got = run(attn, torch.float32)
    expected = run(functools.partial(reference.quadratic, attn.variant), torch.float64)
    for name, g, want in zip(("o", "ht", "dq", "dk", "dv", "dtheta", "dh0"), got, expected):
        assert rel_err(g, want) < TOLERANCE[torch.float32], name


@pytest.mark.parametrize("spec, dims", [("decay=scalar,causal,dk=16,dv=16", ()),
                                         ("decay=vector,causal,dk=64,dv=16", (64,))])
def test_learned_decays_summed_per_piece(spec, dims):
    """split.packed_log_decays: each piece's sum of g over its tokens, in token order by one program per piece, column
    block and part of the piece, the parts then added (the varlen pieces module's piece_sums; an index_add's atomics
    would add in any order): against float64 sums, empty pieces and pieces shorter than the parts included, 3 heads
    of 64 key dims as two column blocks; the same bits on a second run."""
    from lightgen import build, split

    variant = lightgen.Variant.parse(spec)
    offsets = [0, 0, 45, 45, 300, 301]
    packed = split.unpack_pieces(split.packed_pieces(offsets, 40, DEVICE), len(offsets) - 1)
    g = -torch.rand(1, offsets[-1], 3, *dims, device=DEVICE)
    module = build.load(variant, "varlen_pieces")
    sums = split.packed_log_decays(module, variant, g, packed)
    cu = packed.cu.tolist()
    expected = torch.stack([g[0, a:b].double().sum(0) for a, b in zip(cu, cu[1:])])
    assert sums.shape == (packed.count, 3, *dims) and packed.count == 2 + 2 + 7 + 1
    assert rel_err(sums, expected) < 1e-6
    assert torch.equal(split.packed_log_decays(module, variant, g, packed), sums)


@pytest.mark.parametrize("spec, dims", [("decay=scalar,causal,dk=16,dv=16", ()),
                                         ("decay=vector,causal,dk=16,dv=16", (16,))])
def test_packed_suffix_sums(spec, dims):
    """dg's reverse sums of packed sequences (ops._suffix_sums, the varlen pieces module's suffix_sums): each row the
    sum of its sequence's rows from it on, none crossing into the next sequence; empty sequences, and sequences
    longer than a program's step (2,048 entries: 128 rows of decay=scalar's 16 heads, 64 of vector's 2 x 16
    columns), whose sums carry from step to step. Against float64."""
    from lightgen import ops

    variant = lightgen.Variant.parse(spec)
    heads = 16 if not dims else 2
    offsets = [0, 0, 300, 301, 301, 557]
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    dG = torch.randn(1, offsets[-1], heads, *dims, device=DEVICE)
    expected = torch.cat([dG[0, a:b].double().flip(0).cumsum(0).flip(0) for a, b in zip(offsets, offsets[1:])])
    got = ops._suffix_sums(variant, dG.clone(), cu)
    assert rel_err(got[0], expected) < 1e-6


def test_offsets_read_once_per_tensor():
    """The offsets are read on the host (a device sync) once per cu_seqlens tensor: again only after an in-place
    write, which the next call follows; the entry goes with the tensor."""
    import gc

    from lightgen.ops import HostOffsets

    attn = lightgen.compile("decay=constant,causal,dk=16,dv=16")
    q, k, v = random_inputs(attn.variant, 1, 40, 2, torch.float32, DEVICE)[:3]
    cu = torch.tensor([0, 7, 40], dtype=torch.int32, device=DEVICE)
    read = HostOffsets.of(cu)
    assert HostOffsets.of(cu) is read and read.lengths == [7, 33]
    attn(q, k, v, cu_seqlens=cu)
    assert HostOffsets.of(cu) is read
    cu[1] = 30  # a write in place: read again, and the call attends to the new sequences
    assert HostOffsets.of(cu).lengths == [30, 10]
    o = attn(q, k, v, cu_seqlens=cu)
    alone = [attn(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in ((0, 30), (30, 40))]
    torch.testing.assert_close(o, torch.cat(alone, 1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="^cu_seqlens: expected non-decreasing"):
        cu[1] = 41
        attn(q, k, v, cu_seqlens=cu)
    key = id(cu)
    del cu
    gc.collect()
    assert key not in HostOffsets._read
    with torch.inference_mode():  # its tensors count no writes: read on every call, and so never stale
        cu = torch.tensor([0, 7, 40], dtype=torch.int32, device=DEVICE)
        first = attn(q, k, v, cu_seqlens=cu)
        cu[1] = 30
        torch.testing.assert_close(attn(q, k, v, cu_seqlens=cu), o)
        assert rel_err(first, o) > 1e-3 and id(cu) not in HostOffsets._read


def test_piece_length_rule(monkeypatch):
    """Pieces as long as one SM's share of the tokens (all of them times the heads, over the SMs; four (pair, piece)s
    per SM under a learned decay, two for non-causal without decay at dv = 64), a power of two of at least 1024
    tokens; only longer sequences are cut. Never on the CPU, nor non-causal with a decay. And how many sub-windows
    decay=constant's state passes cut each piece's window into."""
    monkeypatch.setattr(launch, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")

    def length(lengths, spec="decay=constant,causal,dk=128,dv=128", heads=16, device=cuda):
        return launch.piece_length(lightgen.Variant.parse(spec), sum(lengths), max(lengths, default=0), heads, device)

    assert length([65536]) == 8192  # as launch.segments cuts one sequence of 64K: 8 pieces x 16 heads
    assert length([60000, 1000, 1000, 3536]) == 8192  # the short ones fill what the long one's pieces leave
    assert length([32768, 32768]) == 8192
    assert length([8192] * 8) == 0  # as long as the pieces would be: nothing to cut
    assert length([1024] * 64) == 0
    assert length([3000, 100]) == 1024  # none shorter
    assert length([65536], "decay=scalar,causal,dk=128,dv=128") == 2048  # 4 per SM
    assert length([65536], heads=2) == 1024
    assert length([65536], device=torch.device("cpu")) == 0
    assert length([65536], "decay=none,noncausal,dk=128,dv=128") == 8192  # its whole state: as segments()
    assert length([65536], "decay=none,noncausal,dk=64,dv=64", heads=32) == 8192  # two per SM at dv = 64
    assert length([65536], "decay=constant,noncausal,dk=128,dv=128") == 8192  # from both sides: as causal
    assert length([]) == 0

    def windows(spec="decay=constant,causal,dk=128,dv=128", tokens=65536, heads=16, device=cuda):
        return launch.packed_state_split(lightgen.Variant.parse(spec), tokens, heads, device)

    # decay=constant's state passes cut each piece's window into sub-windows of at least 1024 tokens, 8 at most
    # (16 for states of 64 x 64 or less), as state_split cuts the batch path's pieces
    assert windows() == 8  # pieces of 8K
    assert windows(tokens=16384) == 2  # pieces of 2K
    assert windows(tokens=1 << 20) == 8
    assert windows("decay=constant,causal,dk=64,dv=64", tokens=1 << 20, heads=32) == 16
    assert windows(tokens=4096) == 1
    assert windows("decay=none,causal,dk=128,dv=128") == windows("decay=scalar,causal,dk=128,dv=128") == 1
    assert windows(device=torch.device("cpu")) == 1


def test_pieces_layout():
    """split.packed_pieces: each sequence cut at multiples of the length from its start, an empty one as one empty
    piece; where each piece's sequence starts (-1 past the last); each sequence's first piece; the pieces longest
    first (ties in packed order); each piece's sequence (-1 past the last). Length 0: none cut."""
    from lightgen import split

    packed = split.unpack_pieces(split.packed_pieces([0, 0, 5, 25, 26], 8, "cpu"), 4)
    assert packed.cu.tolist() == [0, 0, 5, 13, 21, 25, 26]
    assert packed.seq_start.tolist() == [0, 0, 5, 5, 5, 25, -1]
    assert packed.first.tolist() == [0, 1, 2, 5, 6]
    assert packed.order.tolist() == [2, 3, 1, 4, 5, 0]
    assert packed.seq.tolist() == [0, 1, 2, 2, 2, 3, -1]
    assert packed.count == 6 and packed.cut
    whole = split.unpack_pieces(split.packed_pieces([0, 0, 5, 25, 26], 0, "cpu"), 4)
    assert whole.cu.tolist() == [0, 0, 5, 25, 26] and whole.first.tolist() == [0, 1, 2, 3, 4]
    assert whole.order.tolist() == [2, 1, 3, 0] and not whole.cut


@pytest.mark.parametrize("spec", ["decay=scalar,causal,lrpe=d,phi=silu,dk=16,dv=32",
                                  "decay=vector,causal,lrpe=d,phi=silu,dk=16,dv=32",
                                  "decay=constant,noncausal,lrpe=d,phi=silu,dk=16,dv=16"])
def test_each_sequence_as_its_own_call(spec):
    """A packed call equals one call per sequence (same chunking, so to rounding): nothing leaks from one
    sequence into another, however short, and each gets its own states and gradients."""
    attn = lightgen.compile(spec)
    causal = attn.variant.causal
    n = sum(LENGTHS)
    q, k, v, do, _, theta, g = random_inputs(attn.variant, 1, n, 2, DTYPES[0], DEVICE, seed=5)
    h0 = torch.randn(len(LENGTHS), *attn.new_state(1, 2).shape[1:], device=DEVICE) if causal else None
    cu = torch.tensor([0, *itertools.accumulate(LENGTHS)], dtype=torch.int32, device=DEVICE)

    def run(part, state, cu_seqlens):
        """o, final state and the gradients of (q, k, v, g) over rows `part`, from the state `state`."""
        leaves = [t[:, part].clone().requires_grad_() for t in (q, k, v)]
        gate = None if g is None else g[:, part].clone().requires_grad_()
        out = attn(*leaves, theta=theta, g=gate, initial_state=state, output_final_state=causal,
                   cu_seqlens=cu_seqlens)
        o, final = out if causal else (out, None)
        loss = (o.float() * do[:, part].float()).sum() + (final.square().sum() if causal else 0)
        wrt = leaves + ([gate] if gate is not None else [])
        return [o, final, *torch.autograd.grad(loss, wrt)]

    bounds = list(zip(cu.tolist(), cu.tolist()[1:]))
    with launch.override({}):  # the heuristic's chunk for both, whatever is tuned for either length
        packed = run(slice(None), h0, cu)
        alone = [run(slice(start, end), None if h0 is None else h0[i:i + 1], None) for i, (start, end) in enumerate(bounds)]
    for i, (start, end) in enumerate(bounds):
        for name, a, b in zip(["o", "final state", "dq", "dk", "dv", "dg"], packed, alone[i]):
            if b is not None:
                got = a[i:i + 1] if name == "final state" else a[:, start:end]
                # dg: a reverse cumsum, packed over all rows in float64 minus the sum from the sequence's end
                # on, alone in fp32 over the sequence: they round differently by about 1e-5 of its largest entry
                atol = 1e-5 * max(1.0, b.abs().amax().item() if b.numel() else 0.0) if name == "dg" else 1e-5
                torch.testing.assert_close(got, b, rtol=1e-4, atol=atol, msg=f"sequence {i} ({end - start} tokens): {name}")


def test_op_registration():
    """cu_seqlens is an optional tensor argument of the custom op: schema, fake tensors, autograd; and so are the
    pieces they are cut into (the op returns the states the pieces started from)."""
    from lightgen import split

    attn = lightgen.compile("decay=scalar,causal,dk=16,dv=16")
    q, k, v, _, _, _, g = random_inputs(attn.variant, 1, 40, 2, torch.float32, DEVICE)
    op = getattr(torch.ops.lightgen, f"attn_{attn.variant.hash}")
    cu = torch.tensor([0, 7, 40], dtype=torch.int32, device=DEVICE)
    h0 = torch.randn(2, 2, 16, 16, device=DEVICE)
    torch.library.opcheck(op, (q, k, v, g.clone().requires_grad_(), None, h0, 0, True, 1, cu))
    pieces = split.packed_pieces([0, 7, 40], 16, DEVICE)
    torch.library.opcheck(op, (q, k, v, g.clone().requires_grad_(), None, h0, 0, True, 1, cu, None, False, pieces))


def test_bad_cu_seqlens_name_the_argument():
    attn = lightgen.compile("decay=scalar,causal,lrpe=d,dk=16,dv=16")
    q, k, v = (torch.randn(1, 30, 2, 16, device=DEVICE) for _ in range(3))
    theta, g = torch.rand(2, 16, device=DEVICE), -torch.rand(1, 30, 2, device=DEVICE)

    def cu(*offsets, dtype=torch.int32):
        return torch.tensor(offsets, dtype=dtype, device=DEVICE)

    def call(cu_seqlens, **kw):
        return attn(*kw.pop("qkv", (q, k, v)), theta=theta, g=kw.pop("g", g), cu_seqlens=cu_seqlens, **kw)

    other = "meta" if DEVICE == "cpu" else "cpu"
    cases = [
        (cu(0, 10, 30, dtype=torch.int64), TypeError, "cu_seqlens: expected dtype int32"),
        ([0, 10, 30], TypeError, "cu_seqlens: expected an int32 torch.Tensor"),
        (cu(0, 10, 30)[None], ValueError, "cu_seqlens: expected a 1-D"),
        (cu(0), ValueError, "cu_seqlens: expected a 1-D"),
        (cu(0, 10, 30).to(other), ValueError, "cu_seqlens: expected device"),
        (cu(1, 10, 30), ValueError, "cu_seqlens: expected offsets from 0 to N = 30"),
        (cu(0, 10, 31), ValueError, "cu_seqlens: expected offsets from 0 to N = 30"),
        (cu(0, 10, 29), ValueError, "cu_seqlens: expected offsets from 0 to N = 30"),
        (cu(0, 20, 10, 30), ValueError, "cu_seqlens: expected non-decreasing offsets"),
    ]
    for cu_seqlens, err, message in cases:
        with pytest.raises(err) as info:
            call(cu_seqlens)
        assert str(info.value).startswith(message), info.value
    two = [torch.cat([t, t]) for t in (q, k, v)]
    with pytest.raises(ValueError, match="^cu_seqlens: .* batch size must be 1"):
        call(cu(0, 10, 30), qkv=two, g=torch.cat([g, g]))
    with pytest.raises(ValueError, match="^g: expected shape"):
        call(cu(0, 10, 30), g=g[:, :20])
    state = attn.new_state(2, 2, DEVICE)  # two sequences: [2, H, F, dv]
    call(cu(0, 10, 30), initial_state=state)
    with pytest.raises(ValueError, match=r"^initial_state: expected shape \[2, 2, 32, 16\]"):
        call(cu(0, 10, 30), initial_state=attn.new_state(1, 2, DEVICE))


def test_torch_compile_fullgraph(monkeypatch):
    """Traced, a packed call reads no offsets on the host (no sync, no graph break): each sequence runs whole, in
    packed order. The same results as eager, which cuts the long ones into pieces here (forced) and runs them
    longest first."""
    monkeypatch.setattr(launch, "piece_length", lambda variant, tokens, longest, heads, device: 16)
    attn = lightgen.compile("decay=constant,causal,lrpe=d,phi=silu,dk=16,dv=16")
    q, k, v, _, _, theta, _ = random_inputs(attn.variant, 1, sum(LENGTHS), 2, torch.float32, DEVICE)
    cu = torch.tensor([0, *itertools.accumulate(LENGTHS)], dtype=torch.int32, device=DEVICE)

    def loss(q, k, v):
        o, final = attn(q, k, v, theta=theta, cu_seqlens=cu, output_final_state=True)
        return (o * 2).square().mean() + final.square().mean()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = torch.autograd.grad(loss(*leaves), leaves)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*leaves), leaves)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
