"""The Segment Editor effect's behaviour without Qt: preview, update, apply, cancel, clicks.

A :class:`PreviewSession` is one preview of some segments of a segmentation. Its runs go to the
same engine as the module's (the module Logic's :class:`EngineConnection`), with the model the
module's settings name; their results are shown in a separate preview segmentation node (found
through a node reference on the user's segmentation) and never touch the user's segments until
:meth:`PreviewLogic.apply`, which writes exactly what the module's run writes (same code) under
the Segment Editor's masking rules. :meth:`PreviewLogic.cancel` removes the preview and writes
nothing. The effect calls :meth:`PreviewLogic.update` after the user draws (debounced): the run
in flight is cancelled and a new one starts from the slices drawn now.

Boxes, clicks and scribbles (:mod:`.prompting`) live in the session as prompts sent with every
run; a preview can start from one (:meth:`PreviewLogic.startFromPrompt`). "Not here"
(``notHere``: 'off', 'all' or 'visible') sends the other segments of the segmentation as
voxels the previewed ones must not take.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
from slicer.i18n import tr as _

from SGPSegmentLib import edit_rules, labeled_slices, mrml_io, outputs, prompting, refinement
from SGPSegmentLib import slice_geometry as geometry
from SGPSegmentLib.constants import AXIS_NAMES, axisDisplay
from SGPSegmentLib.edit_rules import EditRules
from SGPSegmentLib.engine_connection import ModelSettings
from SGPSegmentLib.request import RunRequest, drawnSlicesAllAxes
from SGPSegmentLib.runs import Run, WriteReport
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
        view = axisDisplay(AXIS_NAMES[axis])
        return _(
            "{name}: {view} slice {slice} (confidence {confidence:.2f})"
        ).format(name=self.name, view=view, slice=self.slice, confidence=self.confidence)


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
    prompts: dict[prompting.PromptKey, prompting.PromptedSlice] = field(default_factory=dict)
    """Boxes, clicks and scribbles on slices along :attr:`axis` (see :mod:`.prompting`)."""
    promptVersion: int = 0
    """Bumped by every change of :attr:`prompts`; a run's request records the one it sent."""
    notHere: str = "off"
    """Other segments as "not here": 'off', 'all' or 'visible' (the editor's overwrite)."""

    def promptsChanged(self) -> None:
        self.promptVersion += 1

    @property
    def running(self) -> bool:
        return self.run is not None and not self.run.done()

    def nodes(self):
        scene = slicer.mrmlScene
        volumeNode = scene.GetNodeByID(self.volumeNodeID)
        segmentationNode = scene.GetNodeByID(self.segmentationNodeID)
        if volumeNode is None or segmentationNode is None:
            raise SGPInputError(_("The volume or segmentation of this preview was removed."))
        return volumeNode, segmentationNode

    def previewSlice(self, segmentId: str, k: int) -> np.ndarray:
        """The preview's mask of ``segmentId`` on slice ``k`` (the start of a click)."""
        if self.result is None or self.request is None:
            raise SGPInputError(_("Compute a preview before correcting it with clicks."))
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
        prompts=None,
        notHere="off",
        **options,
    ) -> PreviewSession:
        """Check the inputs and start the first preview run (nothing is written).
        ``supportSet``: the name of a saved support set (in the core Logic's library);
        ``prompts``: ``{(segmentId, slice): PromptedSlice}`` along ``axis``; ``notHere``:
        'off', 'all' or 'visible' (see :func:`notHereMode`)."""
        mrml_io.checkVolume(volumeNode)
        if segmentationNode is None:
            raise SGPInputError(_("Select a segmentation."))
        ids = [str(s) for s in segmentIds or []]
        if not ids:
            raise SGPInputError(_("Choose at least one segment to preview."))
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
        session.prompts = dict(prompts or {})
        session.notHere = checkNotHere(notHere)
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
                _(
                    "The slice range {first}..{last} must lie within 0..{lastSlice} with first "
                    "<= last."
                ).format(first=first, last=last, lastSlice=n - 1)
            )
        return {v: [first, last] for v in range(1, len(session.segmentIds) + 1)}

    def update(self, session: PreviewSession, onlyIfChanged: bool = False) -> Run | None:
        """Start a run from the slices drawn now, cancelling the one in flight. With
        ``onlyIfChanged``, nothing happens when no selected segment changed since the last."""
        volumeNode, segmentationNode = session.nodes()
        if prompting.dropOverdrawn(session.prompts, segmentationNode, volumeNode, session.axis):
            session.promptVersion += 1  # drawn over: the drawing wins
        latest = session.run.request if session.run is not None else session.request
        promptsNew = latest is None or latest.promptVersion != session.promptVersion
        if onlyIfChanged and not promptsNew and not self.changedSegments(session):
            return None
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
            prompts=prompting.promptsBySegment(session.prompts),
            exclude=notHereSegments(segmentationNode, session.segmentIds, session.notHere),
            **session.options,
        )
        request.promptVersion = session.promptVersion
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
                raise SGPError(_(
                    "The preview did not finish within {timeout:.0f} s; stopped."
                ).format(timeout=timeout))
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
            return False, _("No preview yet: press Preview.")
        stale = self.changedSegments(session, session.request)
        if stale:
            return False, _(
                "Segment(s) {segments} changed since; the preview is updating."
            ).format(segments=", ".join(stale))
        if session.request.promptVersion != session.promptVersion:
            return False, _("Boxes, clicks or scribbles changed since; the preview is updating.")
        return True, ""

    def apply(self, session: PreviewSession, rules: EditRules | None = None) -> WriteReport:
        """Write the preview shown into the user's segments (as the module's run writes),
        under ``rules`` (the editor's masking settings); the preview is removed."""
        if session.result is None or session.request is None:
            raise SGPInputError(
                _("There is no preview to apply yet: press Preview and wait for it.")
            )
        request = session.request
        stale = self.changedSegments(session, request)
        if stale:
            raise SGPInputError(
                _(
                    "Segment(s) {segments} changed after the preview shown was computed, so it "
                    "would undo those edits; nothing was written. Wait for the preview to "
                    "update (or press Preview), then Apply."
                ).format(segments=", ".join(repr(n) for n in stale))
            )
        if request.promptVersion != session.promptVersion:
            raise SGPInputError(
                _(
                    "The preview shown was computed before the last box, click or scribble; "
                    "nothing was written. Wait for the preview to update, then Apply."
                )
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
        session.prompts.clear()
        session.promptsChanged()

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

    # ------------------------------------------------------------ boxes, clicks, scribbles

    def startFromPrompt(self, kind, volumeNode, segmentationNode, segmentIds, segmentId,
                        positions, inPlane, positive=True, carried=None, carriedAxis=None,
                        **startArguments) -> PreviewSession:  # fmt: skip
        """Start a preview from a first ``kind`` ('box': two corners, 'click': one position,
        'scribble': a stroke's positions) of ``segmentId`` in a view with in-plane directions
        ``inPlane``; the preview's axis is the view's. ``carried``: the prompts of the preview
        this one replaces (along ``carriedAxis``). ``startArguments``: :meth:`start`'s."""
        mrml_io.checkVolume(volumeNode)
        axis = self.promptAxis(volumeNode, positions[0], inPlane, carriedAxis if carried else None)
        key, prompt = _newPrompt(kind, volumeNode, segmentationNode, segmentId, axis, positions,
                                 inPlane, positive)  # fmt: skip
        ids = [str(s) for s in segmentIds or []]
        ids += [segmentId] if segmentId not in ids else []
        startArguments.pop("axis", None)
        prompts = {**(carried or {}), key: prompt}
        return self.start(volumeNode, segmentationNode, ids, axis=axis, prompts=prompts,
                          **startArguments)  # fmt: skip

    @staticmethod
    def promptAxis(volumeNode, ras, inPlane, previewAxis=None) -> int:
        """The axis a prompt drawn in a view (in-plane directions ``inPlane``) starts a preview
        along; refused when an open preview (``previewAxis``) runs along another."""
        axis = geometry.viewAxis(volumeNode, ras, inPlane)
        if previewAxis is not None and int(previewAxis) != axis:
            raise SGPInputError(
                _(
                    "The preview runs along {orientation} slices: draw in a view of that "
                    "orientation, or Cancel the preview first."
                ).format(orientation=geometry.axisText(int(previewAxis)))
            )
        return axis

    def clickWrites(self, session: PreviewSession, segmentId, ras, inPlane=None) -> bool:
        """Whether :meth:`click` would write into the segment (a correction of a predicted
        slice) rather than add a point to a prompt (the effect saves the undo state first)."""
        volumeNode, _ = self._promptTarget(session, segmentId)
        k = geometry.pointOnSlice(volumeNode, session.axis, ras, inPlane)[0]
        return (segmentId, k) not in session.prompts and session.result is not None

    def box(self, session: PreviewSession, segmentId, rasStart, rasEnd, inPlane=None) -> str:
        """A box dragged on a slice: that slice's prompt becomes the box (nothing written)."""
        volumeNode, segmentationNode = self._promptTarget(session, segmentId)
        key, prompt = _newPrompt("box", volumeNode, segmentationNode, segmentId, session.axis,
                                 (rasStart, rasEnd), inPlane, True)  # fmt: skip
        session.prompts[key] = prompt
        session.promptsChanged()
        return _("Box on slice {slice}; propagating...").format(slice=key[1])

    def click(self, session: PreviewSession, segmentId, ras, positive=True, inPlane=None,
              rules=None) -> str:  # fmt: skip
        """A click: a point of that slice's prompt when it has one (or no preview is shown
        yet); on a slice of a preview shown, the correction of :meth:`refine` (written)."""
        volumeNode, segmentationNode = self._promptTarget(session, segmentId)
        k, row, col = geometry.pointOnSlice(volumeNode, session.axis, ras, inPlane)
        key = (segmentId, k)
        if key not in session.prompts and session.result is not None:
            return self.refine(session, segmentId, ras, positive, inPlane, rules).describe()
        base = prompting.userSliceChecksum(segmentationNode, volumeNode, segmentId, session.axis, k)
        previous = session.prompts.get(key)
        session.prompts[key] = prompting.withClick(previous, row, col, positive, base)
        session.promptsChanged()
        return _(
            "Slice {k}: {prompt}; propagating..."
        ).format(k=k, prompt=session.prompts[key].describe())

    def scribble(self, session: PreviewSession, segmentId, rasPoints, positive=True,
                 inPlane=None) -> str:  # fmt: skip
        """A stroke: the points sampled along it and the slice's current mask give its new
        mask at once; the voxels it crosses are set (``positive``) or cleared."""
        volumeNode, segmentationNode = self._promptTarget(session, segmentId)
        axis = session.axis
        stroke = geometry.strokeOnSlice(volumeNode, axis, rasPoints, inPlane)
        key = (segmentId, stroke.slice)
        current = self.currentSlice(session, segmentId, stroke.slice)
        self.stop(session)  # the engine would answer only after the run in flight
        client = self.core.engine.client(session.settings)
        engineMask, _checksum, session.volumeId = prompting.refineOnEngine(
            client, session.volumeId, volumeNode, axis,
            session.options.get("intensity", "auto"), stroke.slice, stroke.points,
            [1 if positive else 0] * len(stroke.points), current,
        )  # fmt: skip
        base = prompting.userSliceChecksum(segmentationNode, volumeNode, segmentId, axis,
                                           stroke.slice)  # fmt: skip
        fixed = prompting.scribbledMask(current, stroke, positive, engineMask)
        session.prompts[key] = prompting.PromptedSlice(fixed=fixed, baseChecksum=base)
        session.promptsChanged()
        text = (
            _("Slice {slice}: scribble added ({count} points); propagating...")
            if positive
            else _("Slice {slice}: scribble removed ({count} points); propagating...")
        )
        return text.format(slice=stroke.slice, count=len(stroke.points))

    def currentSlice(self, session: PreviewSession, segmentId, k: int) -> np.ndarray:
        """What slice ``k`` of ``segmentId`` shows now: a scribble's mask, else the preview's,
        else the user's segment there."""
        prompt = session.prompts.get((segmentId, k))
        if prompt is not None and prompt.fixed is not None:
            return prompt.fixed.copy()
        if session.result is not None and segmentId in session.request.segmentIds.values():
            return session.previewSlice(segmentId, k)
        volumeNode, segmentationNode = session.nodes()
        mask = mrml_io.segmentArray(segmentationNode, segmentId, volumeNode)
        return refinement.takeSlice(mask, session.axis, k)

    def setNotHere(self, session: PreviewSession, mode) -> Run | None:
        """Other segments as "not here" from now on ('off', 'all', 'visible'); an open
        preview updates at once."""
        mode = checkNotHere(mode)
        if session is None or mode == session.notHere:
            return None
        session.notHere = mode
        session.promptsChanged()  # a new run is needed even though no segment changed
        return self.update(session)

    @staticmethod
    def _promptTarget(session: PreviewSession, segmentId):
        if session is None:
            raise SGPInputError(_("No preview: start one with a box or a click."))
        if segmentId not in session.segmentIds:
            raise SGPInputError(
                _(
                    "Boxes, clicks and scribbles work on the segments of the preview; select one "
                    "of them (or Cancel and start again with this segment selected)."
                )
            )
        return session.nodes()

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
            made = set((session.result.prompted_by_structure or {}).get(value, []))
            made |= set(session.request.givenSlices.get(value, {}))
            own = [int(s) for s in drawn.get(value, []) if int(s) not in made]
            if own:  # the user's own slices show in the user's segmentation, unchanged
                mask = refinement.putSlice(mask, session.axis, own, False)
            mrml_io.writeSegmentArray(mask, node, segmentId, volumeNode)


NOT_HERE_MODES = ("off", "all", "visible")


def checkNotHere(mode) -> str:
    mode = str(mode or "off").lower()
    if mode not in NOT_HERE_MODES:
        raise SGPInputError(_(
            "'Not here' must be one of {choices}; got {mode!r}."
        ).format(choices=", ".join(NOT_HERE_MODES), mode=mode))
    return mode


def notHereMode(enabled: bool, editorNode) -> str:
    """The "not here" mode for the effect's option: 'off' unless ``enabled``; then the
    visible other segments when the editor overwrites only visible ones, else all."""
    if not enabled:
        return "off"
    rules = edit_rules.rulesFromEditorNode(editorNode)
    return "visible" if rules.overwrite == "visible" else "all"


def notHereDefault(editorNode) -> bool:
    """The option's default: on when the Segment Editor's Masking overwrites other segments
    (its "Modify other segments" is not "Allow overlap")."""
    return edit_rules.rulesFromEditorNode(editorNode).overwrite != "none"


def notHereSegments(segmentationNode, segmentIds, mode) -> list[str]:
    """The other segments sent as "not here" for ``segmentIds`` in ``mode``."""
    mode = checkNotHere(mode)
    if mode == "off":
        return []
    return edit_rules.overwriteTargets(edit_rules.EditRules(mode), segmentationNode, segmentIds)


def _newPrompt(kind, volumeNode, segmentationNode, segmentId, axis, positions, inPlane, positive):
    """``(key, PromptedSlice)`` of a first box, click or stroke (a stroke: its points)."""
    if kind == "box":
        box = geometry.boxFromCorners(volumeNode, axis, positions[0], positions[1], inPlane)
        k, prompt = box.slice, None
    elif kind == "click":
        k, row, col = geometry.pointOnSlice(volumeNode, axis, positions[0], inPlane)
    elif kind == "scribble":
        stroke = geometry.strokeOnSlice(volumeNode, axis, positions, inPlane)
        k = stroke.slice
    else:
        raise SGPInputError(_("Unknown prompt {kind!r}: box, click or scribble.").format(kind=kind))
    base = prompting.userSliceChecksum(segmentationNode, volumeNode, segmentId, axis, k)
    if kind == "box":
        prompt = prompting.boxPrompt(box, base)
    elif kind == "click":
        prompt = prompting.withClick(None, row, col, positive, base)
    else:
        prompt = prompting.PromptedSlice(
            points=[(c, r, bool(positive)) for r, c in stroke.points], baseChecksum=base
        )
    return (segmentId, k), prompt


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
    "NOT_HERE_MODES",
    "PREVIEW_REFERENCE_ROLE",
    "PreviewLogic",
    "PreviewSession",
    "SliceToCheck",
    "notHereDefault",
    "notHereMode",
    "notHereSegments",
    "previewNode",
]
