"""SGPSegment's Logic against real MRML (slicer-core); runs go through a real local engine.

The scene: a small volume with a rotated, anisotropic, off-origin voxel grid and a segmentation
on that grid with two structures drawn on a few slices (module_fixtures.makeScene). No part of
Slicer or the engine is replaced; Testing/extension/test_module_service.py covers the engine side
(in-process equality, cancel, a killed server, tokens, versions, re-runs).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import slicer
import vtk
from module_fixtures import (  # noqa: F401  (mrml, engineLogic: fixtures)
    LABELED,
    RUN,
    SHAPE,
    allSegments,
    engineLogic,
    ijkToRASMatrix,
    makeScene,
    mrml,
    saveAndReload,
    segmentArray,
    truth,
)

from SlicerSGP.errors import SGPError, SGPInputError


@pytest.fixture
def logic(engineLogic):  # noqa: F811
    return engineLogic


# ------------------------------------------------------------------------ MRML <-> numpy


def test_labeled_slices_found_with_counts(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    found = logic.labeledSlices(volume, segmentation, ids, axis=0)
    blobs = truth()
    assert [f.name for f in found] == ["liver", "spleen"]
    for item, value in zip(found, (1, 2), strict=True):
        assert item.slices == list(LABELED)
        assert item.voxelCounts == [int(blobs[value][s].sum()) for s in LABELED]
        assert "2 labeled slice(s) along Axial (K)" in item.describe("Axial (K)")
    # Drawn on K slices: along J those strokes are partial rows, not labeled slices.
    assert logic.labeledSlices(volume, segmentation, ids[:1], axis="J")[0].slices == []


def test_geometry_is_lps_of_the_volume(mrml):  # noqa: F811
    from SGPSegmentLib import mrml_io

    volume, _, _ = makeScene(mrml)
    geometry = mrml_io.volumeGeometry(volume)
    m = ijkToRASMatrix()
    ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras
    np.testing.assert_allclose(geometry.spacing, [0.8, 0.9, 2.5], atol=1e-9)
    np.testing.assert_allclose(geometry.origin, lps[:3, 3], atol=1e-9)
    direction = geometry.direction_matrix()
    np.testing.assert_allclose(direction @ np.diag(geometry.spacing), lps[:3, :3], atol=1e-9)
    assert mrml_io.axisDescription(volume, 0) == "Axial (K)"


def test_prepare_run_exports_on_the_volume_grid(mrml, logic):  # noqa: F811
    from SGPSegmentLib.labeled_slices import checksum

    volume, segmentation, ids = makeScene(mrml)
    request = logic.prepareRun(volume, segmentation, ids, axis=0)
    blobs = truth()
    assert request.volume.shape == SHAPE and request.shape == SHAPE
    np.testing.assert_array_equal(request.volume, slicer.util.arrayFromVolume(volume))
    assert request.structures == {1: "liver", 2: "spleen"}
    assert request.supportSlices == list(LABELED)
    assert request.segmentIds == {1: ids[0], 2: ids[1]}
    for value in (1, 2):
        expected = np.zeros(SHAPE, bool)
        for s in LABELED:
            expected[s] = blobs[value][s]
        np.testing.assert_array_equal(request.labels == value, expected)
        assert request.beforeChecksums[value] == checksum(expected)
    request.release()
    assert request.volume is None and request.labels is None


# ----------------------------------------------------------------------------- bad inputs


def test_no_labeled_slice_is_a_clear_error(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml, labeled=())
    before = allSegments(segmentation, volume)
    with pytest.raises(SGPInputError, match="no slice drawn along k \\(axial\\).*Draw it on"):
        logic.run(volume, segmentation, ids, **RUN)
    after = allSegments(segmentation, volume)
    assert all(np.array_equal(before[s], after[s]) for s in before)


def test_wrong_axis_is_a_clear_error_not_a_guess(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    with pytest.raises(SGPInputError, match="'liver' has no slice drawn along j \\(coronal\\)"):
        logic.prepareRun(volume, segmentation, ids, axis="J")


def test_segmentation_on_a_different_grid_is_a_clear_error(mrml, logic):  # noqa: F811
    volume, _, _ = makeScene(mrml)
    other = slicer.util.addVolumeFromArray(np.zeros(SHAPE, np.float32), name="other scan")
    other.SetSpacing(1.3, 1.3, 3.0)
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(other)
    segmentId = segmentation.GetSegmentation().AddEmptySegment("", "liver")
    drawn = np.zeros(SHAPE, np.uint8)
    drawn[2, 20:30, 20:30] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, segmentId, other)
    with pytest.raises(SGPInputError, match="different voxel grid.*Specify geometry"):
        logic.prepareRun(volume, segmentation, [segmentId])


def test_missing_selection_is_a_clear_error(mrml, logic):  # noqa: F811
    volume, segmentation, _ = makeScene(mrml)
    with pytest.raises(SGPInputError, match="Select an input volume"):
        logic.prepareRun(None, segmentation, None)
    with pytest.raises(SGPInputError, match="Select a segmentation"):
        logic.prepareRun(volume, None, None)
    with pytest.raises(SGPInputError, match="no segment selected"):
        logic.prepareRun(volume, segmentation, [])


def test_segment_outside_the_volume_is_cropped_with_a_note(mrml, logic):  # noqa: F811
    from SGPSegmentLib import mrml_io

    volume, segmentation, ids = makeScene(mrml)
    # The user painted past the volume's last I column: a labelmap wider than the volume.
    wide = slicer.vtkOrientedImageData()
    extent = list(volume.GetImageData().GetExtent())
    extent[1] += 5
    wide.SetExtent(extent)
    wide.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    wide.SetImageToWorldMatrix(m)
    values = np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] + 5), np.uint8)
    values[1] = np.pad(truth()[1][1], ((0, 0), (0, 5)))
    values[1, 10:20, SHAPE[2] - 3 :] = 1  # 10 rows x 5 columns outside
    from vtk.util.numpy_support import numpy_to_vtk

    wide.GetPointData().SetScalars(numpy_to_vtk(values.reshape(-1), deep=True))
    logicClass = slicer.vtkSlicerSegmentationsModuleLogic
    assert logicClass.SetBinaryLabelmapToSegment(
        wide, segmentation, ids[0], logicClass.MODE_REPLACE
    )
    assert mrml_io.voxelsOutsideVolume(segmentation, ids[0], volume) == 50
    request = logic.prepareRun(volume, segmentation, ids)
    assert (
        len(request.notes) == 1
        and "'liver' reaches outside volume 'patient' (50 voxels)" in request.notes[0]
    )
    inside = segmentArray(segmentation, ids[0], volume)
    np.testing.assert_array_equal(request.labels[1] == 1, inside[1])


# -------------------------------------------------------------------- labeled-slice records


def test_drawn_slices_are_recorded_per_axis_not_rederived(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml, segments=("liver",))
    logic.drawingAxis = 0
    logic.watchEdits(segmentation, volume)
    try:
        mask = segmentArray(segmentation, ids[0], volume).astype(np.uint8)
        # A stroke on coronal (J) slice 30 is recorded for J only.
        mask[:, 30, 10:14] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, ids[0], volume)
        assert logic.labeledSlices(volume, segmentation, ids, axis="J")[0].slices == [30]
        assert logic.labeledSlices(volume, segmentation, ids, axis="K")[0].slices == list(LABELED)
        # A 3D edit (grow by one voxel everywhere) labels nothing new along any axis.
        grown = mask.copy()
        grown[:, 1:, :] |= mask[:, :-1, :]
        grown[:, :, 1:] |= mask[:, :, :-1]
        grown[1:] |= mask[:-1]
        slicer.util.updateSegmentBinaryLabelmapFromArray(grown, segmentation, ids[0], volume)
        assert logic.labeledSlices(volume, segmentation, ids, axis="K")[0].slices == list(LABELED)
        assert logic.labeledSlices(volume, segmentation, ids, axis="J")[0].slices == [30]
    finally:
        logic.stopWatching()


def test_a_run_and_an_axis_change_do_not_make_predictions_labeled(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    logic.run(volume, segmentation, ids, **RUN)
    # The prediction covers many slices along every axis; only the drawn ones count.
    assert [s.slices for s in logic.labeledSlices(volume, segmentation, ids, axis=0)] == [
        list(LABELED)
    ] * 2
    assert [s.slices for s in logic.labeledSlices(volume, segmentation, ids, axis=2)] == [[], []]
    # A correction on K slice 2 (seen later, without an observer) is a new labeled slice.
    corrected = segmentArray(segmentation, ids[0], volume).astype(np.uint8)
    corrected[2] = truth()[1][2]
    slicer.util.updateSegmentBinaryLabelmapFromArray(corrected, segmentation, ids[0], volume)
    found = logic.labeledSlices(volume, segmentation, ids, axis=0)
    assert found[0].slices == [1, 2, 4] and found[1].slices == list(LABELED)


def test_labeled_slice_records_are_saved_with_the_segmentation(mrml, logic, tmp_path):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    logic.run(volume, segmentation, ids, **RUN)
    reloaded, newIds = saveAndReload(mrml, segmentation, tmp_path / "seg.seg.nrrd")
    found = logic.labeledSlices(volume, reloaded, newIds, axis=0)
    assert [f.slices for f in found] == [list(LABELED)] * 2


# ------------------------------------------------------------------------------ runs, undo


def test_run_writes_segments_and_keeps_the_drawn_slices(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    otherId = segmentation.GetSegmentation().AddEmptySegment("", "bladder")
    other = np.zeros(SHAPE, np.uint8)
    other[:, 2:8, 2:8] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(other, segmentation, otherId, volume)
    before = allSegments(segmentation, volume)

    request = logic.prepareRun(volume, segmentation, ids, axis=0)
    run = logic.startRun(request, logic.modelSettings(**RUN))
    logic.runs.wait(run, describeFailure=logic.engine.describeFailure)
    assert run.state == "done", run.error
    assert request.volume is None  # the volume copy is dropped once sent
    result, report = logic.lastResult, run.report
    assert result.geometry is not None and result.probabilities == {}  # big arrays released
    assert report.labeledSlices == list(LABELED)
    after = allSegments(segmentation, volume)
    for value, segmentId in zip((1, 2), ids, strict=True):
        expected = np.asarray(result.labels) == value
        for s in LABELED:
            expected[s] = before[segmentId][s]
        np.testing.assert_array_equal(after[segmentId], expected)
        assert report.voxelCounts[segmentId] == int(expected.sum())
    np.testing.assert_array_equal(after[otherId], before[otherId])
    assert any(after[s][[0, 2, 3, 5]].any() for s in ids)


def test_undo_restores_and_refuses_after_a_manual_edit(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    before = allSegments(segmentation, volume)
    assert not logic.canUndo(segmentation)
    logic.run(volume, segmentation, ids, **RUN)
    written = allSegments(segmentation, volume)
    # A manual edit after the run: Undo must not wipe it.
    edited = written[ids[1]].astype(np.uint8)
    edited[3, 0:4, 0:4] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited, segmentation, ids[1], volume)
    with pytest.raises(
        SGPInputError, match="'spleen' were edited after the SGP run.*nothing was changed"
    ):
        logic.undoLastRun(segmentation, volume)
    np.testing.assert_array_equal(segmentArray(segmentation, ids[1], volume), edited > 0)
    # Put it back as the run wrote it: now Undo restores the state before the run.
    slicer.util.updateSegmentBinaryLabelmapFromArray(
        written[ids[1]].astype(np.uint8), segmentation, ids[1], volume
    )
    logic.undoLastRun(segmentation, volume)
    after = allSegments(segmentation, volume)
    assert all(np.array_equal(before[s], after[s]) for s in before)
    assert not logic.canUndo(segmentation)
    with pytest.raises(SGPInputError, match="no SGP result to undo"):
        logic.undoLastRun(segmentation, volume)


def test_edit_during_the_run_writes_nothing(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    request = logic.prepareRun(volume, segmentation, ids)
    run = logic.startRun(request, logic.modelSettings(**RUN))
    drawn = segmentArray(segmentation, ids[0], volume).astype(np.uint8)
    drawn[3, 5:9, 5:9] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, ids[0], volume)
    with pytest.raises(
        SGPInputError, match="'liver' was edited while the run was going on; nothing was written"
    ):
        logic.runs.wait(run)
    np.testing.assert_array_equal(segmentArray(segmentation, ids[0], volume), drawn > 0)
    assert run.state == "failed"


def test_pseudo_masks_scores_plot_and_least_confident_jump(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    red = mrml.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    red.SetOrientationToAxial()
    report = logic.run(volume, segmentation, ids, keepPseudoMasks=True, **RUN)

    pseudo = mrml.scene.GetNodeByID(report.pseudoMaskNodeID)
    assert pseudo is not None and not pseudo.GetDisplayNode().GetVisibility()
    assert pseudo is segmentation.GetNodeReference("SGPPseudoMasks")
    names = [
        pseudo.GetSegmentation().GetSegment(s).GetName()
        for s in pseudo.GetSegmentation().GetSegmentIDs()
    ]
    assert names == ["liver", "spleen"]
    result = logic.lastResult
    table = mrml.scene.GetNodeByID(report.tableNodeID)
    assert table.GetNumberOfRows() == SHAPE[0]
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert columns[0] == "slice" and "liver confidence" in columns and "spleen source" in columns
    confidence = slicer.util.arrayFromTableColumn(table, "liver confidence")
    np.testing.assert_allclose(confidence, result.slice_scores[1]["confidence"], rtol=1e-6)
    chart = mrml.scene.GetNodeByID(report.chartNodeID)
    assert chart.GetNumberOfPlotSeriesNodes() == 2

    worst = logic.leastConfidentSlices(count=3)
    assert len(worst) == 3 and all(s not in LABELED for _, _, s, _ in worst)
    assert [c for *_, c in worst] == sorted(c for *_, c in worst)
    _, _, sliceIndex, _ = worst[0]
    ras = logic.jumpToSlice(volume, 0, sliceIndex)
    ijkToRAS = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijkToRAS)
    expected = ijkToRAS.MultiplyPoint(((SHAPE[2] - 1) / 2, (SHAPE[1] - 1) / 2, sliceIndex, 1.0))[:3]
    np.testing.assert_allclose(ras, expected, atol=1e-6)
    sliceToRAS = red.GetSliceToRAS()
    np.testing.assert_allclose([sliceToRAS.GetElement(r, 3) for r in range(3)], expected, atol=1e-3)


def test_reference_case_in_the_scene_is_support(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml, labeled=(), segments=("liver",))
    refVolume, refSegmentation, _ = makeScene(
        mrml, labeled=range(SHAPE[0]), segments=("Liver", "spleen"), name="reference"
    )
    request = logic.prepareRun(
        volume, segmentation, ids, referenceCases=logic.referenceCases([refSegmentation])
    )
    assert request.supportSlices == []
    items = request.supportBank[1]
    assert len(items) == SHAPE[0] and all(it.mask.any() for it in items)
    run = logic.startRun(request, logic.modelSettings(**RUN))
    logic.runs.wait(run)
    written = segmentArray(segmentation, ids[0], volume)
    np.testing.assert_array_equal(written, np.asarray(logic.lastResult.labels) == 1)


def test_reference_cases_use_the_engines_numpy_intensity_mapping():
    """The module maps reference cases with the engine's own code, which imports no torch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = ("import sys, slicer_i18n; slicer_i18n.install(); "  # slicer.i18n, as in Slicer
            "import SGPSegmentLib.reference_cases, SlicerSGP.data.intensity; "
            "print(sorted(m for m in ('torch', 'sam2', 'SimpleITK') if m in sys.modules))")
    paths = (root / "SGPSegment", root, root / "Testing")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_reference_cases_are_node_references_on_the_parameter_node(mrml, logic, tmp_path):  # noqa: F811
    _, first, _ = makeScene(mrml, name="case A")
    _, second, _ = makeScene(mrml, name="case B")
    parameterNode = mrml.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "SGPSegment")
    logic.setReferenceCases(parameterNode, [first, second])
    assert logic.referenceCaseNodes(parameterNode) == [first, second]
    # Saved and loaded again (IDs may change on import): still the same two segmentations.
    path = str(tmp_path / "scene.mrml")
    mrml.scene.SetURL(path)
    assert mrml.scene.Commit(path)
    mrml.scene.Clear(0)
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 0
    mrml.scene.SetURL(path)
    assert mrml.scene.Connect()
    reloaded = mrml.scene.GetFirstNodeByName("SGPSegment")
    assert [n.GetName() for n in logic.referenceCaseNodes(reloaded)] == [
        "case A segmentation",
        "case B segmentation",
    ]
    logic.setReferenceCases(reloaded, [])
    assert logic.referenceCaseNodes(reloaded) == []


