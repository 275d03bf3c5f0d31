"""Several processes training one model (``torchrun``): this process's rank, the process group,
the trainable model wrapped in PyTorch's ``DistributedDataParallel``, and one decision to stop
for all ranks. One process without ``torchrun``."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the ``torchrun`` job this process belongs to (nccl for CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)


class LossForward(torch.nn.Module):
    """What ``DistributedDataParallel`` wraps: the model as its one submodule (so DDP registers
    exactly the model's trainable parameters) and a ``forward`` that runs the step's loss
    computation, given as a function.

    DDP arms its gradient hooks only inside the wrapper's ``forward``; the trainer reaches the
    network through several Segmenter methods (encode, support memories, the sweep), which call
    submodules directly. Running the whole episode inside this one ``forward`` makes every one of
    those calls part of the step DDP synchronises."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, compute: Callable[[], Any]) -> Any:
        return compute()


def wrap_for_gradients(model: torch.nn.Module, d: Dist,
                       device: torch.device) -> torch.nn.Module | None:
    """The model in DDP when several processes train it, else None (one process needs nothing).

    DDP broadcasts rank 0's weights to every rank here, averages the gradients in buckets that
    overlap the backward pass, and treats a parameter unused in one rank's episode (an ablated
    module, the other target of a pair, the own-image support path) as a zero gradient there
    (``find_unused_parameters``); a parameter unused on every rank keeps no gradient, as in
    one process. Frozen parameters (the SAM2 base under LoRA) are not synchronised at all."""
    if d.world <= 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else d.local_rank] \
        if device.type == "cuda" else None
    return DistributedDataParallel(LossForward(model), device_ids=ids,
                                   find_unused_parameters=True)


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any (one SIGTERM arriving a step earlier on
    one rank must not leave the others waiting in a gradient all-reduce that never comes)."""
    if d.world <= 1:
        return flag
    import torch.distributed as dist

    on = device if device.type == "cuda" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=on)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def leave_distributed(d: Dist) -> None:
    """Wait for every rank, then close the process group (rank 0 has written by then)."""
    if d.world <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
