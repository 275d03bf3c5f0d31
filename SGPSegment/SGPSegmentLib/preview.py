"""The Segment Editor effect's behaviour without Qt: preview, update, apply, cancel, clicks.

A :class:`PreviewSession` is one preview of some segments of a segmentation. Its runs go to the
same engine as the module's (the module Logic's :class:`EngineConnection`), with the model the
module's settings name; their results are shown in a separate preview segmentation node (found
through a node reference on the user's segmentation) and never touch the user's segments until
:meth:`PreviewLogic.apply`, which writes exactly what the module's run writes (same code) under
the Segment Editor's masking rules. :meth:`PreviewLogic.cancel` removes the preview and writes
nothing. The effect calls :meth:`PreviewLogic.update` after the user draws (debounced): the run
in flight is cancelled and a new one starts from the slices drawn now.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer

from SGPSegmentLib import labeled_slices, mrml_io, outputs, refinement
from SGPSegmentLib.constants import AXIS_DISPLAY, AXIS_NAMES
from SGPSegmentLib.edit_rules import EditRules
from SGPSegmentLib.engine_connection import ModelSettings
from SGPSegmentLib.request import RunRequest, drawnSlicesAllAxes
from SGPSegmentLib.run import Run, WriteReport
from SlicerSGP.errors import SGPError, SGPInputError
from SlicerSGP.types import SegmentationResult

PREVIEW_REFERENCE_ROLE = "SGPPreview"
"""Node reference role (on the user's segmentation) of its preview segmentation."""
PREVIEW_OPACITY = 0.6


@dataclass
class SliceToCheck:
    """A predicted slice to look at first (least confident)."""

    segmentId: str
    name: str
    slice: int
    confidence: float

    def describe(self, axis: int) -> str:
        view = AXIS_DISPLAY[AXIS_NAMES[axis]]
        return f"{self.name}: {view} slice {self.slice} (confidence {self.confidence:.2f})"


@dataclass
class PreviewSession:
    """One preview: what it is of, the run in flight and the result shown."""

    volumeNodeID: str
    segmentationNodeID: str
    segmentIds: list[str]
    axis: int
    settings: ModelSettings
    options: dict[str, Any] = field(default_factory=dict)
    """SegmentOptions fields for every run (top_k, intensity, ...)."""
    sliceRange: tuple[int, int] | None = None
    referenceCaseIDs: list[tuple[str, str]] = field(default_factory=list)
    supportSet: str = ""
    """Saved support set every run of this preview uses ('' = none)."""
    run: Run | None = None
    request: RunRequest | None = None
    """The request of the result shown (its checksums say whether the drawing changed since)."""
    result: SegmentationResult | None = None
    volumeId: str = ""
    """The volume's id on the engine (click refinement sends only the clicks)."""
    runsStarted: int = 0
    clicks: dict[tuple[str, int], refinement.SliceClicks] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.run is not None and not self.run.done()

    def nodes(self):
        scene = slicer.mrmlScene
        volumeNode = scene.GetNodeByID(self.volumeNodeID)
        segmentationNode = scene.GetNodeByID(self.segmentationNodeID)
        if volumeNode is None or segmentationNode is None:
            raise SGPInputError("The volume or segmentation of this preview was removed.")
        return volumeNode, segmentationNode

    def previewSlice(self, segmentId: str, k: int) -> np.ndarray:
        """The preview's mask of ``segmentId`` on slice ``k`` (the start of a click)."""
        if self.result is None or self.request is None:
            raise SGPInputError("Compute a preview before correcting it with clicks.")
        value = next(v for v, s in self.request.segmentIds.items() if s == segmentId)
        return refinement.takeSlice(np.asarray(self.result.labels) == value, self.axis, k)


class PreviewLogic:
    """Preview, update, apply and cancel for the effect, on top of the module's core Logic
    (``core``: an ``SGPSegmentCoreLogic``; its engine, runs and edit watcher are shared)."""

    def __init__(self, core) -> None:
        self.core = core

    # --------------------------------------------------------------------------- start, run

    def start(
        self,
        volumeNode,
        segmentationNode,
        segmentIds,
        *,
        settings: ModelSettings,
        axis="auto",
        sliceRange=None,
        referenceCases=(),
        supportSet=None,
        **options,
    ) -> PreviewSession:
        """Check the inputs and start the first preview run (nothing is written).
        ``supportSet``: the name of a saved support set (in the core Logic's library)."""
        mrml_io.checkVolume(volumeNode)
        if segmentationNode is None:
            raise SGPInputError("Select a segmentation.")
        ids = [str(s) for s in segmentIds or []]
        if not ids:
            raise SGPInputError("Choose at least one segment to preview.")
        self.core.ensureWatching(segmentationNode, volumeNode)
        session = PreviewSession(
            volumeNode.GetID(),
            segmentationNode.GetID(),
            ids,
            self.resolveAxis(volumeNode, segmentationNode, ids, axis),
            settings,
            dict(options),
            None if sliceRange is None else tuple(int(v) for v in sliceRange),
            [(v.GetID(), s.GetID()) for v, s in referenceCases],
            str(supportSet or ""),
        )
        self.update(session)
        return session

    def setSupportSet(self, session: PreviewSession, name) -> Run | None:
        """Use saved support set ``name`` ('' or None: none) from now on; an open preview is
        updated at once. On an error (e.g. an unknown set) the session keeps its old set."""
        name = str(name or "")
        if session is None or name == session.supportSet:
            return None
        previous, session.supportSet = session.supportSet, name
        try:
            return self.update(session)
        except BaseException:
            session.supportSet = previous
            raise

    def resolveAxis(self, volumeNode, segmentationNode, segmentIds, axis="auto") -> int:
        """``axis`` as 0/1/2; 'auto' = the axis with the most slices the user drew."""
        if str(axis).lower() != "auto":
            return mrml_io.checkAxis(axis)
        preferred = self.core.drawingAxis
        counts = [0, 0, 0]
        records = self.core.records
        for drawn in drawnSlicesAllAxes(volumeNode, segmentationNode, segmentIds, preferred, records):
            for a in range(3):
                counts[a] += len(drawn[a])
        return max(range(3), key=lambda a: (counts[a], a == preferred, -a))

    def _limits(self, session: PreviewSession, n: int) -> dict[int, list[int]] | None:
        if session.sliceRange is None:
            return None
        first, last = session.sliceRange
        if not 0 <= first <= last < n:
            raise SGPInputError(
                f"The slice range {first}..{last} must lie within 0..{n - 1} with first <= last."
            )
        return {v: [first, last] for v in range(1, len(session.segmentIds) + 1)}

    def update(self, session: PreviewSession, onlyIfChanged: bool = False) -> Run | None:
        """Start a run from the slices drawn now, cancelling the one in flight. With
        ``onlyIfChanged``, nothing happens when no selected segment changed since the last."""
        if onlyIfChanged and not self.changedSegments(session):
            return None
        volumeNode, segmentationNode = session.nodes()
        scene = slicer.mrmlScene
        references = [
            (scene.GetNodeByID(v), scene.GetNodeByID(s)) for v, s in session.referenceCaseIDs
        ]
        limits = self._limits(session, mrml_io.volumeShape(volumeNode)[session.axis])
        request = self.core.prepareRun(
            volumeNode,
            segmentationNode,
            session.segmentIds,
            axis=session.axis,
            referenceCases=[(v, s) for v, s in references if v is not None and s is not None],
            supportSet=session.supportSet or None,
            library=self.core.supportLibraryRoot,
            slice_limits=limits,
            **session.options,
        )
        self.stop(session)
        session.run = self.core.startRun(request, session.settings, preview=True)
        session.volumeId = session.run.volumeId
        session.runsStarted += 1
        return session.run

    def poll(self, session: PreviewSession) -> str:
        """Progress of the run in flight (call from a timer); shows its result once done.
        Returns 'idle', 'running', 'done', 'cancelled' (or raises when it failed)."""
        run = session.run
        if run is None:
            return "idle"
        if not run.done():
            self.core.poll(run)
            session.volumeId = run.volumeId or session.volumeId  # queued once the engine is up
        if run.state == "done" and run.result is not None and session.request is not run.request:
            session.request, session.result = run.request, run.result
            self._showPreview(session)
        return run.state

    def wait(self, session: PreviewSession, timeout: float = 600.0) -> str:
        """Poll until the run in flight ends (console, tests)."""
        deadline = time.monotonic() + timeout
        while session.running:
            if time.monotonic() > deadline:
                self.stop(session)
                raise SGPError(f"The preview did not finish within {timeout:.0f} s; stopped.")
            self.poll(session)
            time.sleep(0.05)
        return self.poll(session)

    def stop(self, session: PreviewSession | None) -> None:
        """Stop the run in flight (the preview shown stays)."""
        if session is not None and session.running:
            self.core.cancel(session.run)

    def changedSegments(self, session: PreviewSession, request=None) -> list[str]:
        """Names of the selected segments whose voxels changed since ``request`` (default: the
        latest run's) was made."""
        if request is None:
            request = session.run.request if session.run is not None else session.request
        if request is None:
            return []
        volumeNode, segmentationNode = session.nodes()
        segmentation = segmentationNode.GetSegmentation()
        changed = []
        for value, segmentId in request.segmentIds.items():
            segment = segmentation.GetSegment(segmentId)
            if segment is None:
                changed.append(request.structures[value])
                continue
            mask = mrml_io.segmentArray(segmentationNode, segmentId, volumeNode)
            if labeled_slices.checksum(mask) != request.beforeChecksums[value]:
                changed.append(segment.GetName())
        return changed

    # ------------------------------------------------------------------- apply and cancel

    def canApply(self, session: PreviewSession | None) -> tuple[bool, str]:
        """Whether Apply would write now, and why not (for the button and its tooltip)."""
        if session is None or session.result is None:
            return False, "No preview yet: press Preview."
        stale = self.changedSegments(session, session.request)
        if stale:
            return False, f"Segment(s) {', '.join(stale)} changed since; the preview is updating."
        return True, ""

    def apply(self, session: PreviewSession, rules: EditRules | None = None) -> WriteReport:
        """Write the preview shown into the user's segments (as the module's run writes),
        under ``rules`` (the editor's masking settings); the preview is removed."""
        if session.result is None or session.request is None:
            raise SGPInputError("There is no preview to apply yet: press Preview and wait for it.")
        request = session.request
        stale = self.changedSegments(session, request)
        if stale:
            raise SGPInputError(
                f"Segment(s) {', '.join(repr(n) for n in stale)} changed after the preview shown "
                "was computed, so it would undo those edits; nothing was written. Wait for the "
                "preview to update (or press Preview), then Apply."
            )
        self.stop(session)
        report = self.core.runs.apply(request, session.result, rules=rules or EditRules())
        self.cancel(session)
        return report

    def cancel(self, session: PreviewSession | None) -> None:
        """Stop the run, remove the preview; the user's segmentation stays as it is."""
        if session is None:
            return
        self.stop(session)
        if session.run is not None:
            session.run.result = None  # a later poll must not show it again
        segmentationNode = slicer.mrmlScene.GetNodeByID(session.segmentationNodeID)
        node = previewNode(segmentationNode)
        if node is not None:
            segmentationNode.RemoveNodeReferenceIDs(PREVIEW_REFERENCE_ROLE)
            slicer.mrmlScene.RemoveNode(node)
        session.result, session.request = None, None
        session.clicks.clear()

    # -------------------------------------------------------------- review and correction

    def slicesToCheck(self, session: PreviewSession, count: int = 5) -> list[SliceToCheck]:
        """The predicted slices to look at first (least confident first)."""
        if session.result is None or session.request is None:
            return []
        ids = session.request.segmentIds
        return [
            SliceToCheck(ids[value], name, s, confidence)
            for value, name, s, confidence in outputs.leastConfidentSlices(session.result, count)
        ]

    def sliceFromViews(self, volumeNode, segmentationNode, segmentIds, axis, sliceToRAS):
        """The slice the views show along the drawing axis (for the slice range)."""
        axis = self.resolveAxis(volumeNode, segmentationNode, segmentIds, axis)
        return refinement.sliceIndexFromViews(volumeNode, axis, sliceToRAS)

    def jumpTo(self, session: PreviewSession, item: SliceToCheck):
        volumeNode, _ = session.nodes()
        return self.core.jumpToSlice(volumeNode, session.axis, item.slice)

    def refine(self, session, segmentId, ras, positive=True, inPlane=None, rules=None):
        """One click on the preview (see :mod:`.refinement`); the caller then calls
        :meth:`update` (the effect does it after its debounce)."""
        self.stop(session)  # the engine would serve the click only after the run in flight
        return refinement.refineClick(self.core, session, segmentId, ras, positive, inPlane, rules)

    # ------------------------------------------------------------------------ preview node

    def _showPreview(self, session: PreviewSession) -> None:
        volumeNode, segmentationNode = session.nodes()
        node = previewNode(segmentationNode, create=True)
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        source = segmentationNode.GetSegmentation()
        target = node.GetSegmentation()
        wanted = set(session.request.segmentIds.values())
        for segmentId in list(target.GetSegmentIDs()):
            if segmentId not in wanted:
                target.RemoveSegment(segmentId)
        labels = np.asarray(session.result.labels)
        drawn = session.result.labeled_by_structure or {}
        for value, segmentId in session.request.segmentIds.items():
            segment = source.GetSegment(segmentId)
            if target.GetSegment(segmentId) is None:
                target.AddEmptySegment(segmentId, segment.GetName(), segment.GetColor())
            mask = labels == value
            own = [int(s) for s in drawn.get(value, [])]
            if own:  # the user's own slices show in the user's segmentation, unchanged
                mask = refinement.putSlice(mask, session.axis, own, False)
            mrml_io.writeSegmentArray(mask, node, segmentId, volumeNode)


def previewNode(segmentationNode, create: bool = False):
    """The preview segmentation of ``segmentationNode`` (made, with its display, on request)."""
    if segmentationNode is None:
        return None
    node = segmentationNode.GetNodeReference(PREVIEW_REFERENCE_ROLE)
    if node is not None or not create:
        return node
    node = slicer.mrmlScene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode", f"{segmentationNode.GetName()} SGP preview"
    )
    node.SetHideFromEditors(True)  # not offered as a segmentation to edit
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetOpacity(PREVIEW_OPACITY)
    display.SetVisibility2DOutline(False)
    if segmentationNode.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(segmentationNode.GetParentTransformNode().GetID())
    segmentationNode.SetNodeReferenceID(PREVIEW_REFERENCE_ROLE, node.GetID())
    return node


__all__ = [
    "PREVIEW_REFERENCE_ROLE",
    "PreviewLogic",
    "PreviewSession",
    "SliceToCheck",
    "previewNode",
]
