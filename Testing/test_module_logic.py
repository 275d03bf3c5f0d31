"""SGPSegment's Logic against real MRML (slicer-core) and the real engine (random weights, CPU).

The scene: a small volume with a rotated, anisotropic, off-origin voxel grid and a segmentation
on that grid with two structures drawn on a few slices. No part of Slicer or the engine is
replaced.
"""

from __future__ import annotations

import time

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


def makeScene(mrml, *, labeled=LABELED, segments=("liver", "spleen"), noiseSeed=0):  # noqa: F811
    rng = np.random.default_rng(noiseSeed)
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


@pytest.fixture(scope="module")
def logic():
    """One Logic for the file: it keeps the model loaded between runs, as in Slicer."""
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
    assert request.supportSlices == list(LABELED)
    assert request.segmentIds == {1: ids[0], 2: ids[1]}
    for value in (1, 2):
        expected = np.zeros(SHAPE, bool)
        for s in LABELED:
            expected[s] = truth[value][s]
        np.testing.assert_array_equal(request.before[value], expected)
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


# ------------------------------------------------------------------------- real engine runs


def _voxelLinesUp(segmentation, segmentId, volume, mask) -> None:
    """The segment's own labelmap, read in world coordinates, matches ``mask`` on the volume grid."""
    labelmap = segmentation.GetBinaryLabelmapInternalRepresentation(segmentId)
    worldToImage = vtk.vtkMatrix4x4()
    labelmap.GetWorldToImageMatrix(worldToImage)
    ijkToRAS = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijkToRAS)
    extent = labelmap.GetExtent()
    scalars = labelmap.GetPointData().GetScalars()
    dims = labelmap.GetDimensions()
    rng = np.random.default_rng(1)
    inside = np.argwhere(mask)
    outside = np.argwhere(~mask)
    picks = [*inside[rng.choice(len(inside), 40)], *outside[rng.choice(len(outside), 40)]]
    for k, j, i in picks:
        ras = ijkToRAS.MultiplyPoint((float(i), float(j), float(k), 1.0))
        ii, jj, kk = (round(v) for v in worldToImage.MultiplyPoint(ras)[:3])
        inExtent = extent[0] <= ii <= extent[1] and extent[2] <= jj <= extent[3] and extent[4] <= kk <= extent[5]
        value = 0
        if inExtent:
            index = (ii - extent[0]) + dims[0] * ((jj - extent[2]) + dims[1] * (kk - extent[4]))
            value = scalars.GetTuple1(index)
        assert (value != 0) == bool(mask[k, j, i]), (k, j, i)


