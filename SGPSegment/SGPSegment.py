"""SGPSegment: few-shot segmentation of a volume from a few labeled slices (SAM2 + SGP).

Module (description), parameter node, Widget (wiring only), Logic and Test, as in Slicer's
scripted-module template. Behaviour lives in ``SGPSegmentLib`` (Qt-free, tested with the
``slicer-core`` wheel). The model runs in a separate engine process (``sgp serve``) that this
module starts on this computer or reaches on a remote server: Slicer's process never imports
torch, and a crash or out-of-memory in the engine cannot take Slicer down.

This file stays importable by an older Slicer's Python 3.9 (no ``X | Y`` annotations, no
``match``, no ``zip(strict=)``), so that such a Slicer (5.4 to 5.8: they have ``slicer.i18n``)
shows the "needs Slicer 5.10" message instead of a traceback. Texts for people are marked for
translation as Slicer's templates do (``_()``, ``translate()``). ``from __future__ import
annotations`` is not used here: the parameter node wrapper reads the class annotations as real
types. One file by Slicer's scripted-module
convention (the self-test must live here for ``slicer_add_python_unittest``), hence over 400 lines.
"""

import contextlib
import logging
import pathlib
from typing import Annotated

import qt
import slicer
import vtk
from SGPSegmentLib.constants import (
    AXIS_NAMES,
    DEFAULT_INTERPOLATION_PRIOR,
    IMAGE_SIZES,
    INTENSITY_MODES,
    INTERPOLATION_PRIORS,
    MODEL_SIZES,
    README_URL,
    axisDisplay,
    slicerVersionProblem,
)
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

VERSION_PROBLEM = slicerVersionProblem(slicer.app.majorVersion, slicer.app.minorVersion)
if not VERSION_PROBLEM:
    # Imported only on a supported Slicer: the Lib and the engine client need Python >= 3.10.
    from SGPSegmentLib.logic import SGPSegmentCoreLogic
else:
    SGPSegmentCoreLogic = object

POLL_INTERVAL_MS = 150


class SGPSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SGP Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["SlicerSGP developers"]
        self.parent.helpText = (
            (f"<p><b>{VERSION_PROBLEM}</b></p>" if VERSION_PROBLEM else "")
            + _("""
Segment structures through a whole volume from a few slices you drew, with SAM2 and
support-set guided prompting (SAM2-SGP). Needs 3D Slicer 5.10 or later.
<ol>
<li>Select the volume and the segmentation; draw each structure on a few slices in the
Segment Editor, all in one orientation. A structure's support is the slices where you drew
that structure; a slice drawn for one structure says nothing about the others (it teaches
"absent here" only if marked complete: <code>complete_slices</code> in the Logic's
<code>run</code>, or <code>sgp segment --complete-slices</code>).</li>
<li>Select the segments and the orientation you drew in (Axial (K), Coronal (J) or
Sagittal (I)); optionally add reference cases (other segmented volumes in the scene) or a
saved support set (Support library section: slices drawn on earlier cases, saved, exported and
imported there). A segment the set holds, by name, is segmented even with nothing drawn.</li>
<li>Choose the model and click Run. Correct any slice and Run again: corrected slices become
support, and the engine reuses the image embeddings, so re-runs are fast.</li>
</ol>
The model runs in an engine process: on this computer (started by the module) or on a remote
server (Engine section: URL and token). Per-slice confidence is shown in a table and a plot.
<p>Without leaving the Segment Editor: its <b>SGP</b> effect shows the same result as a preview
that updates while you draw, takes click corrections and is applied with the editor's Undo. It
uses the engine, model and device chosen here.</p>
""")
            + _(
                "<p>Documentation: <a href=\"{README_URL}\">README</a>.</p>"
            ).format(README_URL=README_URL)
        )
        self.parent.acknowledgementText = _("""
Implements support-set guided prompting for SAM2 (SAM2-SGP) on top of Meta's Segment Anything 2
(Apache-2.0). Uses PyTorch through the PyTorch extension.
""")


