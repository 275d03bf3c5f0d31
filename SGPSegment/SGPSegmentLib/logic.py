"""SGPSegment's behaviour without Qt: usable from the Python console, scripts and tests.

A thin facade over the parts:

* :mod:`.request`: the user's nodes -> numpy (checks every input; reads MRML only),
* :mod:`.labeled_slices`: which slices the user drew, per segment and axis,
* :mod:`.edit_watch`: those records in memory, and what each stroke changed,
* :mod:`.engine_connection`: the local or remote engine (``sgp serve``) and its client,
* :mod:`.runs`: start / poll / apply / cancel / undo,
* :mod:`.outputs`: pseudo-masks, per-slice scores, least confident slices,
* :mod:`.support_library`: drawn slices saved as named support sets, reused on new cases,
* :mod:`.dependencies`, :mod:`.engine_weights`: the engine's packages and weights, installed
  and downloaded by :mod:`.processes` tasks that the Widget's timer polls.

No threads and no torch in this process: a run is queued on the engine with quick HTTP calls,
the Widget's timer calls :meth:`SGPSegmentCoreLogic.poll`, and the result is written when the
run is done (:meth:`run` does the same in a loop for the console).
"""

from __future__ import annotations

import slicer
import vtk

from SGPSegmentLib import (
    dependencies,
    engine_weights,
    mrml_io,
    outputs,
    request,
    support_library,
)
from SGPSegmentLib.constants import MODEL_SIZES
from SGPSegmentLib.edit_watch import RecordStore
from SGPSegmentLib.engine_connection import EngineConnection, ModelSettings, defaultPython
from SGPSegmentLib.parameter_actions import ParameterNodeActions, describeSupportSet
from SGPSegmentLib.processes import Task
from SGPSegmentLib.runs import Run, Runs, WriteReport
from SlicerSGP.data.support_library import SupportLibrary, SupportSetSummary
from SlicerSGP.errors import SGPError

REFERENCE_CASE_ROLE = "SGPReferenceCase"
"""Node reference role (on the parameter node) of each reference-case segmentation."""
SUPPORT_SET_PARAMETER = "SupportSet"
"""Parameter (on the MRML parameter node) naming the saved support set runs and previews use."""


