"""`sgp serve`: the HTTP API (FastAPI, under /v1, OpenAPI at /docs) around one loaded Segmenter.

Arrays travel as .npy/.npz bodies (see protocol.py). Every /v1 route needs
``Authorization: Bearer <token>`` when the server has a token; the check runs before anything
else, so a refused request never touches a volume or the model.

Who may do what:

* Each accepted token is a *user* (today one per ``--token-file``, named by the file; the
  multi-user server, ``--tokens FILE`` with user name -> token hash, adds users to the same
  :class:`Users` table). A run belongs to the user who started it: its status, result, cancel
  and delete answer 404 to every other user, exactly as for a run that does not exist, and
  ``/v1/info`` shows another user's running run only as a count. Without a token there is one
  user, ``local``.
* A server without a token answers only programs on this computer: the ``Host`` header must
  name a loopback address (localhost, 127.0.0.1, [::1], any port; a DNS-rebinding page sends
  its own host name) and a request carrying a browser's ``Origin`` header is refused (a web page
  can send simple cross-origin POSTs without reading the answer). 403 with a message.
* Every request is checked field by field (protocol.py) before the engine sees it: malformed
  input is 4xx naming the field; 500 is kept for faults of the engine itself, logged once
  without the request's data.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import platform
import socket
import sys
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from SlicerSGP import __version__
from SlicerSGP.errors import SGPInputError
from SlicerSGP.service import protocol
from SlicerSGP.service.jobs import (
    RETRY_AFTER,
    JobQueue,
    RunRequest,
    ServiceLimits,
    StoredVolume,
    VolumeStore,
    describe_failure,
    error_type,
    estimate_result_nbytes,
    log_fault,
)

log = logging.getLogger("SlicerSGP.service")

DRAIN_LIMIT = 256 * 2**20
"""How much of an oversize upload is read and dropped so that the client sees the 413 instead of
a reset connection; past this the connection is simply closed."""
WORK_THREADS = 2
"""Threads that parse, hash and encode request and result bodies. They are not the threads that
answer status, cancel, info and the token check (starlette's pool), and no thread waits for the
engine (a refinement's wait is awaited), so a burst of heavy requests never locks those out."""


class ServiceError(Exception):
    """An HTTP error with a message for the user and the protocol's error type."""

    def __init__(self, status: int, message: str, etype: str = "input"):
        super().__init__(message)
        self.status, self.message, self.etype = status, message, etype


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


LOCAL_USER = "local"
"""The one user of a server without a token."""


class Users:
    """Who sent a request: the user whose token it carries. Tokens are kept as SHA-256
    digests and compared in constant time with every known one."""

    def __init__(self, tokens: Mapping[str, str]):
        self._digests = {name: hashlib.sha256(tok.encode()).digest()
                         for name, tok in tokens.items()}

    def __bool__(self) -> bool:
        return bool(self._digests)

    def identify(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for name, known in self._digests.items():
            if hmac.compare_digest(digest, known):
                found = name
        return found


def host_problem(host: str | None, origin: str | None) -> str | None:
    """Why a request may not reach a server without a token (None: it may)."""
    if origin is not None:
        return ("Refused: this engine server has no token, so it serves only programs on this "
                "computer, and this request comes from a web page (it carries an Origin "
                f"header, {origin[:60]!r}). Use SlicerSGP's client, or start the server with "
                "--token-file.")
    name = (host or "").strip().lower()
    if name.startswith("["):
        name, _, port = name[1:].partition("]")
        port = port[1:] if port.startswith(":") else port
    elif name.count(":") == 1:
        name, port = name.split(":")
    else:
        port = ""
    if not name or not is_loopback(name) or not (port == "" or port.isdigit()):
        return (f"Refused: this engine server has no token, so it answers only requests "
                f"addressed to this computer (Host localhost, 127.0.0.1 or [::1]); this one "
                f"names Host {(host or '')[:80]!r}. Connect to http://127.0.0.1:PORT, or start "
                "the server with --token-file to serve other names.")
    return None


class LocalOnly:
    """ASGI middleware of a server without a token: loopback Host names only, no browser
    Origin (see :func:`host_problem`)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            hosts = [v for k, v in scope["headers"] if k == b"host"]
            origins = [v for k, v in scope["headers"] if k == b"origin"]
            host = hosts[0].decode("latin-1") if len(hosts) == 1 else None
            origin = origins[0].decode("latin-1") if origins else None
            problem = host_problem(host, origin)
            if problem is not None:
                await JSONResponse({"detail": problem, "error_type": "forbidden"}, 403)(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


class Shield:
    """ASGI middleware: an exception no handler took becomes one 500 JSON answer and one log
    entry (type and stack, not the message, which may quote the request); a client that hung
    up mid-request is one log line, not a traceback."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            log.info("%s %s: the client hung up before sending the whole request",
                     scope.get("method"), scope.get("path"))
        except Exception as e:
            log_fault(f"{scope.get('method')} {scope.get('path')}", e)
            if not started:
                await JSONResponse({"detail": "The server failed unexpectedly; its log has the "
                                    "traceback.", "error_type": "internal"}, 500)(
                    scope, receive, send)


class Receiving:
    """ASGI middleware: request bodies being received and handled at once hold at most
    ``limit`` bytes (twice --max-upload-mb), counted by their declared Content-Length (or
    --max-upload-mb without one) from the first byte until the answer. A request that does not
    fit is answered 503 with Retry-After before any of its body is read, so many clients
    uploading at once cannot take the server's memory."""

    def __init__(self, app: Any, limit: int, each: int, counter: dict[str, int]):
        self.app, self.limit, self.each = app, limit, each
        self.counter = counter
        """``held``: bytes of the requests in hand (read by /v1/info)."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        lengths = [v for k, v in scope["headers"] if k == b"content-length"]
        declared = lengths[0].decode("latin-1") if len(lengths) == 1 else ""
        need = min(int(declared), self.each) if declared.isdigit() else self.each
        held = self.counter["held"]
        if need and held and held + need > self.limit:
            mb = 2**20
            await JSONResponse(
                {"detail": f"The server is receiving {held / mb:.1f} MB of other requests, "
                 f"and this one declares {need / mb:.1f} MB; it takes at most "
                 f"{self.limit / mb:g} MB at once (twice --max-upload-mb). Try again in a few "
                 "seconds.", "error_type": "busy"}, 503,
                headers={"Retry-After": str(RETRY_AFTER)})(scope, receive, send)
            return
        self.counter["held"] += need
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter["held"] -= need


def device_info() -> list[dict[str, Any]]:
    """What the server can compute on: GPUs with their memory, and the CPU with the RAM."""
    import torch  # the server holds a loaded model, so torch is already imported

    devices: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i),
                            "memory_total_mb": total // 2**20, "memory_free_mb": free // 2**20})
    from SlicerSGP.method.runtime import mps_available

    if mps_available():  # Apple silicon: the GPU shares the computer's memory
        devices.append({"device": "mps", "name": "Apple GPU (Metal)"})
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") \
        else None
    devices.append({"device": "cpu", "name": cpu, "cores": os.cpu_count(),
                    "memory_total_mb": None if total is None else total // 2**20})
    return devices


def create_app(segmenter: Any, *, token: str | None, max_upload_mb: float,
               volume_store_mb: float = 4096, result_ttl: float = 600.0,
               tokens: Mapping[str, str] | None = None,
               limits: ServiceLimits | None = None) -> FastAPI:
    """The API around ``segmenter``; its worker thread starts here. ``tokens``: user name ->
    token, each one accepted (``token``: one more, user ``token``). ``limits``: what requests
    and the server's memory may cost (default: ServiceLimits with ``volume_store_mb``)."""
    limits = limits or ServiceLimits(max_volumes_mb=volume_store_mb)
    volumes = VolumeStore(int(limits.max_volumes_mb * 2**20))
    jobs = JobQueue(segmenter, volumes, result_ttl=result_ttl, max_queue=limits.max_queue,
                    max_result_bytes=int(limits.max_results_mb * 2**20))
    max_upload = int(max_upload_mb * 2**20)
    unpack = functools.partial(protocol.unpack, max_bytes=max_upload)
    work_limiter: list[anyio.CapacityLimiter] = []

    async def offload(fn: Any, *args: Any) -> Any:
        """``guard(fn, *args)`` on one of WORK_THREADS threads (waiting for one is awaited)."""
        if not work_limiter:
            work_limiter.append(anyio.CapacityLimiter(WORK_THREADS))
        return await anyio.to_thread.run_sync(functools.partial(guard, fn, *args),
                                              limiter=work_limiter[0])
    users = Users({**(tokens or {}), **({"token": token} if token else {})})
    owners: dict[str, str] = {}
    """run id -> the user who started it."""
    owners_lock = threading.Lock()

    def authorize(request: Request) -> str:
        """The user the request comes from (after the token and protocol checks)."""
        user = LOCAL_USER
        if users:
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            found = users.identify(value) if scheme.lower() == "bearer" else None
            if found is None:
                raise ServiceError(401, "Wrong or missing token: send the server's token as "
                                   "'Authorization: Bearer <token>' (see --token-file).", "auth")
            user = found
        theirs = request.headers.get(protocol.PROTOCOL_HEADER)
        if theirs is not None and theirs != str(protocol.PROTOCOL_VERSION):
            raise ServiceError(409, version_mismatch(theirs), "protocol")
        return user

    def own(run_id: str, user: str) -> None:
        with owners_lock:
            for rid in [r for r in owners if jobs.peek(r) is None]:
                del owners[rid]
            owners[run_id] = user

    def owner_of(run_id: str) -> str | None:
        with owners_lock:
            return owners.get(run_id)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        jobs.close()  # cancels queued runs and asks the running one to stop

    app = FastAPI(title="SlicerSGP engine", version=__version__, lifespan=lifespan,
                  description="Few-shot volume segmentation with SAM2-SGP as a service. Arrays "
                  "travel as .npy/.npz bodies; use SlicerSGP.service.client.EngineClient.")
    app.state.jobs, app.state.volumes = jobs, volumes
    app.add_middleware(Shield)
    receiving = {"held": 0}
    app.add_middleware(Receiving, limit=2 * max_upload, each=max_upload, counter=receiving)
    if not users:
        app.add_middleware(LocalOnly)
    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": exc.message, "error_type": exc.etype}, exc.status,
                            headers=headers)

    @app.exception_handler(protocol.LimitExceeded)
    async def _limit_exceeded(_: Request, exc: protocol.LimitExceeded) -> JSONResponse:
        headers = None if exc.retry_after is None else \
            {"Retry-After": str(max(1, round(exc.retry_after)))}
        return JSONResponse({"detail": str(exc), "error_type": "input" if exc.status == 413
                             else "busy"}, exc.status, headers=headers)

    @api.get("/info", summary="Versions, devices, the loaded model, queue and memory")
    def info(user: str = Depends(authorize)) -> dict[str, Any]:
        enc = getattr(segmenter, "encoder", None)
        running = jobs.running()
        return {
            "package": "SlicerSGP", "version": __version__,
            "protocol": protocol.PROTOCOL_VERSION, "python": platform.python_version(),
            "devices": device_info(), "model": segmenter.describe(),
            "queue_length": jobs.queue_length(),
            "running": running if running and owner_of(running) == user else None,
            "runs_completed": jobs.completed, "encode_count": segmenter.encode_count,
            "cache": None if enc is None else {
                "budget_mb": round(enc.cache_bytes / 2**20, 1),
                "used_mb": round(enc.cached_bytes() / 2**20, 1),
                "volumes": enc.cached_volumes()},
            "volumes": volumes.summary(), "max_upload_mb": max_upload_mb,
            "waiting": jobs.waiting(), "results": jobs.results_summary(),
            "receiving_mb": round(receiving["held"] / 2**20, 1),
            "limits": {"max_queue": limits.max_queue, "max_volumes_mb": limits.max_volumes_mb,
                       "max_results_mb": limits.max_results_mb, "max_voxels": limits.max_voxels,
                       "max_structures": limits.max_structures,
                       "refine_timeout": limits.refine_timeout},
        }

    def volume_or_404(volume_id: str) -> StoredVolume:
        item = volumes.get(volume_id)
        if item is None:
            raise ServiceError(404, f"The server does not hold volume {volume_id[:12]}... "
                               "(never uploaded, or dropped to free memory): upload it again.",
                               "volume_missing")
        return item

    def pinned_or_404(volume_id: str) -> StoredVolume:
        """The volume, pinned in the store (the caller releases it, or a run does when it ends)."""
        item = volumes.acquire(volume_id)
        return volume_or_404(volume_id) if item is None else item

    @api.head("/volumes/{volume_id}", summary="200 if the server holds the volume, else 404")
    def has_volume(volume_id: str) -> Response:
        return Response(status_code=200 if volumes.get(volume_id) else 404)

    @api.get("/volumes/{volume_id}", summary="Shape, dtype and geometry of a held volume")
    def get_volume(volume_id: str) -> dict[str, Any]:
        item = volume_or_404(volume_id)
        return {"volume_id": volume_id, "shape": list(item.array.shape),
                "dtype": item.array.dtype.str, "geometry": protocol.geometry_to_json(item.geometry)}

    @api.put("/volumes/{volume_id}", status_code=201, summary="Upload a volume (.npy body)",
             description=f"Body: the array as .npy; header {protocol.GEOMETRY_HEADER}: geometry "
             "JSON or null. The id is protocol.volume_id(array, geometry); a body that does not "
             "hash to it is refused. 413 beyond --max-upload-mb.")
    async def put_volume(volume_id: str, request: Request) -> dict[str, Any]:
        body = await read_limited(request, max_upload)
        try:
            geometry = protocol.geometry_from_json(
                json.loads(request.headers.get(protocol.GEOMETRY_HEADER, "null")),
                protocol.GEOMETRY_HEADER)
        except ValueError as e:  # SGPInputError is one
            raise ServiceError(422, f"Bad {protocol.GEOMETRY_HEADER} header: {e}") from None

        def load() -> StoredVolume:
            from SlicerSGP.data.preprocess import validate_volume  # the engine's own checks

            array = protocol.volume_from_npy(body)
            if array.size > limits.max_voxels:  # before any pass over the voxels
                raise protocol.LimitExceeded(
                    413, f"The volume has {array.size:,} voxels but this server takes at most "
                    f"{limits.max_voxels:,} (--max-voxels): crop or downsample the volume, or "
                    "restart the server with a larger --max-voxels.")
            volumes.check_size(int(array.nbytes))
            # What every run checks again along its axis: numeric, 3D (or RGB), not empty,
            # finite. Junk is refused here and never takes a place in the store.
            validate_volume(array, axis=0, min_size=1)
            if protocol.volume_id(array, geometry) != volume_id:
                raise SGPInputError("The uploaded volume does not match its id (damaged in "
                                    "transit, or computed otherwise than protocol.volume_id).")
            return StoredVolume(array, geometry)

        item = volumes.put(volume_id, await offload(load))
        return {"volume_id": volume_id, "nbytes": item.nbytes}

    @api.post("/runs", status_code=202, summary="Queue a segmentation run (.npz body)",
              description="Body: .npz with `meta` (JSON: volume_id, structures, options, "
              "support_slices, labels, bank) and the labeled slices `label_<k>` along the axis. "
              "Returns the run id; poll GET /v1/runs/{id}.")
    async def start_run(request: Request, user: str = Depends(authorize)) -> dict[str, Any]:
        body = await read_limited(request, max_upload)
        arrays, meta = await offload(unpack, body)
        meta = guard(protocol.check_meta, meta, protocol.RUN_FIELDS, ("volume_id",))
        item = pinned_or_404(meta["volume_id"])  # never dropped while the run needs it

        def build() -> RunRequest:
            options = protocol.options_from_json(meta.get("options"))
            desc, shape = meta.get("labels"), item.array.shape
            labels = protocol.decode_labels(desc, arrays, shape)  # checks every field
            structures = protocol.structures_from_json(meta.get("structures"))
            bank = protocol.decode_bank(meta.get("bank"), arrays)
            check_run_cost(item, labels, structures, bank, options)
            del labels  # rebuilt when the run starts: a queued run holds only its slices
            return RunRequest(
                volume_id=meta["volume_id"], volume=item,
                labels=None if desc is None else
                functools.partial(protocol.decode_labels, desc, arrays, shape),
                structures=structures, options=options,
                support_slices=protocol.slices_from_json(meta.get("support_slices"),
                                                         "support_slices"),
                support_bank=bank)

        try:
            run = jobs.submit(await offload(build))
        except BaseException:
            volumes.release(meta["volume_id"])
            raise
        own(run.id, user)
        return jobs.status(run.id) or {"run_id": run.id}

    def check_run_cost(item: StoredVolume, labels: np.ndarray | None,
                       structures: dict[int, str] | None,
                       bank: dict[int, Any] | None, options: Any) -> None:
        """413 for a run that asks for more structures, or a larger result, than the limits."""
        if structures is not None:
            values = sorted(structures)
        else:  # the engine's rule: every value drawn, and every bank value with items
            drawn = set() if labels is None else {int(v) for v in np.unique(labels)} - {0}
            values = sorted(drawn | {int(v) for v, items in (bank or {}).items() if items})
        if len(values) > limits.max_structures:
            raise protocol.LimitExceeded(
                413, f"This run asks for {len(values)} structures but this server segments at "
                f"most {limits.max_structures} per run (--max-structures): segment them in "
                "several runs, or restart the server with a larger --max-structures.")
        shape = item.array.shape
        axis = options.axis if options.axis in (0, 1, 2) else 0  # the engine reports a bad one
        need = estimate_result_nbytes(shape, axis, values, options.keep_pseudo_masks)
        if need > jobs.max_result_bytes:
            raise protocol.LimitExceeded(
                413, f"This run's result would be {need / 2**20:.1f} MB ({len(values)} "
                f"structures of {int(np.prod(shape[:3])):,} voxels) but this server keeps at "
                f"most {limits.max_results_mb:g} MB of results (--max-results-mb): segment "
                "fewer structures at once, turn off keep_pseudo_masks, crop the volume, or "
                "restart the server with a larger --max-results-mb.")

    def run_or_404(run_id: str, user: str) -> dict[str, Any]:
        """The run's status; 404 for a run of another user, as for one that does not exist."""
        status = jobs.status(run_id) if owner_of(run_id) == user else None
        if status is None:
            raise ServiceError(404, f"Unknown run {run_id}: results are freed once downloaded "
                               "and after a while; start the run again.", "run_missing")
        return status

    @api.get("/runs/{run_id}", summary="State (queued/running/done/failed/cancelled), stage, "
             "fraction, error")
    def run_status(run_id: str, user: str = Depends(authorize)) -> dict[str, Any]:
        return run_or_404(run_id, user)

    @api.post("/runs/{run_id}/cancel", summary="Cancel a queued or running run")
    def cancel_run(run_id: str, user: str = Depends(authorize)) -> dict[str, Any]:
        run_or_404(run_id, user)
        return jobs.cancel(run_id) or {}

    @api.delete("/runs/{run_id}", status_code=204, summary="Cancel a run and free its result",
                description="A finished run's result is freed: 204. A queued run is cancelled "
                "and freed: 204. A running run is asked to stop: 202 with its status; it ends "
                "as cancelled and holds no result. 404 for an unknown run or another user's.")
    def delete_run(run_id: str, user: str = Depends(authorize)) -> Response:
        status = run_or_404(run_id, user)
        if status["state"] in ("queued", "running"):
            status = jobs.cancel(run_id) or status
        if status["state"] == "running":
            return JSONResponse(status, 202)
        jobs.discard(run_id)
        return Response(status_code=204)

    @api.get("/runs/{run_id}/result", summary="The result as .npz (freed after download)",
             description="labels, pseudo_<v>, scores_<v> and, with ?probabilities=true, "
             "prob_<v>; `meta` holds structures, axis, labeled slices, geometry, timings, stats.")
    async def run_result(run_id: str, probabilities: bool = False,
                         user: str = Depends(authorize)) -> Response:
        status = run_or_404(run_id, user)
        run = jobs.peek(run_id)
        if status["state"] in ("queued", "running"):
            raise ServiceError(409, f"Run {run_id} is still {status['state']}.", "not_finished")
        if status["state"] != "done" or run is None or run.result is None:
            code = 422 if status["error_type"] == "input" else 500
            code = 410 if status["state"] == "cancelled" else code
            code = 404 if status["error_type"] == "dropped" else code
            raise ServiceError(code, status["error"] or "The run produced no result.",
                               status["error_type"] or "internal")
        body = await offload(protocol.encode_result, run.result, probabilities)
        return Response(body, media_type=protocol.NPZ,
                        background=BackgroundTask(jobs.discard, run_id))

    @api.post("/refine", summary="Correct one slice with point prompts (.npz body)",
              description="Body: .npz with `meta` (volume_id, slice_index, points as (row, col), "
              "point_labels, options) and optional `mask`. Returns .npz with `mask` and `meta` "
              "{iou}. Runs on the model's worker before queued runs.")
    async def refine(request: Request) -> Response:
        body = await read_limited(request, max_upload)
        arrays, meta = await offload(unpack, body)
        index, points, point_labels = guard(protocol.refine_from_json, meta)
        options = guard(protocol.options_from_json, meta.get("options"))
        mask = guard(protocol.refine_mask, arrays)
        item = pinned_or_404(meta["volume_id"])

        def work() -> tuple[np.ndarray, float]:
            return guard(segmenter.refine_slice, item.array, index, points, point_labels, mask,
                         options)

        try:
            fut = jobs.call_soon(work)
        except BaseException:
            volumes.release(meta["volume_id"])
            raise
        fut.add_done_callback(lambda _: volumes.release(meta["volume_id"]))
        # Awaited, not waited for on a thread: pending refinements hold no thread, and the
        # wait has a limit.
        try:
            mask, iou = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)),
                                               limits.refine_timeout)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            raise refine_timed_out(jobs.withdraw(fut)) from None
        return Response(protocol.pack({"mask": np.asarray(mask)}, {"iou": float(iou)}),
                        media_type=protocol.NPZ)

    def refine_timed_out(withdrawn: bool) -> protocol.LimitExceeded:
        wait = f"{limits.refine_timeout:g} s (--refine-timeout)"
        if withdrawn:
            running = " (a run is in progress)" if jobs.running() else ""
            return protocol.LimitExceeded(
                503, f"The engine stayed busy{running} for {wait}; this click refinement was "
                "not run. Try again in a moment, or restart the server with a larger "
                "--refine-timeout.", RETRY_AFTER)
        return protocol.LimitExceeded(
            503, f"This click refinement took longer than {wait} on the engine, so its answer "
            "was dropped. Restart the server with a larger --refine-timeout, or a smaller "
            "--image-size.", RETRY_AFTER)

    app.include_router(api)
    return app


