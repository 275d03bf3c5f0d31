"""The server's state: uploaded volumes, runs and the one worker thread that uses the model.

Every use of the ``Segmenter`` happens on the worker thread, one job at a time (the model and its
caches are not thread-safe, and one device gains nothing from running two jobs at once). Runs
go in arrival order; a point-prompt refinement, which a user waits for with the mouse, goes
before queued runs but never interrupts the running one.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from SlicerSGP.errors import (
    Cancelled,
    SGPDeviceError,
    SGPError,
    SGPInputError,
    SGPWeightsError,
)
from SlicerSGP.types import Geometry, SegmentationResult, SegmentOptions, SupportItem

log = logging.getLogger("SlicerSGP.service")

TERMINAL = ("done", "failed", "cancelled")


def error_type(exc: BaseException) -> str:
    """How a failure is named on the wire (protocol.ERROR_TYPES)."""
    for cls, name in ((SGPInputError, "input"), (SGPWeightsError, "weights"),
                      (SGPDeviceError, "device"), (Cancelled, "cancelled"), (SGPError, "engine")):
        if isinstance(exc, cls):
            return name
    return "internal"


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, SGPError):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return (f"The engine ran out of memory ({text}). Use a smaller --image-size, crop the "
                "volume, or a device with more memory.")
    return f"The engine failed unexpectedly ({text}); the server log has the traceback."


@dataclass
class StoredVolume:
    array: np.ndarray
    geometry: Geometry | None

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


class VolumeStore:
    """Uploaded volumes by content id, least recently used dropped first beyond the bounds.

    A run holds its own reference to its volume, so dropping one here never breaks a queued run;
    the client just uploads it again next time.
    """

    def __init__(self, max_bytes: int, max_count: int = 8):
        self.max_bytes, self.max_count = max_bytes, max_count
        self._items: OrderedDict[str, StoredVolume] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, volume_id: str) -> StoredVolume | None:
        with self._lock:
            item = self._items.pop(volume_id, None)
            if item is not None:
                self._items[volume_id] = item
            return item

    def put(self, volume_id: str, item: StoredVolume) -> None:
        with self._lock:
            self._items.pop(volume_id, None)
            self._items[volume_id] = item
            while len(self._items) > 1 and (len(self._items) > self.max_count or
                                            self.nbytes_locked() > self.max_bytes):
                self._items.popitem(last=False)

    def nbytes_locked(self) -> int:
        return sum(v.nbytes for v in self._items.values())

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"count": len(self._items), "mb": round(self.nbytes_locked() / 2**20, 1)}


@dataclass
class RunRequest:
    volume_id: str
    volume: StoredVolume
    labels: np.ndarray | None
    structures: dict[int, str] | None
    options: SegmentOptions
    support_slices: list[int] | None
    support_bank: dict[int, list[SupportItem]] | None


@dataclass
class Run:
    id: str
    request: RunRequest | None
    state: str = "queued"
    stage: str = ""
    fraction: float = 0.0
    error: str | None = None
    error_type: str | None = None
    created: float = field(default_factory=time.monotonic)
    finished: float | None = None
    result: SegmentationResult | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def status(self, position: int | None) -> dict[str, Any]:
        return {"run_id": self.id, "state": self.state, "stage": self.stage,
                "fraction": round(self.fraction, 4), "error": self.error,
                "error_type": self.error_type, "queue_position": position}


class JobQueue:
    """Runs and refinements, done one at a time on a worker thread; results kept for a while.

    A finished run's result is kept until it is downloaded (then freed), at most
    ``result_ttl`` seconds, and only for the newest ``max_results`` finished runs.
    """

    def __init__(self, segmenter: Any, *, result_ttl: float = 600.0, max_results: int = 16):
        self.segmenter = segmenter
        self.result_ttl, self.max_results = result_ttl, max_results
        self.runs: dict[str, Run] = {}
        self._queue: deque[Run] = deque()
        self._urgent: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._current: Run | None = None
        self._closed = False
        self.completed = 0
        self._thread = threading.Thread(target=self._work, name="sgp-engine-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests

    def submit(self, request: RunRequest) -> Run:
        run = Run(id=uuid.uuid4().hex, request=request)
        with self._cond:
            self._prune_locked()
            self.runs[run.id] = run
            self._queue.append(run)
            self._cond.notify_all()
        return run

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` on the worker thread (before queued runs) and return its result."""
        fut: Future = Future()
        with self._cond:
            self._urgent.append((fn, fut))
            self._cond.notify_all()
        return fut.result(timeout)

    def status(self, run_id: str) -> dict[str, Any] | None:
        with self._cond:
            run = self.runs.get(run_id)
            if run is None:
                return None
            pos = next((i for i, r in enumerate(self._queue) if r is run), None)
            return run.status(pos)

    def cancel(self, run_id: str) -> dict[str, Any] | None:
        with self._cond:
            run = self.runs.get(run_id)
            if run is None:
                return None
            run.cancel_requested.set()
            if run.state == "queued":
                self._queue.remove(run)
                self._finish_locked(run, "cancelled", "Cancelled before it started.", "cancelled")
        return self.status(run_id)

    def peek(self, run_id: str) -> Run | None:
        with self._cond:
            return self.runs.get(run_id)

    def discard(self, run_id: str) -> None:
        """Free a run's result (after download, or when the client says so)."""
        with self._cond:
            run = self.runs.get(run_id)
            if run is not None and run.state in TERMINAL:
                del self.runs[run_id]

    def queue_length(self) -> int:
        with self._cond:
            return len(self._queue) + (self._current is not None)

    def running(self) -> str | None:
        with self._cond:
            return None if self._current is None else self._current.id

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for run in list(self._queue):
                self._finish_locked(run, "cancelled", "The server is shutting down.", "cancelled")
            self._queue.clear()
            if self._current is not None:
                self._current.cancel_requested.set()
            self._cond.notify_all()

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._queue or self._urgent):
                    self._cond.wait()
                if self._urgent:
                    fn, fut = self._urgent.popleft()
                    run = None
                elif self._queue:
                    run = self._current = self._queue.popleft()
                    run.state = "running"
                else:
                    return
            if run is None:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the waiting request
                        fut.set_exception(e)
                continue
            self._execute(run)

    def _execute(self, run: Run) -> None:
        req = run.request
        assert req is not None

        def progress(stage: str, fraction: float) -> None:
            run.stage, run.fraction = stage, float(fraction)

        try:
            result = self.segmenter.segment(
                req.volume.array, req.labels, req.structures, req.options,
                support_slices=req.support_slices, support_bank=req.support_bank,
                geometry=req.volume.geometry, progress=progress,
                cancel=run.cancel_requested.is_set)
        except Cancelled as e:
            outcome: tuple[str, str | None, str | None] = ("cancelled", str(e), "cancelled")
            result = None
        except Exception as e:  # every failure is reported to the client, never lost
            if error_type(e) == "internal":
                log.error("run %s failed:\n%s", run.id, traceback.format_exc())
            outcome, result = ("failed", describe_failure(e), error_type(e)), None
        else:
            outcome = ("done", None, None)
        with self._cond:
            run.result = result
            self._finish_locked(run, *outcome)
            self._current = None
            self.completed += 1

    def _finish_locked(self, run: Run, state: str, error: str | None, etype: str | None) -> None:
        run.state, run.error, run.error_type = state, error, etype
        if state == "done":
            run.fraction = 1.0
        run.finished = time.monotonic()
        run.request = None  # the volume and labels are no longer needed

    def _prune_locked(self) -> None:
        now = time.monotonic()
        done = [r for r in self.runs.values() if r.finished is not None]
        done.sort(key=lambda r: r.finished or 0.0)
        excess = len(done) - self.max_results
        for i, r in enumerate(done):
            if i < excess or now - (r.finished or now) > self.result_ttl:
                del self.runs[r.id]
