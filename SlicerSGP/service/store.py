"""What the server holds besides runs, and its bounds: :class:`ServiceLimits` (the ``sgp serve``
options), the :class:`VolumeStore` of uploaded volumes, and the memory a run's result holds or
will hold.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from SlicerSGP.errors import SGPInputError
from SlicerSGP.service.request_checks import LimitExceeded
from SlicerSGP.types import Geometry, SegmentationResult

MB = 2**20
RETRY_AFTER = 5
"""Seconds a client refused for a full queue or store is told to wait (Retry-After)."""


@dataclass(frozen=True)
class ServiceLimits:
    """What one request, and the server as a whole, may cost (``sgp serve`` options)."""

    max_queue: int = 16
    """Runs and click refinements waiting for the engine (the running one not counted)."""
    max_volumes_mb: float = 4096
    """Uploaded volumes kept, in MB."""
    max_results_mb: float = 8192
    """Finished results kept until downloaded, in MB; also the largest result of one run."""
    max_voxels: int = 1_000_000_000
    """Voxels of one volume."""
    max_structures: int = 128
    """Structures segmented by one run."""
    refine_timeout: float = 25.0
    """Seconds a click refinement may wait for, and run on, the engine."""
    max_queue_per_user: int | None = None
    """Runs of one user waiting for the engine (None: only ``max_queue`` bounds them)."""

    def check(self) -> None:
        for name in ("max_queue", "max_volumes_mb", "max_results_mb", "max_voxels",
                     "max_structures", "refine_timeout", "max_queue_per_user"):
            value = getattr(self, name)
            if value is None and name == "max_queue_per_user":
                continue
            if not (value > 0 and math.isfinite(value)):
                raise SGPInputError(f"--{name.replace('_', '-')} must be a positive number "
                                    f"(got {value}).")


@dataclass
class StoredVolume:
    array: np.ndarray
    geometry: Geometry | None

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


class VolumeStore:
    """Uploaded volumes by content id, least recently used dropped first beyond ``max_bytes``.

    A volume that a queued or running run (or a pending refinement) needs is *pinned*
    (:meth:`acquire` .. :meth:`release`) and never dropped, so the bound holds for every volume
    in memory. An upload that does not fit beside the pinned volumes is refused (503, try
    again once runs finish); one larger than the whole store is refused (413).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, StoredVolume] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, volume_id: str) -> StoredVolume | None:
        with self._lock:
            return self._touch_locked(volume_id)

    def acquire(self, volume_id: str) -> StoredVolume | None:
        """The volume, pinned until :meth:`release` (None if not held)."""
        with self._lock:
            item = self._touch_locked(volume_id)
            if item is not None:
                self._pins[volume_id] = self._pins.get(volume_id, 0) + 1
            return item

    def release(self, volume_id: str) -> None:
        with self._lock:
            left = self._pins.get(volume_id, 0) - 1
            if left > 0:
                self._pins[volume_id] = left
            else:
                self._pins.pop(volume_id, None)

    def check_size(self, nbytes: int) -> None:
        """LimitExceeded (413) for a volume larger than the whole store."""
        if nbytes > self.max_bytes:
            raise LimitExceeded(413, f"The volume is {nbytes / MB:.1f} MB but this server keeps "
                                f"at most {self.max_bytes / MB:g} MB of volumes: restart it "
                                "with a larger --max-volumes-mb, or crop the volume.")

    def put(self, volume_id: str, item: StoredVolume) -> StoredVolume:
        """Store ``item`` (or return the copy already held), dropping least recently used
        unpinned volumes to make room; LimitExceeded if it cannot fit."""
        limit = f"{self.max_bytes / MB:g} MB"
        self.check_size(item.nbytes)
        with self._lock:
            held = self._touch_locked(volume_id)
            if held is not None:
                return held
            used = self.nbytes_locked()
            free = [k for k in self._items if k not in self._pins]
            pinned = used - sum(self._items[k].nbytes for k in free)
            if pinned + item.nbytes > self.max_bytes:
                raise LimitExceeded(
                    503, f"The server's volume store is full: {pinned / MB:.1f} MB of its "
                    f"{limit} (--max-volumes-mb) hold volumes that queued or running runs need, "
                    f"and this volume is {item.nbytes / MB:.1f} MB. Try again once those runs "
                    "finish, or restart the server with a larger --max-volumes-mb.", RETRY_AFTER)
            for key in free:  # oldest use first
                if used + item.nbytes <= self.max_bytes:
                    break
                used -= self._items.pop(key).nbytes
            self._items[volume_id] = item
            return item

    def _touch_locked(self, volume_id: str) -> StoredVolume | None:
        item = self._items.pop(volume_id, None)
        if item is not None:
            self._items[volume_id] = item
        return item

    def nbytes_locked(self) -> int:
        return sum(v.nbytes for v in self._items.values())

    def summary(self) -> dict[str, Any]:
        with self._lock:
            pinned = sum(v.nbytes for k, v in self._items.items() if k in self._pins)
            return {"count": len(self._items), "mb": round(self.nbytes_locked() / MB, 1),
                    "pinned": len(self._pins), "pinned_mb": round(pinned / MB, 1),
                    "budget_mb": round(self.max_bytes / MB, 1)}


