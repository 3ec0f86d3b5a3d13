"""Sharded checkpoints with torch.distributed.checkpoint (DCP): a run on N ranks resumes on M.

    save(path, model, optimizer, {"step": 100, ...})    # every rank writes its own shards
    trainer_state = load(path, model, optimizer)        # any mesh: DCP reads the pieces each rank needs
    export_pretrained(model, "run/model")               # one-GPU save_pretrained folder (rank 0 writes)

DCP stores each tensor by its global shape and offsets, so a checkpoint does not remember the mesh
that wrote it. That works because every distributed run keeps the fused q,k,v,u projection in the
same (head-major, tp-independent) order, see tensor_parallel. The trainer state (step, history, RNG
state) is one pickled object, identical on every rank.
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from .tensor_parallel import standard_state_dict


def save(path, model, optimizer, trainer_state: dict | None = None) -> None:
    """Write model, optimizer and trainer state to the folder `path` (collective: all ranks call).
    Written to path.tmp and swapped in, so a crash mid-save keeps the previous checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "trainer": pickle.dumps(trainer_state or {})},
             checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(path, model, optimizer) -> dict:
    """Read a checkpoint written by save on any mesh into this run's model and optimizer (in place);
    returns the trainer state."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "trainer": b""}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return pickle.loads(state["trainer"])


def full_state_dict(model) -> dict:
    """The whole model in the one-GPU layout, on CPU, on rank 0 (other ranks get {}). Collective."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return standard_state_dict(state, model.config) if state else {}


def export_pretrained(model, directory) -> None:
    """A save_pretrained folder that TNLForCausalLM.from_pretrained loads on one device. Collective."""
    from ..model import TNLForCausalLM

    state = full_state_dict(model)
    if dist.get_rank() == 0:
        single = TNLForCausalLM(model.config)
        single.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
        single.save_pretrained(directory)
    dist.barrier()