@parameterNodeWrapper
class SGPSegmentParameterNode:
    """What the user chose. Segment selection, axis and device are synced by hand (their
    widgets have no connector for these); reference cases are node references
    (role ``SGPReferenceCase``) and the support set used is the parameter ``SupportSet`` on
    the parameter node itself (its set names change as the library does, so no Choice)."""

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentIds: str = ""
    """Comma-separated IDs of the selected segments."""
    axis: Annotated[str, Choice(list(AXIS_NAMES))] = "K"
    model: Annotated[str, Choice([*MODEL_SIZES, "SGP checkpoint"])] = "tiny"
    checkpointPath: pathlib.Path = pathlib.Path()
    device: str = "auto"
    imageSize: Annotated[int, Choice(list(IMAGE_SIZES))] = 1024
    topK: Annotated[int, WithinRange(1, 16)] = 4
    intensity: Annotated[str, Choice(list(INTENSITY_MODES))] = "auto"
    interpolationPrior: Annotated[str, Choice(list(INTERPOLATION_PRIORS))] = (
        DEFAULT_INTERPOLATION_PRIOR
    )
    keepPseudoMasks: bool = False


class SGPSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the .ui to the Logic; no behaviour of its own. (Over 250 lines: one short
    handler per control.)"""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._task = None
        """An install or download in progress (polled by the timer, like a run)."""
        self._afterTask = None
        self._connecting = False
        self._timer = None
        self._worstIndex = 0

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        if VERSION_PROBLEM:
            label = qt.QLabel(VERSION_PROBLEM)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SGPSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        # Qt 5.15's .ui loader turns an int property given as <enum> into -1: set it here.
        self.ui.segmentsTableView.selectionMode = qt.QAbstractItemView.MultiSelection
        for name in AXIS_NAMES:
            self.ui.axisComboBox.addItem(axisDisplay(name), name)
        self.ui.engineComboBox.addItem(_("This computer"), "local")
        self.ui.engineComboBox.addItem(_("Remote server"), "remote")

        self.logic = SGPSegmentLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollRun)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        slicer.app.connect("aboutToQuit()", self.logic.shutdown)

        self.ui.segmentsTableView.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentsTableView.selectionChanged.connect(self.onSegmentSelectionChanged)
        self.ui.segmentationSelector.currentNodeChanged.connect(self.onInputsChanged)
        self.ui.inputVolumeSelector.currentNodeChanged.connect(self.onInputsChanged)
        self.ui.referenceSegmentationsSelector.checkedNodesChanged.connect(self.onReferencesChanged)
        self.ui.axisComboBox.currentIndexChanged.connect(self.onAxisChanged)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.onDeviceChanged)
        self.ui.engineComboBox.currentIndexChanged.connect(self.onEngineSettingsChanged)
        self.ui.engineUrlLineEdit.editingFinished.connect(self.onEngineSettingsChanged)
        self.ui.engineTokenLineEdit.editingFinished.connect(self.onEngineSettingsChanged)
        self.ui.enginePythonLineEdit.currentPathChanged.connect(self.onEngineSettingsChanged)
        self.ui.connectButton.clicked.connect(self.onConnect)
        self.ui.refreshLabeledSlicesButton.clicked.connect(self.updateLabeledSlices)
        self.ui.runButton.clicked.connect(self.onRunButton)
        self.ui.cancelButton.clicked.connect(self.onCancelButton)
        self.ui.undoButton.clicked.connect(self.onUndoButton)
        self.ui.jumpLeastConfidentButton.clicked.connect(self.onJumpLeastConfident)
        self.ui.installDependenciesButton.clicked.connect(self.onInstallDependencies)
        self.ui.downloadWeightsButton.clicked.connect(self.onDownloadWeights)
        self.ui.importWeightsButton.clicked.connect(self.onImportWeights)
        self.ui.useSupportSetComboBox.currentIndexChanged.connect(self.onUseSupportSetChanged)
        self.ui.supportSetComboBox.currentIndexChanged.connect(self.onSupportSetShown)
        self.ui.saveSupportSetButton.clicked.connect(self.onSaveSupportSet)
        self.ui.renameSupportSetButton.clicked.connect(self.onRenameSupportSet)
        self.ui.deleteSupportSetButton.clicked.connect(self.onDeleteSupportSet)
        self.ui.importSupportSetButton.clicked.connect(self.onImportSupportSet)
        self.ui.exportSupportSetButton.clicked.connect(self.onExportSupportSet)

        self.loadEngineSettings()
        self.populateDevices([])
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setEnabled(False)
        self.initializeParameterNode()
        self.updateSupportSets()
        self.updateDependencyStatus()

    def cleanup(self) -> None:
        if self._run is not None and self.logic is not None:
            self.logic.cancel(self._run)
        if self._task is not None and self.logic is not None:
            self.logic.cancelTask(self._task)
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.stopWatching()
        self.removeObservers()

    def enter(self) -> None:
        if not VERSION_PROBLEM:
            self.logic.refreshSetup()  # weights fetched meanwhile (e.g. with `sgp weights`)
            self.initializeParameterNode()
            self.updateSupportSets()  # sets saved meanwhile (e.g. with `sgp support`)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
            )

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.sceneClosing(self._run)
        self.endRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
            )
            self.updateGUIFromParameterNode()
            self.onInputsChanged()

    # ------------------------------------------------------------------ parameter node <-> GUI

    def populateDevices(self, devices) -> None:
        self.ui.deviceComboBox.clear()
        for device, label in self.logic.deviceChoices(devices):
            self.ui.deviceComboBox.addItem(label, device)

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        pn = self._parameterNode
        if pn is None:
            return
        self.ui.segmentsTableView.setSegmentationNode(pn.segmentation)
        wanted = [s for s in pn.segmentIds.split(",") if s]
        if wanted != list(self.ui.segmentsTableView.selectedSegmentIDs()):
            self.ui.segmentsTableView.setSelectedSegmentIDs(wanted)
        for combo, value in ((self.ui.axisComboBox, pn.axis), (self.ui.deviceComboBox, pn.device)):
            index = combo.findData(value)
            if index >= 0 and index != combo.currentIndex:
                combo.currentIndex = index
        self.syncReferenceCases(self.logic.referenceCaseNodes(pn.parameterNode))
        self.ui.checkpointPathLineEdit.setEnabled(pn.model == "SGP checkpoint")
        self.ui.weightsStatusLabel.text = self.logic.weightsStatusText(pn)
        running = self._run is not None or self._task is not None or self._connecting
        canRun, reason = self.logic.canRun(pn)
        self.ui.runButton.enabled = canRun and not running
        self.ui.runButton.toolTip = reason or _(
            "Segment the selected structures through the volume."
        )
        # Nothing that installs, downloads or changes the engine while a run is going on.
        for widget in (
            self.ui.installDependenciesButton,
            self.ui.downloadWeightsButton,
            self.ui.importWeightsButton,
            self.ui.engineCollapsibleButton,
        ):
            widget.enabled = not running
        self.ui.undoButton.enabled = not running and self.logic.canUndo(pn.segmentation)
        self.ui.jumpLeastConfidentButton.enabled = bool(self.logic.leastConfidentSlices(count=1))
        self.syncSupportSet(pn)

    def syncReferenceCases(self, checked) -> None:
        """Show the parameter node's reference cases checked (e.g. after a scene reload)."""
        selector = self.ui.referenceSegmentationsSelector
        wasBlocked = selector.blockSignals(True)  # partial states must not be written back
        try:
            shown = list(selector.checkedNodes())
            for node in shown:
                if node not in checked:
                    selector.setCheckState(node, qt.Qt.Unchecked)
            for node in checked:
                if node not in shown:
                    selector.setCheckState(node, qt.Qt.Checked)
        finally:
            selector.blockSignals(wasBlocked)

    def onInputsChanged(self, *args) -> None:
        # Read the selectors: the parameter node may not have their new value yet.
        self.logic.watchEdits(
            self.ui.segmentationSelector.currentNode(), self.ui.inputVolumeSelector.currentNode()
        )
        self.updateLabeledSlices()

    def onSegmentSelectionChanged(self, *args) -> None:
        if self._parameterNode:
            self._parameterNode.segmentIds = ",".join(
                self.ui.segmentsTableView.selectedSegmentIDs()
            )
        self.updateLabeledSlices()

    def onReferencesChanged(self) -> None:
        if self._parameterNode:
            nodes = self.ui.referenceSegmentationsSelector.checkedNodes()
            self.logic.setReferenceCases(self._parameterNode.parameterNode, nodes)

    def onAxisChanged(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.axis = self.ui.axisComboBox.itemData(index)
            self.logic.drawingAxis = AXIS_NAMES.index(self._parameterNode.axis)
        self.updateLabeledSlices()

    def onDeviceChanged(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def updateLabeledSlices(self) -> None:
        self.ui.labeledSlicesList.clear()
        if self._parameterNode:
            for line in self.logic.labeledSlicesSummary(self._parameterNode):
                self.ui.labeledSlicesList.addItem(line)

    # ------------------------------------------------------------------ support library

    @staticmethod
    def selectData(combo, value) -> None:
        """Show the item whose data is ``value`` (signals blocked: it is not a user choice)."""
        for index in range(combo.count):
            if (combo.itemData(index) or "") == (value or ""):
                wasBlocked = combo.blockSignals(True)
                combo.currentIndex = index
                combo.blockSignals(wasBlocked)
                return

    def updateSupportSets(self, show=None) -> None:
        """List the saved sets again (after a change, on entering the module)."""
        if self._parameterNode is None:
            return
        chosen = self.logic.supportSetName(self._parameterNode.parameterNode)
        shown = show if show is not None else self.ui.supportSetComboBox.currentData
        use, saved = self.ui.useSupportSetComboBox, self.ui.supportSetComboBox
        try:
            lists = [(use, self.logic.supportSetChoices(chosen))]
            lists.append((saved, self.logic.supportSetChoices()[1:]))
            self.ui.supportLibraryFolderLabel.text = _(
                "Folder: {root}"
            ).format(root=self.logic.supportLibrary().root)
        except Exception as exc:  # e.g. an unreadable folder: said in the panel, not raised
            lists = [(use, [("", "None")] + ([(chosen, chosen)] if chosen else [])), (saved, [])]
            self.ui.supportLibraryFolderLabel.text = str(exc)
        for combo, choices in lists:
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            for name, label in choices:
                combo.addItem(label, name)
            combo.blockSignals(wasBlocked)
        self.selectData(use, chosen)
        self.selectData(saved, shown or chosen)
        self.onSupportSetShown()

    def syncSupportSet(self, pn) -> None:
        """Show the parameter node's set as the one used (e.g. after a scene load)."""
        chosen = self.logic.supportSetName(pn.parameterNode)
        if chosen != (self.ui.useSupportSetComboBox.currentData or ""):
            self.updateSupportSets()
        self.ui.supportLibraryCollapsibleButton.text = self.logic.supportLibraryTitle(pn)
        self.ui.saveSupportSetButton.enabled = bool(pn.inputVolume and pn.segmentation)

    def onUseSupportSetChanged(self, index) -> None:
        if self._parameterNode and index >= 0:
            name = self.ui.useSupportSetComboBox.itemData(index) or ""
            self.logic.setSupportSet(self._parameterNode.parameterNode, name)

    def onSupportSetShown(self, *args) -> None:
        name = self.ui.supportSetComboBox.currentData or ""
        self.ui.supportSetDetailsLabel.text = self.logic.supportSetDetails(name)
        for button in (
            self.ui.renameSupportSetButton,
            self.ui.deleteSupportSetButton,
            self.ui.exportSupportSetButton,
        ):
            button.enabled = bool(name)

    def onSaveSupportSet(self) -> None:
        name = qt.QInputDialog.getText(
            self.parent, _("Save support set"), _("Name of the support set (e.g. liver CT):")
        )
        if not name:
            return
        with self.errorsShown(_("The support set was not saved."), waitCursor=True):
            summary = self.logic.saveSupportSetFromParameterNode(
                self._parameterNode, name, confirm=self.confirmYesNo
            )
            if summary is not None:
                self.updateSupportSets(show=summary.name)
                slicer.util.showStatusMessage(_(
                    "Saved support set '{name}'."
                ).format(name=summary.name), 5000)

    def onRenameSupportSet(self) -> None:
        name = self.ui.supportSetComboBox.currentData
        newName = qt.QInputDialog.getText(
            self.parent,
            _("Rename support set"),
            _("New name for '{name}':").format(name=name),
            qt.QLineEdit.Normal,
            name,
        )
        if not name or not newName or newName == name:
            return
        with self.errorsShown(_("The support set was not renamed."), waitCursor=True):
            newName = self.logic.renameSupportSet(name, newName, self._parameterNode.parameterNode)
            self.updateSupportSets(show=newName)

    def onDeleteSupportSet(self) -> None:
        name = self.ui.supportSetComboBox.currentData
        with self.errorsShown(_("The support set was not deleted."), waitCursor=True):
            if name and self.logic.deleteSupportSet(
                name, self._parameterNode.parameterNode, confirm=self.confirmYesNo
            ):
                self.updateSupportSets(show="")

    def onImportSupportSet(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Import support set"), "", _("Support set (*.zip)")
        )
        if not path:
            return
        name = qt.QInputDialog.getText(
            self.parent,
            _("Import support set"),
            _("Name in the library:"),
            qt.QLineEdit.Normal,
            pathlib.Path(path).stem,
        )
        if not name:
            return
        with self.errorsShown(_("The support set was not imported."), waitCursor=True):
            summary = self.logic.importSupportSet(
                path, name, confirm=self.confirmYesNo
            )
            if summary is not None:
                self.updateSupportSets(show=summary.name)

    def onExportSupportSet(self) -> None:
        name = self.ui.supportSetComboBox.currentData
        path = qt.QFileDialog.getSaveFileName(
            self.parent, _("Export support set"), f"{name}.zip", _("Zip file (*.zip)")
        )
        if not name or not path:
            return
        # The file dialog asked before replacing the file it returns; not one with .zip added.
        overwrite = path.lower().endswith(".zip")
        path = path if overwrite else path + ".zip"
        with self.errorsShown(_("The support set was not exported."), waitCursor=True):
            out = self.logic.exportSupportSet(name, path, overwrite=overwrite)
            slicer.util.showStatusMessage(_(
                "Exported support set '{name}' to {out}."
            ).format(name=name, out=out), 5000)

    # --------------------------------------------------------------------------- engine

    def loadEngineSettings(self) -> None:
        settings = qt.QSettings()
        index = self.ui.engineComboBox.findData(settings.value("SGPSegment/engine", "local"))
        self.ui.engineComboBox.currentIndex = max(index, 0)
        self.ui.engineUrlLineEdit.text = settings.value("SGPSegment/engineUrl", "")
        self.ui.enginePythonLineEdit.currentPath = settings.value("SGPSegment/enginePython", "")
        self.onEngineSettingsChanged()

    def onEngineSettingsChanged(self, *args) -> None:
        mode = self.ui.engineComboBox.currentData or "local"
        remote = mode == "remote"
        for widget in (self.ui.engineUrlLineEdit, self.ui.engineTokenLineEdit):
            widget.enabled = remote
        self.ui.enginePythonLineEdit.enabled = not remote
        settings = qt.QSettings()  # the token is never saved: it stays in memory only
        settings.setValue("SGPSegment/engine", mode)
        settings.setValue("SGPSegment/engineUrl", self.ui.engineUrlLineEdit.text)
        settings.setValue("SGPSegment/enginePython", self.ui.enginePythonLineEdit.currentPath)
        self.logic.engine.configure(
            mode,
            self.ui.engineUrlLineEdit.text,
            self.ui.engineTokenLineEdit.text,
            self.ui.enginePythonLineEdit.currentPath,
        )
        self.updateDependencyStatus()

    def onConnect(self) -> None:
        """Connect (a local engine is started first: the timer polls it, nothing waits)."""
        self.ui.engineStatusLabel.text = _("Connecting...")
        self._connecting = True
        self.updateGUIFromParameterNode()
        self.pollConnection()
        if self._connecting:
            self._timer.start()

    def pollConnection(self) -> None:
        answer = None
        with self.errorsShown(_("Could not reach the engine.")):
            try:
                answer = self.logic.pollConnection(self._parameterNode)
            except Exception:
                self._connecting = False
                raise
        if answer is None and self._connecting:  # the local engine is starting
            self.showProgress(_("starting engine"), None, self.logic.engine.lastLogLine())
            return
        self._connecting = False
        self.endRun()
        if answer is None:
            self.ui.engineStatusLabel.text = _("Not connected.")
            return
        text, devices = answer
        self.ui.engineStatusLabel.text = text
        self.populateDevices(devices)
        self.updateGUIFromParameterNode()

    # ------------------------------------------------------------------------------ run

    def onRunButton(self) -> None:
        pn = self._parameterNode
        with self.errorsShown(_("Could not start SGP segmentation.")):
            ready = self.logic.ensureReady(pn, confirm=self.confirmOkCancel)
            if ready is not True:
                if ready:  # installing packages or downloading weights first, then the run
                    self.startTask(ready, then=self.onRunButton)
                return
            with self.errorsShown(_("Could not start SGP segmentation."), waitCursor=True):
                self._run = self.logic.startRunFromParameterNode(pn)
        if self._run is None:
            return
        self._worstIndex = 0
        self.ui.notesLabel.text = "\n".join(self._run.request.notes)
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        self.ui.cancelButton.setEnabled(True)
        self.updateGUIFromParameterNode()
        self._timer.start()

    def showProgress(self, stage, fraction, line="") -> None:
        """The progress bar (busy when ``fraction`` is None) and the last output line."""
        bar = self.ui.progressBar
        bar.setVisible(True)
        if fraction is None:
            bar.setRange(0, 0)
        else:
            bar.setRange(0, 100)
            bar.value = int(round(100 * fraction))
        bar.format = f"{stage}: %p%"
        bar.toolTip = stage
        self.ui.taskOutputLabel.text = line

    def onPollRun(self) -> None:
        """The timer: the install or download, the connection, or the run in progress."""
        if self._task is not None:
            self.pollTask()
            return
        if self._connecting:
            self.pollConnection()
            return
        run = self._run
        if run is None:
            self._timer.stop()
            return
        try:
            self.logic.poll(run)
        except Exception as exc:  # shown to the user; the segmentation was not touched
            self.endRun()
            slicer.util.errorDisplay(_(
                "SGP segmentation failed; nothing was written.\n\n{exc}"
            ).format(exc=exc))
            return
        self.showProgress(*self.logic.progressOf(run))
        if not run.done():
            return
        self.endRun()
        slicer.util.showStatusMessage(self.logic.finishMessage(run), 5000)
        if run.state == "done":
            self.logic.showResultViews(run)
            self.ui.scoresTableView.setMRMLTableNode(
                self.logic.scoresTableNode(self._parameterNode.segmentation)
            )
        self.updateLabeledSlices()

    def endRun(self) -> None:
        self._run = None
        if self._task is None and not self._connecting:  # else the timer still polls those
            if self._timer is not None:
                self._timer.stop()
            self.ui.cancelButton.setEnabled(False)
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setVisible(False)
            self.ui.taskOutputLabel.text = ""
        self.updateGUIFromParameterNode()

    def onCancelButton(self) -> None:
        if self._task is not None:
            self.logic.cancelTask(self._task)
            self.pollTask()
            return
        if self._run is not None:
            self.logic.cancel(self._run)
            slicer.util.showStatusMessage(
                _("SGP segmentation cancelled; nothing was written."), 5000
            )
            self.endRun()

    def onUndoButton(self) -> None:
        pn = self._parameterNode
        with self.errorsShown(_("Undo was not done."), waitCursor=True):
            self.logic.undoLastRun(pn.segmentation, pn.inputVolume)
        self.updateLabeledSlices()
        self.updateGUIFromParameterNode()

    def onJumpLeastConfident(self) -> None:
        with self.errorsShown(_("Could not jump to the slice.")):
            self.ui.leastConfidentLabel.text = self.logic.jumpToLeastConfident(
                self._parameterNode, self._worstIndex
            )
            self._worstIndex += 1

    # ---------------------------------------------------------------- dependencies, weights

    def updateDependencyStatus(self) -> None:
        if self._parameterNode is not None:
            self.ui.dependenciesLabel.text = self.logic.dependencyStatus(self._parameterNode)

    def onInstallDependencies(self) -> None:
        with self.errorsShown(_("Installing Python packages failed.")):
            task = self.logic.ensureDependencies(self._parameterNode, confirm=self.confirmOkCancel)
            if task not in (True, False):
                self.startTask(task)
        self.updateDependencyStatus()
        self.updateGUIFromParameterNode()

    def onDownloadWeights(self) -> None:
        with self.errorsShown(_("Downloading weights failed.")):
            self.startTask(self.logic.downloadWeights(self._parameterNode.model))
        self.updateGUIFromParameterNode()

    def onImportWeights(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("SAM2.1 checkpoint"), "", _("PyTorch checkpoint (*.pt)")
        )
        if not path:
            return
        with self.errorsShown(_("The checkpoint could not be used.")):
            self.startTask(self.logic.importWeights(self._parameterNode.model, path))
        self.updateGUIFromParameterNode()

    def startTask(self, task, then=None) -> None:
        """Show an install or download the Logic started, poll it, offer Cancel; ``then`` runs
        when it ends well (e.g. the run that needed it)."""
        self._task, self._afterTask = task, then
        self.ui.cancelButton.setEnabled(True)
        self.showProgress(*self.logic.progressOf(task))
        self.updateGUIFromParameterNode()
        self._timer.start()

    def pollTask(self) -> None:
        task = self.logic.pollTask(self._task)
        self.showProgress(*self.logic.progressOf(task))
        if not task.done():
            return
        then, self._task, self._afterTask = self._afterTask, None, None
        self.endRun()
        message = self.logic.taskMessage(task)
        if task.state == "failed":
            slicer.util.errorDisplay(message)
        else:
            slicer.util.showStatusMessage(message, 8000)
        self.updateDependencyStatus()
        self.updateGUIFromParameterNode()
        if task.state == "done" and then is not None:
            then()

    # ------------------------------------------------------------------------- helpers

    @contextlib.contextmanager
    def errorsShown(self, message, waitCursor=False):
        """``slicer.util.tryWithErrorDisplay``, which shows the error and raises it again: here
        it ends at the display, so that what follows the block (status updates) still runs."""
        try:
            with slicer.util.tryWithErrorDisplay(message, waitCursor=waitCursor):
                yield
        except Exception as exc:  # shown to the user; in testing mode only logged, here
            logging.info(f"{message} {exc}")

    @staticmethod
    def _asked(ask, message) -> bool:
        # The normal cursor over the question, even inside a wait-cursor block.
        slicer.app.setOverrideCursor(qt.QCursor(qt.Qt.ArrowCursor))
        try:
            return bool(ask(message))
        finally:
            slicer.app.restoreOverrideCursor()

    def confirmOkCancel(self, message) -> bool:
        return self._asked(slicer.util.confirmOkCancelDisplay, message)

    def confirmYesNo(self, message) -> bool:
        return self._asked(slicer.util.confirmYesNoDisplay, message)


class SGPSegmentLogic(ScriptedLoadableModuleLogic, SGPSegmentCoreLogic):
    """The module's Logic: Slicer's parameter node (``ScriptedLoadableModuleLogic``) and the
    Qt-free Logic of ``SGPSegmentLib``, which holds the role objects (``engine``, ``setup``,
    ``drawing``, ``runs``, ``supportSets``, ``actions``) that do the work.

    Usable from the Python console, e.g.::

        logic = slicer.util.getModuleLogic("SGPSegment")
        logic.run(volumeNode, segmentationNode, ["Segment_1"], model="tiny", device="cuda:0")
    """

    def __init__(self) -> None:
        # Cooperative: ScriptedLoadableModuleLogic.__init__ calls SGPSegmentCoreLogic.__init__.
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SGPSegmentParameterNode(super().getParameterNode())

    def showResultViews(self, run) -> None:
        """Show the confidence plot (if any) in the layout."""
        segmentationNode = slicer.mrmlScene.GetNodeByID(run.request.segmentationNodeID)
        chart = (
            segmentationNode.GetNodeReference("SGPSliceScoresChart") if segmentationNode else None
        )
        if chart is not None and hasattr(slicer.modules, "plots"):
            slicer.modules.plots.logic().ShowChartInLayout(chart)


class SGPSegmentTest(ScriptedLoadableModuleTest):
    """Self-test: a generated volume, two labeled slices, a run through the local engine on CPU
    with small random weights. Offline; never installs anything: without the engine's Python
    packages it says so and skips the run."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        if VERSION_PROBLEM:
            self.delayDisplay("Skipped: " + VERSION_PROBLEM)
            return
        self.test_SGPSegment_random_weights_cpu()

    def test_SGPSegment_random_weights_cpu(self):
        import numpy as np

        self.delayDisplay("Generating a volume with a labeled structure")
        shape = (6, 64, 64)
        k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
        blob = ((j - 30 - k) ** 2 + (i - 28) ** 2) < 12**2
        rng = np.random.default_rng(0)
        image = (rng.normal(100, 10, shape) + 150 * blob).astype(np.float32)
        volume = slicer.util.addVolumeFromArray(image, name="SGPSegmentTest volume")
        volume.SetSpacing(0.8, 0.8, 2.5)
        segmentation = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", "SGPSegmentTest segmentation"
        )
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", "blob")
        drawn = np.zeros(shape, np.uint8)
        drawn[[1, 4]] = blob[[1, 4]]
        slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, segmentId, volume)

        logic = SGPSegmentLogic()
        self.assertEqual(logic.labeledSlices(volume, segmentation, [segmentId])[0].slices, [1, 4])
        problems = logic.dependencyProblems("tiny")
        if problems:
            self.delayDisplay(
                "Skipped the run: the engine's Python packages are not installed ("
                + "; ".join(problems)
                + "). Install them from the module's Setup section."
            )
            return

        self.delayDisplay("Running the local engine on CPU with random weights")
        try:
            report = logic.run(
                volume,
                segmentation,
                [segmentId],
                model="tiny",
                weights="random",
                device="cpu",
                imageSize=256,
                keepPseudoMasks=True,
            )
            result = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
            np.testing.assert_array_equal(result[[1, 4]], drawn[[1, 4]])
            self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(report.tableNodeID))
            self.assertTrue(logic.canUndo(segmentation))
            logic.undoLastRun(segmentation, volume)
            np.testing.assert_array_equal(
                slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume), drawn
            )
        finally:
            logic.shutdown()
        self.delayDisplay("Test passed")


__all__ = [
    "SGPSegment",
    "SGPSegmentLogic",
    "SGPSegmentParameterNode",
    "SGPSegmentTest",
    "SGPSegmentWidget",
]
