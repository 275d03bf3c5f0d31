"""SGPSegment's behaviour without Qt: usable from the Python console, scripts and tests.

The Logic is composed of role objects, each the one owner of its part:

* ``engine`` (:class:`~.engine_connection.EngineConnection`): the local or remote engine
  (``sgp serve``) and its client,
* ``setup`` (:class:`~.engine_setup.EngineSetup`): the engine's packages and weights, installed
  and downloaded by :mod:`.processes` tasks that the Widget's timer polls,
* ``drawing`` (:class:`~.drawing_watch.DrawingWatch`): the user's strokes, watched, feeding the
  drawn-slice ``records`` (:mod:`.edit_watch`; :mod:`.labeled_slices` says what counts as drawn),
* ``runs`` (:class:`~.runs.Runs`): poll / apply / cancel / undo of runs on the engine, the
  last result for review (:mod:`.outputs`),
* ``supportSets`` (:class:`~.support_library.SupportSets`): drawn slices saved as named support
  sets, reused on new cases,
* ``actions`` (:class:`~.parameter_actions.ParameterNodeActions`): what the panel asks, in
  terms of the parameter node.

The Logic itself coordinates what spans roles (prepare a run with the drawn-slice records and
the support library, start it on the engine, wait for it) and keeps the console's names: each
other public method or attribute is the one of the role named beside it (:class:`Delegated`).

No threads and no torch in this process: a run is queued on the engine with quick HTTP calls,
the Widget's timer calls :meth:`SGPSegmentCoreLogic.poll`, and the result is written when the
run is done (:meth:`run` does the same in a loop for the console).
"""

from __future__ import annotations

import slicer
from slicer.i18n import tr as _

from SGPSegmentLib import mrml_io, outputs, reference_cases, request
from SGPSegmentLib.drawing_watch import DrawingWatch
from SGPSegmentLib.edit_watch import RecordStore
from SGPSegmentLib.engine_connection import EngineConnection, ModelSettings
from SGPSegmentLib.engine_setup import EngineSetup
from SGPSegmentLib.parameter_actions import ParameterNodeActions
from SGPSegmentLib.runs import Run, Runs, WriteReport
from SGPSegmentLib.support_library import SupportSets
from SlicerSGP.errors import SGPError


class Delegated:
    """A public name of the Logic that belongs to one of its roles: reading it reads the
    role's attribute (a bound method, a value), assigning it assigns the role's, so that the
    role's own calls see a replaced method too."""

    def __init__(self, role: str, name: str) -> None:
        self.role, self.name = role, name

    def __set_name__(self, owner, attribute: str) -> None:
        self.__doc__ = f"The ``{self.role}`` role's ``{self.name}``."

    def __get__(self, logic, owner=None):
        if logic is None:
            return self
        return getattr(getattr(logic, self.role), self.name)

    def __set__(self, logic, value) -> None:
        setattr(getattr(logic, self.role), self.name, value)


