"""Run bookkeeping: start a run on the engine, poll it, apply the result, cancel, undo.

Nothing here blocks for long or uses threads: :meth:`Runs.start` uploads the volume (only if
the engine does not have it yet) and queues the run; the Widget's timer calls
:meth:`Runs.poll` every 100-200 ms; the result is written into the segmentation only when the
run is done, and only if the selected segments are still exactly as they were at the start.
A cancelled or failed run writes nothing.

A preview run (the Segment Editor effect) keeps its result on the :class:`Run` instead of
writing it; :meth:`Runs.apply` writes it later, under the same checks.

Undo goes through the segmentation's own saved state (``vtkSegmentationHistory``) and refuses
when a segment was edited after the run (checksum differs), so a later manual edit is never
silently wiped. Writes follow explicit :class:`~SGPSegmentLib.edit_rules.EditRules` (the
default changes no other segment).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
from slicer.i18n import tr as _

from SGPSegmentLib import edit_rules, labeled_slices, mrml_io, outputs
from SGPSegmentLib.edit_rules import EditRules
from SGPSegmentLib.edit_watch import RecordStore
from SGPSegmentLib.request import RunRequest
from SGPSegmentLib.undo import RUN_CHECKSUM_TAG, RunHistory
from SlicerSGP.errors import Cancelled, SGPError, SGPInputError
from SlicerSGP.types import SegmentationResult


@dataclass
class WriteReport:
    """What :meth:`Runs.apply` wrote."""

    segmentIds: list[str]
    voxelCounts: dict[str, int]
    labeledSlices: list[int]
    pseudoMaskNodeID: str | None = None
    tableNodeID: str | None = None
    chartNodeID: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Run:
    """One run on the engine, as the Widget sees it."""

    request: RunRequest
    client: Any
    runId: str
    volumeId: str
    keepPseudoMasks: bool = False
    preview: bool = False
    """Keep the result in :attr:`result` instead of writing it (the effect's preview)."""
    stage: str = "queued"
    fraction: float = 0.0
    state: str = "running"
    """'running', 'done', 'cancelled' or 'failed'."""
    report: WriteReport | None = None
    result: SegmentationResult | None = None
    """The engine's result of a preview run, once done (nothing written)."""
    error: BaseException | None = None
    startTime: float = field(default_factory=time.monotonic)
    engineReady: Any = None
    """While the local engine starts: ``engineReady() -> client or None``; the run is queued
    on the engine by the first :meth:`Runs.poll` that gets a client (``runId`` '' until then)."""

    def done(self) -> bool:
        return self.state != "running"


class Runs:
    """Starts, polls, applies, cancels and undoes runs; keeps the last result for review."""

    def __init__(self) -> None:
        self.history = RunHistory()
        self.lastResult: SegmentationResult | None = None
        self.lastRequest: RunRequest | None = None
        self.applying = False
        """True while a result is being written (edit observers ignore those events)."""
        self.records = RecordStore()
        """The drawn-slice records (the Logic gives its own): a written result updates them."""

    def clear(self) -> None:
        """Forget cached results and undo states (scene closed)."""
        self.history.clear()
        self.lastResult = None
        self.lastRequest = None

    # ------------------------------------------------------------------------ engine side

    def start(
        self, request: RunRequest, client, *, keepPseudoMasks: bool = False, preview: bool = False
    ) -> Run:
        """Upload the volume if the engine lacks it and queue the run (quick HTTP calls)."""
        run = Run(request, client, "", "", keepPseudoMasks=keepPseudoMasks, preview=preview)
        self._queue(run, client)
        return run

    @staticmethod
    def pending(
        request: RunRequest, engineReady, *, keepPseudoMasks: bool = False, preview: bool = False
    ) -> Run:
        """A run that waits for the local engine to start (nothing waits: :meth:`poll` asks
        ``engineReady()`` and queues the run once it gives a client)."""
        run = Run(request, None, "", "", keepPseudoMasks=keepPseudoMasks, preview=preview)
        run.stage, run.engineReady = _("starting engine"), engineReady
        return run

    @staticmethod
    def _queue(run: Run, client) -> None:
        request = run.request
        request.options.keep_pseudo_masks = bool(run.keepPseudoMasks)
        volumeId = client.ensure_volume(request.volume, request.geometry)
        runId = client.start_run(
            volumeId,
            request.labels,
            request.structures,
            request.options,
            # No explicit support slices: the label map holds each segment on the slices the
            # user drew it on only, so each structure's support is its own drawn slices
            # (complete slices, if any, come in the options).
            support_slices=None,
            support_bank=request.supportBank,
            # Only when there are prompts: an engine without them still serves every other run.
            **({"prompts": request.prompts} if request.prompts else {}),
        )
        request.release()
        run.client, run.runId, run.volumeId = client, runId, volumeId
        run.engineReady, run.stage = None, _("queued")

    def poll(self, run: Run, describeFailure=None) -> Run:
        """Update ``run`` from the engine; when it is done, write the result (main thread).

        ``describeFailure(exc) -> exc`` turns a lost connection into a message that says why
        (e.g. the local engine was killed). Errors end the run with ``state = 'failed'`` and
        are raised; the segmentation is untouched then.
        """
        if run.done():
            return run
        try:
            if not run.runId:
                client = run.engineReady()
                if client is None:
                    return run  # the engine is still starting
                self._queue(run, client)
            status = run.client.run_status(run.runId)
            run.stage = str(status.get("stage") or status.get("state") or "")
            run.fraction = float(min(max(status.get("fraction") or 0.0, 0.0), 1.0))
            state = status.get("state")
            if state in ("cancelled", "canceled"):
                run.state = "cancelled"
            elif state in ("failed", "error"):
                raise SGPError(
                    _(
                        "The engine could not segment: {error}; nothing was written."
                    ).format(error=status.get("error") or _("unknown error"))
                )
            elif state == "done":
                try:
                    result = run.client.run_result(run.runId)
                except Cancelled:  # cancelled between the status and the download
                    run.state = "cancelled"
                    return run
                if run.preview:
                    run.result = result
                else:
                    run.report = self.apply(
                        run.request, result, keepPseudoMasks=run.keepPseudoMasks
                    )
                run.state = "done"
        except BaseException as exc:
            run.state = "failed"
            run.error = describeFailure(exc) if describeFailure else exc
            if run.error is exc:
                raise
            raise run.error from exc
        return run

    def cancel(self, run: Run) -> None:
        """Ask the engine to stop; the segmentation stays as it is."""
        if run.done():
            return
        run.state = "cancelled"
        if not run.runId:
            return  # not queued yet (the engine was starting): nothing runs
        try:
            run.client.cancel_run(run.runId)
        except SGPError:
            pass  # the engine is gone or the run ended: nothing runs, nothing is written

    def wait(
        self, run: Run, timeout: float = 600.0, interval: float = 0.1, describeFailure=None
    ) -> Run:
        """Poll until done (console, scripts and tests; the Widget uses its timer instead)."""
        deadline = time.monotonic() + timeout
        while not run.done():
            if time.monotonic() > deadline:
                self.cancel(run)
                raise SGPError(_(
                    "The run did not finish within {timeout:.0f} s; it was cancelled."
                ).format(timeout=timeout))
            self.poll(run, describeFailure)
            if not run.done():
                time.sleep(interval)
        return run

    # ------------------------------------------------------------------------- MRML side

    def _nodes(self, request: RunRequest):
        scene = slicer.mrmlScene
        volumeNode = scene.GetNodeByID(request.volumeNodeID)
        segmentationNode = scene.GetNodeByID(request.segmentationNodeID)
        if volumeNode is None or segmentationNode is None:
            raise SGPInputError(
                _(
                    "The volume or segmentation of this run was removed from the scene; nothing "
                    "was written."
                )
            )
        return volumeNode, segmentationNode

    def _currentMasks(
        self, request: RunRequest, volumeNode, segmentationNode
    ) -> dict[int, np.ndarray]:
        segmentation = segmentationNode.GetSegmentation()
        masks = {}
        for value, segmentId in request.segmentIds.items():
            if segmentation.GetSegment(segmentId) is None:
                raise SGPInputError(
                    _(
                        "Segment '{segmentName}' was removed during the run; nothing was written."
                    ).format(segmentName=request.structures[value])
                )
            masks[value] = mrml_io.segmentArray(segmentationNode, segmentId, volumeNode)
            if labeled_slices.checksum(masks[value]) != request.beforeChecksums[value]:
                raise SGPInputError(
                    _(
                        "Segment '{segmentName}' was edited while the run was going on; nothing "
                        "was written. Run again to use the edits."
                    ).format(segmentName=request.structures[value])
                )
        return masks

    def apply(
        self,
        request: RunRequest,
        result: SegmentationResult,
        *,
        keepPseudoMasks=False,
        rules: EditRules | None = None,
    ) -> WriteReport:
        """Write ``result`` into the request's segmentation: the engine's labels everywhere,
        and on every labeled slice exactly what the user drew; other segments change only as
        ``rules`` allow (default: never)."""
        start = time.monotonic()
        volumeNode, segmentationNode = self._nodes(request)
        if tuple(result.labels.shape[:3]) != tuple(request.shape):
            raise SGPError(
                _(
                    "The engine returned labels of shape {shape}, expected {shape2}; nothing "
                    "was written."
                ).format(shape=result.labels.shape, shape2=request.shape)
            )
        before = self._currentMasks(request, volumeNode, segmentationNode)
        axis = request.axis
        drawn = {item.value: set(item.slices) for item in request.labeledSegments}
        byStructure = getattr(result, "labeled_by_structure", {}) or {}
        prompted = getattr(result, "prompted_by_structure", {}) or {}
        newMasks: dict[int, np.ndarray] = {}
        madeHere: dict[int, list[int]] = {}
        for value in request.segmentIds:
            mask = np.asarray(result.labels) == value
            # Slices the preview's prompts made: the engine's mask there (prompted) or the
            # scribbled mask; they count as drawn from now on.
            given = request.givenSlices.get(value, {})
            made = {int(s) for s in prompted.get(value, [])} | set(given)
            madeHere[value] = sorted(made)
            # Only this segment's own drawn slices keep what the user drew: a slice drawn for
            # another segment is predicted for this one (support semantics).
            labeled = sorted(
                (drawn.get(value, set()) | {int(s) for s in byStructure.get(value, [])}) - made
            )
            if labeled:
                index = [slice(None)] * 3
                index[axis] = labeled
                mask[tuple(index)] = before[value][tuple(index)]
            for k, plane in given.items():
                index = [slice(None)] * 3
                index[axis] = k
                mask[tuple(index)] = plane
            newMasks[value] = mask
        ids = request.segmentIds
        final, others = edit_rules.applyRules(
            rules or EditRules(),
            segmentationNode,
            volumeNode,
            {ids[v]: m for v, m in newMasks.items()},
            {ids[v]: m for v, m in before.items()},
        )
        newMasks = {v: final[ids[v]] for v in newMasks}
        del before, final

        # Edits of other segments made during the run are the user's: record them before the
        # write moves the baselines (an observer has done so already when one watches).
        self.records.sync(segmentationNode, volumeNode, None, request.axis)
        history = self.history.save(segmentationNode)
        self.applying = True
        wasModifying = segmentationNode.StartModify()
        try:
            self._write(request, segmentationNode, volumeNode, newMasks, others, madeHere)
        except Exception:
            history.RestorePreviousState()
            raise
        finally:
            segmentationNode.EndModify(wasModifying)
            self.applying = False

        report = WriteReport(
            segmentIds=list(request.segmentIds.values()),
            voxelCounts={request.segmentIds[v]: int(m.sum()) for v, m in newMasks.items()},
            labeledSlices=labeled,
            notes=list(request.notes),
        )
        if keepPseudoMasks and result.pseudo_masks:
            node = outputs.writePseudoMasks(request, result, segmentationNode, volumeNode)
            report.pseudoMaskNodeID = node.GetID()
        if result.slice_scores:
            tableNode, chartNode = outputs.writeSliceScores(request, result, segmentationNode)
            report.tableNodeID, report.chartNodeID = tableNode.GetID(), chartNode.GetID()
        # Keep what review needs (scores, labeled slices); drop the big arrays.
        result.probabilities = {}
        result.pseudo_masks = {}
        self.lastRequest, self.lastResult = request, result
        report.timings = dict(result.timings)
        report.timings["write"] = time.monotonic() - start
        return report

    def _write(self, request, segmentationNode, volumeNode, newMasks, others, madeHere) -> None:
        """Write the selected segments and the other segments that lose voxels (tagged too, so
        Undo notices a later edit of any of them)."""
        segmentation = segmentationNode.GetSegmentation()
        for value, segmentId in request.segmentIds.items():
            mrml_io.writeSegmentArray(newMasks[value], segmentationNode, segmentId, volumeNode)
            segment = segmentation.GetSegment(segmentId)
            item = next(i for i in request.labeledSegments if i.value == value)
            slices = sorted(set(item.slices) | set(madeHere.get(value, [])))
            self.records.markWritten(
                segmentationNode, volumeNode, segmentId, newMasks[value], {request.axis: slices}
            )
            segment.SetTag(RUN_CHECKSUM_TAG, str(labeled_slices.checksum(newMasks[value])))
        for segmentId, (old, new) in others.items():
            mrml_io.writeSegmentArray(new, segmentationNode, segmentId, volumeNode)
            segment = segmentation.GetSegment(segmentId)
            self.records.moveBaseline(segmentationNode, volumeNode, segmentId, old, new)
            segment.SetTag(RUN_CHECKSUM_TAG, str(labeled_slices.checksum(new)))

    # ------------------------------------------------------------------------------ undo

    def canUndo(self, segmentationNode) -> bool:
        return self.history.canUndo(segmentationNode)

    def editedSinceRun(self, segmentationNode, volumeNode) -> list[str]:
        return self.history.editedSinceRun(segmentationNode, volumeNode)

    def undo(self, segmentationNode, volumeNode) -> None:
        """Restore the segmentation as it was before the last result was written (refuses,
        naming them, when segments were edited after the run)."""
        self.applying = True  # the restore is no user edit
        try:
            self.history.undo(segmentationNode, volumeNode)
        finally:
            self.applying = False
