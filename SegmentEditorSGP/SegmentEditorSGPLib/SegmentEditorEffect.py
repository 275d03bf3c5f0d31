"""The "SGP" Segment Editor effect: propagate the slices you drew through the volume.

Draw a structure on a few slices with any effect, choose SGP, press Preview: the result shows
as a preview (your segments unchanged), updates about a second after you draw more, takes
click corrections (left click adds, Shift + left click removes), and Apply writes it with
the editor's undo; Cancel removes it.

Thin by design: every decision is in ``SGPSegmentLib.preview.PreviewLogic`` (Qt-free, tested
with slicer-core and a real engine). This file is the effect's interface to the editor
(name, icon, help, parameters, clicks in slice views); ``SegmentEditorSGPWidgets.panel``
wires its options panel.

Slicer loads this file as a module named after its folder (``SegmentEditorSGPLib``), not as
part of a package: it imports nothing relative to its folder, only installed top-level packages
(``SGPSegmentLib``, ``SegmentEditorSGPWidgets``).
Engine, model and device are the SGP Segment module's settings (one place). Nothing heavy is
imported at module level, and the file parses as Python 3.9 so that an old Slicer shows the
"needs Slicer 5.10" message instead of failing.
"""

import os

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect
from SGPSegmentLib.constants import slicerVersionProblem

HERE = os.path.dirname(os.path.abspath(__file__))


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """The effect as the Segment Editor sees it (see the module docstring)."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "SGP"  # not translated: modules find effects by name
        scriptedEffect.perSegment = True  # the selected segment: default choice, click target
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.versionProblem = slicerVersionProblem(slicer.app.majorVersion, slicer.app.minorVersion)
        self.panel = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(HERE, "..", "Resources", "Icons", "SegmentEditorSGP.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return (
            "<html>Fill the volume from a few drawn slices with SAM2-SGP.<p>Draw the structure "
            "on some slices (any effect, one orientation), choose the segments, press "
            "<b>Preview</b>. Draw more, or click on a wrong slice of the preview (left: add, "
            "Shift+left: remove), and it updates. <b>Apply</b> writes it (Undo takes it back); "
            "<b>Cancel</b> removes it. Engine and model: SGP Segment module.</html>"
        )

    def setupOptionsFrame(self):
        if self.versionProblem:
            label = qt.QLabel(self.versionProblem)
            label.wordWrap = True
            self.scriptedEffect.addOptionsWidget(label)
            return
        # Imported here: the Lib needs Python >= 3.10 (Slicer 5.10).
        from SegmentEditorSGPWidgets.panel import PreviewPanel
        from SGPSegmentLib.preview import PreviewLogic

        moduleLogic = slicer.util.getModuleLogic("SGPSegment")  # shared engine and settings
        self.panel = PreviewPanel(self.scriptedEffect, PreviewLogic(moduleLogic), moduleLogic)
        self.panel.setup(os.path.join(HERE, "..", "Resources", "UI", "SegmentEditorSGP.ui"))

    def cleanup(self):
        if self.panel is not None:
            self.panel.cleanup()  # disconnect timers so the effect can be deleted (Slicer #7392)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("SGPAutoUpdate", "1")

    def updateGUIFromMRML(self):
        if self.panel is not None:
            self.panel.updateGUI()

    def updateMRMLFromGUI(self):
        if self.panel is not None:
            self.panel.updateMRML()

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        """Left click on a slice view with a preview shown: correct that slice (Shift: remove).
        Other events (and Ctrl/Alt clicks) go on to the view."""
        panel = self.panel
        if (
            panel is None
            or not panel.hasPreview()
            or eventId != vtk.vtkCommand.LeftButtonPressEvent
            or viewWidget.className() != "qMRMLSliceWidget"
            or callerInteractor.GetControlKey()
            or callerInteractor.GetAltKey()
        ):
            return False
        ras = self.xyToRas(callerInteractor.GetEventPosition(), viewWidget)
        sliceToRAS = slicer.util.arrayFromVTKMatrix(viewWidget.mrmlSliceNode().GetSliceToRAS())
        inPlane = (sliceToRAS[:3, 0], sliceToRAS[:3, 1])
        panel.click(ras, not callerInteractor.GetShiftKey(), inPlane)
        return True