def test_scene_close_cancels_and_forgets(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    logic.run(volume, segmentation, ids, **RUN)
    assert logic.lastResult is not None and logic.canUndo(segmentation)
    run = logic.startRun(logic.prepareRun(volume, segmentation, ids), logic.modelSettings(**RUN))
    logic.sceneClosing(run)
    assert run.state == "cancelled"
    assert logic.lastResult is None and not logic.canUndo(segmentation)
    assert logic.leastConfidentSlices() == []


# --------------------------------------------------------------------- panel (parameter node)


def test_panel_actions_from_the_parameter_node(mrml, logic, tmp_path):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    pn = types.SimpleNamespace(
        inputVolume=volume,
        segmentation=segmentation,
        segmentIds=",".join(ids),
        axis="K",
        model="tiny",
        checkpointPath=tmp_path / "none.safetensors",
        device="cpu",
        imageSize=256,
        topK=4,
        intensity="auto",
        keepPseudoMasks=False,
        parameterNode=mrml.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"),
    )
    assert logic.canRun(pn) == (True, "")
    assert logic.labeledSlicesSummary(pn)[0].startswith("liver: 2 labeled slice(s) along Axial (K)")
    pn.axis = "I"
    assert logic.labeledSlicesSummary(pn) == [
        "liver: no slice drawn along Sagittal (I)",
        "spleen: no slice drawn along Sagittal (I)",
    ]
    pn.model = "SGP checkpoint"
    assert logic.canRun(pn) == (False, "Choose the trained SGP checkpoint (.safetensors) file.")
    pn.segmentIds = ""
    assert logic.canRun(pn)[0] is False
    choices = logic.deviceChoices([{"device": "cuda:0", "name": "H100"}, {"device": "cpu"}])
    assert [c[0] for c in choices] == ["auto", "cuda:0", "cpu"]
    mac = logic.deviceChoices([{"device": "mps", "name": "Apple GPU (Metal)"}, {"device": "cpu"}])
    assert [c[0] for c in mac] == ["auto", "mps", "cpu"]


# ----------------------------------------------------------------------------- dependencies


def test_dependency_versions_are_checked_not_just_presence():
    from SGPSegmentLib import dependencies

    assert dependencies.problems(["numpy>=1.24"], {"numpy": "2.4.6"}) == []
    assert dependencies.problems(["numpy>=1.24"], {"numpy": "1.21.0"}) == [
        "numpy: 1.21.0 installed, needs >=1.24"
    ]
    assert dependencies.problems(["sam2==1.1.0"], {"sam2": None}) == [
        "sam2: not installed (needs sam2==1.1.0)"
    ]
    assert "peft>=0.11" not in dependencies.requirements(sgpCheckpoint=False)
    assert "peft>=0.11" in dependencies.requirements(sgpCheckpoint=True)
    assert dependencies.missing(sgpCheckpoint=True) == []  # this test environment has them all


def test_sam2_is_installed_only_after_its_sha256_matches(tmp_path):
    from SGPSegmentLib import dependencies

    from SlicerSGP.filesystem import file_sha256

    calls = []

    def fakePip(python, args, env=None):
        calls.append((args[0], env.get("SAM2_BUILD_CUDA") if env else None, args))
        if args[0] == "download":
            target = args[args.index("-d") + 1]
            (tmp_path / "sdist").write_bytes(b"not the pinned file")
            import shutil

            shutil.copy(tmp_path / "sdist", f"{target}/{dependencies.SAM2_SDIST}")
        return ""

    with pytest.raises(SGPError, match="sha256 .* not the pinned 7e0ea252.*not installed"):
        dependencies.installSam2("python", pip=fakePip)
    assert [c[0] for c in calls] == ["download"]  # never reached "install"
    assert calls[0][1] == "0" and "--no-deps" in calls[0][2]

    good = tmp_path / "good.tar.gz"
    good.write_bytes(b"x")
    import hashlib

    assert file_sha256(good) == hashlib.sha256(b"x").hexdigest()
    dependencies.SAM2_SHA256, saved = (
        file_sha256(tmp_path / "sdist"),
        dependencies.SAM2_SHA256,
    )
    try:
        calls.clear()
        dependencies.installSam2("python", pip=fakePip)
    finally:
        dependencies.SAM2_SHA256 = saved
    assert [c[0] for c in calls] == ["download", "install"]
    install = calls[1][2]
    assert {"--no-build-isolation", "--no-deps"} <= set(install) and calls[1][1] == "0"


def test_widget_calls_only_what_the_logic_has():
    """The Widget cannot run here (no Slicer application); at least every Logic method and
    attribute it uses must exist."""
    import ast
    from pathlib import Path

    from SGPSegmentLib import SGPSegmentCoreLogic

    source = (Path(__file__).resolve().parents[2] / "SGPSegment" / "SGPSegment.py").read_text()
    tree = ast.parse(source)
    logicClass = next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SGPSegmentLogic"
    )
    ownMethods = {n.name for n in logicClass.body if isinstance(n, ast.FunctionDef)}
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            if (
                node.value.attr == "logic"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"
            ):
                used.add(node.attr)
    assert {"poll", "cancel", "startRunFromParameterNode", "undoLastRun", "sceneClosing"} <= used
    logic = SGPSegmentCoreLogic()
    missing = sorted(name for name in used if name not in ownMethods and not hasattr(logic, name))
    assert not missing, f"SGPSegment.py uses Logic members that do not exist: {missing}"
    engine = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Attribute)
        and n.value.attr == "engine"
    }
    assert engine and all(hasattr(logic.engine, name) for name in engine), engine


def test_a_broken_torch_does_not_stop_the_panel(tmp_path):
    """The panel's Logic builds and answers with a torch that fails to import (e.g. a CUDA
    build that does not match the driver): it never imports torch."""
    import subprocess
    import sys
    from pathlib import Path

    broken = tmp_path / "torch"
    broken.mkdir()
    (broken / "__init__.py").write_text(
        "raise OSError('libcudart.so: cannot open shared object file')\n"
    )
    here = Path(__file__).resolve().parents[1]
    script = (
        "import sys, types\n"
        f"sys.path[:0] = [{str(tmp_path)!r}, {str(here)!r}]\n"
        "import module_fixtures\n"
        "from SGPSegmentLib import SGPSegmentCoreLogic\n"
        "logic = SGPSegmentCoreLogic()\n"
        "pn = types.SimpleNamespace(model='tiny', checkpointPath='', inputVolume=None, segmentation=None, segmentIds='', axis='K')\n"
        "print('STATUS', logic.weightsStatusText(pn), '|', logic.dependencyStatus(pn), '|', logic.canRun(pn))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "STATUS Weights:" in proc.stdout and "Select an input volume." in proc.stdout
