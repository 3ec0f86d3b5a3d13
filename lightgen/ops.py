"""The public call: lightgen.compile(variant) -> attn(q, k, v, slopes=None, theta=None).

Each variant becomes two torch.library custom ops, lightgen::attn_<hash> and its backward, so
torch.compile(fullgraph=True) sees one opaque node per call and autograd gets the fused backward.
Where the kernels run:
  CUDA tensors                       the generated Triton kernels
  CPU tensors, TRITON_INTERPRET=1    the same kernels under Triton's interpreter (tests)
  CPU tensors otherwise              the PyTorch reference (lightgen.reference.quadratic), so models
  (or LIGHTGEN_CPU_REFERENCE=1)      built on lightgen run anywhere; it is O(N^2), not a fast path
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from . import build, launch, reference
from .spec import Variant, as_variant, tnl_slopes

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LN2 = math.log(2.0)


class LinearAttention:
    """A compiled variant. Call as attn(q, k, v, slopes=None, theta=None) -> o.

    Layout [B, N, H, D] (batch, sequence, heads, head dim), like flash-linear-attention:
      q, k   [B, N, H, dk]        v -> o  [B, N, H, dv]        fp32, fp16 or bf16 (all the same)
      slopes [H]      decay=constant only: lambda_h = exp(-slopes[h]); TransNormerLLM's when omitted;
                      fixed (no gradient)
      theta  [H, dk]  lrpe=d only, required; learnable (the backward returns its gradient)
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

    def source(self) -> str:
        return self.source_path.read_text()

    def __call__(self, q, k, v, slopes=None, theta=None):
        variant = self.variant
        _check_inputs(variant, q, k, v)
        heads = q.shape[2]
        log2_decay = None
        if variant.decay == "constant":
            if slopes is None:
                key = (heads, str(q.device))
                if key not in self._default_slopes:
                    self._default_slopes[key] = torch.tensor(tnl_slopes(heads), dtype=torch.float32, device=q.device)
                slopes = self._default_slopes[key]
            _check_param("slopes", slopes, (heads,), q.device)
            if slopes.requires_grad:
                raise ValueError("slopes: the decay rates are fixed and get no gradient; pass slopes.detach()")
            log2_decay = (slopes.to(torch.float32) * (-1.0 / _LN2)).contiguous()
        elif slopes is not None:
            raise ValueError(f"slopes: variant has decay={variant.decay}, which takes no slopes")
        if variant.lrpe == "d":
            if theta is None:
                raise ValueError(f"theta: variant has lrpe=d, which needs theta of shape [H, dk] = [{heads}, {variant.dk}]")
            _check_param("theta", theta, (heads, variant.dk), q.device)
            theta = theta.to(torch.float32).contiguous()
        elif theta is not None:
            raise ValueError("theta: variant has lrpe=none, which takes no theta")
        return self._forward(q.contiguous(), k.contiguous(), v.contiguous(), log2_decay, theta)


_COMPILED: dict[str, LinearAttention] = {}
_OPS: dict[str, object] = {}


def compile(variant) -> LinearAttention:  # noqa: A001 - the product's verb
    """Compile a variant (a lightgen.Variant or its text form) into a callable attention op."""
    variant = as_variant(variant)
    if variant.hash not in _COMPILED:
        _COMPILED[variant.hash] = LinearAttention(variant)
    return _COMPILED[variant.hash]


# ---- checks -------------------------------------------------------------------------------

