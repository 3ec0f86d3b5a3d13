"""Tensor parallelism for TNL: attention heads and SGLU columns split across the ranks of a TP mesh.

    parallelize_tnl(model, tp_mesh)     # in place; every parameter becomes a DTensor on tp_mesh (tp > 1)

Per block (Megatron style: one all-reduce after the attention, one after the SGLU, in the forward
and in the backward):
  qkvu_proj  ColwiseParallel   each rank gets whole heads of each of q, k, v and u (see below)
  attention  the lightgen kernel on the local heads, with the local slopes and LRPE theta [H/tp, d]
  norm       SRMSNorm over the whole hidden row: the sum of squares is all-reduced over the TP
             ranks (one [B, N, 1] tensor), so each rank normalises its columns exactly as one GPU does
  out_proj   RowwiseParallel   (input sharded by heads, output all-reduced)
  SGLU       l1, l2 ColwiseParallel, l3 RowwiseParallel
Embedding (vocab-sharded, RowwiseParallel) and LM head (ColwiseParallel, logits all-gathered) are
split too, so that every parameter lives on the same mesh: gradient clipping, the optimizer and FSDP2
then see one kind of tensor.

Why the norm is all-reduced rather than gathered: the statistic is one number per token, so the
all-reduce moves 1/(hidden/tp) of what gathering the attention output would, and out_proj can stay
rowwise (no gather before it either).

The fused projection: its rows are [q | k | v | u], each [H heads x d]. ColwiseParallel cuts rows
into tp contiguous pieces, which would give rank 0 q and k. So the weight is stored *head-major*,
rows [head 0: q, k, v, u | head 1: q, k, v, u | ...]; a contiguous piece then holds whole heads of
all four, for any tp that divides H. The order does not depend on tp, so a DCP checkpoint reshards
freely between meshes; a forward hook regroups each rank's output to [q | k | v | u] for GLA.
`standard_state_dict` / `head_major_state_dict` convert to and from the single-GPU order.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..config import TNLConfig

QKVU_SUFFIX = "token_mixer.qkvu_proj.weight"


# ---- the head-major order of the fused projection -----------------------------------------------

def head_major_order(config: TNLConfig) -> torch.Tensor:
    """Row indices into the [q | k | v | u] weight that list it head by head: w[order] is head-major."""
    heads, d = config.num_heads, config.head_dim
    return torch.arange(4 * config.hidden_size).view(4, heads, d).transpose(0, 1).reshape(-1)


def head_major_state_dict(state_dict: dict, config: TNLConfig) -> dict:
    """A single-GPU TNLForCausalLM state dict (or gradients by name) in the distributed row order."""
    order = head_major_order(config)
    return {k: v[order] if k.endswith(QKVU_SUFFIX) else v for k, v in state_dict.items()}


def standard_state_dict(state_dict: dict, config: TNLConfig) -> dict:
    """The inverse: full distributed tensors by name -> the single-GPU order."""
    inverse = torch.argsort(head_major_order(config))
    return {k: v[inverse] if k.endswith(QKVU_SUFFIX) else v for k, v in state_dict.items()}


def _group_by_part(module, inputs, output, head_dim: int):
    # the local output is [head][q, k, v, u][d]; GLA splits it as [q | k | v | u]
    return output.unflatten(-1, (-1, 4, head_dim)).transpose(-3, -2).flatten(-3)


# ---- the output norm over a row split across ranks -----------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """Sum over the group, and sum the gradients in the backward: each rank's graph only sees its own
    columns' use of the sum, so the chain rule needs the total over ranks. (What
    torch.distributed.nn.functional.all_reduce does; that one is deprecated as of torch 2.13.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ShardedSRMSNorm(nn.Module):
    """SRMSNorm of rows whose columns are split over a process group: x * rsqrt(mean(x^2) + eps)
    with the mean over the whole row."""

    def __init__(self, full_size: int, group, eps: float = 1e-6):
        super().__init__()
        self.full_size, self.group, self.eps = full_size, group, eps

    def forward(self, x):
        x32 = x.float()
        sum_sq = _AllReduceSum.apply(x32.pow(2).sum(-1, keepdim=True), self.group)
        return (x32 * torch.rsqrt(sum_sq / self.full_size + self.eps)).to(x.dtype)

    def extra_repr(self):
        return f"full_size={self.full_size}, eps={self.eps}"


# ---- the plan -----------------------------------------------------------------------------------

def _store_head_major(gla, config: TNLConfig):
    with torch.no_grad():
        weight = gla.qkvu_proj.weight
        weight.copy_(weight[head_major_order(config)])


def _regroup_output(gla, config: TNLConfig):
    gla.qkvu_proj.register_forward_hook(functools.partial(_group_by_part, head_dim=config.head_dim))


def _shard_heads(gla, tp_mesh: DeviceMesh, config: TNLConfig):
    tp, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    local = config.num_heads // tp
    _store_head_major(gla, config)
    gla.heads = local  # GLA reshapes q, k, v to [B, N, heads, d]
    gla.slopes = gla.slopes[rank * local:(rank + 1) * local].clone()  # fixed buffer: a plain slice
    if gla.theta is not None:  # learnable: a DTensor, so optimizers and checkpoints see all heads
        gla.theta = nn.Parameter(distribute_tensor(gla.theta.detach(), tp_mesh, [Shard(0)]))
    gla.norm = ShardedSRMSNorm(config.hidden_size, tp_mesh.get_group(), gla.norm.eps)


def parallelize_tnl(model, tp_mesh: DeviceMesh):
    """Split a TNLForCausalLM over a 1-D TP mesh, in place (weights must be the same on every rank:
    seed alike, or load after). For tp = 1 only the head-major layout is applied, so every distributed
    run saves checkpoints in the same order; the parameters stay plain tensors, since DTensor's
    dispatch costs host time on every op (16 tiny layers on the CPU: 182 ms a training step against
    33 with plain tensors; the 1b config at 16K tokens on one H200: 411 ms a step, now 315)."""
    config = model.config
    tp = tp_mesh.size()
    if config.num_heads % tp:
        raise ValueError(f"tensor parallel size {tp} must divide num_heads={config.num_heads}")
    if tp == 1:
        for block in model.layers:
            _store_head_major(block.token_mixer, config)
            _regroup_output(block.token_mixer, config)
        return model
    if config.tie_word_embeddings:
        raise NotImplementedError("tensor parallelism with tie_word_embeddings: the embedding and the LM head "
                                  "would be sharded as two different parameters")
    for block in model.layers:
        _shard_heads(block.token_mixer, tp_mesh, config)
        parallelize_module(block, tp_mesh, {
            "token_mixer.qkvu_proj": ColwiseParallel(),
            "token_mixer.out_proj": RowwiseParallel(),
            "channel_mixer.l1": ColwiseParallel(),
            "channel_mixer.l2": ColwiseParallel(),
            "channel_mixer.l3": RowwiseParallel(),
        })
        _regroup_output(block.token_mixer, config)  # after parallelize_module's hooks: it sees the local tensor
    parallelize_module(model, tp_mesh, {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })
    return model
