"""Registers the "SGP" Segment Editor effect when Slicer has started (a hidden module, as
Slicer's extension template for editor effects does).

The effect lives in ``SegmentEditorSGPLib/SegmentEditorEffect.py`` (Slicer loads that file as
the module ``SegmentEditorSGPLib``: the folder is no package), its options panel in the package
``SegmentEditorSGPWidgets``; its behaviour is the SGP Segment module's Logic
(``SGPSegmentLib.preview``), with that module's engine and settings.
This file parses as Python 3.9, so an old Slicer still loads it and the effect shows the
"needs Slicer 5.10" message.
"""

import os

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

EFFECT_NAME = "SGP"


class SegmentEditorSGP(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Segment Editor SGP")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "SGPSegment"]
        self.parent.contributors = ["SlicerSGP developers"]
        self.parent.hidden = True  # only registers the effect
        self.parent.helpText = (
            _(
                "Adds the SGP effect to the Segment Editor: fill a volume from a few drawn slices "
                "with SAM2-SGP, as a preview that updates while you draw and takes click "
                "corrections. Engine, model and device are set in the SGP Segment module."
            )
        )
        self.parent.acknowledgementText = (
            _("Built on Meta's Segment Anything 2 (Apache-2.0) and support-set guided prompting.")
        )
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        instance = effects.qSlicerSegmentEditorScriptedEffect(None)
        path = os.path.join(
            os.path.dirname(__file__), "SegmentEditorSGPLib", "SegmentEditorEffect.py"
        )
        instance.setPythonSource(path.replace("\\", "/"))
        instance.self().register()


class SegmentEditorSGPTest(ScriptedLoadableModuleTest):
    """In Slicer: the effect is registered, can be chosen in a Segment Editor widget and
    builds its panel. (Its behaviour is tested without Slicer in Testing/extension/test_effect_logic.py.)"""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_effect_is_registered_and_builds_its_panel()

    def test_effect_is_registered_and_builds_its_panel(self):
        import numpy as np

        names = slicer.qSlicerSegmentEditorEffectFactory.instance().registeredEffects()
        self.assertIn(EFFECT_NAME, [effect.name for effect in names])
        volume = slicer.util.addVolumeFromArray(np.zeros((4, 32, 32), np.float32))
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", "structure")
        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.setMRMLSegmentEditorNode(editorNode)
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)
        editor.setCurrentSegmentID(segmentId)
        editor.setActiveEffectByName(EFFECT_NAME)
        effect = editor.activeEffect()
        self.assertIsNotNone(effect)
        self.assertEqual(effect.name, EFFECT_NAME)
        panel = effect.self().panel
        if effect.self().versionProblem:  # a Slicer older than 5.10: a label says why
            self.assertIsNone(panel)
        else:
            self.assertIsNotNone(panel, "the SGP effect built no options panel")
            self.assertEqual(type(panel).__module__, "SegmentEditorSGPWidgets.panel")
            self.assertIsNotNone(panel.ui.previewButton)
            self.assertEqual(panel.chosenIds, [segmentId])
        editor.setActiveEffect(None)
        self.delayDisplay("Test passed")