def result_nbytes(result: SegmentationResult) -> int:
    """Memory held by a result's arrays."""
    total = int(result.labels.nbytes)
    for group in (result.probabilities, result.pseudo_masks, result.slice_scores):
        total += sum(int(np.asarray(a).nbytes) for a in group.values())
    return total


def estimate_result_nbytes(shape: tuple[int, ...], axis: int, values: list[int],
                           keep_pseudo_masks: bool) -> int:
    """What a run's result will hold (:func:`result_nbytes`), from its request alone: the label
    map, a float32 probability map per structure (and a pseudo-mask one if kept), a score row
    per slice and structure."""
    from SlicerSGP.method.assembly import SCORE_DTYPE, label_dtype

    voxels = int(np.prod([int(s) for s in shape[:3]], dtype=np.int64))
    per_structure = voxels * 4 * (2 if keep_pseudo_masks else 1) + \
        int(shape[axis]) * SCORE_DTYPE.itemsize
    try:
        label_bytes = label_dtype(list(values)).itemsize
    except SGPInputError:
        label_bytes = 8
    return voxels * label_bytes + len(values) * per_structure


def too_big(nbytes: int, budget: int) -> str:
    """Why a run's result is refused: it alone is over --max-results-mb (``budget`` bytes)."""
    return (f"The run's result is {nbytes / MB:.1f} MB, more than the {budget / MB:g} MB of "
            "results this server keeps (--max-results-mb): segment fewer structures at once, "
            "crop the volume, or restart the server with a larger --max-results-mb.")


def prune_finished(runs: dict[str, Any], max_results: int, result_ttl: float,
                   max_result_bytes: int | None) -> None:
    """Forget old finished runs of ``runs`` (run id -> jobs.Run; count, age) and drop the
    oldest results beyond ``max_result_bytes``; a dropped result's run says why. The caller
    holds the job queue's lock."""
    now = time.monotonic()
    done = [r for r in runs.values() if r.finished is not None]
    done.sort(key=lambda r: r.finished or 0.0)
    excess = len(done) - max_results
    for i, r in enumerate(done):
        if i < excess or now - (r.finished or now) > result_ttl:
            del runs[r.id]
    if max_result_bytes is None:
        return
    held = [r for r in done if r.result is not None and r.id in runs]
    total = sum(r.result_nbytes for r in held)
    for r in held[:-1]:  # never the newest
        if total <= max_result_bytes:
            break
        total -= r.result_nbytes
        r.result, r.result_nbytes = None, 0
        r.state, r.error_type = "failed", "dropped"
        r.error = (f"The run's result was dropped before it was downloaded, to keep the "
                   f"server's results within {max_result_bytes / MB:g} MB "
                   "(--max-results-mb): run it again, download results sooner, or restart "
                   "the server with a larger --max-results-mb.")
