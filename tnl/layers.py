"""TransNormerLLM layers: SRMSNorm, the GLA token mixer (lightgen attention), the SGLU channel mixer.

Follows the released TransNormerLLM code where the paper and the code differ; each such choice is
named where it is made.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

import lightgen

from .config import TNLConfig
from .generation import chunk_with_state, recurrent_step


class SRMSNorm(nn.Module):
    """Simple RMSNorm: x * rsqrt(mean(x^2) + eps), no learned scale. Computed in fp32."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self):
        return f"eps={self.eps}"


def lrpe_theta_init(heads: int, head_dim: int) -> torch.Tensor:
    """LRPE angles: 10000^(-2i/(H*d)) for i in 0..H*d-1, as [H, d] (the released Lrpe module)."""
    d = heads * head_dim
    return (10000.0 ** (-2.0 / d * torch.arange(d, dtype=torch.float64))).float().reshape(heads, head_dim)


def decay_slopes(config: TNLConfig, layer: int) -> torch.Tensor:
    """Per-head decay rates s of one layer (lambda = exp(-s)), fp32 [H]."""
    heads, layers = config.num_heads, config.num_layers
    if config.slope_schedule == "released":
        # released code: slopes * (1 - l/(L-1) + 1e-5); one layer has no l/(L-1), use factor 1
        factor = 1.0 if layers == 1 else 1.0 - layer / (layers - 1) + 1e-5
        rates = [s * factor for s in lightgen.tnl_slopes(heads)]
    else:
        # paper: lambda = exp(-8h/H * (1 - l/L)), h and l counted from 1
        rates = [8.0 * (h + 1) / heads * (1.0 - (layer + 1) / layers) for h in range(heads)]
    return torch.tensor(rates, dtype=torch.float32)


_GATES = {"identity": lambda u: u, "sigmoid": torch.sigmoid, "silu": F.silu}


