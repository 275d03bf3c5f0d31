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
* gives ``slicer.i18n`` (Slicer's pure-Python translation functions, not in the wheel) as
  :mod:`slicer_i18n` reproduces them,
* puts ``SGPSegment/`` (the module's own files) and the repository root (the engine) on
  ``sys.path``, the way Slicer's qt-scripted-modules folder holds them after installation.

Test modules use it with ``from module_fixtures import mrml  # noqa: F401``. The scene
builders below (:func:`makeScene`: a small volume with a rotated, anisotropic, off-origin grid
and two structures drawn on a few slices) and :func:`engineLogic` (a Logic whose local engine is
a real ``sgp serve``: tiny model, random weights, CPU, 256 px) are shared by the module tests.
"""

from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import slicer_i18n

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO_ROOT / "SGPSegment"

for _path in (str(MODULE_DIR), str(REPO_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

slicer_i18n.install()  # the Lib marks its messages with slicer.i18n, which slicer-core lacks

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


# ------------------------------------------------------------------------------ test scenes

SHAPE = (6, 64, 64)  # (K, J, I)
LABELED = (1, 4)  # slices (axis K) the user drew on
RUN = dict(model="tiny", weights="random", device="cpu", imageSize=256, seed=0)
"""The model every module test runs: what a local engine started by the Logic loads."""


def ijkToRASMatrix():
    """A non-identity direction: rotated 30 degrees about S and flipped in I, anisotropic."""
    import vtk

    angle = np.deg2rad(30.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([-1.0, 1.0, 1.0]) @ np.diag([0.8, 0.9, 2.5])
    matrix[:3, 3] = [12.5, -30.0, 7.0]
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, matrix[r, c])
    return m


def truth(shape=SHAPE) -> dict[int, np.ndarray]:
    """Two blobs that move a little from slice to slice."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    disk = ((j - 24 - k % 8) ** 2 + (i - 22) ** 2) < 10**2
    box = (abs(j - 44) < 6) & (abs(i - 46 + k % 8) < 8)
    return {1: disk, 2: box}


def makeScene(
    env, *, labeled=LABELED, segments=("liver", "spleen"), noiseSeed=0, shape=SHAPE, name="patient"
):
    """A volume and a segmentation on its grid with ``segments`` drawn on ``labeled`` slices."""
    import slicer

    rng = np.random.default_rng(noiseSeed)
    blobs = truth(shape)
    image = rng.normal(100.0, 10.0, shape)
    image[blobs[1]] += 200.0
    image[blobs[2]] += 120.0
    volume = slicer.util.addVolumeFromArray(image.astype(np.float32), name=name)
    volume.SetIJKToRASMatrix(ijkToRASMatrix())
    segmentation = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = []
    for value, segmentName in enumerate(segments, start=1):
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", segmentName)
        drawn = np.zeros(shape, np.uint8)
        for s in labeled:
            drawn[s] = blobs[value][s]
        if drawn.any():
            slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, segmentId, volume)
        ids.append(segmentId)
    return volume, segmentation, ids


def segmentArray(segmentation, segmentId, volume) -> np.ndarray:
    import slicer

    return (
        np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)) > 0
    )


def allSegments(segmentation, volume) -> dict[str, np.ndarray]:
    ids = segmentation.GetSegmentation().GetSegmentIDs()
    return {s: segmentArray(segmentation, s, volume) for s in ids}


def saveAndReload(mrml, segmentation, path) -> tuple:
    """Write ``segmentation`` as a .seg.nrrd and read it into a new node, as another session
    would: (the new node, the IDs of its "liver" and "spleen" segments)."""
    import slicer

    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation)
    reloaded = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(path))
    assert reader.ReadData(reloaded)
    ids = [reloaded.GetSegmentation().GetSegmentIdBySegmentName(n) for n in ("liver", "spleen")]
    return reloaded, ids


@pytest.fixture(scope="module")
def engineLogic():
    """One Logic per test file with its local engine (a real `sgp serve` subprocess on
    127.0.0.1) kept running between tests, as in a Slicer session; stopped at the end."""
    from SGPSegmentLib import SGPSegmentCoreLogic

    logic = SGPSegmentCoreLogic()
    try:
        yield logic
    finally:
        logic.shutdown()
