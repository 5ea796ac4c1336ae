"""Data-parallel training with ``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on GPU).

``torchrun --nproc_per_node=2 -m ase_race.cli.main train config.yaml`` starts one process per
rank; each takes every ``world``-th structure of each global batch and normalises its loss by the
sums over the whole global batch. DDP averages the gradients over ranks, so each rank's loss is
multiplied by ``world``: the update then equals the single-process update on the same batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_environment(device: torch.device) -> bool:
    """Join the process group torchrun describes in the environment; False when not launched
    by torchrun (single process)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    return True


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU (``cuda:LOCAL_RANK``) when training on CUDA; the CPU stays the CPU.

    Under torchrun every rank is its own process, so making its GPU the current CUDA device
    (which NCCL needs) affects that process alone.
    """
    if device.type != "cuda":
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(local)
    return local


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around ``model`` when a process group is up, else the model itself."""
    if rank_and_world()[1] == 1:
        return model
    # find_unused_parameters: with the MSE losses the variance heads get no gradient.
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()