def version_mismatch(client_version: str) -> str:
    return (f"Protocol mismatch: the client speaks SlicerSGP protocol {client_version}, this "
            f"server (SlicerSGP {__version__}) speaks protocol {protocol.PROTOCOL_VERSION}. "
            "Install the same SlicerSGP version on both sides.")


def guard(fn: Any, *args: Any) -> Any:
    """Call ``fn``; engine errors become HTTP errors carrying the engine's message."""
    try:
        return fn(*args)
    except (ServiceError, protocol.LimitExceeded):
        raise
    except Exception as e:
        etype = error_type(e)
        if etype == "internal":
            log_fault(getattr(fn, "__name__", "request"), e)
        raise ServiceError(422 if etype == "input" else 500, describe_failure(e), etype) from e


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, or 413 once it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    size = int(declared) if declared and declared.isdigit() else None
    chunks, total = [], 0
    too_big = size is not None and size > limit
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                too_big = True
            if too_big:
                if total > limit + DRAIN_LIMIT:
                    break
                continue
            chunks.append(chunk)
    except ClientDisconnect:
        log.info("%s %s: the client hung up after %d bytes of the body", request.method,
                 request.url.path, total)
        raise ServiceError(400, "The request body was cut off (the client hung up).") from None
    if too_big:
        got = max(total, size or 0)
        raise ServiceError(413, f"The upload is {got / 2**20:.1f} MB but this server accepts at "
                           f"most {limit / 2**20:g} MB: restart it with a larger "
                           "--max-upload-mb, or crop the volume.", "input")
    return b"".join(chunks)


