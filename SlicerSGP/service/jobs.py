"""The server's runs and the one worker thread that uses the model (volumes: store.py).

Every use of the ``Segmenter`` happens on the worker thread, one job at a time (the model and its
caches are not thread-safe, and one device gains nothing from running two jobs at once). Each
run carries its user; runs are taken round robin between users, each user's in arrival order
(fair_queue.py); a point-prompt refinement, which a user waits for with the mouse, goes before
queued runs but never interrupts the running one. The log names each run's user, volume hash,
wait and run time, never the image or its labels.

What the server holds is bounded by :class:`ServiceLimits` (``sgp serve`` options): the queue
(runs and refinements waiting, ``--max-queue``; runs of one user, ``--max-queue-per-user``), the
volumes (``--max-volumes-mb``, least
recently used dropped first, never one a queued or running run needs) and the finished results
(``--max-results-mb``, oldest dropped first). A request over a limit is refused with
:class:`protocol.LimitExceeded` (HTTP 413/429/503) naming the limit and its option. The volume
store, the limits and the result size estimates are in store.py.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
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
from SlicerSGP.service.fair_queue import FairQueue
from SlicerSGP.service.request_checks import LimitExceeded

# The names imported ``as`` themselves moved to store.py; they are imported back so that
# ``jobs.<name>`` keeps working for every caller.
from SlicerSGP.service.store import MB as MB
from SlicerSGP.service.store import RETRY_AFTER as RETRY_AFTER
from SlicerSGP.service.store import ServiceLimits as ServiceLimits
from SlicerSGP.service.store import StoredVolume as StoredVolume
from SlicerSGP.service.store import VolumeStore as VolumeStore
from SlicerSGP.service.store import estimate_result_nbytes as estimate_result_nbytes
from SlicerSGP.service.store import prune_finished, too_big
from SlicerSGP.service.store import result_nbytes as result_nbytes
from SlicerSGP.types import SegmentationResult, SegmentOptions, SlicePrompt, SupportItem

log = logging.getLogger("SlicerSGP.service")


def log_fault(what: str, exc: BaseException) -> None:
    """Log a real fault once: its type and stack, without its message (the message may hold
    data from the request, e.g. structure names; the client gets it in the answer)."""
    stack = "".join(traceback.format_tb(exc.__traceback__))
    log.error("%s failed with %s:\n%s", what, type(exc).__name__, stack.rstrip())

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
class RunRequest:
    volume_id: str
    volume: StoredVolume
    labels: np.ndarray | Callable[[], np.ndarray | None] | None
    """The label map, or a function that builds it when the run starts (a queued run then
    holds only the labeled slices it was sent, not a volume-sized map)."""
    structures: dict[int, str] | None
    options: SegmentOptions
    support_slices: list[int] | None
    support_bank: dict[int, list[SupportItem]] | None
    prompts: list[SlicePrompt] | None = None

    def label_map(self) -> np.ndarray | None:
        return self.labels() if callable(self.labels) else self.labels


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
    result_nbytes: int = 0
    user: str = "local"
    volume_id: str = ""
    started: float | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def status(self, position: int | None) -> dict[str, Any]:
        return {"run_id": self.id, "state": self.state, "stage": self.stage,
                "fraction": round(self.fraction, 4), "error": self.error,
                "error_type": self.error_type, "queue_position": position}


class JobQueue:
    """Runs and refinements, done one at a time on a worker thread; results kept for a while.

    At most ``max_queue`` runs and refinements wait (the running one not counted); more are
    refused with 429. A finished run's result is kept until it is downloaded (then freed), at
    most ``result_ttl`` seconds, only for the newest ``max_results`` finished runs, and within
    ``max_result_bytes`` in all (oldest dropped first). Volumes that runs need are pinned in
    ``volumes`` from :meth:`submit` (the caller acquired them) until the run ends.
    """

    def __init__(self, segmenter: Any, volumes: VolumeStore | None = None, *,
                 result_ttl: float = 600.0, max_results: int = 16,
                 max_result_bytes: int | None = None, max_queue: int | None = None,
                 max_queue_per_user: int | None = None):
        self.segmenter, self.volumes = segmenter, volumes
        self.result_ttl, self.max_results = result_ttl, max_results
        self.max_result_bytes, self.max_queue = max_result_bytes, max_queue
        self.max_queue_per_user = max_queue_per_user
        self.runs: dict[str, Run] = {}
        self._queue: FairQueue[Run] = FairQueue()
        self._urgent: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._current: Run | None = None
        self._closed = False
        self.completed = 0
        self.refused = 0
        """Requests refused because the queue was full."""
        self._thread = threading.Thread(target=self._work, name="sgp-engine-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests

    def submit(self, request: RunRequest, user: str = "local") -> Run:
        """Queue a run of ``user`` (LimitExceeded, 429, when the queue or the user's share of
        it is full). The run releases its volume's pin when it ends; on refusal the caller
        still holds it."""
        run = Run(id=uuid.uuid4().hex, request=request, user=user, volume_id=request.volume_id)
        with self._cond:
            self._check_room_locked("run")
            self._check_user_room_locked(user)
            self._prune_locked()
            self.runs[run.id] = run
            self._queue.append(run)
            log.info("run %s queued: user %s, volume %s, %d of theirs and %d in all waiting",
                     run.id, user, run.volume_id[:16], self._queue.count(user), len(self._queue))
            self._cond.notify_all()
        return run

    def call_soon(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the worker thread before queued runs; its Future. LimitExceeded (429)
        when the queue is full. A caller that stops waiting calls :meth:`withdraw`."""
        fut: Future = Future()
        with self._cond:
            self._check_room_locked("click refinement")
            self._urgent.append((fn, fut))
            self._cond.notify_all()
        return fut

    def call(self, fn: Callable[[], Any], timeout: float) -> Any:
        """:meth:`call_soon` and wait at most ``timeout`` seconds for the result (TimeoutError,
        and ``fn`` withdrawn if it has not started)."""
        fut = self.call_soon(fn)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            self.withdraw(fut)
            raise

    def withdraw(self, fut: Future) -> bool:
        """Take a waiting call off the queue (True), or False if it started already."""
        with self._cond:
            for entry in self._urgent:
                if entry[1] is fut:
                    self._urgent.remove(entry)
                    fut.cancel()
                    return True
        return False

    def _check_room_locked(self, what: str) -> None:
        waiting = len(self._queue) + len(self._urgent)
        if self.max_queue is not None and waiting >= self.max_queue:
            self.refused += 1
            raise LimitExceeded(
                429, f"The engine's queue is full: {waiting} runs and click refinements are "
                f"waiting, the most this server takes (--max-queue {self.max_queue}). This "
                f"{what} was not queued: try again in a few seconds, or restart the server "
                "with a larger --max-queue.", RETRY_AFTER)

    def _check_user_room_locked(self, user: str) -> None:
        cap, mine = self.max_queue_per_user, self._queue.count(user)
        if cap is not None and mine >= cap:
            self.refused += 1
            raise LimitExceeded(
                429, f"You have {mine} runs waiting on this engine server, the most it queues "
                f"for one user (--max-queue-per-user {cap}), so this run was not queued: wait "
                "for one of them to start, or cancel one, and send it again.", RETRY_AFTER)

    def status(self, run_id: str) -> dict[str, Any] | None:
        with self._cond:
            run = self.runs.get(run_id)
            if run is None:
                return None
            return run.status(self._queue.position(run) if run.state == "queued" else None)

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

    def waiting(self) -> dict[str, int]:
        with self._cond:
            return {"runs": len(self._queue), "refinements": len(self._urgent)}

    def queue_of(self, user: str) -> dict[str, Any]:
        """The queue as ``user`` sees it: their waiting runs and whether one of theirs runs,
        the runs waiting in all and how many users they belong to, and the per-user cap."""
        with self._cond:
            current = self._current
            return {"yours_waiting": self._queue.count(user),
                    "yours_running": current is not None and current.user == user,
                    "waiting": len(self._queue), "users_waiting": self._queue.users(),
                    "running": current is not None,
                    "max_queue_per_user": self.max_queue_per_user}

    def results_summary(self) -> dict[str, Any]:
        with self._cond:
            held = [r for r in self.runs.values() if r.result is not None]
            return {"count": len(held),
                    "mb": round(sum(r.result_nbytes for r in held) / MB, 1),
                    "budget_mb": None if self.max_result_bytes is None else
                    round(self.max_result_bytes / MB, 1)}

    def running(self) -> str | None:
        with self._cond:
            return None if self._current is None else self._current.id

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for run in list(self._queue):
                self._finish_locked(run, "cancelled", "The server is shutting down.", "cancelled")
            self._queue.clear()
            for _, fut in self._urgent:
                fut.cancel()
            self._urgent.clear()
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
                    run.state, run.started = "running", time.monotonic()
                    log.info("run %s started: user %s, volume %s, waited %.2f s", run.id,
                             run.user, run.volume_id[:16], run.started - run.created)
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

        nbytes = 0
        try:
            result = self.segmenter.segment(
                req.volume.array, req.label_map(), req.structures, req.options,
                support_slices=req.support_slices, support_bank=req.support_bank,
                prompts=req.prompts,
                geometry=req.volume.geometry, progress=progress,
                cancel=run.cancel_requested.is_set)
        except Cancelled as e:
            outcome: tuple[str, str | None, str | None] = ("cancelled", str(e), "cancelled")
            result = None
        except Exception as e:  # every failure is reported to the client, never lost
            if error_type(e) == "internal":
                log_fault(f"run {run.id}", e)
            outcome, result = ("failed", describe_failure(e), error_type(e)), None
        else:
            outcome = ("done", None, None)
            nbytes = result_nbytes(result)
            if self.max_result_bytes is not None and nbytes > self.max_result_bytes:
                outcome, result = ("failed", too_big(nbytes, self.max_result_bytes), "input"), None
        with self._cond:
            run.result, run.result_nbytes = result, nbytes
            self._finish_locked(run, *outcome)
            self._current = None
            self.completed += 1
            self._prune_locked()

    def _finish_locked(self, run: Run, state: str, error: str | None, etype: str | None) -> None:
        run.state, run.error, run.error_type = state, error, etype
        if state == "done":
            run.fraction = 1.0
        run.finished = time.monotonic()
        ran = "" if run.started is None else f", ran {run.finished - run.started:.2f} s"
        log.info("run %s %s: user %s, volume %s, %.2f s after it was queued%s", run.id, state,
                 run.user, run.volume_id[:16], run.finished - run.created, ran)
        if run.request is not None and self.volumes is not None:
            self.volumes.release(run.request.volume_id)
        run.request = None  # the volume and labels are no longer needed

    def _prune_locked(self) -> None:
        prune_finished(self.runs, self.max_results, self.result_ttl, self.max_result_bytes)
