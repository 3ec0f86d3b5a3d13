"""The public call: lightgen.compile(variant) -> attn(q, k, v, slopes=None, theta=None, g=None).

Each variant becomes two torch.library custom ops, lightgen::attn_<hash> and its backward, so
torch.compile(fullgraph=True) sees one opaque node per call and autograd gets the fused backward.
Where the kernels run:
  CUDA tensors                       the generated Triton kernels
  CPU tensors, TRITON_INTERPRET=1    the same kernels under Triton's interpreter (tests)
  CPU tensors otherwise              the PyTorch reference (lightgen.reference.quadratic, .step), so
  (or LIGHTGEN_CPU_REFERENCE=1)      models built on lightgen run anywhere; it is O(N^2), not a fast path
attn.step(q, k, v, state, ...) is the decode step of causal variants (one token per sequence, the
state updated in place); inference only, so a plain function rather than a custom op.
"""
from __future__ import annotations

import functools
import os
import weakref
from typing import NamedTuple, Optional

import torch

from . import build, launch, reference, split
from .spec import Variant, as_variant, tnl_slopes

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# module-level names: the custom ops' schemas are read from their (string) annotations
Tensor, MaybeTensor = torch.Tensor, Optional[torch.Tensor]


class LinearAttention:
    """A compiled variant. Call as attn(q, k, v, slopes=None, theta=None, g=None) -> o.

    attn(..., initial_state=S0, output_final_state=True, offset=t0) -> (o, S_final) for causal
    variants: S_t = lambda_t S_{t-1} + f(k_t)^T v_t, o_t = scale f(q_t) S_t, states [B, H, F, dv] in fp32
    with F = dk (2 dk under LRPE: the cos half, then the sin half); both get gradients. offset is the
    LRPE position of the first token (chunked prefill, sequence parallelism).
    attn(..., cu_seqlens=cu): packed sequences, B = 1: q, k, v [1, T, H, D] hold S sequences back to back,
    cu int32 [S + 1] their offsets (0, ..., T; non-decreasing); each is attended on its own, from LRPE
    position offset, with its own states [S, H, F, dv]; g [1, T, H] (or [1, T, H, dk]). Causal variants and
    non-causal ones without decay cut the long ones into pieces, as long sequences are (launch.piece_length).
    attn.step(q, k, v, state, position=t) -> o: one decode token per sequence, the state updated in place.

    Layout [B, N, H, D] (batch, sequence, heads, head dim), like flash-linear-attention:
      q, k   [B, N, H, dk]        v -> o  [B, N, H, dv]        fp32, fp16 or bf16 (all the same)
      slopes [H]      decay=constant only: lambda_h = exp(-slopes[h]); TransNormerLLM's when omitted;
                      fixed (no gradient)
      g [B, N, H]     decay=scalar only, required: lambda_t = exp(g[b, t, h]), the log decay per token and
                      head (Mamba2 / simple GLA); any float dtype, used in fp32; learnable (gets dg).
                      Any real g works; g <= 0 keeps the states bounded
      g [B, N, H, dk] decay=vector only, required: the same per key dim (GLA), S_t = diag(exp(g_t)) S_{t-1}
                      + f(k_t)^T v_t; under LRPE dim i decays state rows i and dk + i. Learnable (gets dg).
      theta  [H, dk]  lrpe=d only, required; learnable (the backward returns its gradient)
      u [B, N, H, dv] gated variants only (gate=act), required, v's dtype: the output is
                      SRMSNorm(o) * act(u) (norm=srms; else o * act(u)); learnable (gets du)
    Variants with norm=srms return SRMSNorm(o) per head and row; the final state is always that of o.
    Any N; accumulation in fp32. Non-contiguous inputs are copied to contiguous ones.
    """

    def __init__(self, variant: Variant):
        self.variant = variant
        self._forward = _custom_ops(variant)
        self._default_slopes: dict = {}

    def __reduce__(self):  # pickle / deepcopy by spec: the kernels are found again by hash
        return compile, (self.variant.canonical(),)

    def __repr__(self):
        return f"lightgen.compile({self.variant.canonical()!r})"

    @property
    def source_path(self):
        """The generated kernel file (rendered now if it is not in the cache)."""
        return build.ensure_source(self.variant)

    def source(self, module: str = "main") -> str:
        """The generated source of one of the variant's kernel modules (lightgen.render.MODULES)."""
        return build.ensure_source(self.variant, module).read_text()

    def __call__(self, q, k, v, slopes=None, theta=None, initial_state=None, output_final_state=False, offset=0,
                 g=None, cu_seqlens=None, u=None):
        variant = self.variant
        _check_inputs(variant, q, k, v)
        u = _check_gate_input(variant, u, v, "B, N, H")
        batch, heads = q.shape[0], q.shape[2]
        offsets = None
        if cu_seqlens is not None:
            batch, offsets = _check_cu_seqlens(cu_seqlens, q)  # states are per sequence
        log_decay, theta = self._decay_and_theta(slopes, g, theta, q.shape[:3], "B, N, H", q.device)
        if (initial_state is not None or output_final_state) and not variant.causal:
            raise ValueError("initial_state, output_final_state: states exist only for causal variants")
        if initial_state is not None:
            _check_param("initial_state", initial_state, _state_shape(variant, batch, heads), q.device)
            initial_state = initial_state.to(torch.float32).contiguous()
        _check_position("offset", offset)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        segments = launch.segments(variant, q.shape, q.dtype, q.device) if cu_seqlens is None else 1
        # packed sequences as the kernels run them (split.Packed): the longest first, and the long ones cut into
        # pieces that run as packed sequences of their own (not under torch.compile tracing, which has no offsets
        # on the host: each whole, in packed order)
        length, pieces = 0, None
        if offsets is not None:
            length = launch.piece_length(variant, q.shape[1], offsets.longest, heads, q.device)
            pieces = offsets.pieces(length)
        # non-causal without decay, unsplit: the forward keeps the whole k-v state for the backward's dq when there
        # will be one (a state per (sequence, head), where dq would walk k and v again)
        keep = variant.whole_state and segments == 1 and not length and q.shape[1] > 0 and torch.is_grad_enabled() \
            and any(t is not None and t.requires_grad for t in (q, k, v, theta, u))
        o, final_state, _, _ = self._forward(q, k, v, log_decay, theta, initial_state, offset,
                                             bool(output_final_state), segments, cu_seqlens, u, keep, pieces)
        return (o, final_state) if output_final_state else o

    def step(self, q, k, v, state, slopes=None, theta=None, position=0, g=None, u=None):
        """One decode token per sequence (causal variants): S <- lambda S + f(k)^T v, o = scale f(q) S.
        Variants with an epilogue return epilogue(o, u) (u [B, H, dv] for a gate), applied in PyTorch.

        q, k [B, H, dk], v [B, H, dv] -> o [B, H, dv] in v's dtype; g [B, H] the token's log decay
        (decay=scalar: lambda = exp(g); decay=vector: g [B, H, dk], one per key dim). state [B, H, F, dv] fp32,
        contiguous, is updated IN PLACE (read once, written once: the memory floor of decoding);
        it is the state that attn(..., output_final_state=True) returns. position: the LRPE position
        of the token, an int for every sequence or an integer tensor [B] (one per sequence; its values
        are not checked, they stay on the device). Inference only: no gradients.
        """
        variant = self.variant
        if not variant.causal:
            raise ValueError(f"step: {variant.canonical()} is non-causal; the recurrent step exists for causal "
                             f"variants only")
        _check_inputs(variant, q, k, v, layout="B, H")
        u = _check_gate_input(variant, u, v, "B, H")
        batch, heads = q.shape[:2]
        if torch.is_grad_enabled():
            for name, t in (("q", q), ("k", k), ("v", v), ("state", state), ("theta", theta), ("g", g), ("u", u)):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    raise ValueError(f"{name}: requires grad, but the decode step is inference only (it has no "
                                     f"backward); call it under torch.no_grad() or pass {name}.detach()")
        log_decay, theta = self._decay_and_theta(slopes, g, theta, q.shape[:2], "B, H", q.device)
        _check_param("state", state, _state_shape(variant, batch, heads), q.device)
        if state.dtype != torch.float32:
            raise TypeError(f"state: expected float32 (it is updated in place), got {state.dtype}")
        if not state.is_contiguous():
            raise ValueError("state: expected a contiguous tensor (it is updated in place), got a strided view")
        positions, offset = _step_positions(position, batch, q.device)
        if batch * heads == 0:
            return torch.empty_like(v)
        impl = _step_kernel if _use_kernels(q) else _step_reference
        o = impl(variant, q.contiguous(), k.contiguous(), v.contiguous(), state, log_decay, theta, positions, offset)
        if variant.epilogue:  # one token: the epilogue in PyTorch costs about what the step does
            o = reference.epilogue(variant, o.float(), u).to(v.dtype)
        return o

    @torch.no_grad()
    def chunk_state(self, k, v, slopes=None, theta=None, offset=0, g=None) -> torch.Tensor:
        """The state a chunk of a causal sequence leaves from a zero start, sum over its tokens s of
        decay(s -> last) f(k_s)^T v_s: [B, H, F, dv] fp32, from k and v alone (sequence parallelism:
        what a rank hands on). No gradient."""
        return self._state_pass("fwd_state", k, v, slopes, theta, offset, g)

    @torch.no_grad()
    def state_gradient(self, q, do, slopes=None, theta=None, offset=0, g=None) -> torch.Tensor:
        """What a chunk's outputs send back to the state before it: dL/dS [B, H, F, dv] fp32 for
        o = attn(q, k, v, initial_state=S) and dL/do = do, from q and do alone (sequence parallelism:
        what a rank hands back). No gradient."""
        return self._state_pass("bwd_state", q, do, slopes, theta, offset, g)

    def _state_pass(self, kernel, x, y, slopes, theta, offset, g):
        variant = self.variant
        if not variant.causal:
            raise ValueError(f"{kernel}: {variant.canonical()} is non-causal; states exist only for causal variants")
        _check_inputs(variant, x, x, y)  # (k, k, v) or (q, q, do): the shapes of q, k, v
        log_decay, theta = self._decay_and_theta(slopes, g, theta, x.shape[:3], "B, N, H", x.device)
        x, y = x.contiguous(), y.contiguous()
        if not _use_kernels(x):
            return _reference_state_pass(variant, kernel, x, y, log_decay, theta, offset)
        segments = launch.segments(variant, x.shape, x.dtype, x.device)
        return _chunk_state_pass(variant, kernel, x, y, log_decay, theta, offset, segments)

    def new_state(self, batch, heads, device=None) -> torch.Tensor:
        """A zero state [B, H, F, dv] fp32 for step (F = dk, or 2 dk under LRPE)."""
        return torch.zeros(_state_shape(self.variant, batch, heads), dtype=torch.float32, device=device)

    def _decay_and_theta(self, slopes, g, theta, shape, layout, device):
        """Checked kernel inputs: the natural log decays, -slopes [H] (decay=constant) or g per token `shape`
        (decay=scalar: [B, N, H], a step's [B, H]; decay=vector: [B, N, H, dk]) in fp32, None without decay
        (the kernels take them as they are: scaling g to another base would be one more pass over a tensor as
        big as q under decay=vector, and its gradient another); theta [H, dk] fp32."""
        variant = self.variant
        heads = shape[-1]
        log_decay = None
        if variant.decay == "constant":
            if slopes is None:
                key = (heads, str(device))
                if key not in self._default_slopes:
                    self._default_slopes[key] = torch.tensor(tnl_slopes(heads), dtype=torch.float32, device=device)
                slopes = self._default_slopes[key]
            _check_param("slopes", slopes, (heads,), device)
            if slopes.requires_grad:
                raise ValueError("slopes: the decay rates are fixed and get no gradient; pass slopes.detach()")
            log_decay = -slopes.to(torch.float32).contiguous()
        elif slopes is not None:
            raise ValueError(f"slopes: variant has decay={variant.decay}, which takes no slopes"
                             + (" (it takes g, a log decay per token)" if variant.learned_decay else ""))
        if variant.learned_decay:
            if variant.decay == "vector":
                shape, layout, what = (*shape, variant.dk), layout + ", dk", "per token, head and key dim"
            else:
                what = "per token and head"
            if g is None:
                raise ValueError(f"g: variant has decay={variant.decay}, which needs g of shape [{layout}] = "
                                 f"{list(shape)}, the log decay {what}")
            _check_param("g", g, shape, device)
            log_decay = g.to(torch.float32).contiguous()  # differentiable: dg flows back
        elif g is not None:
            raise ValueError(f"g: variant has decay={variant.decay}, which takes no g (per-token decays are "
                             f"decay=scalar or vector)")
        if variant.lrpe == "d":
            if theta is None:
                raise ValueError(f"theta: variant has lrpe=d, which needs theta of shape [H, dk] = [{heads}, {variant.dk}]")
            _check_param("theta", theta, (heads, variant.dk), device)
            theta = theta.to(torch.float32).contiguous()
        elif theta is not None:
            raise ValueError("theta: variant has lrpe=none, which takes no theta")
        return log_decay, theta


