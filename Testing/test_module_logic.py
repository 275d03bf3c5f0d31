"""SGPSegment's Logic against real MRML (slicer-core) and the real engine (random weights, CPU).

The scene: a small volume with a rotated, anisotropic, off-origin voxel grid and a segmentation
on that grid with two structures drawn on a few slices. No part of Slicer or the engine is
replaced.
"""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk
from module_fixtures import mrml  # noqa: F401  (fixture)

SHAPE = (6, 64, 64)  # (K, J, I)
LABELED = (1, 4)  # slices (axis K) the user drew on
RUN = dict(model="tiny", weights="random", device="cpu", imageSize=256, seed=0)


def _ijkToRAS() -> vtk.vtkMatrix4x4:
    """A non-identity direction: rotated 30 degrees about S and flipped in I, anisotropic."""
    angle = np.deg2rad(30.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    directions = rotation @ np.diag([-1.0, 1.0, 1.0])
    matrix = np.eye(4)
    matrix[:3, :3] = directions @ np.diag([0.8, 0.9, 2.5])
    matrix[:3, 3] = [12.5, -30.0, 7.0]
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, matrix[r, c])
    return m


def _truth() -> dict[int, np.ndarray]:
    """Two blobs that move a little from slice to slice."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    disk = ((j - 24 - k) ** 2 + (i - 22) ** 2) < 10**2
    box = (abs(j - 44) < 6) & (abs(i - 46 + k) < 8)
    return {1: disk, 2: box}


def makeScene(mrml, *, labeled=LABELED, segments=("liver", "spleen")):  # noqa: F811
    rng = np.random.default_rng(0)
    truth = _truth()
    image = rng.normal(100.0, 10.0, SHAPE)
    image[truth[1]] += 200.0
    image[truth[2]] += 120.0
    volume = slicer.util.addVolumeFromArray(image.astype(np.float32), name="patient")
    volume.SetIJKToRASMatrix(_ijkToRAS())
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "patient segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = []
    for value, name in enumerate(segments, start=1):
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", name)
        drawn = np.zeros(SHAPE, np.uint8)
        for s in labeled:
            drawn[s] = truth[value][s]
        if drawn.any():
            slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, segmentId, volume)
        ids.append(segmentId)
    return volume, segmentation, ids


def segmentArray(segmentation, segmentId, volume) -> np.ndarray:
    return np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)) > 0


def allSegments(segmentation, volume) -> dict[str, np.ndarray]:
    ids = segmentation.GetSegmentation().GetSegmentIDs()
    return {s: segmentArray(segmentation, s, volume) for s in ids}


@pytest.fixture
def logic():
    from SGPSegmentLib import SGPSegmentCoreLogic

    return SGPSegmentCoreLogic()


# ------------------------------------------------------------------------ MRML <-> numpy


def test_labeled_slices_found_with_counts(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    found = logic.labeledSlices(volume, segmentation, ids, axis=0)
    truth = _truth()
    assert [f.name for f in found] == ["liver", "spleen"]
    for item, value in zip(found, (1, 2), strict=True):
        assert item.slices == list(LABELED)
        assert item.voxelCounts == [int(truth[value][s].sum()) for s in LABELED]
        assert "2 labeled slice(s)" in item.describe()
    # Along J the same strokes cover many rows.
    alongJ = logic.labeledSlices(volume, segmentation, ids[:1], axis="J")[0]
    assert len(alongJ.slices) > 2 and sum(alongJ.voxelCounts) == found[0].totalVoxels


def test_geometry_is_lps_of_the_volume(mrml, logic):  # noqa: F811
    volume, _, _ = makeScene(mrml)
    geometry = logic.volumeGeometry(volume)
    m = _ijkToRAS()
    ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras
    np.testing.assert_allclose(geometry.spacing, [0.8, 0.9, 2.5], atol=1e-9)
    np.testing.assert_allclose(geometry.origin, lps[:3, 3], atol=1e-9)
    direction = geometry.direction_matrix()
    np.testing.assert_allclose(direction @ np.diag(geometry.spacing), lps[:3, :3], atol=1e-9)
    assert not np.allclose(direction, np.eye(3))


def test_prepare_run_exports_on_the_volume_grid(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    request = logic.prepareRun(volume, segmentation, ids, axis=0, **RUN)
    truth = _truth()
    assert request.volume.shape == SHAPE
    np.testing.assert_array_equal(request.volume, slicer.util.arrayFromVolume(volume))
    assert request.structures == {1: "liver", 2: "spleen"}
    assert request.segmentIds == {1: ids[0], 2: ids[1]}
    for value in (1, 2):
        expected = np.zeros(SHAPE, bool)
        for s in LABELED:
            expected[s] = truth[value][s]
        np.testing.assert_array_equal(request.drawn[value], expected)
        np.testing.assert_array_equal(request.labels == value, expected)


# ----------------------------------------------------------------------------- bad inputs


def test_no_labeled_slice_is_a_clear_error(mrml, logic):  # noqa: F811
    from SlicerSGP.errors import SGPInputError

    volume, segmentation, ids = makeScene(mrml, labeled=())
    before = allSegments(segmentation, volume)
    with pytest.raises(SGPInputError, match="No labeled slice.*Draw each structure"):
        logic.run(volume, segmentation, ids, **RUN)
    after = allSegments(segmentation, volume)
    assert all(np.array_equal(before[s], after[s]) for s in before)


def test_empty_segment_is_a_clear_error(mrml, logic):  # noqa: F811
    from SlicerSGP.errors import SGPInputError

    volume, segmentation, ids = makeScene(mrml)
    emptyId = segmentation.GetSegmentation().AddEmptySegment("", "kidney")
    with pytest.raises(SGPInputError, match="Segment 'kidney' is empty"):
        logic.prepareRun(volume, segmentation, [ids[0], emptyId], **RUN)


def test_segmentation_on_a_different_grid_is_a_clear_error(mrml, logic):  # noqa: F811
    from SlicerSGP.errors import SGPInputError

    volume, _, _ = makeScene(mrml)
    # A second volume with another spacing/orientation; the segmentation is drawn on it.
    other = slicer.util.addVolumeFromArray(np.zeros(SHAPE, np.float32), name="other scan")
    other.SetSpacing(1.3, 1.3, 3.0)
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(other)
    segmentId = segmentation.GetSegmentation().AddEmptySegment("", "liver")
    drawn = np.zeros(SHAPE, np.uint8)
    drawn[2, 20:30, 20:30] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, segmentId, other)
    with pytest.raises(SGPInputError, match="different voxel grid.*Specify geometry"):
        logic.prepareRun(volume, segmentation, [segmentId], **RUN)


def test_missing_selection_is_a_clear_error(mrml, logic):  # noqa: F811
    from SlicerSGP.errors import SGPInputError

    volume, segmentation, _ = makeScene(mrml)
    with pytest.raises(SGPInputError, match="Select an input volume"):
        logic.prepareRun(None, segmentation, None, **RUN)
    with pytest.raises(SGPInputError, match="Select a segmentation"):
        logic.prepareRun(volume, None, None, **RUN)
    with pytest.raises(SGPInputError, match="no segment selected"):
        logic.prepareRun(volume, segmentation, [], **RUN)
