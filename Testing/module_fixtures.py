"""A real MRML scene for testing the SGPSegment Logic outside the Slicer application.

The ``slicer-core`` wheel is Slicer's MRML and module logic without Qt. Inside the application,
``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` exist and the segmentation converter
rules are registered at start-up; here the :func:`mrml` fixture does that setup itself:

* registers the segmentation conversion rules with ``vtkSegmentationConverterFactory`` (once per
  process, as the application does),
* makes a fresh ``vtkMRMLScene`` with an application logic and the Colors, Volumes and
  Segmentations module logics on it,
* publishes them where ``slicer.util`` looks them up (``slicer.mrmlScene``,
  ``slicer.modules.{colors,volumes,segmentations}.logic()``),
* puts ``SGPSegment/`` (the module's own files) and the repository root (the engine) on
  ``sys.path``, the way Slicer's qt-scripted-modules folder holds them after installation.

Test modules use it with ``from module_fixtures import mrml  # noqa: F401``.
"""

from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO_ROOT / "SGPSegment"

for _path in (str(MODULE_DIR), str(REPO_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

_CONVERTERS_REGISTERED = False


def register_segmentation_converters() -> None:
    """Register the conversion rules the application registers at start-up (once)."""
    global _CONVERTERS_REGISTERED
    if _CONVERTERS_REGISTERED:
        return
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
    ):
        factory.RegisterConverterRule(rule())
    _CONVERTERS_REGISTERED = True


class MRMLEnvironment:
    """The scene and module logics of one test, published on the ``slicer`` module."""

    def __init__(self) -> None:
        import slicer

        register_segmentation_converters()
        self._tmp = tempfile.TemporaryDirectory(prefix="sgp-mrml-")
        self.scene = slicer.vtkMRMLScene()
        self.appLogic = slicer.vtkSlicerApplicationLogic()
        # Colors logic looks for its default tables under these; empty folders = no tables.
        self.appLogic.SetHomeDirectory(self._tmp.name)
        self.appLogic.SetShareDirectory(self._tmp.name)
        self.appLogic.SetMRMLScene(self.scene)

        self.colorLogic = slicer.vtkSlicerColorLogic()
        self.volumesLogic = slicer.vtkSlicerVolumesLogic()
        self.segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
        for name, logic in (
            ("Colors", self.colorLogic),
            ("Volumes", self.volumesLogic),
            ("Segmentations", self.segmentationsLogic),
        ):
            logic.SetMRMLApplicationLogic(self.appLogic)
            logic.SetMRMLScene(self.scene)
            self.appLogic.SetModuleLogic(name, logic)

        self._saved = {name: getattr(slicer, name, None) for name in ("mrmlScene", "modules")}
        slicer.mrmlScene = self.scene
        slicer.modules = types.SimpleNamespace(
            colors=types.SimpleNamespace(logic=lambda: self.colorLogic),
            volumes=types.SimpleNamespace(logic=lambda: self.volumesLogic),
            segmentations=types.SimpleNamespace(logic=lambda: self.segmentationsLogic),
        )

    def close(self) -> None:
        import slicer

        self.scene.Clear(1)
        for name, value in self._saved.items():
            if value is None:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)
        for logic in (self.segmentationsLogic, self.volumesLogic, self.colorLogic):
            logic.SetMRMLScene(None)
        self._tmp.cleanup()


@pytest.fixture
def mrml():
    """A fresh real MRML scene with the module logics ``slicer.util`` needs."""
    env = MRMLEnvironment()
    try:
        yield env
    finally:
        env.close()
