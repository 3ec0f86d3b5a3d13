"""A Llama-style decoder the size of a TNL config: the softmax-attention baseline of tools/bench_tnl.py.

    model = LlamaForCausalLM(LlamaConfig.matching(TNLConfig.preset("385m")))
    loss = model.loss(input_ids, targets)

RMSNorm with a learned scale, rotary position embeddings, causal F.scaled_dot_product_attention
(FlashAttention-2 on a GPU when the caller picks that backend), SwiGLU MLP, no biases. Hidden size,
layers, heads and vocabulary are TNL's. TNL's token mixer has a fifth hidden x hidden matrix (the
output gate u), so the MLP is widened by hidden/3 to give both models the same parameter count.
A benchmark baseline, not part of the product: no generation, no save / load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tnl import TNLConfig


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def matching(cls, tnl: TNLConfig) -> "LlamaConfig":
        """TNL's sizes; per layer TNL has 5 h^2 + 3 h g weights, Llama 4 h^2 + 3 h g', so g' = g + h/3
        (rounded to a multiple of 128, which matrix units like)."""
        intermediate = max(128, round((tnl.glu_dim + tnl.hidden_size / 3) / 128) * 128)
        return cls(vocab_size=tnl.vocab_size, hidden_size=tnl.hidden_size, num_layers=tnl.num_layers,
                   num_heads=tnl.num_heads, intermediate_size=intermediate, norm_eps=tnl.norm_eps,
                   init_std=tnl.init_std)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary_tables(length: int, head_dim: int, base: float, device):
    """cos and sin [length, head_dim] of the rotary angles, in fp32 (the caller casts)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x [B, N, H, d]: rotate pairs (i, i + d/2) by the position's angles, in x's dtype (SDPA's flash
    backend needs bf16 or fp16, so the tables must not promote x to fp32)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, self.head_dim) for t in self.qkv_proj(x).chunk(3, dim=-1))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=config.init_std)
        self.gradient_checkpointing = False  # as TNLForCausalLM's: blocks recomputed in the backward

    def forward(self, input_ids):
        """input_ids [B, N] -> logits [B, N, vocab]."""
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_tables(input_ids.shape[1], self.config.head_dim, self.config.rope_base, x.device)
        for block in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.lm_head(self.final_norm(x))

    def loss(self, input_ids, targets):
        """Mean next-token cross-entropy, computed as TNLForCausalLM.loss computes it."""
        logits = self(input_ids)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