_COMPILED: dict[str, LinearAttention] = {}
_OPS: dict[str, object] = {}


def compile(variant) -> LinearAttention:  # noqa: A001 - the product's verb
    """Compile a variant (a lightgen.Variant or its text form) into a callable attention op."""
    variant = as_variant(variant)
    if variant.hash not in _COMPILED:
        _COMPILED[variant.hash] = LinearAttention(variant)
    return _COMPILED[variant.hash]


# ---- checks -------------------------------------------------------------------------------

def _check_inputs(variant: Variant, q, k, v, layout="B, N, H"):
    """q, k [*layout, dk] and v [*layout, dv]: [B, N, H, D] for a sequence, [B, H, D] for a decode step."""
    dims = layout.count(",") + 2
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name}: expected {dims} dims [{layout}, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
    if q.shape[-1] != variant.dk:
        raise ValueError(f"q: last dim must be dk={variant.dk} for this variant, got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1] or v.shape[-1] != variant.dv:
        raise ValueError(f"v: expected shape [{layout}, dv] = {(*q.shape[:-1], variant.dv)}, got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"k, v: expected the device of q ({q.device}), got k {k.device}, v {v.device}")


def _check_gate_input(variant, u, v, layout):
    """u, the gate's input: required (v's shape, dtype and device) for gated variants, refused otherwise."""
    if variant.gate == "none":
        if u is not None:
            raise ValueError("u: variant has gate=none, which takes no u (a gate is e.g. gate=silu)")
        return None
    if u is None:
        raise ValueError(f"u: variant has gate={variant.gate_name}, which needs u of shape [{layout}, dv] = "
                         f"{list(v.shape)} (the gate's input, v's dtype)")
    _check_param("u", u, v.shape, v.device)
    if u.dtype != v.dtype:
        raise TypeError(f"u: expected the dtype of v ({v.dtype}), got {u.dtype}")
    return u.contiguous()


def _check_param(name, t, shape, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {list(shape)}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of q), got {t.device}")


def _check_cu_seqlens(cu_seqlens, q) -> tuple[int, HostOffsets | None]:
    """The number of packed sequences S, and their offsets on the host. The values are checked there (read once
    per tensor, HostOffsets): a wrong offset would make the kernels read and write out of bounds, silently.
    Under torch.compile tracing they are not (data-dependent checks would break the graph): offsets None."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected an int32 torch.Tensor [S + 1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens: expected dtype int32 (as flash-attn's), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor [S + 1] of sequence offsets (S >= 1), got shape "
                         f"{list(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens: expected device {q.device} (that of q), got {cu_seqlens.device}")
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens: the sequences are packed along N, so the batch size must be 1; got q of "
                         f"shape {tuple(q.shape)}")
    if torch.compiler.is_compiling():
        return cu_seqlens.numel() - 1, None
    offsets = HostOffsets.of(cu_seqlens)
    if offsets.values[0] != 0 or offsets.values[-1] != q.shape[1]:
        raise ValueError(f"cu_seqlens: expected offsets from 0 to N = {q.shape[1]} (q's tokens), got "
                         f"{offsets.values[0]} .. {offsets.values[-1]}")
    return cu_seqlens.numel() - 1, offsets


class HostOffsets:
    """A cu_seqlens tensor's offsets on the host, read once while the tensor lives and is not written in place
    (torch's version counter): each read is a device sync, and a training step hands the same tensor to every
    layer. Also keeps the pieces cut from them (split.packed_pieces, by piece length), so they are built once too.
    (A write that torch does not count, such as a kernel's through the raw pointer, is not seen. Tensors made under
    torch.inference_mode count none: theirs are read on every call.)"""

    _read: dict[int, HostOffsets] = {}  # id(tensor) -> its offsets, while it lives

    def __init__(self, tensor: torch.Tensor, kept: bool = True):
        key, read = id(tensor), HostOffsets._read  # (the dict itself: at exit the class's name may be gone first)

        def forget(ref):  # the tensor is gone (and its id free for another): its entry goes too
            if key in read and read[key].tensor is ref:
                del read[key]
        self.tensor = weakref.ref(tensor, forget) if kept else None
        self.version = tensor._version if kept else None
        self.values = tensor.tolist()
        for i, (start, end) in enumerate(zip(self.values, self.values[1:])):
            if end < start:
                raise ValueError(f"cu_seqlens: expected non-decreasing offsets (sequence lengths >= 0), got "
                                 f"cu_seqlens[{i + 1}] = {end} < cu_seqlens[{i}] = {start}")
        self.lengths = [end - start for start, end in zip(self.values, self.values[1:])]
        self.longest = max(self.lengths)
        self._pieces: dict[int, torch.Tensor] = {}
        self._device = tensor.device

    @classmethod
    def of(cls, tensor: torch.Tensor) -> HostOffsets:
        if tensor.is_inference():  # (no version counter: an in-place write could not be told)
            return cls(tensor, kept=False)
        read = cls._read.get(id(tensor))
        if read is None or read.tensor() is not tensor or read.version != tensor._version:
            read = cls._read[id(tensor)] = cls(tensor)
        return read

    def pieces(self, length: int) -> torch.Tensor:
        """split.packed_pieces of these offsets (on the tensor's device)."""
        if length not in self._pieces:
            self._pieces[length] = split.packed_pieces(self.values, length, self._device)
        return self._pieces[length]


def _check_position(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0 (the position of the first token), got {value!r}")


def _step_positions(position, batch, device):
    """(positions [B] int64 or None, offset): per-row LRPE positions, or one int for every row."""
    if not isinstance(position, torch.Tensor):
        _check_position("position", position)
        return None, position
    if position.dtype.is_floating_point or position.dtype.is_complex or position.dtype == torch.bool:
        raise TypeError(f"position: expected an integer tensor, got {position.dtype}")
    if tuple(position.shape) != (batch,):
        raise ValueError(f"position: expected an int or a tensor of shape [B] = [{batch}], got shape "
                         f"{list(position.shape)}")
    if position.device != device:
        raise ValueError(f"position: expected device {device} (that of q), got {position.device}")
    return position.to(torch.int64).contiguous(), 0


def _state_shape(variant, batch, heads):
    """[B, H, F, dv] (F: variant.state_rows)."""
    return (batch, heads, variant.state_rows, variant.dv)


# ---- launching ------------------------------------------------------------------------------

def _use_kernels(t: torch.Tensor) -> bool:
    # LIGHTGEN_CPU_REFERENCE=1 picks the reference on CPU even under the interpreter (fast CPU tests
    # of models); toggling TRITON_INTERPRET itself inside a process confuses Triton's interpreter.
    if t.is_cuda or _recorded is not None:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("LIGHTGEN_CPU_REFERENCE") != "1"


class TileShares(NamedTuple):
    """A kernel argument every output-tile program adds its share to (dk from bwd_dkv's dv tiles).
    _launch hands the kernel one fp32 slice per tile and sums them into `total`; with one tile the
    kernel writes `total` itself. (A tuple, so the tuner finds the tensor among the arguments.)"""
    total: torch.Tensor


# ---- recording the launches (the tuner replays one to time it, lightgen.inspect to compile it) ----------

_recorded: dict | None = None  # while record_launches runs: kernel name -> its _launch call


def record_launches(attn, q, k, v, do, **kwargs) -> dict:
    """kernel name -> (args, kwargs) of its _launch call in one forward + backward of `attn` on q, k, v
    (`kwargs`: attn's keyword arguments) with the output's gradient `do`, once per backward path
    (launch.BACKWARDS), and its state passes (fwd_state, bwd_state) where it has them: a causal variant's by
    chunk_state and state_gradient, a non-causal one's with a decay by a forward + backward with the sequence cut in
    two (launch.pieces: the forward's k-v passes, scale 1). Nothing is launched, so the outputs are garbage; the
    kernel path is taken on any device, CPU tensors without Triton's interpreter too. Replaying a call,
    _launch(*args, **kwargs) under launch.override, launches one kernel with a chosen config."""
    global _recorded
    if _recorded is not None:
        raise RuntimeError("record_launches: already recording (one recording at a time)")
    _recorded = calls = {}

    def forward_backward():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        attn(*leaves, **kwargs).backward(do)

    try:
        for path in launch.BACKWARDS:  # the backward's two ways: the kernels of both
            with launch.backward(path):
                forward_backward()
        if attn.variant.causal:
            decays = {name: kwargs[name] for name in ("slopes", "theta", "g") if name in kwargs}
            attn.chunk_state(k, v, **decays)
            attn.state_gradient(q, do, **decays)
        elif attn.variant.two_sided:
            with launch.pieces(2):
                forward_backward()
    finally:
        _recorded = None
    missing = [name for name in launch.kernels(attn.variant) if name not in calls]
    if missing:
        raise RuntimeError(f"no launch of {', '.join(missing)} seen in a forward + backward "
                           f"(is LIGHTGEN_CPU_REFERENCE set?)")
    return calls


def _launch(module, variant, kernel, q, tile_name, args, offset, segments, cu_seqlens=None, batch=None,
            packed=None, scale=None, **flags):
    """One kernel over B*H*tiles programs: its output's head dim ("BK": dk, "BV": dv) is tiled.
    Packed sequences (cu_seqlens): S*H*tiles programs of the varlen module's kernel, over the sequences of
    `packed` (split.Packed: pieces, the longest first) where it is given, else of cu_seqlens in packed order.
    batch: programs for only that many of the B rows (the pieces module's SKIP). scale: the run-time scale, where
    not the variant's (_from_both_sides)."""
    import triton.language as tl

    if _recorded is not None:  # record_launches: the first call of each kernel, not launched
        _recorded.setdefault(kernel, ((module, variant, kernel, q, tile_name, args, offset, segments),
                                      dict(cu_seqlens=cu_seqlens, batch=batch, packed=packed, scale=scale, **flags)))
        return
    b, n, h, _ = q.shape
    scale = variant.scale if scale is None else scale
    if cu_seqlens is None:
        length, tail = n, (n, h, scale, offset, segments)
    else:
        # the same per-chunk code as the plain kernel's: its tuned configs serve, at the mean length
        if packed is None:  # (each sequence whole, where it starts, in packed order)
            order = torch.arange(cu_seqlens.numel() - 1, dtype=torch.int32, device=q.device)
            packed = split.Packed(cu_seqlens, cu_seqlens, None, order)
        b = packed.count
        length, tail = n // b, (packed.cu, packed.seq_start, packed.order, n, h, scale, offset)
    params = launch.params(variant, kernel, q.dtype, length, q.device)
    tile = params[tile_name]
    tiles = (variant.dk if tile_name == "BK" else variant.dv) // tile
    shares = [(a.total, a.total.unsqueeze(0) if tiles == 1 else
               torch.empty((tiles, *a.total.shape), device=q.device, dtype=torch.float32))
              for a in args if isinstance(a, TileShares)]
    slices = iter(s for _, s in shares)
    args = [next(slices) if isinstance(a, TileShares) else a for a in args]
    dot = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[q.dtype]
    getattr(module, kernel)[((batch or b) * h * tiles,)](
        *args, *tail, DK=variant.dk, DV=variant.dv, C=params["C"], DOT=dot,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=params["num_warps"], num_stages=params["num_stages"], **{tile_name: tile}, **flags)
    if tiles > 1:
        for total, per_tile in shares:
            total.copy_(per_tile.sum(0))


def _state_like(variant, q, cu_seqlens=None):
    """An empty state [B, H, F, dv] fp32 for q's batch, or one per packed sequence [S, H, F, dv]."""
    batch = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return torch.empty(_state_shape(variant, batch, q.shape[2]), device=q.device, dtype=torch.float32)


def _forward_kernels(variant, q, k, v, log_decay, theta, h0, offset, final, segments, cu_seqlens=None, u=None,
                     keep=False, pieces=None):
    """(output, final state or None, o for the epilogue's backward or None, the states the pieces
    started from or None). segments > 1: the sequence runs as that many pieces (lightgen.split). keep (non-causal
    without decay, unsplit): the whole state, as the kernel's final state, takes the pieces' states' place.
    pieces: packed sequences as the kernels run them (split.packed_pieces), the long ones maybe cut into pieces."""
    packed = _unpacked(pieces, cu_seqlens)
    if packed is not None and packed.cut:
        received = _packed_handed_states(variant, "fwd_state", k, v, log_decay, theta, offset, packed, h0)
        y, ht, o = _forward_pass(variant, q, k, v, log_decay, theta, received, offset, final, 1, packed.cu, u, packed,
                                 edges=h0 is not None)
        return y, None if ht is None else ht.index_select(0, packed.first[1:] - 1), o, received  # their last pieces'
    if segments == 1:
        y, ht, o = _forward_pass(variant, q, k, v, log_decay, theta, h0, offset, final or keep, 1, cu_seqlens, u,
                                 packed)
        return (y, None, o, ht) if keep else (y, ht, o, None)
    b, n, h, _ = q.shape
    pieces = functools.partial(split.as_pieces, segments=segments)
    piece_decay = split.kernel_log_decay(variant, log_decay, segments)
    received = _handed_states(variant, "fwd_state", k, v, log_decay, theta, offset, segments, h0)
    y, ht, o = _forward_pass(variant, pieces(q), pieces(k), pieces(v), piece_decay, theta, received, offset, final,
                             segments, None, pieces(u))
    whole = functools.partial(_whole, b=b, n=n)
    ht = None if ht is None else ht.view(b, segments, *ht.shape[1:])[:, -1].clone()  # its own storage, as promised
    return whole(y), ht, whole(o), received


def _handed_states(variant, kernel, x, y, log_decay, theta, offset, segments, start):
    """What each of the `segments` pieces per sequence is handed, [B * P, H, F, dv]: fwd_state (x, y = k, v), the
    state it starts from (start: the initial state, or None); bwd_state (q, dO), the gradient of the state after it
    (start: the final state's, or None). The state passes run on pieces cut finer still (launch.state_split).
    Non-causal without decay: every piece's own state (or gradient), which the kernels sum over the sequence's pieces
    (the whole state: each piece's rows see them all; a state pass over all P pieces fills the GPU, none is left
    out); else the scan, forward or reverse. Non-causal with a decay: a piece's two walks each start from a side,
    so it is handed both, [2 * B * P, H, F, dv]: from its left (the forward scan of fwd_state over x, y) and from
    its right (the reverse scan of bwd_state over them): the forward's k-v states, or the backward's q-dO ones."""
    if variant.whole_state:
        return _piece_states(variant, kernel, x, y, log_decay, theta, offset, segments)[1]
    scanned = functools.partial(_scanned, variant, x=x, y=y, log_decay=log_decay, theta=theta, offset=offset,
                                segments=segments)
    if variant.two_sided:
        return _from_both_sides(variant, kernel, scanned, x.shape[0] * segments, x)
    return scanned(kernel, start=start)


def _from_both_sides(variant, kernel, scanned, pieces, x):
    """Non-causal with a decay: the states `pieces` pieces are handed from both sides, [2 * pieces, H, F, dv], those
    from the left (scanned("fwd_state", ...): a state pass and the forward scan) then those from the right
    (scanned("bwd_state", ...)), each written in place (out). Both passes scale their states by the run-time scale
    here: 1 for the forward's k-v states, the variant's for the backward's q-dO ones (as its gradients carry it)."""
    sides = torch.empty(_state_shape(variant, 2 * pieces, x.shape[2]), device=x.device, dtype=torch.float32)
    left, right = sides.chunk(2)
    scale = 1.0 if kernel == "fwd_state" else variant.scale
    scanned("fwd_state", start=None, out=left, scale=scale)
    scanned("bwd_state", start=None, out=right, scale=scale)
    return sides


def _scanned(variant, kernel, *, x, y, log_decay, theta, offset, segments, start, out=None, scale=None):
    """A state pass over pieces cut finer still, then the scan (forward for fwd_state, reverse for bwd_state) to one
    state per piece (written into out where given). scale: _launch's."""
    n = x.shape[1]
    finer = launch.state_split(variant, x.shape, segments, x.device)
    # the states the scan never uses are left out: each sequence's last pieces' forward, first pieces' backward
    module, own, decays, reach = _piece_states(variant, kernel, x, y, log_decay, theta, offset, segments * finer,
                                               skip=finer, every=finer, scale=scale)
    if _recorded is not None:  # record_launches: the state pass is what it takes (the scan's launch is fixed)
        return own if out is None else out
    return split.scan(module, own, decays, segments * finer, n // (segments * finer), start,
                      reverse=kernel == "bwd_state", every=finer, reach=reach, out=out)


def _unpacked(pieces, cu_seqlens, cut=False):
    """The op's `pieces` argument as split.Packed (None: none); cut: only where it cuts a sequence into pieces."""
    packed = None if pieces is None else split.unpack_pieces(pieces, cu_seqlens.numel() - 1)
    return packed if packed is not None and (packed.cut or not cut) else None


def _packed_handed_states(variant, kernel, x, y, log_decay, theta, offset, packed, start):
    """_handed_states of packed sequences' pieces (split.Packed), [S', H, F, dv] ([2 * S', ...] from both sides
    non-causal with a decay): the varlen pieces module's state pass (each piece's own; not each sequence's last
    forward, first backward: no piece receives those; under decay=constant one per sub-window of each piece's
    window), then the scan over each sequence's pieces from start ([S, H, F, dv] or None)."""
    scanned = functools.partial(_packed_scanned, variant, x=x, y=y, log_decay=log_decay, theta=theta, offset=offset,
                                packed=packed)
    if variant.two_sided:
        return _from_both_sides(variant, kernel, scanned, packed.count, x)
    return scanned(kernel, start=start)


def _packed_scanned(variant, kernel, *, x, y, log_decay, theta, offset, packed, start, out=None, scale=None):
    """_scanned of packed sequences' pieces."""
    module = build.load(variant, "varlen_pieces")
    reach = split.reach_bits(x.dtype)
    every = {}  # decay=constant: each piece's window over that many programs, a state each (launch.packed_state_split)
    if variant.decay == "constant":
        every = {"EVERY": launch.packed_state_split(variant, x.shape[1], x.shape[2], x.device)}
    count = packed.count * every.get("EVERY", 1)
    own = torch.empty(_state_shape(variant, count, x.shape[2]), device=x.device, dtype=torch.float32)
    _launch(module, variant, kernel, x, "BV", (x, y, own, log_decay, theta), offset, 1, packed.cu, batch=count,
            packed=packed, scale=scale, HAS_FINAL=True, REACH=reach, **every)
    decays = split.packed_log_decays(module, variant, log_decay, packed)
    return split.packed_scan(module, own, decays, packed, start, reverse=kernel == "bwd_state",
                             every=every.get("EVERY"), reach=reach, out=out)


def _whole(t, b, n):
    """The inverse of split.as_pieces: [B * P, N / P, ...] -> [B, N, ...]."""
    return None if t is None else t.view(b, n, *t.shape[2:])


def _piece_states(variant, kernel, x, y, log_decay, theta, offset, segments, skip=0, every=1, scale=None):
    """A state pass of the pieces module over each sequence's `segments` pieces: (the module, one state per
    piece and head [B * P, H, F, dv] fp32, the pieces' log decays and the pass's reach bits as split.scan takes
    them: the scan must skip the very pieces the pass left empty). kernel: fwd_state
    (x, y = k, v) or bwd_state (q, dO). skip: not for the pieces whose states the scan never uses (each
    sequence's last `skip` under fwd_state, first under bwd_state; their slots are left empty): less to read.
    every: state-pass pieces per kernel piece (launch.state_split), whose boundaries bound decay=constant's windows.
    scale: _launch's."""
    module = build.load(variant, "pieces")
    pieces = functools.partial(split.as_pieces, segments=segments)
    piece_decay = split.kernel_log_decay(variant, log_decay, segments)
    states = _state_like(variant, pieces(x))
    reach = split.reach_bits(x.dtype)
    _launch(module, variant, kernel, pieces(x), "BV", (pieces(x), pieces(y), states, piece_decay, theta), offset,
            segments, batch=x.shape[0] * (segments - skip) if skip else None, scale=scale, HAS_FINAL=True, SKIP=skip,
            EVERY=every, REACH=reach)
    return module, states, split.scan_log_decays(variant, log_decay, x.shape, segments), reach


def _chunk_state_pass(variant, kernel, x, y, log_decay, theta, offset, segments):
    """LinearAttention.chunk_state / state_gradient by the pieces module: one state per sequence, from its
    pieces' states combined by the scan when it is split (the state after the last piece; the gradient
    of the state before the first)."""
    module, own, decays, reach = _piece_states(variant, kernel, x, y, log_decay, theta, offset, segments)
    if segments == 1:
        return own
    # where the scan ends: the state after the last piece (fwd_state), the gradient of the one before the first
    return split.scan(module, own, decays, segments, x.shape[1] // segments, reverse=kernel == "bwd_state", last=True,
                      reach=reach)[1]


def _reference_state_pass(variant, kernel, x, y, log_decay, theta, offset):
    """chunk_state / state_gradient by the reference: the final state from zero (x = k, y = v), or the
    gradient of <o, do> with respect to the initial state (x = q, y = do; o is linear in it)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(work), y.to(work)
    decay = _natural_decay(variant, log_decay)
    if kernel == "fwd_state":
        return reference.quadratic(variant.without_epilogue, x, x, y, theta=theta, offset=offset,
                                   output_final_state=True, **decay)[1].float()
    b, _, h, _ = x.shape
    start = torch.zeros(_state_shape(variant, b, h), dtype=work, device=x.device, requires_grad=True)
    with torch.enable_grad():
        o = reference.quadratic(variant.without_epilogue, x, torch.zeros_like(x), torch.zeros_like(y), theta=theta,
                                initial_state=start, offset=offset, **decay)
        return torch.autograd.grad(o, start, y)[0].float()


def _forward_pass(variant, q, k, v, log_decay, theta, h0, offset, final, segments, cu_seqlens=None, u=None,
                  packed=None, edges=True):
    """The forward kernel: (output, final state or None, o or None). With an epilogue the kernel writes
    the attention's o (all the backward needs: rstd comes back from it) and y. edges (packed): whether h0 holds the
    caller's initial states at each sequence's first piece (else zeros there, which the kernel does not read)."""
    module = build.load(variant, "varlen" if cu_seqlens is not None else "main")
    o = torch.empty_like(v)
    ht = _state_like(variant, q, cu_seqlens) if final else None
    y = torch.empty_like(v) if variant.epilogue else None
    _launch(module, variant, "fwd", q, "BV", (q, k, v, o, h0, ht, log_decay, theta, *((u, y) if y is not None else ())),
            offset, segments, cu_seqlens, packed=packed, HAS_INIT=h0 is not None, HAS_FINAL=final,
            **_edges(cu_seqlens, edges))
    return (y, ht, o) if y is not None else (o, ht, None)


def _edges(cu_seqlens, given) -> dict:
    """The varlen kernels' EDGES flag (whether the states handed to the pieces at their sequences' edges are the
    caller's, so to be read); the batch kernels take none."""
    return {} if cu_seqlens is None else {"EDGES": given}


def _backward_kernels(variant, q, k, v, do, log_decay, theta, h0, dht, ht, offset, segments, cu_seqlens=None,
                      o=None, u=None, received=None, pieces=None):
    """(dq, dk, dv, d log_decay, dtheta, dh0, du), None where there is none. segments > 1 or pieces: the pieces
    of the forward (received: the states they started from), see lightgen.split."""
    module = build.load(variant, "varlen" if cu_seqlens is not None else "main")
    do, du = _epilogue_backward(module, variant, o, u, do) if variant.epilogue else (do, None)
    packed = _unpacked(pieces, cu_seqlens)
    if packed is not None and packed.cut:
        return (*_packed_backward(module, variant, q, k, v, do, log_decay, theta, h0, dht, ht, offset, received,
                                  packed), du)
    if segments == 1:  # (received: the whole state the forward kept, which dq takes as the pieces' own)
        terms = _final_state_term(variant, dht, ht) if variant.learned_decay and dht is not None else None
        return (*_attention_backward(module, variant, q, k, v, do, log_decay, theta, h0 if received is None else received,
                                     dht, terms, offset, 1, cu_seqlens, packed), du)
    b, n, h, _ = q.shape
    pieces = functools.partial(split.as_pieces, segments=segments)
    by_piece = lambda t: t.view(b, segments, *t.shape[1:])  # noqa: E731 - [B * P, ...] -> [B, P, ...]
    piece_decay = split.kernel_log_decay(variant, log_decay, segments)
    sent = _handed_states(variant, "bwd_state", q, do, log_decay, theta, offset, segments, dht)
    terms = None
    if variant.learned_decay:  # (each sequence's last piece: every segments-th row)
        terms = _piece_final_terms(variant, sent, received, slice(segments - 1, None, segments), dht, ht)
    dq, dk, dv, dlog_decay, dtheta, dh0 = _attention_backward(
        module, variant, pieces(q), pieces(k), pieces(v), pieces(do), piece_decay, theta, received, sent, terms, offset,
        segments)
    whole = functools.partial(_whole, b=b, n=n)
    dh0 = by_piece(dh0)[:, 0].clone() if h0 is not None else None  # the first piece received h0
    return whole(dq), whole(dk), whole(dv), whole(dlog_decay), dtheta, dh0, du


def _packed_backward(module, variant, q, k, v, do, log_decay, theta, h0, dht, ht, offset, received, packed):
    """_backward_kernels of packed sequences' pieces (the attention's part): each piece's backward as a packed
    sequence of its own, from the state it received and the gradient of the state after it (the reverse scan's)."""
    sent = _packed_handed_states(variant, "bwd_state", q, do, log_decay, theta, offset, packed, dht)
    terms = None
    if variant.learned_decay:
        terms = _piece_final_terms(variant, sent, received, packed.first[1:].long() - 1, dht, ht)
    dq, dk, dv, dlog_decay, dtheta, dh0 = _attention_backward(
        module, variant, q, k, v, do, log_decay, theta, received, sent, terms, offset, 1, packed.cu, packed,
        edges=(h0 is not None, dht is not None))
    dh0 = dh0.index_select(0, packed.first[:-1]) if h0 is not None else None  # each sequence's first piece got h0
    return dq, dk, dv, dlog_decay, dtheta, dh0


def _piece_final_terms(variant, sent, received, last_pieces, dht, ht):
    """Learned decays' dg takes each piece's final-state term (_log_decay_grad): <the gradient of the state after the
    piece (sent), that state>, which is the next piece's start (received), or, at a sequence's last piece (rows
    last_pieces: an index or a slice), the sequence's final state ht with its gradient dht (without dht: no term).
    The products run on the two tensors side by side, one row apart: nothing is copied, and what meets across a
    sequence's end (states a packed scan may leave unset) is overwritten."""
    terms = sent.new_empty(sent.shape[:2] + ((variant.dk,) if variant.decay == "vector" else ()))  # [pieces, H(, dk)]
    terms[:-1] = _final_state_term(variant, sent[:-1], received[1:])
    terms[last_pieces] = 0.0 if dht is None else _final_state_term(variant, dht, ht)
    return terms


def _attention_backward(module, variant, q, k, v, do, log_decay, theta, h0, dht, terms, offset, segments,
                        cu_seqlens=None, packed=None, edges=(True, True)):
    """The backward kernels (after the epilogue's): dq, dk, dv, d log_decay, dtheta, dh0. terms: learned decays'
    final-state terms of dg, one per sequence or piece (_log_decay_grad; None: none). edges (packed): whether h0 and
    dht hold the caller's states at the sequences' edges (_forward_pass)."""
    b, n, h, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lrpe = variant.lrpe == "d"
    sequences = b if cu_seqlens is None else cu_seqlens.numel() - 1
    dth_q = torch.empty(sequences * h, variant.dk, device=q.device, dtype=torch.float32) if lrpe else None
    dth_k = torch.empty_like(dth_q) if lrpe else None
    dh0 = _state_like(variant, q, cu_seqlens) if h0 is not None and variant.causal else None  # (none non-causal)
    # decay=scalar / vector: the dq and dk kernels each write their part of dL/dG [B, N, H] / [B, N, H, dk]
    # (G the cumulative log decay); under vector each dk tile writes its own columns, nothing to sum across tiles
    learned, vector = variant.learned_decay, variant.decay == "vector"
    dG_q, dG_k = (torch.empty(b, n, h, *((variant.dk,) if vector else ()), device=q.device, dtype=torch.float32)
                  for _ in range(2)) if learned else (None, None)
    if vector:  # one buffer: bwd_dk adds its part to bwd_dq's
        dG_k = dG_q
    gate_q, gate_k = ((dG_q,), (dG_k,)) if vector else ((TileShares(dG_q),), (TileShares(dG_k),)) if learned else ((), ())
    left, right = _edges(cu_seqlens, edges[0]), _edges(cu_seqlens, edges[1])
    states = dict(HAS_INIT=dht is not None, HAS_FINAL=h0 is not None, **right)
    _launch(module, variant, "bwd_dq", q, "BK", (q, k, v, do, dq, dth_q, *gate_q, h0, log_decay, theta), offset,
            segments, cu_seqlens, packed=packed, HAS_INIT=h0 is not None, **left)
    if launch.backward_path(variant, q.dtype, n, q.device) == "fused":
        _launch(module, variant, "bwd_dkv", q, "BV", (q, k, v, do, TileShares(dk), dv,
                                                      dth_k if dth_k is None else TileShares(dth_k), *gate_k,
                                                      dht, dh0, log_decay, theta), offset, segments,
                cu_seqlens, packed=packed, **states)
    else:
        _launch(module, variant, "bwd_dk", q, "BK", (q, k, v, do, dk, dth_k, *gate_k, dht, log_decay, theta), offset,
                segments, cu_seqlens, packed=packed, HAS_INIT=dht is not None, **right)
        _launch(module, variant, "bwd_dv", q, "BV", (q, k, v, do, dv, dht, dh0, log_decay, theta), offset,
                segments, cu_seqlens, packed=packed, **states)
    dtheta = (dth_q + dth_k).view(sequences, h, variant.dk).sum(0) if lrpe else None
    dlog_decay = _log_decay_grad(variant, dG_q if vector else dG_q + dG_k, terms, cu_seqlens) if learned else None
    return dq, dk, dv, dlog_decay, dtheta, dh0


def _epilogue_backward(module, variant, o, u, dy):
    """bwd_epilogue: from the output's gradient dy, the attention's (do) and the gate input's (du)."""
    do = torch.empty_like(o)
    du = torch.empty_like(u) if u is not None else None
    rows, per_program = o.numel() // variant.dv, launch.epilogue_rows(variant)
    if _recorded is None:  # (its launch params are fixed: nothing to record)
        module.bwd_epilogue[(-(-rows // per_program),)](o, u, dy, do, du, rows, DV=variant.dv, BR=per_program)
    return do, du


def _log_decay_grad(variant, dG, terms, cu_seqlens=None):
    """decay=scalar: the gradient of the log decays g [B, N, H] from dL/dG, G_t = g_0 + ... + g_t.
    g_t moves every G_u with u >= t, so dg_t = sum over u >= t of dL/dG_u. The kernels' dL/dG (f(q).df(q)
    - f(k).df(k) per token) misses one term: the final state S_{N-1} carries exp(G_{N-1}) as a whole,
    which adds <dS_{N-1}, S_{N-1}> to dL/dG_{N-1}.
    decay=vector: the same per key dim [B, N, H, dk] (S_{N-1}'s row i carries exp(G_{N-1,i})).
    terms: that term of each sequence, <dS_{N-1}, S_{N-1}> (_final_state_term; None: no dS given).
    Packed sequences (cu_seqlens): the same within each sequence."""
    if cu_seqlens is not None:
        return _packed_log_decay_grad(variant, dG, terms, cu_seqlens)
    if terms is not None:
        dG[:, -1] += terms
    if variant.decay == "vector" or dG.shape[1] <= SUFFIX_KERNEL_ROWS:  # (the kernels' backward only)
        return _suffix_sums(variant, dG)
    # torch scans a copy with N last along its rows (its scan over dim 1 of [B, N, H] took 1.46 ms at B = 8,
    # N = 8K, H = 16 on H100; this, 66 us: SUFFIX_KERNEL_ROWS)
    return dG.movedim(1, -1).contiguous().flip(-1).cumsum(-1).flip(-1).movedim(-1, 1).contiguous()


# decay=scalar's dL/dG [B, N, H] is summed from each sequence's end by suffix_sums (one program a sequence, 128 rows
# a step at H = 16) up to this many rows, else by torch (five passes, but over every row at once). H100, H = 16, us,
# torch / suffix_sums (session 30, out/p30_suffix.py): B = 32, N = 2K 61 / 28; 8 x 8K 66 / 92; 4 x 16K 68 / 177;
# 1 x 64K 111 / 695. A learned decay's split backward at 65,536 tokens runs pieces of 2,048 (launch.segments).
SUFFIX_KERNEL_ROWS = 2048


def _suffix_sums(variant, dG, cu_seqlens=None):
    """decay=vector: dG [B, N, H, dk] summed from each sequence's end (packed: [1, T, H, dk], each sequence of
    cu_seqlens from its own), in place, by the pieces module's suffix_sums: big enough for a kernel of its own.
    decay=scalar ([B, N, H]) too where its sequences are short (SUFFIX_KERNEL_ROWS), and packed ([1, T, H]): torch
    has no scan that restarts at each sequence."""
    cols = dG[0, 0].numel()
    # columns per program (at B = 1, H * dk = 2048 makes 64 programs; scalar's H = 16, one), 2,048 entries a step
    block = min(32, max(16, 1 << (cols - 1).bit_length()))
    if cu_seqlens is None:
        module, sequences, length = "pieces", dG.shape[0], dG.shape[1]
    else:
        module, sequences, length = "varlen_pieces", cu_seqlens.numel() - 1, cu_seqlens
    if _recorded is None:  # (its launch params are fixed: nothing to record)
        build.load(variant, module).suffix_sums[(sequences, -(-cols // block))](dG, length, cols, ROWS=2048 // block,
                                                                                BLOCK=block)
    return dG


def _final_state_term(variant, dht, ht):
    """<dS, S> over what one decay scales: the whole state [B, H] (scalar), or per key dim [B, H, dk]
    (vector: rows i and, under LRPE, dk + i)."""
    if variant.decay != "vector":
        return (dht * ht).sum((-2, -1))
    rows = (dht * ht).sum(-1)  # [B, H, F]
    return rows.view(*rows.shape[:2], -1, variant.dk).sum(2)


def _packed_log_decay_grad(variant, dG, terms, cu_seqlens):
    """_log_decay_grad of packed sequences, without a host sync: suffix_sums restarted at each sequence."""
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    if terms is not None:  # each sequence's last row; an empty sequence has none (its term: 0)
        last = terms * (ends > starts).view(-1, *[1] * (terms.dim() - 1))  # [S, H] (vector: [S, H, dk])
        dG[0].index_add_(0, (ends - 1).clamp_min(0), last)
    return _suffix_sums(variant, dG, cu_seqlens)


def _step_kernel(variant, q, k, v, state, log_decay, theta, positions, offset):
    """The decode step over grid (B*H, dv tiles); the state is updated in place."""
    module = build.load(variant)
    b, h, _ = q.shape
    params = launch.params(variant, "step", q.dtype, 1, q.device)
    o = torch.empty_like(v)
    module.step[(b * h, variant.dv // params["BV"])](
        q, k, v, o, state, log_decay, theta, positions, h, variant.scale, offset,
        DK=variant.dk, DV=variant.dv, BV=params["BV"], PER_ROW=positions is not None,
        num_warps=params["num_warps"], num_stages=params["num_stages"])
    return o


def _step_reference(variant, q, k, v, state, log_decay, theta, positions, offset):
    o, new_state = reference.step(variant, q.float(), k.float(), v.float(), state, theta=theta,
                                  positions=offset if positions is None else positions,
                                  **_natural_decay(variant, log_decay))
    state.copy_(new_state)
    return o.to(v.dtype)


def _natural_decay(variant, log_decay) -> dict:
    """The reference's decay argument from the kernels' log decays: slopes [H], or g (decay=scalar, vector)."""
    if log_decay is None:
        return {}
    return {"g": log_decay} if variant.learned_decay else {"slopes": -log_decay}


def _reference(variant, q, k, v, log_decay, theta, h0, offset, final, segments=1, cu_seqlens=None, u=None):
    """Like _forward_kernels, by the PyTorch reference."""
    assert segments == 1, "sequence splitting runs the kernels only"
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = reference.quadratic(variant.without_epilogue, q.to(work), k.to(work), v.to(work), theta=theta,
                              initial_state=h0, offset=offset, output_final_state=final, cu_seqlens=cu_seqlens,
                              **_natural_decay(variant, log_decay))
    o, ht = out if final else (out, None)
    if not variant.epilogue:
        return o.to(v.dtype).contiguous(), ht, None  # the fake op promises the layout of v
    y = reference.epilogue(variant, o, u)
    return y.to(v.dtype).contiguous(), ht, o.to(v.dtype).contiguous()


def _backward_reference(variant, q, k, v, do, log_decay, theta, h0, dht, offset, segments=1, cu_seqlens=None,
                        u=None):
    """Gradients of the reference by autograd (runs at the autograd level, not inside the op)."""
    learned = variant.learned_decay
    inputs = [q, k, v, log_decay if learned else None, theta, h0, u]
    leaves = [None if t is None else t.detach().to(torch.float32).requires_grad_() for t in inputs]
    with torch.enable_grad():
        o, ht, _ = _reference(variant, *leaves[:3], leaves[3] if learned else log_decay, leaves[4], leaves[5], offset,
                              dht is not None, cu_seqlens=cu_seqlens, u=leaves[6])
        outputs, grads_out = [o], [do.to(o.dtype)]
        if dht is not None:
            outputs.append(ht)
            grads_out.append(dht)
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(outputs, wanted, grads_out, allow_unused=True))
    result = [None if t is None else next(grads) for t in leaves]
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(result, inputs))


def _plain_eager(t: Tensor) -> bool:
    """A call on real tensors outside any tracer (torch.compile, export, make_fx, opcheck's modes): the
    kernels may run without the op around them."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    return type(t) is torch.Tensor and not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode()


def _custom_ops(variant: Variant):
    """Register lightgen::attn_<hash> (+ _backward) once per variant; returns the forward: the op under a
    tracer (_plain_eager), else the same functions as a plain autograd.Function. The op's dispatch layers
    (schema defaults, autograd wrapper, redispatch, the dynamo guard around its kernel) cost host time on
    every call, and at long N with few heads a call's host work is as long as its GPU work (CPU, launches
    stubbed, D = 64 in 4 pieces: fwd+bwd 263-276 us of host against 349-386 through the op)."""
    if variant.hash in _OPS:
        return _OPS[variant.hash]
    name = f"lightgen::attn_{variant.hash}"

    def forward(q: Tensor, k: Tensor, v: Tensor, log_decay: MaybeTensor, theta: MaybeTensor,
                initial_state: MaybeTensor, offset: int, output_final_state: bool, segments: int,
                cu_seqlens: MaybeTensor = None, u: MaybeTensor = None, keep: bool = False, pieces: MaybeTensor = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        received = None
        if q.shape[1] == 0:
            y = torch.zeros_like(v)
            ht = _state_like(variant, q, cu_seqlens).zero_() if initial_state is None else initial_state.clone()
            o = torch.zeros_like(v) if variant.epilogue else None
        elif _use_kernels(q):
            y, ht, o, received = _forward_kernels(variant, q, k, v, log_decay, theta, initial_state, offset,
                                                  output_final_state, segments, cu_seqlens, u=u, keep=keep,
                                                  pieces=pieces)
        else:
            y, ht, o = _reference(variant, q, k, v, log_decay, theta, initial_state, offset, output_final_state,
                                  segments, cu_seqlens, u=u)
        # custom ops return tensors: an empty one stands for "no final state asked for" (and, without an
        # epilogue, for the attention's own o, which the epilogue's backward takes; unsplit and not kept, for
        # the states the pieces started from)
        def given(t):  # outputs may not alias each other: a fresh empty tensor for each absent one
            return q.new_empty(0) if t is None else t

        return y, given(ht if output_final_state else None), given(o), given(received)

    def backward(q: Tensor, k: Tensor, v: Tensor, do: Tensor, log_decay: MaybeTensor, theta: MaybeTensor,
                 initial_state: MaybeTensor, dht: MaybeTensor, final_state: MaybeTensor, offset: int, segments: int,
                 cu_seqlens: MaybeTensor, o: MaybeTensor, u: MaybeTensor, received: MaybeTensor, pieces: MaybeTensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        grads = _backward_kernels(variant, q, k, v, do.contiguous(), log_decay, theta, initial_state, dht,
                                  final_state, offset, segments, cu_seqlens, o, u, received, pieces)
        # outputs may not alias each other: a fresh empty tensor for each absent gradient
        return tuple(q.new_empty(0) if g is None else g for g in grads)

    fwd_op = torch.library.custom_op(name, forward, mutates_args=())
    bwd_op = torch.library.custom_op(name + "_backward", backward, mutates_args=())
    learned = variant.learned_decay  # the decays with a gradient (log_decay is g / ln 2)

    @fwd_op.register_fake
    def _(q, k, v, log_decay, theta, initial_state, offset, output_final_state, segments, cu_seqlens=None, u=None,
          keep=False, pieces=None):
        packed = _unpacked(pieces, cu_seqlens, cut=True)
        sides = 2 if variant.two_sided else 1
        if packed is not None:  # one state per piece
            received = q.new_empty(_state_shape(variant, sides * packed.count, q.shape[2]), dtype=torch.float32)
        elif keep:  # one state per sequence
            received = _state_like(variant, q, cu_seqlens)
        else:
            received = q.new_empty(0) if segments == 1 else q.new_empty(
                _state_shape(variant, sides * q.shape[0] * segments, q.shape[2]), dtype=torch.float32)
        return (torch.empty_like(v), (_state_like(variant, q, cu_seqlens) if output_final_state else q.new_empty(0)),
                torch.empty_like(v) if variant.epilogue else q.new_empty(0), received)

    @bwd_op.register_fake
    def _(q, k, v, do, log_decay, theta, initial_state, dht, final_state, offset, segments, cu_seqlens, o, u, received,
          pieces):
        like = (q, k, v, log_decay if learned else None, theta, initial_state, u)
        return tuple(q.new_empty(0) if t is None else torch.empty_like(t) for t in like)

    def setup_context(ctx, inputs, output):
        (q, k, v, log_decay, theta, initial_state, offset, output_final_state, segments, cu_seqlens, u, keep,
         pieces) = inputs
        # decay=scalar / vector: the final state itself enters dg (see _log_decay_grad)
        final_state = output[1] if learned and output_final_state else None
        o = output[2] if variant.epilogue else None  # the attention's own output, for the epilogue's backward
        # the states the pieces started from (or kept)
        received = output[3] if segments > 1 or keep or _unpacked(pieces, cu_seqlens, cut=True) is not None else None
        ctx.save_for_backward(q, k, v, log_decay, theta, initial_state, final_state, cu_seqlens, o, u, received, pieces)
        ctx.offset, ctx.final, ctx.segments = offset, output_final_state, segments
        # outputs without a gradient arrive as None, not as zeros to fill: the pieces' states alone are
        # [B * P, H, F, dv] fp32 (17 MB at 32K x 2, D = 128, 8 pieces), and the backward never reads them
        ctx.set_materialize_grads(False)

    def autograd_backward(ctx, do, dht, _do_inner, _received):  # the last two outputs are internal
        q, k, v, log_decay, theta, h0, ht, cu_seqlens, o, u, received, pieces = ctx.saved_tensors
        if do is None:
            do = torch.zeros(*q.shape[:3], variant.dv, dtype=v.dtype, device=v.device)
        dht = dht.to(torch.float32).contiguous() if (ctx.final and dht is not None) else None
        if q.shape[1] == 0:
            grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                     torch.zeros_like(log_decay) if learned else None,
                     None if theta is None else torch.zeros_like(theta), None if h0 is None else dht,
                     None if u is None else torch.zeros_like(u))
        elif _use_kernels(q):
            kernels = backward if getattr(ctx, "eager", False) and _plain_eager(q) else bwd_op  # (see the docstring)
            grads = kernels(q, k, v, do, log_decay, theta, h0, dht, ht if dht is not None else None, ctx.offset,
                            ctx.segments, cu_seqlens, o, u, received, pieces)
        else:  # the reference needs autograd, which is off below the op's dispatch: run it here
            grads = _backward_reference(variant, q, k, v, do, log_decay, theta, h0, dht, ctx.offset, ctx.segments,
                                        cu_seqlens, u=u)
        dq, dk, dv, dlog_decay, dtheta, dh0, du = grads
        return (dq, dk, dv, dlog_decay if learned else None, dtheta if theta is not None else None,
                dh0 if h0 is not None else None, None, None, None, None, du if u is not None else None, None, None)

    fwd_op.register_autograd(autograd_backward, setup_context=setup_context)

    def eager_forward(ctx, *inputs):  # (ctx first: a separate setup_context costs an inspect.signature per call)
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        ctx.eager = True
        return output

    Eager = type(f"Attention_{variant.hash}", (torch.autograd.Function,), dict(
        forward=staticmethod(eager_forward), backward=staticmethod(autograd_backward)))

    def attention(*inputs):
        return Eager.apply(*inputs) if _plain_eager(inputs[0]) else fwd_op(*inputs)

    _OPS[variant.hash] = attention
    return attention