class _Server(uvicorn.Server):
    """uvicorn that prints ``ready URL`` once it accepts connections (the launcher waits for it)."""

    ready_url = ""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(f"ready {self.ready_url}", flush=True)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; an OSError if the port is taken. ``sgp serve``
    binds before loading the model, so a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if sys.platform != "win32":  # on Windows SO_REUSEADDR lets two servers share a port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def serve(segmenter: Any, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
          max_upload_mb: float = 2048, watch_stdin: bool = False,
          sock: socket.socket | None = None, tokens: Mapping[str, str] | None = None,
          limits: ServiceLimits | None = None) -> None:
    """Bind (unless ``sock`` is a socket bound already), print ``ready URL`` on stdout, and
    serve until interrupted (or, with ``watch_stdin``, until standard input closes: the
    launcher's parent has gone)."""
    app = create_app(segmenter, token=token, max_upload_mb=max_upload_mb, tokens=tokens,
                     limits=limits)
    if sock is None:
        sock = bind_socket(host, port)
    real_port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if sock.family == socket.AF_INET6 else host
    # Logs go to stderr: stdout carries the one `ready` line the launcher reads.
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = _Server(config)
    server.ready_url = f"http://{shown}:{real_port}"
    if watch_stdin:
        def wait_for_eof() -> None:
            while sys.stdin.buffer.read(4096):
                pass
            log.info("standard input closed: shutting down")
            server.should_exit = True

        threading.Thread(target=wait_for_eof, name="sgp-stdin-watch", daemon=True).start()
    asyncio.run(server.serve(sockets=[sock]))


def setup_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