class SGPSegmentCoreLogic:
    """Behaviour of the SGPSegment module, composed of its role objects. The module's
    ``SGPSegmentLogic`` is Slicer's ``ScriptedLoadableModuleLogic`` (the parameter node) plus
    this; everything here works on explicit nodes and values."""

    def __init__(self) -> None:
        super().__init__()  # cooperative: Slicer's ScriptedLoadableModuleLogic comes first
        self.records = RecordStore()
        """The drawn-slice records, in memory; a segment's tag gets its record when a run
        uses it (see :mod:`.edit_watch`). Shared by the roles that read or move them."""
        self.engine = EngineConnection()
        self.setup = EngineSetup(self.engine)
        self.runs = Runs()
        self.runs.records = self.records
        self.drawing = DrawingWatch(self.records, isApplying=lambda: self.runs.applying)
        self.supportSets = SupportSets(self.records)
        self.actions = ParameterNodeActions(self)

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
        kwargs.setdefault("library", self.supportSets.root)
        runRequest = self.prepareRun(volumeNode, segmentationNode, segmentIds, **kwargs)
        settings = self.modelSettings(model, weights, device, imageSize, seed)
        handle = self.startRun(runRequest, settings, keepPseudoMasks)
        self.runs.wait(handle, timeout=timeout, describeFailure=self.engine.describeFailure)
        if handle.state == "cancelled":
            raise SGPError(_("The run was cancelled; nothing was written."))
        return handle.report

    def sceneClosing(self, run: Run | None = None) -> None:
        """The scene is closing: cancel the run, forget results, undo states and observers."""
        if run is not None:
            self.runs.cancel(run)
        self.drawing.stopWatching()
        self.runs.clear()
        self.records.clear()

    def shutdown(self) -> None:
        """Slicer exits: stop the local engine this module started."""
        self.drawing.stopWatching()
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

    # ------------------------------------------------ the roles' names, for the console

    # drawing: the user's strokes and the slices they drew
    drawingAxis = Delegated("drawing", "axis")
    labeledSlices = Delegated("drawing", "labeledSlices")
    watchEdits = Delegated("drawing", "watchEdits")
    stopWatching = Delegated("drawing", "stopWatching")
    ensureWatching = Delegated("drawing", "ensureWatching")
    # runs: results and their undo
    lastResult = Delegated("runs", "lastResult")
    canUndo = Delegated("runs", "canUndo")
    undoLastRun = Delegated("runs", "undo")
    # reference cases: node references on the parameter node
    setReferenceCases = staticmethod(reference_cases.setReferenceCases)
    referenceCaseNodes = staticmethod(reference_cases.referenceCaseNodes)
    referenceCases = staticmethod(reference_cases.referenceCases)
    # supportSets: the support library
    supportLibraryRoot = Delegated("supportSets", "root")
    supportLibrary = Delegated("supportSets", "library")
    saveSupportSet = Delegated("supportSets", "save")
    supportSetName = Delegated("supportSets", "chosen")
    setSupportSet = Delegated("supportSets", "choose")
    renameSupportSet = Delegated("supportSets", "rename")
    deleteSupportSet = Delegated("supportSets", "delete")
    exportSupportSet = Delegated("supportSets", "exportZip")
    importSupportSet = Delegated("supportSets", "importZip")
    supportSetChoices = Delegated("supportSets", "choices")
    supportSetDetails = Delegated("supportSets", "details")
    # setup: the engine's packages and weights
    dependencyProblems = Delegated("setup", "dependencyProblems")
    installDependencies = Delegated("setup", "installDependencies")
    weightsStatus = Delegated("setup", "weightsStatus")
    refreshSetup = Delegated("setup", "refreshSetup")
    downloadWeights = Delegated("setup", "downloadWeights")
    importWeights = Delegated("setup", "importWeights")
    pollTask = Delegated("setup", "pollTask")
    cancelTask = Delegated("setup", "cancelTask")
    # actions: the panel's requests in terms of the parameter node
    modelArgument = Delegated("actions", "modelArgument")
    canRun = Delegated("actions", "canRun")
    labeledSlicesSummary = Delegated("actions", "labeledSlicesSummary")
    deviceChoices = Delegated("actions", "deviceChoices")
    settingsFromParameterNode = Delegated("actions", "settingsFromParameterNode")
    pollConnection = Delegated("actions", "pollConnection")
    testConnection = Delegated("actions", "testConnection")
    startRunFromParameterNode = Delegated("actions", "startRunFromParameterNode")
    previewArguments = Delegated("actions", "previewArguments")
    engineSummary = Delegated("actions", "engineSummary")
    saveSupportSetFromParameterNode = Delegated("actions", "saveSupportSetFromParameterNode")
    supportLibraryTitle = Delegated("actions", "supportLibraryTitle")
    finishMessage = Delegated("actions", "finishMessage")
    scoresTableNode = Delegated("actions", "scoresTableNode")
    jumpToLeastConfident = Delegated("actions", "jumpToLeastConfident")
    dependencyStatus = Delegated("actions", "dependencyStatus")
    ensureDependencies = Delegated("actions", "ensureDependencies")
    weightsStatusText = Delegated("actions", "weightsStatusText")
    ensureReady = Delegated("actions", "ensureReady")
    taskMessage = Delegated("actions", "taskMessage")
    progressOf = Delegated("actions", "progressOf")


__all__ = ["Delegated", "SGPSegmentCoreLogic", "WriteReport", "Run"]