def _check_inputs(variant: Variant, q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims [B, N, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
    if q.shape[-1] != variant.dk:
        raise ValueError(f"q: last dim must be dk={variant.dk} for this variant, got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3] or v.shape[-1] != variant.dv:
        raise ValueError(f"v: expected shape [B, N, H, dv] = {(*q.shape[:3], variant.dv)}, got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"k, v: expected the device of q ({q.device}), got k {k.device}, v {v.device}")


def _check_param(name, t, shape, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {list(shape)}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of q), got {t.device}")


# ---- launching ------------------------------------------------------------------------------

_DOT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _use_kernels(t: torch.Tensor) -> bool:
    # LIGHTGEN_CPU_REFERENCE=1 picks the reference on CPU even under the interpreter (fast CPU tests
    # of models); toggling TRITON_INTERPRET itself inside a process confuses Triton's interpreter.
    if t.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("LIGHTGEN_CPU_REFERENCE") != "1"


def _launch(module, variant, kernel, q, tile_name, args):
    """One kernel over grid (B*H, tiles): its output's head dim ("BK": dk, "BV": dv) is tiled."""
    import triton.language as tl

    b, n, h, _ = q.shape
    params = launch.params(variant, kernel, q.dtype, n, q.device)
    tile = params[tile_name]
    tiles = (variant.dk if tile_name == "BK" else variant.dv) // tile
    dot = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[q.dtype]
    getattr(module, kernel)[(b * h, tiles)](
        *args, n, h, variant.scale, DK=variant.dk, DV=variant.dv, C=params["C"], DOT=dot,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=params["num_warps"], num_stages=params["num_stages"], **{tile_name: tile})


def _forward_kernels(variant, q, k, v, log2_decay, theta):
    module = build.load(variant)
    o = torch.empty_like(v)
    _launch(module, variant, "fwd", q, "BV", (q, k, v, o, log2_decay, theta))
    return o


def _backward_kernels(variant, q, k, v, do, log2_decay, theta):
    module = build.load(variant)
    b, n, h, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lrpe = variant.lrpe == "d"
    dth_q = torch.empty(b * h, variant.dk, device=q.device, dtype=torch.float32) if lrpe else None
    dth_k = torch.empty_like(dth_q) if lrpe else None
    _launch(module, variant, "bwd_dq", q, "BK", (q, k, v, do, dq, dth_q, log2_decay, theta))
    _launch(module, variant, "bwd_dk", q, "BK", (q, k, v, do, dk, dth_k, log2_decay, theta))
    _launch(module, variant, "bwd_dv", q, "BV", (q, k, v, do, dv, log2_decay, theta))
    dtheta = (dth_q + dth_k).view(b, h, variant.dk).sum(0) if lrpe else q.new_empty(0)
    return dq, dk, dv, dtheta


def _slopes(log2_decay):
    return None if log2_decay is None else log2_decay * -_LN2


def _forward_reference(variant, q, k, v, log2_decay, theta):
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = reference.quadratic(variant, q.to(work), k.to(work), v.to(work), _slopes(log2_decay), theta)
    return o.to(v.dtype).contiguous()  # the fake op promises the layout of v


def _backward_reference(variant, q, k, v, do, log2_decay, theta):
    work = torch.float32
    leaves = [t.detach().to(work).requires_grad_() for t in (q, k, v)]
    th = theta.detach().requires_grad_() if theta is not None else None
    with torch.enable_grad():
        o = reference.quadratic(variant, *leaves, _slopes(log2_decay), th)
        grads = torch.autograd.grad(o, leaves + ([th] if th is not None else []), do.to(work))
    dq, dk, dv = (g.to(t.dtype) for g, t in zip(grads, (q, k, v)))
    return dq, dk, dv, (grads[3] if th is not None else q.new_empty(0))


def _custom_ops(variant: Variant):
    """Register lightgen::attn_<hash> (+ _backward) once per variant; returns the forward op."""
    if variant.hash in _OPS:
        return _OPS[variant.hash]
    name = f"lightgen::attn_{variant.hash}"

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                log2_decay: Optional[torch.Tensor], theta: Optional[torch.Tensor]) -> torch.Tensor:
        if q.shape[1] == 0:
            return torch.zeros_like(v)
        impl = _forward_kernels if _use_kernels(q) else _forward_reference
        return impl(variant, q, k, v, log2_decay, theta)

    def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
                 log2_decay: Optional[torch.Tensor], theta: Optional[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        do = do.contiguous()
        if q.shape[1] == 0:
            dtheta = torch.zeros_like(theta) if theta is not None else q.new_empty(0)
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dtheta
        return _backward_kernels(variant, q, k, v, do, log2_decay, theta)

    fwd_op = torch.library.custom_op(name, forward, mutates_args=())
    bwd_op = torch.library.custom_op(name + "_backward", backward, mutates_args=())

    @fwd_op.register_fake
    def _(q, k, v, log2_decay, theta):
        return torch.empty_like(v)

    @bwd_op.register_fake
    def _(q, k, v, do, log2_decay, theta):
        dtheta = torch.empty_like(theta) if theta is not None else q.new_empty(0)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dtheta

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def autograd_backward(ctx, do):
        q, k, v, log2_decay, theta = ctx.saved_tensors
        if _use_kernels(q):
            dq, dk, dv, dtheta = bwd_op(q, k, v, do, log2_decay, theta)
        else:  # the reference needs autograd, which is off below the op's dispatch: run it here
            dq, dk, dv, dtheta = _backward_reference(variant, q, k, v, do, log2_decay, theta)
        return dq, dk, dv, None, (dtheta if theta is not None else None)

    fwd_op.register_autograd(autograd_backward, setup_context=setup_context)
    _OPS[variant.hash] = fwd_op
    return fwd_op
