"""The "SGP" Segment Editor effect: propagate the slices you drew through the volume.

Start a structure with a box (drag on one slice) or a click, or draw it on a few slices with
any effect and press Preview: the result shows as a preview (your segments unchanged), updates
about a second after you draw more, takes clicks (left adds, Shift + left or right click
removes) and scribbles (a left stroke adds, a Shift stroke removes), and Apply writes it with
the editor's undo; Cancel removes it. Keys over a slice view: X box / click, S scribble.

Thin by design: every decision is in ``SGPSegmentLib.preview.PreviewLogic`` (Qt-free, tested
with slicer-core and a real engine). This file is the effect's interface to the editor
(name, icon, help, parameters, mouse and keys in slice views, the rubber band of a box or
stroke being drawn); ``SegmentEditorSGPWidgets.panel`` wires its options panel, and
``SGPSegmentLib.slice_geometry`` turns the world positions collected here into slices, rows and
columns.

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
from SGPSegmentLib.constants import PROMPT_MODE_KEYS, slicerVersionProblem
from slicer.i18n import tr as _

HERE = os.path.dirname(os.path.abspath(__file__))
DRAG_PIXELS = 4
"""A press and release closer than this (screen pixels) is a click, not a box or a stroke."""


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """The effect as the Segment Editor sees it (see the module docstring)."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "SGP"  # not translated: modules find effects by name
        scriptedEffect.title = _("SGP")
        scriptedEffect.perSegment = True  # the selected segment: default choice, click target
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.versionProblem = slicerVersionProblem(slicer.app.majorVersion, slicer.app.minorVersion)
        self.panel = None
        self.gesture = None  # the left drag in progress: its view, positions and rubber band
        self.rightPress = None  # (view, xy) of a right press: a click if released in place

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(HERE, "..", "Resources", "Icons", "SegmentEditorSGP.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return _(
            "<html>Segment a structure through the volume with SAM2-SGP.<p><b>Fast start</b>: "
            "select a segment, drag a <b>box</b> around the structure on one slice (or click "
            "on it); the preview shows that slice and propagates the rest. Correct with clicks "
            "(left: add; Shift+left or right click: remove) or <b>scribbles</b> (left stroke "
            "adds, Shift stroke removes). Keys over a slice view: <b>X</b> box / click, "
            "<b>S</b> scribble.<p>Or draw the structure on some slices (any effect, one "
            "orientation) and press <b>Preview</b>; it updates as you draw. <b>Apply</b> writes "
            "it (Undo takes it back); <b>Cancel</b> removes it and everything drawn in the "
            "preview. Engine and model: SGP Segment module.</html>"
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

    def deactivate(self):
        self.endGesture()

    def cleanup(self):
        self.endGesture()
        if self.panel is not None:
            self.panel.cleanup()  # disconnect timers so the effect can be deleted (Slicer #7392)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("SGPAutoUpdate", "1")
        self.scriptedEffect.setParameterDefault("SGPPromptMode", "box")
        self.scriptedEffect.setParameterDefault("SGPNotHere", "")  # '': follow Masking

    def updateGUIFromMRML(self):
        if self.panel is not None:
            self.panel.updateGUI()

    def updateMRMLFromGUI(self):
        if self.panel is not None:
            self.panel.updateMRML()

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        """Slice views: a left drag is a box or a stroke (the mode), a left click a point
        (Shift: not here), a right click a 'not here' point (a right drag still zooms); keys
        X and S choose the mode. Ctrl/Alt events go on to the view."""
        panel = self.panel
        if panel is None or viewWidget.className() != "qMRMLSliceWidget":
            return False
        command = vtk.vtkCommand
        starts = (command.KeyPressEvent, command.LeftButtonPressEvent, command.RightButtonPressEvent)
        if eventId in starts and (callerInteractor.GetControlKey() or callerInteractor.GetAltKey()):
            return False  # the view's own Ctrl/Alt actions; a drag already begun still ends here
        xy = callerInteractor.GetEventPosition()
        if eventId == command.KeyPressEvent:
            mode = PROMPT_MODE_KEYS.get(callerInteractor.GetKeySym())
            if mode is not None and self.gesture is None:
                panel.setMode(mode)
                return True
            return False
        if eventId == command.LeftButtonPressEvent:
            self.endGesture()
            self.gesture = Gesture(self.scriptedEffect, viewWidget, xy, panel.mode,
                                   not callerInteractor.GetShiftKey())  # fmt: skip
            self.gesture.add(xy, self.xyToRas(xy, viewWidget))
            return True
        gesture = self.gesture
        if eventId == command.MouseMoveEvent and gesture is not None:
            if gesture.view is not viewWidget:
                return False
            gesture.add(xy, self.xyToRas(xy, viewWidget))
            return True
        if eventId == command.LeftButtonReleaseEvent and gesture is not None:
            self.endGesture()
            if gesture.view is viewWidget:
                gesture.add(xy, self.xyToRas(xy, viewWidget))
            kind, positions = gesture.result()
            panel.prompt(kind, positions, gesture.positive, self.inPlane(gesture.view))
            return True
        if eventId == command.RightButtonPressEvent:
            self.rightPress = (viewWidget, xy)
            return False  # a right drag zooms as usual
        if eventId == command.RightButtonReleaseEvent and self.rightPress is not None:
            view, start = self.rightPress
            self.rightPress = None
            if view is viewWidget and _distance(start, xy) < DRAG_PIXELS:
                ras = self.xyToRas(xy, viewWidget)
                panel.prompt("click", [ras], False, self.inPlane(viewWidget))
                return True  # no context menu: the click was a 'not here' point
        return False

    def endGesture(self):
        if self.gesture is not None:
            self.gesture.remove()
            self.gesture = None

    @staticmethod
    def inPlane(viewWidget):
        """The view's in-plane directions (world): which slices of the volume it shows."""
        sliceToRAS = viewWidget.mrmlSliceNode().GetSliceToRAS()
        return tuple(
            [sliceToRAS.GetElement(row, column) for row in range(3)] for column in (0, 1)
        )


def _distance(a, b):
    return ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5


class Gesture:
    """One left drag in one slice view: its screen and world positions and the rubber band
    (the box's outline or the stroke) drawn over the view while it lasts."""

    def __init__(self, scriptedEffect, view, xy, mode, positive):
        self.scriptedEffect = scriptedEffect
        self.view = view
        self.start = tuple(xy)
        self.mode = mode
        self.positive = positive
        self.xy = []
        self.ras = []
        self.moved = False
        self.points = vtk.vtkPoints()
        self.lines = vtk.vtkCellArray()
        self.polyData = vtk.vtkPolyData()
        self.polyData.SetPoints(self.points)
        self.polyData.SetLines(self.lines)
        mapper = vtk.vtkPolyDataMapper2D()
        mapper.SetInputData(self.polyData)
        self.actor = vtk.vtkActor2D()
        self.actor.SetMapper(mapper)
        self.actor.GetProperty().SetColor((1.0, 1.0, 0.0) if positive else (1.0, 0.3, 0.3))
        self.actor.GetProperty().SetLineWidth(2)
        scriptedEffect.addActor2D(view, self.actor)

    def add(self, xy, ras):
        self.moved = self.moved or _distance(self.start, xy) >= DRAG_PIXELS
        self.xy.append(tuple(xy))
        self.ras.append(tuple(ras))
        self.draw()

    def draw(self):
        if self.mode == "box":
            (x0, y0), (x1, y1) = self.start, self.xy[-1]
            outline = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
        else:
            outline = self.xy
        self.points.Reset()
        self.lines.Reset()
        for x, y in outline:
            self.points.InsertNextPoint(x, y, 0.0)
        if len(outline) > 1:
            self.lines.InsertNextCell(len(outline))
            for index in range(len(outline)):
                self.lines.InsertCellPoint(index)
        self.polyData.Modified()
        self.view.sliceView().scheduleRender()

    def result(self):
        """('click', [ras]) for a press and release in place; else ('box', [corner, corner])
        or ('scribble', [ras, ...])."""
        if not self.moved:
            return "click", [self.ras[0]]
        if self.mode == "box":
            return "box", [self.ras[0], self.ras[-1]]
        return "scribble", list(self.ras)

    def remove(self):
        self.scriptedEffect.removeActor2D(self.view, self.actor)
        self.view.sliceView().scheduleRender()
