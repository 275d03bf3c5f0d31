"""The "SGP" Segment Editor effect (SegmentEditorEffect.py, loaded by the editor from its file)
and its options panel (panel.py).

May import qt, slicer, vtk, the Segment Editor's ``SegmentEditorEffects`` and ``SGPSegmentLib``
(the Qt-free Logic; imported only once the Slicer version is known to be new enough). Never
torch or the engine's internals: the model runs in the engine process.
"""
