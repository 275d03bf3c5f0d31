"""The SGP effect's options panel (panel.py), a package of its own.

Not in ``SegmentEditorSGPLib/``: Slicer loads an effect's file as a module named after its
parent folder (``qSlicerSegmentEditorScriptedEffect::setPythonSource``), so inside Slicer
``SegmentEditorSGPLib`` *is* ``SegmentEditorEffect.py`` and is no package one can import from.

May import qt, slicer, vtk and ``SGPSegmentLib`` (the Qt-free Logic; imported only once the
Slicer version is known to be new enough). Never torch or the engine's internals: the model
runs in the engine process.
"""
