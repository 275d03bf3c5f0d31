"""`sgp serve`: the HTTP API (FastAPI, under /v1, OpenAPI at /docs) around one loaded Segmenter.

This file holds :func:`create_app` (the app, its info and volume routes) and :func:`serve`
(binding, the ``ready`` line, uvicorn). Who may call the API is in access.py, the ASGI
middleware and body reading in middleware.py, the run and refine routes in run_routes.py.

Arrays travel as .npy/.npz bodies (see protocol.py). Every /v1 route needs
``Authorization: Bearer <token>`` when the server has a token; the check runs before anything
else, so a refused request never touches a volume or the model. Every request is checked field
by field (protocol.py) before the engine sees it: malformed input is 4xx naming the field; 500
is kept for faults of the engine itself, logged once without the request's data.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import platform
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from SlicerSGP import __version__
from SlicerSGP.errors import SGPInputError
from SlicerSGP.host import memory_total_mb, processor_name
from SlicerSGP.service import protocol

# Names that callers and tests import from this module, though they live in access.py and
# middleware.py since the split; re-exported so those imports keep working.
from SlicerSGP.service.access import (  # noqa: F401
    LOCAL_USER,
    LocalOnly,
    ServiceError,
    Users,
    host_problem,
    is_loopback,
    make_authorize,
    version_mismatch,
)
from SlicerSGP.service.jobs import JobQueue, ServiceLimits, StoredVolume, VolumeStore
from SlicerSGP.service.middleware import (  # noqa: F401
    DRAIN_LIMIT,
    Receiving,
    Shield,
    guard,
    read_limited,
)
from SlicerSGP.service.run_routes import add_run_routes

log = logging.getLogger("SlicerSGP.service")

WORK_THREADS = 2
"""Threads that parse, hash and encode request and result bodies. They are not the threads that
answer status, cancel, info and the token check (starlette's pool), and no thread waits for the
engine (a refinement's wait is awaited), so a burst of heavy requests never locks those out."""


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
    devices.append({"device": "cpu", "name": processor_name(), "cores": os.cpu_count(),
                    "memory_total_mb": memory_total_mb()})
    return devices


def create_app(segmenter: Any, *, token: str | None, max_upload_mb: float,
               volume_store_mb: float = 4096, result_ttl: float = 600.0,
               tokens: Mapping[str, str] | None = None,
               limits: ServiceLimits | None = None, users: Users | None = None) -> FastAPI:
    """The API around ``segmenter``; its worker thread starts here. ``tokens``: user name ->
    token, each one accepted (``token``: one more, user ``token``); ``users``: a user table
    to use instead (the server's SIGHUP handler replaces its contents). ``limits``: what
    requests and the server's memory may cost (default: ServiceLimits with
    ``volume_store_mb``)."""
    limits = limits or ServiceLimits(max_volumes_mb=volume_store_mb)
    volumes = VolumeStore(int(limits.max_volumes_mb * 2**20))
    jobs = JobQueue(segmenter, volumes, result_ttl=result_ttl, max_queue=limits.max_queue,
                    max_result_bytes=int(limits.max_results_mb * 2**20),
                    max_queue_per_user=limits.max_queue_per_user)
    max_upload = int(max_upload_mb * 2**20)
    unpack = functools.partial(protocol.unpack, max_bytes=max_upload)
    work_limiter: list[anyio.CapacityLimiter] = []

    async def offload(fn: Any, *args: Any) -> Any:
        """``guard(fn, *args)`` on one of WORK_THREADS threads (waiting for one is awaited)."""
        if not work_limiter:
            work_limiter.append(anyio.CapacityLimiter(WORK_THREADS))
        return await anyio.to_thread.run_sync(functools.partial(guard, fn, *args),
                                              limiter=work_limiter[0])
    if users is None:
        users = Users({**(tokens or {}), **({"token": token} if token else {})})
    authorize = make_authorize(users)
    owners: dict[str, str] = {}
    """run id -> the user who started it."""
    owners_lock = threading.Lock()

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
            "queue_length": jobs.queue_length(), "queue": {"user": user, **jobs.queue_of(user)},
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
                       "max_queue_per_user": limits.max_queue_per_user,
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

    add_run_routes(api, segmenter=segmenter, jobs=jobs, volumes=volumes, limits=limits,
                   max_upload=max_upload, unpack=unpack, offload=offload, authorize=authorize,
                   own=own, owner_of=owner_of, pinned_or_404=pinned_or_404)
    app.include_router(api)
    return app


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
          limits: ServiceLimits | None = None, users: Users | None = None,
          on_hangup: Callable[[], None] | None = None) -> None:
    """Bind (unless ``sock`` is a socket bound already), print ``ready URL`` on stdout, and
    serve until interrupted (or, with ``watch_stdin``, until standard input closes: the
    launcher's parent has gone). ``on_hangup``: what SIGHUP does (e.g. reload the user
    table; POSIX only)."""
    app = create_app(segmenter, token=token, max_upload_mb=max_upload_mb, tokens=tokens,
                     limits=limits, users=users)
    if on_hangup is not None and hasattr(signal, "SIGHUP"):
        # Runs on the main thread between two steps of the event loop; the reload is a
        # small file read, and the table swap is atomic.
        signal.signal(signal.SIGHUP, lambda *_: on_hangup())
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