class SGPSegmentCoreLogic(ParameterNodeActions):
    """Behaviour of the SGPSegment module. The module's ``SGPSegmentLogic`` adds the parameter
    node on top; everything here works on explicit nodes and values."""

    def __init__(self) -> None:
        super().__init__()
        self.engine = EngineConnection()
        self.runs = Runs()
        self.drawingAxis = 0
        """Axis a drawn dot or line (planar in several orientations) is recorded on."""
        self.records = RecordStore()
        """The drawn-slice records, in memory; a segment's tag gets its record when a run
        uses it (see :mod:`.edit_watch`)."""
        self.runs.records = self.records
        self._watched: dict[str, tuple] = {}
        self.supportLibraryRoot = None
        """Folder of the saved support sets; None: the engine's (``sgp support`` uses it too)."""
        self._weightsStatus: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------- labeled slices

    def labeledSlices(self, volumeNode, segmentationNode, segmentIds, axis=0):
        """Per selected segment, the slices along ``axis`` the user drew, with voxel counts."""
        pairs = request.labeledSegments(
            volumeNode, segmentationNode, list(segmentIds), axis, self.records
        )
        return [item for item, _ in pairs]

    def watchEdits(self, segmentationNode, volumeNode) -> None:
        """Record the user's strokes as they happen (see :mod:`.labeled_slices`). Writes
        nothing to the scene: the records stay in memory until a run uses them."""
        entry = self._watched.get(segmentationNode.GetID()) if segmentationNode else None
        if entry is not None and entry[0] is segmentationNode and entry[2] is volumeNode:
            # Watched already: only look at the segments now (edits since count as one).
            self.records.sync(segmentationNode, volumeNode, None, self.drawingAxis)
            return
        self.stopWatching()
        if segmentationNode is None or volumeNode is None or volumeNode.GetImageData() is None:
            return

        @vtk.calldata_type(vtk.VTK_STRING)
        def onSegmentModified(caller, event, segmentId=None):
            self._onSegmentModified(segmentationNode, volumeNode, segmentId)

        def onLabelmapModified(caller, event):
            self._onSegmentModified(segmentationNode, volumeNode, None)

        # A Paint/Draw stroke changes the shared labelmap in place: only the source
        # representation's event fires (no segment ID). Replacing a segment's labelmap, its
        # tags or an undo fire SegmentModified.
        tags = (
            segmentationNode.AddObserver(slicer.vtkSegmentation.SegmentModified, onSegmentModified),
            segmentationNode.AddObserver(
                slicer.vtkSegmentation.SourceRepresentationModified, onLabelmapModified
            ),
        )
        self._watched[segmentationNode.GetID()] = (segmentationNode, tags, volumeNode)
        # Baseline (or first record) of every segment now, so the next stroke is seen alone.
        self.records.sync(segmentationNode, volumeNode, None, self.drawingAxis)

    def stopWatching(self) -> None:
        for node, tags, _ in self._watched.values():
            for tag in tags:
                node.RemoveObserver(tag)
        self._watched.clear()

    def ensureWatching(self, segmentationNode, volumeNode) -> None:
        """Watch this pair unless it is watched already (the effect and the module share it)."""
        entry = self._watched.get(segmentationNode.GetID()) if segmentationNode else None
        if entry is None or entry[0] is not segmentationNode or entry[2] is not volumeNode:
            self.watchEdits(segmentationNode, volumeNode)

    def _onSegmentModified(self, segmentationNode, volumeNode, segmentId) -> None:
        # Shared-labelmap updates come without a segment ID: look at every segment then. A
        # write of the Logic itself (a run's result, its undo) only moves the baselines.
        self.records.sync(
            segmentationNode,
            volumeNode,
            [segmentId] if segmentId else None,
            self.drawingAxis,
            record=not self.runs.applying,
        )

    # ------------------------------------------------------------------------------ runs

    def prepareRun(self, volumeNode, segmentationNode, segmentIds=None, **kwargs):
        """:func:`.request.prepareRun` with this Logic's drawn-slice records."""
        kwargs.setdefault("records", self.records)
        return request.prepareRun(volumeNode, segmentationNode, segmentIds, **kwargs)

    @staticmethod
    def modelSettings(
        model="tiny", weights=None, device="auto", imageSize=1024, seed=0
    ) -> ModelSettings:
        return ModelSettings(
            str(model),
            None if weights is None else str(weights),
            str(device),
            int(imageSize),
            int(seed),
        )

    def startRun(
        self, runRequest, settings: ModelSettings, keepPseudoMasks: bool = False, preview=False
    ) -> Run:
        """Queue a prepared run on the engine; a ``preview`` run keeps its result instead of
        writing it. Never waits for a local engine to start: the run then shows the stage
        'starting engine' and is queued by the :meth:`poll` that finds the engine ready."""
        try:
            client = self.engine.ready(settings)
            if client is None:
                return self.runs.pending(
                    runRequest,
                    lambda: self.engine.ready(settings),
                    keepPseudoMasks=keepPseudoMasks,
                    preview=preview,
                )
            return self.runs.start(
                runRequest, client, keepPseudoMasks=keepPseudoMasks, preview=preview
            )
        except BaseException as exc:
            failure = self.engine.describeFailure(exc, duringRun=False)
            if failure is exc:
                raise
            raise failure from exc

    def poll(self, run: Run) -> Run:
        """Progress of ``run``; writes the result once it is done (call from a timer)."""
        return self.runs.poll(run, self.engine.describeFailure)

    def cancel(self, run: Run) -> None:
        self.runs.cancel(run)

    def run(
        self,
        volumeNode,
        segmentationNode,
        segmentIds=None,
        *,
        model="tiny",
        weights=None,
        device="auto",
        imageSize=1024,
        seed=0,
        keepPseudoMasks=False,
        timeout=600.0,
        **kwargs,
    ) -> WriteReport:
        """Prepare, run on the engine and write, waiting for the result (console, scripts).
        ``kwargs``: :func:`.request.prepareRun`'s, e.g. ``supportSet="liver CT"``."""
        kwargs.setdefault("library", self.supportLibraryRoot)
        runRequest = self.prepareRun(volumeNode, segmentationNode, segmentIds, **kwargs)
        settings = self.modelSettings(model, weights, device, imageSize, seed)
        handle = self.startRun(runRequest, settings, keepPseudoMasks)
        self.runs.wait(handle, timeout=timeout, describeFailure=self.engine.describeFailure)
        if handle.state == "cancelled":
            raise SGPError("The run was cancelled; nothing was written.")
        return handle.report

    @property
    def lastResult(self):
        return self.runs.lastResult

    def canUndo(self, segmentationNode) -> bool:
        return self.runs.canUndo(segmentationNode)

    def undoLastRun(self, segmentationNode, volumeNode) -> None:
        self.runs.undo(segmentationNode, volumeNode)

    def sceneClosing(self, run: Run | None = None) -> None:
        """The scene is closing: cancel the run, forget results, undo states and observers."""
        if run is not None:
            self.runs.cancel(run)
        self.stopWatching()
        self.runs.clear()
        self.records.clear()

    def shutdown(self) -> None:
        """Slicer exits: stop the local engine this module started."""
        self.stopWatching()
        self.engine.stop()

    # ----------------------------------------------------------------- review of results

    def leastConfidentSlices(self, count: int = 5):
        return outputs.leastConfidentSlices(self.runs.lastResult, count)

    @staticmethod
    def jumpToSlice(volumeNode, axis, sliceIndex: int):
        """Centre all slice views on slice ``sliceIndex`` of ``volumeNode`` along ``axis``."""
        ras = mrml_io.sliceCenterRAS(volumeNode, axis, sliceIndex)
        slicer.vtkMRMLSliceNode.JumpAllSlices(
            slicer.mrmlScene, *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice
        )
        return ras

    # ------------------------------------------------------------------ reference cases

    @staticmethod
    def setReferenceCases(parameterNode, segmentationNodes) -> None:
        """Store the reference cases as node references on the (MRML) parameter node, so that
        they are saved with the scene and follow node ID changes on import."""
        parameterNode.RemoveNodeReferenceIDs(REFERENCE_CASE_ROLE)
        for node in segmentationNodes:
            parameterNode.AddNodeReferenceID(REFERENCE_CASE_ROLE, node.GetID())

    @staticmethod
    def referenceCaseNodes(parameterNode) -> list:
        n = parameterNode.GetNumberOfNodeReferences(REFERENCE_CASE_ROLE)
        nodes = [parameterNode.GetNthNodeReference(REFERENCE_CASE_ROLE, i) for i in range(n)]
        return [node for node in nodes if node is not None]

    @staticmethod
    def referenceCases(segmentationNodes, exclude=None) -> list:
        """``(volumeNode, segmentationNode)`` pairs for the reference segmentations."""
        return [
            (mrml_io.referenceVolumeForSegmentation(node), node)
            for node in segmentationNodes
            if node is not None and node is not exclude
        ]

    # ------------------------------------------------------------------- support library

    def supportLibrary(self, root=None) -> SupportLibrary:
        """The saved support sets: ``.list() .names() .show() .rename() .delete()
        .export_zip() .import_zip()`` (``root`` None: :attr:`supportLibraryRoot`)."""
        return SupportLibrary(root if root is not None else self.supportLibraryRoot)

    def saveSupportSet(
        self, name, volumeNode, segmentationNode, segmentIds=None, axis=0, **kwargs
    ) -> SupportSetSummary:
        """Save the segments' drawn slices as support set ``name``. ``kwargs``: drawnSlices
        (``{segmentId: [slices]}``), intensity, description, library, overwrite."""
        kwargs.setdefault("library", self.supportLibraryRoot)
        kwargs.setdefault("records", self.records)
        return support_library.saveSupportSet(
            name, volumeNode, segmentationNode, segmentIds, axis=axis, **kwargs
        )

    @staticmethod
    def supportSetName(parameterNode) -> str:
        """The support set runs and previews use ('' = none), from the MRML parameter node (so
        it is saved with the scene and shared by the module and the SGP effect)."""
        return (parameterNode.GetParameter(SUPPORT_SET_PARAMETER) or "") if parameterNode else ""

    @staticmethod
    def setSupportSet(parameterNode, name) -> None:
        parameterNode.SetParameter(SUPPORT_SET_PARAMETER, str(name or "").strip())

    def renameSupportSet(self, name, newName, parameterNode=None) -> str:
        """Rename a saved set; the parameter node follows if it uses it. Returns the new name."""
        newName = self.supportLibrary().rename(name, newName).name
        if self.supportSetName(parameterNode).lower() == str(name).strip().lower():
            self.setSupportSet(parameterNode, newName)
        return newName

    def deleteSupportSet(self, name, parameterNode=None, confirm=None) -> bool:
        """Delete a saved set after ``confirm(message)`` says yes; a parameter node that uses
        it goes back to none. Returns whether it was deleted."""
        library = self.supportLibrary()
        path = library.path(name)  # unknown names fail before anything is asked
        summary = next(s for s in library.list() if s.path == path)
        if confirm is not None and not confirm(
            f"Delete support set '{path.name}' ({describeSupportSet(summary)}) from "
            f"{library.root}? This cannot be undone; export it first to keep a copy."
        ):
            return False
        library.delete(path.name)
        if self.supportSetName(parameterNode).lower() == path.name.lower():
            self.setSupportSet(parameterNode, "")
        return True

    def exportSupportSet(self, name, path, overwrite=False):
        """Write a saved set as one zip (``sgp support import`` and Import zip read it)."""
        return self.supportLibrary().export_zip(name, path, overwrite=overwrite)

    def importSupportSet(self, path, name=None, overwrite=False, confirm=None):
        """Add the set in a zip, as ``name`` (None or '': the name it was exported under). A
        set called ``name`` is replaced only with ``overwrite`` or after ``confirm(message)``
        says yes (returns None when it says no). The zip is checked before anything changes."""
        library = self.supportLibrary()
        existing = self._existingSupportSet(name) if name else None
        if existing is not None and not overwrite and confirm is not None:
            if not confirm(
                f"A support set named '{existing}' exists in {library.root}. Replace it with "
                "the imported one? The old set is lost (export it first to keep a copy)."
            ):
                return None
            overwrite = True
        return library.import_zip(path, name or None, overwrite=overwrite)

    def _existingSupportSet(self, name) -> str | None:
        """The saved set called ``name`` (letter case ignored), or None."""
        wanted = str(name).strip().lower()
        return next((n for n in self.supportLibrary().names() if n.lower() == wanted), None)

    def supportSetChoices(self, selected: str = "", details=True) -> list[tuple[str, str]]:
        """``[(name, label)]`` for a combo box: None first, then each saved set (``details``:
        with its structures and slice counts); a ``selected`` set no longer in the library is
        kept, marked missing (a run then says so)."""
        choices = [("", "None")]
        if details:
            choices += [(s.name, f"{s.name}: {describeSupportSet(s)}")
                        for s in self.supportLibrary().list()]  # fmt: skip
        else:
            choices += [(n, n) for n in self.supportLibrary().names()]
        if selected and selected.lower() not in {n.lower() for n, _ in choices}:
            choices.append((selected, f"{selected} (not in the library)"))
        return choices

    # --------------------------------------------------------------- dependencies, weights

    def dependencyProblems(self, model: str = "tiny") -> list[str]:
        """What the engine's Python lacks for ``model`` (checked in that Python)."""
        return dependencies.missing(model not in MODEL_SIZES, self.engine.python or None)

    def installDependencies(self, model: str, problemLines: list[str]) -> Task:
        """Start installing into the engine's Python: a :class:`Task` to poll from a timer
        (:meth:`pollTask`), or to ``.wait()`` for in the console."""
        python = self.engine.python or defaultPython()
        return dependencies.installTask(problemLines, python, model not in MODEL_SIZES)

    def weightsStatus(self, model: str) -> str:
        """'cached', 'missing', 'checkpoint' (a trained SGP file) or 'unknown', as the engine's
        Python sees its cache (remembered per Python and model until :meth:`refreshSetup`)."""
        if model not in MODEL_SIZES:
            return "checkpoint"
        key = (self.engine.python or defaultPython(), model)
        if key not in self._weightsStatus:
            self._weightsStatus[key] = engine_weights.status(model, self.engine.python or None)
        return self._weightsStatus[key]

    def refreshSetup(self) -> None:
        """Forget what was seen of the weights cache (after a download, on entering)."""
        self._weightsStatus.clear()

    def downloadWeights(self, model: str) -> Task:
        """Start fetching the official SAM2.1 checkpoint into the engine's cache (checksum
        verified), in the engine's Python: a :class:`Task` (``.wait()`` in the console)."""
        self.refreshSetup()
        return engine_weights.fetchTask(model, self.engine.python or None)

    def importWeights(self, model: str, path) -> Task:
        """Start checking and copying a local copy of the official checkpoint (offline
        machines) into the engine's cache: a :class:`Task`."""
        self.refreshSetup()
        return engine_weights.fetchTask(model, self.engine.python or None, file=path)

    def pollTask(self, task: Task) -> Task:
        """Advance an install or download (call from a timer); never waits."""
        task.poll()
        if task.done():
            self.refreshSetup()
        return task

    def cancelTask(self, task: Task) -> None:
        """Stop an install or download: its processes are killed, nothing more runs."""
        task.cancel()
        self.refreshSetup()


__all__ = ["SGPSegmentCoreLogic", "WriteReport", "Run"]
