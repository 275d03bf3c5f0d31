"""SGPSegment: few-shot segmentation of a volume from a few labeled slices (SAM2 + SGP).

Module (description), parameter node, Widget (wiring only), Logic and Test, as in Slicer's
scripted-module template. All behaviour lives in the Logic; its Qt-free part is
``SGPSegmentLib.logic.SGPSegmentCoreLogic`` so that it runs (and is tested) with the
``slicer-core`` wheel too. This file needs the Slicer application (Qt, CTK, the parameter node
wrapper); heavy dependencies (torch, sam2, the engine) are imported only when a run needs them.
"""

import logging
import pathlib
from typing import Annotated

import qt
import slicer
import vtk
from SGPSegmentLib.logic import (
    AXIS_NAMES,
    IMAGE_SIZES,
    INTENSITY_MODES,
    MODEL_SIZES,
    SGPSegmentCoreLogic,
)
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#
# SGPSegment
#


class SGPSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SGP Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["SlicerSGP developers"]
        self.parent.helpText = """
Segment structures through a whole volume from a few slices you labeled, with SAM2 and
support-set guided prompting (SAM2-SGP).
<ol>
<li>Select the volume and the segmentation; draw each structure on a few slices in the
Segment Editor (a slice you draw on counts as fully labeled: structures not drawn there are
taken as absent).</li>
<li>Select the segments to segment. The labeled slices are listed; optionally add reference
cases (other volumes with segmentations in the scene).</li>
<li>Choose the slice axis, the model (SAM2.1 size or a trained SGP checkpoint), the device and
the input size, and click Run. Correct any slice and Run again: corrected slices become support
and the run is much faster (the image embeddings are cached).</li>
</ol>
Per-slice confidence is shown in a table and a plot; "Next least confident slice" jumps the
views there. Results can be undone.
"""
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = """
Implements support-set guided prompting for SAM2 (SAM2-SGP) on top of Meta's Segment Anything 2
(Apache-2.0). Uses PyTorch through the PyTorch extension.
"""


#
# Parameter node
#


@parameterNodeWrapper
class SGPSegmentParameterNode:
    """What the user chose. Segment and reference-case selections and the device are kept as
    strings because their widgets have no parameter-node connector."""

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentIds: str = ""
    """Comma-separated IDs of the selected segments."""
    referenceSegmentationIds: str = ""
    """Comma-separated node IDs of reference segmentations (their reference volume is used)."""
    axis: Annotated[str, Choice(list(AXIS_NAMES))] = "K"
    model: Annotated[str, Choice([*MODEL_SIZES, "SGP checkpoint"])] = "tiny"
    checkpointPath: pathlib.Path = pathlib.Path()
    device: str = "auto"
    imageSize: Annotated[int, Choice(list(IMAGE_SIZES))] = 1024
    topK: Annotated[int, WithinRange(1, 16)] = 4
    intensity: Annotated[str, Choice(list(INTENSITY_MODES))] = "auto"
    keepPseudoMasks: bool = False


#
# SGPSegmentWidget
#


class SGPSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the .ui to the Logic; no behaviour of its own."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None
        self._worstIndex = 0

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SGPSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SGPSegmentLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onPollRun)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentsTableView.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentsTableView.selectionChanged.connect(self.onSegmentSelectionChanged)
        self.ui.segmentationSelector.currentNodeChanged.connect(self.onSegmentationChanged)
        self.ui.referenceSegmentationsSelector.checkedNodesChanged.connect(self.onReferencesChanged)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.onDeviceChanged)
        self.ui.refreshLabeledSlicesButton.clicked.connect(self.updateLabeledSlices)
        self.ui.runButton.clicked.connect(self.onRunButton)
        self.ui.cancelButton.clicked.connect(self.onCancelButton)
        self.ui.undoButton.clicked.connect(self.onUndoButton)
        self.ui.jumpLeastConfidentButton.clicked.connect(self.onJumpLeastConfident)
        self.ui.installDependenciesButton.clicked.connect(self.onInstallDependencies)
        self.ui.downloadWeightsButton.clicked.connect(self.onDownloadWeights)
        self.ui.importWeightsButton.clicked.connect(self.onImportWeights)

        self.populateDevices()
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setEnabled(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    # ---------------------------------------------------------------- parameter node <-> GUI

    def populateDevices(self) -> None:
        self.ui.deviceComboBox.clear()
        for device, label in self.logic.availableDevices():
            self.ui.deviceComboBox.addItem(label, device)

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        pn = self._parameterNode
        if pn is None:
            return
        self.ui.segmentsTableView.setSegmentationNode(pn.segmentation)
        wanted = [s for s in pn.segmentIds.split(",") if s]
        if wanted != list(self.ui.segmentsTableView.selectedSegmentIDs()):
            self.ui.segmentsTableView.setSelectedSegmentIDs(wanted)
        index = self.ui.deviceComboBox.findData(pn.device)
        if index >= 0 and index != self.ui.deviceComboBox.currentIndex:
            self.ui.deviceComboBox.currentIndex = index
        self.ui.checkpointPathLineEdit.setEnabled(pn.model == "SGP checkpoint")
        warning = self.logic.deviceWarning(pn.device)
        self.ui.deviceWarningLabel.text = warning
        self.ui.deviceWarningLabel.setVisible(bool(warning))
        self.ui.dependenciesLabel.text = self.logic.dependencyStatus()
        self.ui.weightsStatusLabel.text = self.logic.weightsStatusText(pn)
        running = self._job is not None
        canRun, reason = self.logic.canRun(pn)
        self.ui.runButton.enabled = canRun and not running
        self.ui.runButton.toolTip = reason or "Segment the selected structures through the volume."
        self.ui.undoButton.enabled = not running and self.logic.canUndo(pn.segmentation)
        self.ui.jumpLeastConfidentButton.enabled = bool(self.logic.leastConfidentSlices(count=1))

    def onSegmentationChanged(self, node) -> None:
        self.updateLabeledSlices()

    def onSegmentSelectionChanged(self, *args) -> None:
        if self._parameterNode:
            self._parameterNode.segmentIds = ",".join(self.ui.segmentsTableView.selectedSegmentIDs())
        self.updateLabeledSlices()

    def onReferencesChanged(self) -> None:
        if self._parameterNode:
            nodes = self.ui.referenceSegmentationsSelector.checkedNodes()
            self._parameterNode.referenceSegmentationIds = ",".join(n.GetID() for n in nodes)

    def onDeviceChanged(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def updateLabeledSlices(self) -> None:
        self.ui.labeledSlicesList.clear()
        if self._parameterNode:
            for line in self.logic.labeledSlicesSummary(self._parameterNode):
                self.ui.labeledSlicesList.addItem(line)

    # ------------------------------------------------------------------------------- run

    def onRunButton(self) -> None:
        pn = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start SGP segmentation.", waitCursor=True):
            if not self.logic.ensureDependencies(confirm=slicer.util.confirmOkCancelDisplay):
                return
            if not self.logic.ensureWeightsForRun(pn, confirm=slicer.util.confirmOkCancelDisplay, progress=self.onProgress):
                return
            self._job = self.logic.startRunFromParameterNode(pn)
        if self._job is None:
            return
        self._worstIndex = 0
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        self.ui.cancelButton.setEnabled(True)
        self.updateGUIFromParameterNode()
        self._timer.start()

    def onProgress(self, stage: str, fraction: float) -> None:
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.format = f"{stage}: %p%"
        self.ui.progressBar.value = int(round(100 * fraction))
        slicer.app.processEvents()

    def onPollRun(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        self.ui.progressBar.format = f"{job.stage}: %p%"
        self.ui.progressBar.value = int(round(100 * job.fraction))
        if not job.done():
            return
        self._timer.stop()
        self._job = None
        self.ui.cancelButton.setEnabled(False)
        self.ui.progressBar.setVisible(False)
        with slicer.util.tryWithErrorDisplay("SGP segmentation failed; nothing was written.", waitCursor=True):
            message = self.logic.finishRun(job)
            if message:
                slicer.util.showStatusMessage(message, 5000)
                self.logic.showResultViews(job.request)
        self.ui.scoresTableView.setMRMLTableNode(self.logic.scoresTableNode(self._parameterNode.segmentation))
        self.updateLabeledSlices()
        self.updateGUIFromParameterNode()

    def onCancelButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.progressBar.format = "cancelling..."

    def onUndoButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Undo failed.", waitCursor=True):
            self.logic.undoLastRun(self._parameterNode.segmentation)
        self.updateLabeledSlices()
        self.updateGUIFromParameterNode()

    def onJumpLeastConfident(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not jump to the slice."):
            text = self.logic.jumpToLeastConfident(self._parameterNode, self._worstIndex)
            self.ui.leastConfidentLabel.text = text
            self._worstIndex += 1

    # ---------------------------------------------------------------- dependencies, weights

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay("Installing dependencies failed.", waitCursor=True):
            self.logic.ensureDependencies(confirm=slicer.util.confirmOkCancelDisplay)
        self.updateGUIFromParameterNode()

    def onDownloadWeights(self) -> None:
        with slicer.util.tryWithErrorDisplay("Downloading weights failed.", waitCursor=True):
            self.logic.downloadWeights(self._parameterNode.model, progress=self.onProgress)
        self.ui.progressBar.setVisible(False)
        self.updateGUIFromParameterNode()

    def onImportWeights(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, "SAM2.1 checkpoint", "", "PyTorch checkpoint (*.pt)"
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("The checkpoint could not be used.", waitCursor=True):
            self.logic.importWeights(self._parameterNode.model, path, progress=self.onProgress)
        self.ui.progressBar.setVisible(False)
        self.updateGUIFromParameterNode()


#
# SGPSegmentLogic
#


class SGPSegmentLogic(ScriptedLoadableModuleLogic, SGPSegmentCoreLogic):
    """The module's Logic: SGPSegmentCoreLogic's behaviour plus the parameter node.

    Usable from the Python console, e.g.::

        logic = slicer.util.getModuleLogic("SGPSegment")
        logic.run(volumeNode, segmentationNode, ["Segment_1"], model="tiny", device="cuda:0")
    """

    def __init__(self) -> None:
        # Cooperative: ScriptedLoadableModuleLogic.__init__ calls SGPSegmentCoreLogic.__init__.
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SGPSegmentParameterNode(super().getParameterNode())

    # The parameter node as arguments of the core logic.

    @staticmethod
    def _ids(text: str) -> list[str]:
        return [s for s in (text or "").split(",") if s]

    def referenceCasesFromParameterNode(self, pn) -> list:
        cases = []
        for nodeId in self._ids(pn.referenceSegmentationIds):
            segmentationNode = slicer.mrmlScene.GetNodeByID(nodeId)
            if segmentationNode is None or segmentationNode is pn.segmentation:
                continue
            cases.append((self.referenceVolumeForSegmentation(segmentationNode), segmentationNode))
        return cases

    def modelArgument(self, pn) -> str:
        if pn.model == "SGP checkpoint":
            return str(pn.checkpointPath)
        return pn.model

    def canRun(self, pn) -> tuple[bool, str]:
        if not pn.inputVolume:
            return False, "Select an input volume."
        if not pn.segmentation:
            return False, "Select a segmentation."
        if not self._ids(pn.segmentIds):
            return False, "Select at least one segment."
        if pn.model == "SGP checkpoint" and not pathlib.Path(pn.checkpointPath).is_file():
            return False, "Choose the trained SGP checkpoint (.safetensors) file."
        return True, ""

    def labeledSlicesSummary(self, pn) -> list[str]:
        if not (pn.inputVolume and pn.segmentation and self._ids(pn.segmentIds)):
            return []
        try:
            found = self.labeledSlices(pn.inputVolume, pn.segmentation, self._ids(pn.segmentIds), pn.axis)
        except Exception as exc:  # shown in the list, not raised, while the user is choosing
            return [str(exc)]
        return [item.describe() for item in found]

    def dependencyStatus(self) -> str:
        missing = self.missingDependencies()
        return "All Python packages installed." if not missing else f"Missing: {', '.join(missing)}"

    def weightsStatusText(self, pn) -> str:
        if pn.model == "SGP checkpoint":
            return "Trained SGP checkpoint (its base SAM2.1 weights must be in the cache)."
        try:
            status = self.weightsStatus(pn.model)
        except ImportError:  # the engine's packages are not installed yet
            return "Weights: unknown until the Python packages are installed."
        return {"cached": "Weights: in the cache.", "missing": "Weights: not downloaded yet."}.get(status, status)

    def scoresTableNode(self, segmentationNode):
        return segmentationNode.GetNodeReference("SGPSliceScores") if segmentationNode else None

    def ensureWeightsForRun(self, pn, confirm, progress=None) -> bool:
        if pn.model == "SGP checkpoint" or self.weightsStatus(pn.model) == "cached":
            return True
        if not confirm(
            f"The SAM2.1 '{pn.model}' weights are not downloaded yet. Download them now into "
            "the cache (checksum verified)? On an offline machine use 'Use local file...' instead."
        ):
            return False
        self.downloadWeights(pn.model, progress=progress)
        return True

    def startRunFromParameterNode(self, pn):
        request = self.prepareRun(
            pn.inputVolume,
            pn.segmentation,
            self._ids(pn.segmentIds),
            axis=pn.axis,
            referenceCases=self.referenceCasesFromParameterNode(pn),
            model=self.modelArgument(pn),
            weights=None,
            device=pn.device,
            imageSize=pn.imageSize,
            keepPseudoMasks=pn.keepPseudoMasks,
            top_k=pn.topK,
            intensity=pn.intensity,
        )
        return self.startRun(request)

    def finishRun(self, job) -> str:
        """Apply a finished job's result (main thread); returns a status message."""
        if job.cancelled:
            return "SGP segmentation cancelled; nothing was written."
        if job.error is not None:
            raise job.error
        report = self.applyResult(job.request, job.result)
        seconds = report.timings.get("total", 0.0)
        logging.info(f"SGPSegment: wrote {len(report.segmentIds)} segment(s) in {seconds:.1f} s")
        return f"SGP segmentation done in {seconds:.1f} s."

    def showResultViews(self, request) -> None:
        """Show the confidence plot (if any) in the layout."""
        segmentationNode = slicer.mrmlScene.GetNodeByID(request.segmentationNodeID)
        chart = segmentationNode.GetNodeReference("SGPSliceScoresChart") if segmentationNode else None
        if chart is not None and hasattr(slicer.modules, "plots"):
            slicer.modules.plots.logic().ShowChartInLayout(chart)

    def jumpToLeastConfident(self, pn, index: int) -> str:
        worst = self.leastConfidentSlices(count=index + 1)
        if not worst:
            return "No predicted slice to review."
        value, name, sliceIndex, confidence = worst[min(index, len(worst) - 1)]
        self.jumpToSlice(pn.inputVolume, pn.axis, sliceIndex)
        return f"{name}: slice {sliceIndex} (confidence {confidence:.2f})"


#
# SGPSegmentTest
#


class SGPSegmentTest(ScriptedLoadableModuleTest):
    """Self-test: a generated volume, two labeled slices, a run on CPU with small random weights."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
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
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SGPSegmentTest segmentation")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", "blob")
        drawn = np.zeros(shape, np.uint8)
        drawn[[1, 4]] = blob[[1, 4]]
        slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, segmentId, volume)

        logic = SGPSegmentLogic()
        self.assertEqual(logic.labeledSlices(volume, segmentation, [segmentId])[0].slices, [1, 4])
        if not logic.ensureDependencies(confirm=slicer.util.confirmOkCancelDisplay):
            self.delayDisplay("Dependencies not installed; skipping the run")
            return

        self.delayDisplay("Running on CPU with random weights")
        report = logic.run(
            volume, segmentation, [segmentId],
            model="tiny", weights="random", device="cpu", imageSize=256, keepPseudoMasks=True,
        )  # fmt: skip
        result = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        np.testing.assert_array_equal(result[[1, 4]], drawn[[1, 4]])
        self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(report.tableNodeID))
        self.assertTrue(logic.canUndo(segmentation))
        self.assertTrue(logic.undoLastRun(segmentation))
        np.testing.assert_array_equal(
            slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume), drawn
        )
        self.delayDisplay("Test passed")


__all__ = [
    "SGPSegment",
    "SGPSegmentLogic",
    "SGPSegmentParameterNode",
    "SGPSegmentTest",
    "SGPSegmentWidget",
]
