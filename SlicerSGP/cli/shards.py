"""Commands that share a list of cases between the processes of a ``torchrun`` job
(``sgp segment-batch``, ``sgp eval``): which cases are this process's, its GPU, and the one
exchange at the end that tells every process what all of them did.

Without ``torchrun`` (no ``WORLD_SIZE``) there is one share holding every case and nothing is
exchanged. Under ``torchrun`` the processes form a gloo group (CPU messages, whatever device
segments) used only to exchange results; a process that finishes its share early waits there
for the others, for up to :data:`WAIT`.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from SlicerSGP.errors import Cancelled, SGPError
from SlicerSGP.training.distributed import Dist

T = TypeVar("T")

WAIT = timedelta(days=7)
"""How long a process that finished its share waits for the slowest one."""


@dataclass
class Shard(Dist):
    """This process's place in the job (rank 0 of 1 alone) and its share of the cases."""

    def mine(self, count: int) -> list[int]:
        """Indices of this process's cases among ``count``: every ``world``-th, from ``rank``
        (neighbouring rows, often alike in size, go to different processes)."""
        return list(range(self.rank, count, self.world))

    def device(self, device: str) -> str:
        """One GPU per process: 'auto' or 'cuda' becomes ``cuda:<local rank>`` when several
        processes run and CUDA is there; anything else is kept as given."""
        if self.world <= 1 or device not in ("auto", "cuda"):
            return device
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else device

    def exchange(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process."""
        if self.world <= 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        if self.world <= 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def join_shards() -> Shard:
    """This process's share: alone, or its rank in the ``torchrun`` job (joins the group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=WAIT)
    return Shard(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def run_share(shard: Shard, work: Callable[[], T]) -> list[T]:
    """``work()`` here, then every process's result in rank order, on every process.

    If the work failed on any process, it raises on every process after the exchange (so that
    none waits forever and each removes its temporaries): the process's own exception where it
    failed, elsewhere an error naming the process and its message. A process that fails while
    others still run, instead of leaving the job, keeps ``torchrun`` from killing the others
    mid-write."""
    error: BaseException | None = None
    try:
        outcome: tuple[str, Any] = ("done", work())
    except (Exception, KeyboardInterrupt) as exc:  # reported to the others, then re-raised
        error = exc
        outcome = ("cancelled" if isinstance(exc, (Cancelled, KeyboardInterrupt)) else "failed",
                   str(exc) if isinstance(exc, SGPError) else
                   "".join(traceback.format_exception_only(type(exc), exc)).strip())
    outcomes = shard.exchange(outcome)
    if error is not None:
        raise error
    for rank, (status, detail) in enumerate(outcomes):
        if status == "cancelled":
            raise Cancelled(f"Process {rank} of {shard.world} was stopped ({detail}).")
        if status == "failed":
            raise SGPError(f"Process {rank} of {shard.world} failed: {detail}")
    return [detail for _, detail in outcomes]
