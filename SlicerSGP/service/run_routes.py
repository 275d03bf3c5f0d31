"""The /v1 routes of segmentation runs and click refinement: start, status, cancel, delete,
result download, and refine. :func:`add_run_routes` puts them on the server's router."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask

from SlicerSGP.data.prompt_checks import check_prompts
from SlicerSGP.service import protocol
from SlicerSGP.service.access import ServiceError
from SlicerSGP.service.jobs import (
    RETRY_AFTER,
    JobQueue,
    RunRequest,
    ServiceLimits,
    StoredVolume,
    VolumeStore,
    estimate_result_nbytes,
)
from SlicerSGP.service.middleware import guard, read_limited


def add_run_routes(api: APIRouter, *, segmenter: Any, jobs: JobQueue, volumes: VolumeStore,
                   limits: ServiceLimits, max_upload: int, unpack: Callable[..., Any],
                   offload: Callable[..., Any], authorize: Callable[[Request], str],
                   own: Callable[[str, str], None], owner_of: Callable[[str], str | None],
                   pinned_or_404: Callable[[str], StoredVolume]) -> None:
    """Add the run and refine routes to ``api``; the arguments are create_app's state and
    helpers (``own``/``owner_of`` record and look up which user started a run)."""

    @api.post("/runs", status_code=202, summary="Queue a segmentation run (.npz body)",
              description="Body: .npz with `meta` (JSON: volume_id, structures, options, "
              "support_slices, labels, bank, prompts) and the labeled slices `label_<k>` along "
              "the axis (and a prompt's current mask `prompt_mask_<i>`). "
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
            prompts = protocol.prompts_from_json(meta.get("prompts"), arrays)
            check_prompts_fit(prompts, shape, options)
            check_run_cost(item, labels, structures, bank, options,
                           {p.value for p in prompts or []})
            del labels  # rebuilt when the run starts: a queued run holds only its slices
            return RunRequest(
                volume_id=meta["volume_id"], volume=item,
                labels=None if desc is None else
                functools.partial(protocol.decode_labels, desc, arrays, shape),
                structures=structures, options=options,
                support_slices=protocol.slices_from_json(meta.get("support_slices"),
                                                         "support_slices"),
                support_bank=bank, prompts=prompts)

        try:
            run = jobs.submit(await offload(build), user)
        except BaseException:
            volumes.release(meta["volume_id"])
            raise
        own(run.id, user)
        return jobs.status(run.id) or {"run_id": run.id}

    def check_run_cost(item: StoredVolume, labels: np.ndarray | None,
                       structures: dict[int, str] | None,
                       bank: dict[int, Any] | None, options: Any,
                       prompted: set[int] | None = None) -> None:
        """413 for a run that asks for more structures, or a larger result, than the limits."""
        if structures is not None:
            values = sorted(structures)
        else:  # the engine's rule: every value drawn, and every bank value with items
            drawn = set() if labels is None else {int(v) for v in np.unique(labels)} - {0}
            drawn -= set(options.exclude or [])
            values = sorted(drawn | set(prompted or ()) |
                            {int(v) for v, items in (bank or {}).items() if items})
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

    def check_prompts_fit(prompts: list[Any] | None, shape: tuple[int, ...],
                          options: Any) -> None:
        """Boxes and clicks inside their slices, on slices of the volume (422 otherwise)."""
        if not prompts or options.axis not in (0, 1, 2):  # the engine reports a bad axis
            return
        spatial, axis = shape[:3], options.axis
        check_prompts(prompts, (spatial[axis], *(spatial[a] for a in range(3) if a != axis)),
                      axis, options.exclude)

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
