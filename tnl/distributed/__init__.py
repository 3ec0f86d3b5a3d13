"""TNL beyond one GPU: tensor parallel, sequence parallel, FSDP2 and DCP checkpoints.

    mesh = make_mesh(dp=2, sp=1, tp=2)        # under torchrun, world size = dp * sp * tp
    model = parallelize(TNLForCausalLM(cfg), mesh)

The mesh has dims ("sp", "dp", "tp"), tp innermost (its all-reduces are the busiest, so its ranks
should share a node). Each concept has its module:
  tensor_parallel    heads and SGLU columns over mesh["tp"]              (parallelize_tnl)
  sequence_parallel  LASP-style state exchange over mesh["sp"]           (enable_sequence_parallel)
  checkpoint         DCP save / load that reshards between meshes, full export for one GPU
FSDP2 (fully_shard) shards parameters, gradients and optimizer state over mesh["dp"]. With SP the
SP ranks hold replicas (HSDP over ("sp", "dp"): replicate over sp, shard over dp), so gradients are
averaged over every rank that saw different tokens.

Data: dp ranks take different rows of the global batch; the sp ranks of one dp rank take contiguous
pieces of the same rows; tp ranks see the same tokens.
"""
from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from .sequence_parallel import enable_sequence_parallel, split_sequence
from .tensor_parallel import head_major_state_dict, parallelize_tnl, standard_state_dict

__all__ = ["enable_sequence_parallel", "head_major_state_dict", "make_mesh", "parallelize",
           "parallelize_tnl", "split_sequence", "standard_state_dict"]

MESH_DIMS = ("sp", "dp", "tp")


def make_mesh(dp: int, sp: int, tp: int, device_type: str = "cpu") -> DeviceMesh:
    """The ("sp", "dp", "tp") mesh over all ranks of the default process group."""
    world = dist.get_world_size()
    if dp * sp * tp != world:
        raise ValueError(f"mesh dp={dp} x sp={sp} x tp={tp} = {dp * sp * tp} ranks, but the world has {world}")
    return init_device_mesh(device_type, (sp, dp, tp), mesh_dim_names=MESH_DIMS)


def parallelize(model, mesh: DeviceMesh, sp_method: str = "states"):
    """TP over mesh["tp"], SP over mesh["sp"] (if > 1), then FSDP2 per block and at the root (if
    more than one rank holds data: with one there is nothing to shard or average)."""
    parallelize_tnl(model, mesh["tp"])
    if mesh["sp"].size() > 1:
        enable_sequence_parallel(model, mesh["sp"].get_group(), sp_method)
    data_mesh = mesh["sp", "dp"] if mesh["sp"].size() > 1 else mesh["dp"]
    if data_mesh.size() == 1:  # nothing to shard or average; FSDP2's hooks would only cost host time
        return model
    for block in model.layers:
        fully_shard(block, mesh=data_mesh)
    fully_shard(model, mesh=data_mesh)
    return model