class GLA(nn.Module):
    """Gated linear attention: o = Wo (SRMSNorm(attn(silu(q), silu(k), v)) * act(u)).

    One fused projection gives q, k, v, u. silu on q, k and LRPE-d run inside the lightgen kernel,
    so raw projections go in. The output gate is u itself by default (gate_act="identity"): the
    released TransNormerLLM code computes `output = u * output` with no activation on u.
    The output SRMSNorm runs over the whole hidden row (all heads), as in the released code, or with
    output_norm="head" over each head's row: then norm and gate run inside the kernel (`fused`, the
    fused epilogue) when training without sequence parallelism; use_fused=False (and the cache paths,
    and sequence parallelism, see forward) apply the same math in PyTorch.
    """

    # hook for tnl.distributed.sequence_parallel: attention over a sequence split across ranks,
    # called as fn(attn, q, k, v, slopes=, theta=) -> o in place of attn itself (training form only)
    sequence_parallel = None

    def __init__(self, config: TNLConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.head_dim = config.num_heads, config.head_dim
        hidden = config.hidden_size
        self.qkvu_proj = nn.Linear(hidden, 4 * hidden, bias=False)
        self.out_proj = nn.Linear(hidden, hidden, bias=False)
        self.norm = SRMSNorm(config.norm_eps)
        self.gate_act = config.gate_act
        self.uses_lrpe = layer in config.lrpe_layers
        self.theta = nn.Parameter(lrpe_theta_init(self.heads, self.head_dim)) if self.uses_lrpe else None
        # fixed decay rates; rebuilt from the config, so not saved with the weights
        self.register_buffer("slopes", decay_slopes(config, layer), persistent=False)
        d = self.head_dim
        self.attn = lightgen.compile(
            f"decay=constant,causal,lrpe={'d' if self.uses_lrpe else 'none'},phi=silu,dk={d},dv={d},scale=1")
        self.fused = None  # the attention with norm and gate in its output stage (output_norm="head")
        if config.output_norm == "head":
            self.fused = lightgen.compile(f"{self.attn.variant},norm=srms,eps={config.norm_eps!r},gate={self.gate_act}")
        self.use_fused = self.fused is not None

    def _apply(self, fn, *args, **kwargs):
        # .half() / .to(bfloat16) would round the decay rates (0.4% in bf16): keep them fp32
        slopes = self.slopes
        super()._apply(fn, *args, **kwargs)
        self.slopes = slopes.to(self.slopes.device)
        return self

    def _attend(self, q, k, v, **extra):  # extra: the states of a chunked prefill, or cu_seqlens
        theta = self._local_theta()
        if self.sequence_parallel is not None and not extra:
            return self.sequence_parallel(self.attn, q, k, v, slopes=self.slopes.float(), theta=theta)
        return self.attn(q, k, v, slopes=self.slopes.float(), theta=theta, **extra)

    def _step(self, q, k, v, state, position):
        return self.attn.step(q, k, v, state, slopes=self.slopes.float(), theta=self._local_theta(), position=position)

    def _local_theta(self):
        theta = self.theta
        if isinstance(theta, DTensor):  # tensor parallel: the kernel takes this rank's heads as a plain tensor
            theta = theta.to_local()
        return theta

    def _epilogue(self, o, u):
        """SRMSNorm(o) * act(u) in PyTorch; o, u [B, N, heads, d]."""
        if self.fused is not None:  # output_norm="head": the fused variant's epilogue, the same math
            return lightgen.reference.epilogue(self.fused.variant, o.float(), u)
        # -1, not hidden: under tensor parallelism this rank holds hidden / tp columns (its heads)
        b, n = o.shape[:2]
        return self.norm(o.reshape(b, n, -1)) * _GATES[self.gate_act](u.reshape(b, n, -1))

    def forward(self, x, cache=None, cu_seqlens=None):
        """x [B, N, hidden]. With a cache (generation), carry this layer's state across calls. cu_seqlens: packed
        documents (B = 1), each attended on its own (TNLForCausalLM.forward)."""
        b, n, _ = x.shape
        if cu_seqlens is not None and self.sequence_parallel is not None:
            raise ValueError("cu_seqlens: packed documents are not split across ranks (sequence parallelism); "
                             "pass one sequence per batch row there")
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)
        q, k, v, u = (t.reshape(b, n, self.heads, self.head_dim) for t in (q, k, v, u))
        # Sequence parallelism adds the earlier ranks' state contribution to o after the kernel; the norm
        # is not linear, so it must come after that sum: that path keeps the epilogue in PyTorch.
        if cache is None and self.use_fused and self.sequence_parallel is None:
            o = self.fused(q, k, v, slopes=self.slopes.float(), theta=self._local_theta(), u=u, **packed)
            return self.out_proj(o.reshape(b, n, -1))
        if cache is None:
            o = self._attend(q, k, v, **packed)
        elif n == 1 and not packed:
            state = cache.states[self.layer]
            if state is None:  # a one-token prompt: decoding starts from the zero state
                state = self.attn.new_state(b, q.shape[2], q.device)
            o, cache.states[self.layer] = recurrent_step(self._step, q[:, 0], k[:, 0], v[:, 0], state, cache.position)
            o = o[:, None]
        else:
            if isinstance(cache.position, torch.Tensor):
                raise ValueError("cache: its sequences stand at different positions (ragged prompts); continue them "
                                 "one token at a time")
            o, cache.states[self.layer] = chunk_with_state(
                self._attend, q, k, v, cache.states[self.layer], cache.position, **packed)
        o = self._epilogue(o, u)
        return self.out_proj(o.reshape(b, n, -1).to(u.dtype))


class SGLU(nn.Module):
    """Simple GLU channel mixer: W3((x W1) * (x W2)), no activation."""

    def __init__(self, hidden: int, glu_dim: int):
        super().__init__()
        self.l1 = nn.Linear(hidden, glu_dim, bias=False)
        self.l2 = nn.Linear(hidden, glu_dim, bias=False)
        self.l3 = nn.Linear(glu_dim, hidden, bias=False)

    def forward(self, x):
        return self.l3(self.l1(x) * self.l2(x))


class TNLBlock(nn.Module):
    """Pre-norm block: x + GLA(SRMSNorm(x)), then x + SGLU(SRMSNorm(x))."""

    def __init__(self, config: TNLConfig, layer: int):
        super().__init__()
        self.token_norm = SRMSNorm(config.norm_eps)
        self.token_mixer = GLA(config, layer)
        self.channel_norm = SRMSNorm(config.norm_eps)
        self.channel_mixer = SGLU(config.hidden_size, config.glu_dim)

    def forward(self, x, cache=None, cu_seqlens=None):
        x = x + self.token_mixer(self.token_norm(x), cache, cu_seqlens)
        return x + self.channel_mixer(self.channel_norm(x))
