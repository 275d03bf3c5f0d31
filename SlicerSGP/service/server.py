"""`sgp serve`: the HTTP API (FastAPI, under /v1, OpenAPI at /docs) around one loaded Segmenter.

Arrays travel as .npy/.npz bodies (see protocol.py). Every /v1 route needs
``Authorization: Bearer <token>`` when the server has a token; the check runs before anything
else, so a refused request never touches a volume or the model.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import platform
import socket
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from SlicerSGP import __version__
from SlicerSGP.errors import SGPInputError
from SlicerSGP.service import protocol
from SlicerSGP.service.jobs import (
    JobQueue,
    RunRequest,
    StoredVolume,
    VolumeStore,
    describe_failure,
    error_type,
)

log = logging.getLogger("SlicerSGP.service")

DRAIN_LIMIT = 256 * 2**20
"""How much of an oversize upload is read and dropped so that the client sees the 413 instead of
a reset connection; past this the connection is simply closed."""


class ServiceError(Exception):
    """An HTTP error with a message for the user and the protocol's error type."""

    def __init__(self, status: int, message: str, etype: str = "input"):
        super().__init__(message)
        self.status, self.message, self.etype = status, message, etype


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def device_info() -> list[dict[str, Any]]:
    """What the server can compute on: GPUs with their memory, and the CPU with the RAM."""
    import torch  # the server holds a loaded model, so torch is already imported

    devices: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i),
                            "memory_total_mb": total // 2**20, "memory_free_mb": free // 2**20})
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
               volume_store_mb: float = 4096, result_ttl: float = 600.0) -> FastAPI:
    """The API around ``segmenter``; its worker thread starts here."""
    jobs = JobQueue(segmenter, result_ttl=result_ttl)
    volumes = VolumeStore(int(volume_store_mb * 2**20))
    max_upload = int(max_upload_mb * 2**20)
    secret = token.encode() if token else None

    def authorize(request: Request) -> None:
        if secret is not None:
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), secret):
                raise ServiceError(401, "Wrong or missing token: send the server's token as "
                                   "'Authorization: Bearer <token>' (see --token-file).", "auth")
        theirs = request.headers.get(protocol.PROTOCOL_HEADER)
        if theirs is not None and theirs != str(protocol.PROTOCOL_VERSION):
            raise ServiceError(409, version_mismatch(theirs), "protocol")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        jobs.close()  # cancels queued runs and asks the running one to stop

    app = FastAPI(title="SlicerSGP engine", version=__version__, lifespan=lifespan,
                  description="Few-shot volume segmentation with SAM2-SGP as a service. Arrays "
                  "travel as .npy/.npz bodies; use SlicerSGP.service.client.EngineClient.")
    app.state.jobs, app.state.volumes = jobs, volumes
    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": exc.message, "error_type": exc.etype}, exc.status,
                            headers=headers)

    @api.get("/info", summary="Versions, devices, the loaded model, queue and memory")
    def info() -> dict[str, Any]:
        enc = getattr(segmenter, "encoder", None)
        return {
            "package": "SlicerSGP", "version": __version__,
            "protocol": protocol.PROTOCOL_VERSION, "python": platform.python_version(),
            "devices": device_info(), "model": segmenter.describe(),
            "queue_length": jobs.queue_length(), "running": jobs.running(),
            "runs_completed": jobs.completed, "encode_count": segmenter.encode_count,
            "cache": None if enc is None else {
                "budget_mb": round(enc.cache_bytes / 2**20, 1),
                "used_mb": round(enc.cached_bytes() / 2**20, 1),
                "volumes": enc.cached_volumes()},
            "volumes": volumes.summary(), "max_upload_mb": max_upload_mb,
        }

    def volume_or_404(volume_id: str) -> StoredVolume:
        item = volumes.get(volume_id)
        if item is None:
            raise ServiceError(404, f"The server does not hold volume {volume_id[:12]}... "
                               "(never uploaded, or dropped to free memory): upload it again.",
                               "volume_missing")
        return item

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
                json.loads(request.headers.get(protocol.GEOMETRY_HEADER, "null")))
        except (ValueError, KeyError, TypeError) as e:
            raise ServiceError(422, f"Bad {protocol.GEOMETRY_HEADER} header: {e}.") from None

        def load() -> StoredVolume:
            array = protocol.volume_from_npy(body)
            if protocol.volume_id(array, geometry) != volume_id:
                raise SGPInputError("The uploaded volume does not match its id (damaged in "
                                    "transit, or computed otherwise than protocol.volume_id).")
            return StoredVolume(array, geometry)

        item = await run_in_threadpool(guard, load)
        volumes.put(volume_id, item)
        return {"volume_id": volume_id, "nbytes": item.nbytes}

    @api.post("/runs", status_code=202, summary="Queue a segmentation run (.npz body)",
              description="Body: .npz with `meta` (JSON: volume_id, structures, options, "
              "support_slices, labels, bank) and the labeled slices `label_<k>` along the axis. "
              "Returns the run id; poll GET /v1/runs/{id}.")
    async def start_run(request: Request) -> dict[str, Any]:
        body = await read_limited(request, max_upload)
        arrays, meta = await run_in_threadpool(guard, protocol.unpack, body)
        item = volume_or_404(str(meta.get("volume_id")))

        def build() -> RunRequest:
            options = protocol.options_from_json(meta.get("options"))
            return RunRequest(
                volume_id=meta["volume_id"], volume=item,
                labels=protocol.decode_labels(meta.get("labels"), arrays, item.array.shape),
                structures=protocol.structures_from_json(meta.get("structures")),
                options=options, support_slices=meta.get("support_slices"),
                support_bank=protocol.decode_bank(meta.get("bank"), arrays))

        run = jobs.submit(await run_in_threadpool(guard, build))
        return jobs.status(run.id) or {"run_id": run.id}

    def run_or_404(run_id: str) -> dict[str, Any]:
        status = jobs.status(run_id)
        if status is None:
            raise ServiceError(404, f"Unknown run {run_id}: results are freed once downloaded "
                               "and after a while; start the run again.", "run_missing")
        return status

    @api.get("/runs/{run_id}", summary="State (queued/running/done/failed/cancelled), stage, "
             "fraction, error")
    def run_status(run_id: str) -> dict[str, Any]:
        return run_or_404(run_id)

    @api.post("/runs/{run_id}/cancel", summary="Cancel a queued or running run")
    def cancel_run(run_id: str) -> dict[str, Any]:
        run_or_404(run_id)
        return jobs.cancel(run_id) or {}

    @api.delete("/runs/{run_id}", status_code=204, summary="Free a finished run's result")
    def delete_run(run_id: str) -> Response:
        jobs.discard(run_id)
        return Response(status_code=204)

    @api.get("/runs/{run_id}/result", summary="The result as .npz (freed after download)",
             description="labels, pseudo_<v>, scores_<v> and, with ?probabilities=true, "
             "prob_<v>; `meta` holds structures, axis, labeled slices, geometry, timings, stats.")
    def run_result(run_id: str, probabilities: bool = False) -> Response:
        status = run_or_404(run_id)
        run = jobs.peek(run_id)
        if status["state"] in ("queued", "running"):
            raise ServiceError(409, f"Run {run_id} is still {status['state']}.", "not_finished")
        if status["state"] != "done" or run is None or run.result is None:
            code = 422 if status["error_type"] == "input" else 500
            code = 410 if status["state"] == "cancelled" else code
            raise ServiceError(code, status["error"] or "The run produced no result.",
                               status["error_type"] or "internal")
        body = protocol.encode_result(run.result, probabilities)
        return Response(body, media_type=protocol.NPZ,
                        background=BackgroundTask(jobs.discard, run_id))

    @api.post("/refine", summary="Correct one slice with point prompts (.npz body)",
              description="Body: .npz with `meta` (volume_id, slice_index, points as (row, col), "
              "point_labels, options) and optional `mask`. Returns .npz with `mask` and `meta` "
              "{iou}. Runs on the model's worker before queued runs.")
    async def refine(request: Request) -> Response:
        body = await read_limited(request, max_upload)
        arrays, meta = await run_in_threadpool(guard, protocol.unpack, body)
        item = volume_or_404(str(meta.get("volume_id")))
        options = guard(protocol.options_from_json, meta.get("options"))

        def work() -> tuple[np.ndarray, float]:
            return segmenter.refine_slice(item.array, int(meta["slice_index"]),
                                          [tuple(p) for p in meta["points"]],
                                          [int(v) for v in meta["point_labels"]],
                                          arrays.get("mask"), options)

        mask, iou = await run_in_threadpool(guard, jobs.call, work)
        return Response(protocol.pack({"mask": np.asarray(mask)}, {"iou": float(iou)}),
                        media_type=protocol.NPZ)

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
    except ServiceError:
        raise
    except Exception as e:
        etype = error_type(e)
        if etype == "internal":
            log.exception("request failed")
        raise ServiceError(422 if etype == "input" else 500, describe_failure(e), etype) from e


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, or 413 once it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    size = int(declared) if declared and declared.isdigit() else None
    chunks, total = [], 0
    too_big = size is not None and size > limit
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            too_big = True
        if too_big:
            if total > limit + DRAIN_LIMIT:
                break
            continue
        chunks.append(chunk)
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


def serve(segmenter: Any, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
          max_upload_mb: float = 2048, watch_stdin: bool = False) -> None:
    """Bind, print ``ready URL`` on stdout, and serve until interrupted (or, with
    ``watch_stdin``, until standard input closes: the launcher's parent has gone)."""
    app = create_app(segmenter, token=token, max_upload_mb=max_upload_mb)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(128)
    real_port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
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