def test_run_writes_segments_on_the_input_geometry(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    # A third segment the user did not select must not change.
    otherId = segmentation.GetSegmentation().AddEmptySegment("", "bladder")
    other = np.zeros(SHAPE, np.uint8)
    other[:, 2:8, 2:8] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(other, segmentation, otherId, volume)
    before = allSegments(segmentation, volume)

    request = logic.prepareRun(volume, segmentation, ids, axis=0, **RUN)
    result = logic.compute(request)
    report = logic.applyResult(request, result)

    assert result.labels.shape == SHAPE and result.geometry == logic.volumeGeometry(volume)
    assert report.labeledSlices == list(LABELED)
    after = allSegments(segmentation, volume)
    for value, segmentId in zip((1, 2), ids, strict=True):
        expected = np.asarray(result.labels) == value
        for s in LABELED:  # user-drawn slices exactly as drawn
            np.testing.assert_array_equal(after[segmentId][s], before[segmentId][s])
            expected[s] = before[segmentId][s]
        np.testing.assert_array_equal(after[segmentId], expected)
        assert report.voxelCounts[segmentId] == int(expected.sum())
        _voxelLinesUp(segmentation, segmentId, volume, expected)
    np.testing.assert_array_equal(after[otherId], before[otherId])
    # Predictions were written outside the labeled slices (random weights still predict).
    assert any(after[s][[0, 2, 3, 5]].any() for s in ids)


def test_undo_restores_the_segmentation(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    before = allSegments(segmentation, volume)
    assert not logic.canUndo(segmentation)
    logic.run(volume, segmentation, ids, **RUN)
    assert any(not np.array_equal(before[s], a) for s, a in allSegments(segmentation, volume).items())
    assert logic.canUndo(segmentation)
    assert logic.undoLastRun(segmentation)
    after = allSegments(segmentation, volume)
    assert after.keys() == before.keys()
    assert all(np.array_equal(before[s], after[s]) for s in before)
    assert not logic.canUndo(segmentation)


def test_cancelled_run_leaves_the_segmentation_as_it_was(mrml, logic):  # noqa: F811
    from SlicerSGP.errors import Cancelled

    volume, segmentation, ids = makeScene(mrml)
    before = allSegments(segmentation, volume)
    outputClasses = ("vtkMRMLSegmentationNode", "vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode")

    def outputNodes():
        return [mrml.scene.GetNumberOfNodesByClass(c) for c in outputClasses]

    nodesBefore = outputNodes()

    # Synchronous: cancel once the engine has started propagating.
    stages = []
    with pytest.raises(Cancelled):
        logic.run(
            volume, segmentation, ids, keepPseudoMasks=True, **RUN,
            progress=lambda stage, fraction: stages.append(stage),
            cancel=lambda: any(s.startswith("propagate") for s in stages),
        )  # fmt: skip
    assert any(s.startswith("propagate") for s in stages)

    # In the worker thread, cancelled from the main thread while it runs.
    request = logic.prepareRun(volume, segmentation, ids, **RUN)
    job = logic.startRun(request)
    deadline = time.monotonic() + 60
    while job.stage in ("waiting", "loading model") and not job.done() and time.monotonic() < deadline:
        time.sleep(0.002)
    job.cancel()
    assert job.wait(60)
    assert job.cancelled, job.error
    assert job.result is None

    after = allSegments(segmentation, volume)
    assert all(np.array_equal(before[s], after[s]) for s in before)
    assert outputNodes() == nodesBefore  # no pseudo-mask segmentation, table, chart or series
    assert not logic.canUndo(segmentation)


def test_worker_thread_run_then_apply(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    request = logic.prepareRun(volume, segmentation, ids, **RUN)
    job = logic.startRun(request)
    seen = set()
    while not job.done():
        seen.add(job.stage)
        time.sleep(0.001)
    assert job.error is None, job.error
    assert job.fraction >= 0.0 and "waiting" not in (job.stage,)
    report = logic.applyResult(request, job.result)
    assert set(report.segmentIds) == set(ids)


def test_correction_is_used_as_support_and_embeddings_are_reused(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml, noiseSeed=7)  # a volume not seen before
    truth = _truth()
    first = logic.prepareRun(volume, segmentation, ids, **RUN)
    firstResult = logic.compute(first)
    logic.applyResult(first, firstResult)

    # Predicted slices are not taken for user labels on the next run...
    assert [s.slices for s in logic.labeledSlices(volume, segmentation, ids)] == [list(LABELED)] * 2
    # ...but a slice the user corrects is.
    corrected = segmentArray(segmentation, ids[0], volume).astype(np.uint8)
    corrected[2] = truth[1][2]
    slicer.util.updateSegmentBinaryLabelmapFromArray(corrected, segmentation, ids[0], volume)
    found = logic.labeledSlices(volume, segmentation, ids)
    assert found[0].slices == [1, 2, 4] and found[1].slices == list(LABELED)

    spleenBefore = segmentArray(segmentation, ids[1], volume)
    encodedBefore = firstResult.stats["slices_encoded"]
    second = logic.prepareRun(volume, segmentation, ids, **RUN)
    assert second.supportSlices == [1, 2, 4]
    secondResult = logic.compute(second)
    assert secondResult.labeled_slices == [1, 2, 4]
    assert secondResult.stats["slices_encoded"] == encodedBefore  # no slice encoded again
    assert secondResult.timings["encode"] < 0.1 * firstResult.timings["encode"]
    logic.applyResult(second, secondResult)
    liver = segmentArray(segmentation, ids[0], volume)
    np.testing.assert_array_equal(liver[2], truth[1][2])
    # Slice 2 now counts as labeled for every structure: the spleen there stays as the user
    # left it (the accepted prediction), like the other labeled slices.
    np.testing.assert_array_equal(segmentArray(segmentation, ids[1], volume)[2], spleenBefore[2])


def test_pseudo_masks_scores_plot_and_least_confident_jump(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    red = mrml.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    red.SetOrientationToAxial()
    report = logic.run(volume, segmentation, ids, keepPseudoMasks=True, **RUN)

    pseudo = mrml.scene.GetNodeByID(report.pseudoMaskNodeID)
    assert pseudo is not None and not pseudo.GetDisplayNode().GetVisibility()
    assert pseudo is segmentation.GetNodeReference("SGPPseudoMasks")
    names = [pseudo.GetSegmentation().GetSegment(s).GetName() for s in pseudo.GetSegmentation().GetSegmentIDs()]
    assert names == ["liver", "spleen"]
    result = logic.lastResult
    pseudoLiver = segmentArray(pseudo, pseudo.GetSegmentation().GetSegmentIdBySegmentName("liver"), volume)
    np.testing.assert_array_equal(pseudoLiver, result.pseudo_masks[1] >= 0.5)

    table = mrml.scene.GetNodeByID(report.tableNodeID)
    assert table.GetNumberOfRows() == SHAPE[0]
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert columns[0] == "slice" and "liver confidence" in columns and "spleen source" in columns
    confidence = slicer.util.arrayFromTableColumn(table, "liver confidence")
    np.testing.assert_allclose(confidence, result.slice_scores[1]["confidence"], rtol=1e-6)
    chart = mrml.scene.GetNodeByID(report.chartNodeID)
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    assert chart.GetNthPlotSeriesNode(0).GetYColumnName() == "liver confidence"

    worst = logic.leastConfidentSlices(count=3)
    assert len(worst) == 3 and all(s not in LABELED for _, _, s, _ in worst)
    assert [c for *_, c in worst] == sorted(c for *_, c in worst)
    value, name, sliceIndex, _ = worst[0]
    ras = logic.jumpToSlice(volume, 0, sliceIndex)
    ijkToRAS = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijkToRAS)
    expected = ijkToRAS.MultiplyPoint(((SHAPE[2] - 1) / 2, (SHAPE[1] - 1) / 2, sliceIndex, 1.0))[:3]
    np.testing.assert_allclose(ras, expected, atol=1e-6)
    sliceToRAS = red.GetSliceToRAS()
    np.testing.assert_allclose([sliceToRAS.GetElement(r, 3) for r in range(3)], expected, atol=1e-3)


def test_reference_case_in_the_scene_is_support(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml, labeled=(), segments=("liver",))
    refVolume, refSegmentation, refIds = makeScene(mrml, labeled=range(SHAPE[0]), segments=("Liver", "spleen"))
    request = logic.prepareRun(
        volume, segmentation, ids, referenceCases=[(refVolume, refSegmentation)], **RUN
    )
    assert request.supportSlices == []
    items = request.supportBank[1]
    assert len(items) == SHAPE[0] and all(it.mask.any() for it in items)
    assert 0.0 <= min(float(it.image.min()) for it in items) and max(float(it.image.max()) for it in items) <= 1.0
    result = logic.compute(request)
    logic.applyResult(request, result)
    written = segmentArray(segmentation, ids[0], volume)
    np.testing.assert_array_equal(written, np.asarray(result.labels) == 1)
    assert logic.referenceVolumeForSegmentation(refSegmentation) is refVolume


def test_out_of_memory_becomes_a_concrete_suggestion(mrml, logic):  # noqa: F811
    import torch

    from SlicerSGP.errors import SGPDeviceError

    volume, segmentation, ids = makeScene(mrml)
    request = logic.prepareRun(volume, segmentation, ids, **{**RUN, "imageSize": 1024, "model": "large"})
    error = logic.translateError(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), request)
    assert isinstance(error, SGPDeviceError)
    message = str(error)
    assert "nothing was written" in message and "768 instead of 1024" in message
    assert "tiny" in message and "CPU" in message
    other = ValueError("something else")
    assert logic.translateError(other, request) is other


def test_devices_and_cpu_warning(logic):
    devices = logic.availableDevices()
    assert devices[0][0] == "auto" and devices[-1][0] == "cpu"
    assert "CPU" in logic.deviceWarning("cpu")
    assert logic.missingDependencies() == []
    assert logic.ensureDependencies(confirm=lambda message: pytest.fail("nothing to install"))
