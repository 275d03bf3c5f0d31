"""The Segment Editor effect's Logic against real MRML (slicer-core) and a real local engine
(`sgp serve`: tiny model, random weights, CPU, 256 px):

* preview then Apply writes exactly what the module's run writes; the preview never touches the
  user's segments before Apply;
* Cancel, during and after a run, leaves the segmentation unchanged;
* undo after Apply restores exactly: the Logic's own undo, and the Segment Editor's undo logic
  (``vtkSlicerSegmentEditorLogic``, the C++ class Slicer >= 5.10's editor uses for
  ``saveStateForUndo``/Undo; the effect's own call of it needs the Slicer application);
* a click changes only its slice before re-propagation and makes it a drawn slice; the re-run
  after it recomputes only what the correction can change (the engine's per-structure counts);
* other segments keep their voxels unless the editor's overwrite setting says otherwise, and
  the editable area follows the editor's masking exactly as Slicer's own editor logic does;
* drawing while a preview runs cancels that run and starts one with the new slice;
* a box (or a click) on one slice starts a structure: that slice is made from the prompt and
  shown in the preview, the rest propagated; Apply writes it and it counts as drawn, also when
  edited afterwards; clicks on a prompted slice add to its prompt;
* a scribble removes (Shift) or adds every voxel it crosses, starting from the slice the
  preview shows and the engine's answer to the points sampled along it;
* Cancel after boxes, clicks and scribbles leaves everything as it was;
* "not here": with the editor overwriting other segments they are sent as excluded values and
  none of their voxels are in a predicted slice; with "Allow overlap" nothing is sent.

The effect's Qt panel and slice-view clicks need Slicer and do not run here; the last tests
check its files (Python 3.9 syntax, nothing heavy imported at module level, only widgets its
.ui has, everything listed in its CMake file).
"""

from __future__ import annotations

import ast
import py_compile
import re
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import slicer
from module_fixtures import (  # noqa: F401  (mrml, engineLogic: fixtures)
    LABELED,
    RUN,
    SHAPE,
    allSegments,
    engineLogic,
    makeScene,
    mrml,
    segmentArray,
    truth,
)

from SlicerSGP.errors import SGPInputError

ROOT = Path(__file__).resolve().parents[2]
EFFECT_DIR = ROOT / "SegmentEditorSGP"
LONG = (30, 64, 64)


@pytest.fixture
def logic(engineLogic):  # noqa: F811
    engineLogic.engine.configure("local")
    try:
        yield engineLogic
    finally:
        engineLogic.stopWatching()


@pytest.fixture
def preview(logic):
    from SGPSegmentLib.preview import PreviewLogic

    return PreviewLogic(logic)


def startPreview(preview, logic, volume, segmentation, ids, **kwargs):
    session = preview.start(
        volume, segmentation, ids, settings=logic.modelSettings(**RUN), **kwargs
    )
    assert preview.wait(session) == "done", session.run.error
    return session


def addSegment(segmentation, volume, name, mask) -> str:
    segmentId = segmentation.GetSegmentation().AddEmptySegment("", name)
    slicer.util.updateSegmentBinaryLabelmapFromArray(
        mask.astype(np.uint8), segmentation, segmentId, volume
    )
    return segmentId


def rasOf(volume, k, j, i):
    from SGPSegmentLib import mrml_io

    return (mrml_io.ijkToRAS(volume) @ np.array([i, j, k, 1.0]))[:3]


def viewDirections(volume, columns=(0, 1)):
    """In-plane directions (world) of a view along the volume's grid: IJK columns 0=I, 1=J, 2=K."""
    from SGPSegmentLib import mrml_io

    m = mrml_io.ijkToRAS(volume)[:3, :3]
    return tuple(m[:, c] / np.linalg.norm(m[:, c]) for c in columns)


def sameSegments(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[s], b[s]) for s in a)


# ------------------------------------------------------------------------- preview, apply



@contextmanager
def recordedRefinements(client):
    """While the block runs, each ``client.refine_slice`` call is recorded: its arguments
    followed by its answer."""
    seen: list[tuple] = []
    original = client.refine_slice

    def record(*args):
        answer = original(*args)
        seen.append((*args, answer))
        return answer

    client.refine_slice = record
    try:
        yield seen
    finally:
        del client.refine_slice

def test_preview_then_apply_writes_what_the_modules_run_writes(mrml, logic, preview):  # noqa: F811
    from SGPSegmentLib import outputs
    from SGPSegmentLib.preview import previewNode

    volume, segmentation, ids = makeScene(mrml, noiseSeed=3, name="module run")
    logic.run(volume, segmentation, ids, **RUN)
    expected = allSegments(segmentation, volume)

    volume2, segmentation2, ids2 = makeScene(mrml, noiseSeed=3, name="effect")
    before = allSegments(segmentation2, volume2)
    session = startPreview(preview, logic, volume2, segmentation2, ids2)
    assert session.axis == 0  # 'auto': the user drew axial slices
    # Nothing written yet; the preview node shows the prediction, the drawn slices are the user's.
    assert sameSegments(allSegments(segmentation2, volume2), before)
    node = previewNode(segmentation2)
    labels = np.asarray(session.result.labels)
    for value, segmentId in zip((1, 2), ids2, strict=True):
        shown = segmentArray(node, segmentId, volume2)
        wanted = labels == value
        wanted[list(LABELED)] = False
        np.testing.assert_array_equal(shown, wanted)
        assert shown.any()

    report = preview.apply(session)
    assert report.segmentIds == ids2
    applied = allSegments(segmentation2, volume2)
    for a, b in zip(ids, ids2, strict=True):
        np.testing.assert_array_equal(applied[b], expected[a])
    assert previewNode(segmentation2) is None and mrml.scene.GetNodeByID(node.GetID()) is None
    assert segmentation2.GetNodeReference(outputs.SCORES_TABLE_REFERENCE_ROLE) is not None
    with pytest.raises(SGPInputError, match="no preview to apply"):
        preview.apply(session)


def test_cancel_during_and_after_a_run_leaves_the_segmentation_unchanged(mrml, logic, preview):  # noqa: F811
    from SGPSegmentLib.preview import previewNode

    classes = ("vtkMRMLSegmentationNode", "vtkMRMLTableNode", "vtkMRMLPlotChartNode")
    volume, segmentation, ids = makeScene(mrml, shape=LONG, name="long")
    before = allSegments(segmentation, volume)
    counts = [mrml.scene.GetNumberOfNodesByClass(c) for c in classes]
    session = preview.start(volume, segmentation, ids, settings=logic.modelSettings(**RUN))
    deadline = time.monotonic() + 120
    while not session.run.stage.startswith("propagat"):
        assert time.monotonic() < deadline and session.running, session.run.stage
        preview.poll(session)
        time.sleep(0.02)
    preview.cancel(session)
    assert session.run.state == "cancelled" and session.result is None
    client, runId = session.run.client, session.run.runId
    while client.run_status(runId)["state"] not in ("cancelled", "canceled"):
        assert time.monotonic() < deadline, client.run_status(runId)
        time.sleep(0.05)
    assert preview.poll(session) == "cancelled"  # a later timer tick shows nothing
    assert previewNode(segmentation) is None
    assert sameSegments(allSegments(segmentation, volume), before)
    assert [mrml.scene.GetNumberOfNodesByClass(c) for c in classes] == counts
    assert not logic.canUndo(segmentation)

    # After a finished preview: Cancel removes the preview node and writes nothing.
    small, smallSegmentation, smallIds = makeScene(mrml, name="small")
    smallBefore = allSegments(smallSegmentation, small)
    counts = [mrml.scene.GetNumberOfNodesByClass(c) for c in classes]
    session = startPreview(preview, logic, small, smallSegmentation, smallIds)
    assert previewNode(smallSegmentation) is not None
    preview.cancel(session)
    preview.poll(session)  # a timer tick after Cancel shows nothing again
    assert previewNode(smallSegmentation) is None and session.result is None
    assert sameSegments(allSegments(smallSegmentation, small), smallBefore)
    assert [mrml.scene.GetNumberOfNodesByClass(c) for c in classes] == counts
    assert preview.canApply(session) == (False, "No preview yet: press Preview.")


def editorLogicFor(mrml, segmentation, volume):  # noqa: F811
    """Slicer's Segment Editor logic (C++) on this scene, as the editor widget sets it up."""
    editorLogicClass = getattr(slicer, "vtkSlicerSegmentEditorLogic", None)
    if editorLogicClass is None:
        pytest.skip("this slicer-core has no vtkSlicerSegmentEditorLogic (Slicer < 5.10)")
    editorLogic = editorLogicClass()
    editorLogic.SetMRMLScene(mrml.scene)
    editorLogic.SetMRMLApplicationLogic(mrml.appLogic)
    editorNode = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editorLogic.SetSegmentEditorNode(editorNode)
    editorNode.SetAndObserveSegmentationNode(segmentation)
    editorNode.SetAndObserveSourceVolumeNode(volume)
    return editorLogic, editorNode


def test_undo_after_apply_restores_exactly(mrml, logic, preview):  # noqa: F811
    from SGPSegmentLib.edit_rules import EditRules

    volume, segmentation, ids = makeScene(mrml, noiseSeed=4, name="undo")
    region = np.zeros(SHAPE, bool)
    region[2:4, 4:60, 4:60] = True  # under the liver's predicted slices: overwrite takes voxels
    other = addSegment(segmentation, volume, "other", region)
    before = allSegments(segmentation, volume)

    session = startPreview(preview, logic, volume, segmentation, ids[:1])
    preview.apply(session, EditRules(overwrite="all"))
    applied = allSegments(segmentation, volume)
    assert not np.array_equal(applied[other], before[other])  # the rule took voxels
    assert logic.canUndo(segmentation)
    logic.undoLastRun(segmentation, volume)
    assert sameSegments(allSegments(segmentation, volume), before)

    # The editor's undo: state saved before Apply (as the effect does), Undo restores it.
    editorLogic, _ = editorLogicFor(mrml, segmentation, volume)
    assert editorLogic.SaveStateForUndo()
    session = startPreview(preview, logic, volume, segmentation, ids[:1])
    preview.apply(session, EditRules(overwrite="all"))
    assert sameSegments(allSegments(segmentation, volume), applied)
    editorLogic.Undo()
    assert sameSegments(allSegments(segmentation, volume), before)


def test_other_segments_change_only_as_the_overwrite_setting_says(mrml, logic, preview):  # noqa: F811
    from SGPSegmentLib.edit_rules import EditRules

    volume, segmentation, ids = makeScene(mrml, noiseSeed=5, name="overwrite")
    liver, spleen = ids
    region = np.zeros(SHAPE, bool)
    region[2:4, 4:60, 4:60] = True  # slices the liver is predicted on
    other = addSegment(segmentation, volume, "other", region)
    hiddenRegion = np.zeros(SHAPE, bool)
    hiddenRegion[[0, 5], 4:60, 4:60] = True
    hidden = addSegment(segmentation, volume, "hidden", hiddenRegion)
    segmentation.GetDisplayNode().SetSegmentVisibility(hidden, False)
    before = allSegments(segmentation, volume)

    def applyWith(rules):
        # Slices 0 and 5 lie past the drawn ones (1, 4): the random model's masks there need
        # not overlap the drawn slices, so the stop by continuity is off to have them written.
        session = startPreview(preview, logic, volume, segmentation, [liver], min_continuity=0)
        preview.apply(session, rules)
        after = allSegments(segmentation, volume)
        logic.undoLastRun(segmentation, volume)
        assert sameSegments(allSegments(segmentation, volume), before)
        return after

    kept = applyWith(EditRules(overwrite="none"))  # the module's and the Logic's default
    for segmentId in (spleen, other, hidden):
        np.testing.assert_array_equal(kept[segmentId], before[segmentId])
    added = kept[liver] & ~before[liver]
    assert (added & before[other]).any() and (added & before[hidden]).any()

    taken = applyWith(EditRules(overwrite="all"))
    np.testing.assert_array_equal(taken[liver], kept[liver])  # the selected segment is the same
    for segmentId in (spleen, other, hidden):
        np.testing.assert_array_equal(taken[segmentId], before[segmentId] & ~added)
    assert not np.array_equal(taken[other], before[other])

    visible = applyWith(EditRules(overwrite="visible"))
    np.testing.assert_array_equal(visible[hidden], before[hidden])  # hidden: untouched
    np.testing.assert_array_equal(visible[other], before[other] & ~added)


def test_editable_area_and_overwrite_match_slicers_editor_logic(mrml):  # noqa: F811
    """The Logic's masking (GenerateEditMask + intensity range) and overwrite give what the
    Segment Editor's own C++ logic gives for the same change, mode by mode."""
    from SGPSegmentLib.edit_rules import EditRules, applyRules

    volume, segmentation, ids = makeScene(mrml, noiseSeed=7, name="masking")
    region = np.zeros(SHAPE, bool)
    region[1:5, 10:40, 30:62] = True
    other = addSegment(segmentation, volume, "other", region)
    liver = ids[0]
    editorLogic, editorNode = editorLogicFor(mrml, segmentation, volume)
    editorNode.SetSelectedSegmentID(liver)
    before = allSegments(segmentation, volume)
    wanted = np.zeros(SHAPE, bool)
    wanted[0:5, 15:50, 5:45] = True  # adds where other and spleen are, removes some liver
    image = slicer.util.arrayFromVolume(volume)
    low, high = float(np.percentile(image, 30)), float(np.percentile(image, 95))
    node = slicer.vtkMRMLSegmentationNode
    cases = [
        EditRules("all"),
        EditRules("none"),
        EditRules("all", node.EditAllowedOutsideAllSegments),
        EditRules("none", node.EditAllowedInsideAllSegments),
        EditRules("all", node.EditAllowedInsideSingleSegment, other),
        EditRules("all", node.EditAllowedEverywhere, "", (low, high)),
    ]
    modes = {"all": 0, "visible": 1, "none": 2}
    for rules in cases:
        final, others = applyRules(rules, segmentation, volume, {liver: wanted}, before)
        ours = dict(before)
        ours[liver] = final[liver]
        ours.update({s: new for s, (_, new) in others.items()})

        editorNode.SetOverwriteMode(modes[rules.overwrite])
        editorNode.SetMaskMode(rules.maskMode)
        editorNode.SetMaskSegmentID(rules.maskSegmentId or None)
        editorNode.SetSourceVolumeIntensityMask(rules.intensityRange is not None)
        if rules.intensityRange:
            editorNode.SetSourceVolumeIntensityMaskRange(*rules.intensityRange)
        assert editorLogic.SaveStateForUndo()
        logicClass = type(editorLogic)
        for mode, mask in (
            (logicClass.ModificationModeAdd, wanted & ~before[liver]),
            (logicClass.ModificationModeRemove, before[liver] & ~wanted),
        ):
            modifier = _orientedImage(volume, mask)
            editorLogic.ModifySegmentByLabelmap(segmentation, liver, modifier, mode, True, False)
        slicers = allSegments(segmentation, volume)
        editorLogic.Undo()
        assert sameSegments(allSegments(segmentation, volume), before)
        for segmentId in before:
            np.testing.assert_array_equal(ours[segmentId], slicers[segmentId], err_msg=f"{rules}")
        assert not np.array_equal(final[liver], before[liver])


def _orientedImage(volume, mask):
    from SGPSegmentLib import mrml_io
    from vtk.util.numpy_support import numpy_to_vtk

    image = mrml_io.referenceImage(volume)
    image.GetPointData().SetScalars(numpy_to_vtk(mask.astype(np.uint8).reshape(-1), deep=True))
    return image


def test_rules_follow_the_segment_editors_masking_settings(mrml):  # noqa: F811
    from SGPSegmentLib.edit_rules import EditRules, describe, rulesFromEditorNode

    editorNode = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    assert rulesFromEditorNode(editorNode) == EditRules("all")  # Slicer's default: overwrite all
    editorNode.SetOverwriteMode(editorNode.OverwriteNone)
    assert rulesFromEditorNode(editorNode).overwrite == "none"
    assert "never changed" in describe(rulesFromEditorNode(editorNode))
    editorNode.SetOverwriteMode(editorNode.OverwriteVisibleSegments)
    editorNode.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editorNode.SetMaskSegmentID("Segment_7")
    editorNode.SetSourceVolumeIntensityMask(True)
    editorNode.SetSourceVolumeIntensityMaskRange(-100.0, 250.0)
    rules = rulesFromEditorNode(editorNode)
    assert rules == EditRules(
        "visible", slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment, "Segment_7",
        (-100.0, 250.0),
    )  # fmt: skip
    assert "visible other segments" in describe(rules) and "editable area" in describe(rules)
    with pytest.raises(SGPInputError, match="overwrite must be one of none, all, visible"):
        EditRules("some")
    with pytest.raises(SGPInputError, match="no segment is chosen"):
        EditRules("all", slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    with pytest.raises(SGPInputError, match="is empty"):
        EditRules("all", 0, "", (5.0, 1.0))


# --------------------------------------------------------------------- click refinement


def test_a_click_changes_only_its_slice_and_makes_it_drawn(mrml, logic, preview):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml, noiseSeed=6, name="clicks")
    liver = ids[0]
    session = startPreview(preview, logic, volume, segmentation, ids, top_k=1)
    first = session.result
    before = allSegments(segmentation, volume)
    k = 2
    js, is_ = np.nonzero(truth()[1][k])
    j, i = int(js.mean()), int(is_.mean())
    inPlane = viewDirections(volume)
    client = logic.engine.client(session.settings)
    with recordedRefinements(client) as seen:
        report = preview.refine(session, liver, rasOf(volume, k, j, i), True, inPlane)
        afterFirst = allSegments(segmentation, volume)
        report2 = preview.refine(session, liver, rasOf(volume, k, j + 9, i + 9), False, inPlane)
    assert (report.slice, report.point, report.positive) == (k, (j, i), True)
    volumeId, sliceIndex, points, labels, base, options, (mask, iou) = seen[0]
    assert (volumeId, sliceIndex, points, labels) == (session.volumeId, k, [(j, i)], [1])
    np.testing.assert_array_equal(base, np.asarray(first.labels)[k] == 1)  # the preview's slice
    assert options.axis == 0 and np.isfinite(iou)
    # Only that slice of that segment changed, to the engine's answer.
    np.testing.assert_array_equal(afterFirst[liver][k], mask)
    others = [s for s in range(SHAPE[0]) if s != k]
    np.testing.assert_array_equal(afterFirst[liver][others], before[liver][others])
    assert np.array_equal(afterFirst[ids[1]], before[ids[1]])
    assert report.changedVoxels == int((afterFirst[liver] != before[liver]).sum()) > 0
    assert logic.labeledSlices(volume, segmentation, [liver])[0].slices == [1, k, 4]
    # A second click on that slice adds to the first one, from the same starting mask.
    _, _, points2, labels2, base2, _, (mask2, _) = seen[1]
    assert points2 == [(j, i), (j + 9, i + 9)] and labels2 == [1, 0] and report2.positive is False
    np.testing.assert_array_equal(base2, base)
    np.testing.assert_array_equal(segmentArray(segmentation, liver, volume)[k], mask2)
    # A click in a view of another orientation is refused; nothing changes.
    corrected = allSegments(segmentation, volume)
    with pytest.raises(SGPInputError, match=r"shows Axial \(K\) slices"):
        preview.refine(session, liver, rasOf(volume, k, j, i), True, viewDirections(volume, (0, 2)))
    assert sameSegments(allSegments(segmentation, volume), corrected)

    # Propagation again: slice k is the liver's support now, and only what it can change is
    # recomputed (the spleen, not corrected, is taken whole from the last run).
    preview.update(session)
    assert preview.wait(session) == "done"
    second = session.result
    assert second.labeled_by_structure[1] == [1, k, 4] and second.labeled_by_structure[2] == [1, 4]
    np.testing.assert_array_equal(np.asarray(second.labels)[k] == 1, mask2)
    if not getattr(second, "slices_predicted", None):
        pytest.skip("the engine reports no per-structure re-run counts (slices_predicted)")
    assert second.slices_predicted[2] == 0 and second.slices_reused[2] == first.slices_predicted[2]
    assert 0 < second.slices_predicted[1] < first.slices_predicted[1]
    report = preview.apply(session)
    np.testing.assert_array_equal(segmentArray(segmentation, liver, volume)[k], mask2)


def test_click_and_view_geometry_on_a_rotated_grid(mrml):  # noqa: F811
    from SGPSegmentLib.refinement import clickOnSlice, sliceIndexFromViews

    volume, _, _ = makeScene(mrml, name="geometry")
    axial = viewDirections(volume)
    assert clickOnSlice(volume, 0, rasOf(volume, 3, 20, 41), axial) == (3, 20, 41)
    assert clickOnSlice(volume, 1, rasOf(volume, 3, 20, 41)) == (20, 3, 41)  # (k, i) in a J slice
    assert clickOnSlice(volume, 2, rasOf(volume, 3, 20, 41.4)) == (41, 3, 20)
    with pytest.raises(SGPInputError, match="outside the volume"):
        clickOnSlice(volume, 0, rasOf(volume, 3, 20, 80), axial)
    view = np.eye(4)
    view[:3, 0], view[:3, 1] = axial
    view[:3, 2] = np.cross(*axial)
    view[:3, 3] = rasOf(volume, 4, 10, 10)
    coronal = view.copy()
    coronal[:3, 1] = viewDirections(volume, (2,))[0]
    assert sliceIndexFromViews(volume, "K", [coronal, view]) == 4  # the aligned view counts
    with pytest.raises(SGPInputError, match=r"No slice view shows Coronal \(J\) slices"):
        sliceIndexFromViews(volume, "J", [view])


# ----------------------------------------------------------- boxes, clicks and scribbles


def sliceView(volume, axis=0):
    """In-plane directions of a view that shows ``axis`` slices (IJK columns: 0=I, 1=J, 2=K)."""
    return viewDirections(volume, {0: (0, 1), 1: (0, 2), 2: (1, 2)}[axis])


def test_a_box_makes_a_drawn_slice_of_the_selected_segment_and_a_preview(mrml, logic, preview):  # noqa: F811
    from SGPSegmentLib.preview import previewNode

    volume, segmentation, ids = makeScene(mrml, noiseSeed=9, name="box")
    lesion = segmentation.GetSegmentation().AddEmptySegment("", "lesion")
    before = allSegments(segmentation, volume)
    k = 2
    js, is_ = np.nonzero(truth()[1][k])  # the liver's blob on slice 2, drawn nowhere as lesion
    corners = (rasOf(volume, k, js.max(), is_.max()), rasOf(volume, k, js.min(), is_.min()))
    session = preview.startFromPrompt(
        "box", volume, segmentation, [], lesion, corners, sliceView(volume),
        settings=logic.modelSettings(**RUN),
    )  # fmt: skip
    assert preview.wait(session) == "done", session.run.error
    assert (session.axis, session.segmentIds) == (0, [lesion])
    [prompt] = session.request.prompts
    assert (prompt.value, prompt.slice_index, prompt.points) == (1, k, [])
    assert prompt.box == (is_.min(), js.min(), is_.max(), js.max())  # (x0, y0, x1, y1)
    result = session.result
    labels = np.asarray(result.labels)
    assert result.prompted_by_structure[1] == [k] and k in result.labeled_by_structure[1]
    scores = {int(r["slice"]): str(r["source"]) for r in result.slice_scores[1]}
    assert scores[k] == "prompted"
    assert [s for s, source in scores.items() if source not in ("prompted", "absent")]
    # The prompted slice shows in the preview as made; the user's segments are untouched.
    shown = segmentArray(previewNode(segmentation), lesion, volume)
    np.testing.assert_array_equal(shown, labels == 1)
    assert sameSegments(allSegments(segmentation, volume), before)
    assert preview.canApply(session) == (True, "")

    report = preview.apply(session)
    written = segmentArray(segmentation, lesion, volume)
    np.testing.assert_array_equal(written, labels == 1)
    assert report.segmentIds == [lesion]
    table = mrml.scene.GetNodeByID(report.tableNodeID).GetTable()
    assert table.GetColumnByName("lesion source").GetValue(k) == "prompted"  # the scores table
    assert logic.labeledSlices(volume, segmentation, [lesion])[0].slices == [k]
    # Edited afterwards with any effect: the prompted slice and the new one count as drawn.
    edited = written.copy()
    for s, plane in ((k, ~written[k]), (4, truth()[1][4])):  # two strokes, one slice each
        edited[s] = plane
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            edited.astype(np.uint8), segmentation, lesion, volume
        )
    assert logic.labeledSlices(volume, segmentation, [lesion])[0].slices == [k, 4]


def test_a_click_starts_a_structure_and_adds_to_a_prompted_slice(mrml, logic, preview):  # noqa: F811
    volume, segmentation, _ = makeScene(mrml, segments=(), shape=(16, 20, 24), name="click")
    lesion = segmentation.GetSegmentation().AddEmptySegment("", "lesion")
    view = sliceView(volume, 1)  # a coronal (J) view: the preview runs along J
    session = preview.startFromPrompt(
        "click", volume, segmentation, [], lesion, [rasOf(volume, 3, 10, 12)], view,
        settings=logic.modelSettings(**RUN),
    )  # fmt: skip
    assert session.axis == 1
    assert preview.wait(session) == "done", session.run.error
    [prompt] = session.request.prompts
    assert (prompt.slice_index, prompt.box, prompt.points) == (10, None, [(12.0, 3.0, True)])
    assert session.result.prompted_by_structure[1] == [10]
    # A Shift click on that slice adds a "not here" point to its prompt; nothing is written.
    text = preview.click(session, lesion, rasOf(volume, 2, 10, 18), False, view)
    assert "1 click(s) here + 1 click(s) not here" in text
    assert preview.canApply(session)[0] is False  # the preview shown predates the click
    assert preview.update(session, onlyIfChanged=True) is not None
    assert preview.wait(session) == "done"
    [prompt] = session.request.prompts
    assert prompt.points == [(12.0, 3.0, True), (18.0, 2.0, False)]
    assert not segmentArray(segmentation, lesion, volume).any()
    preview.cancel(session)


def test_a_scribble_removes_what_it_crosses(mrml, logic, preview):  # noqa: F811
    from SGPSegmentLib.preview import previewNode

    volume, segmentation, ids = makeScene(mrml, noiseSeed=10, name="scribble")
    liver = ids[0]
    session = startPreview(preview, logic, volume, segmentation, ids)
    before = allSegments(segmentation, volume)
    k, row = 2, 24
    shown = session.previewSlice(liver, k).copy()
    shown[row, 5:60] = True  # so that the stroke crosses preview voxels whatever the model says
    session.result.labels = np.asarray(session.result.labels).copy()
    session.result.labels[k][shown] = 1
    client = logic.engine.client(session.settings)
    with recordedRefinements(client) as seen:
        path = [rasOf(volume, k, row, 5), rasOf(volume, k, row, 59)]
        preview.scribble(session, liver, path, False, sliceView(volume))
    _, sliceIndex, points, labels, base, options, (engineMask, _) = seen[0]
    assert sliceIndex == k and set(labels) == {0} and 2 < len(points) <= 12
    assert all(r == row and 5 <= c <= 59 for r, c in points)
    np.testing.assert_array_equal(base, shown)  # the slice as the preview shows it
    fixed = session.prompts[(liver, k)].fixed
    assert not fixed[row, 5:60].any()  # every voxel crossed is removed
    outside = np.ones_like(fixed)
    outside[row, 5:60] = False
    np.testing.assert_array_equal(fixed[outside], np.asarray(engineMask, bool)[outside])
    assert sameSegments(allSegments(segmentation, volume), before)  # nothing written yet

    assert preview.update(session, onlyIfChanged=True) is not None
    assert preview.wait(session) == "done"
    np.testing.assert_array_equal(np.asarray(session.result.labels)[k] == 1, fixed)
    np.testing.assert_array_equal(segmentArray(previewNode(segmentation), liver, volume)[k], fixed)
    # A left stroke adds what it crosses.
    preview.scribble(session, liver, [rasOf(volume, k, 40, 10), rasOf(volume, k, 40, 30)], True,
                     sliceView(volume))  # fmt: skip
    added = session.prompts[(liver, k)].fixed
    assert added[40, 10:31].all() and not added[row, 5:60].any()
    assert preview.update(session, onlyIfChanged=True) is not None
    assert preview.wait(session) == "done"
    preview.apply(session)
    np.testing.assert_array_equal(segmentArray(segmentation, liver, volume)[k], added)
    assert k in logic.labeledSlices(volume, segmentation, [liver])[0].slices


def test_cancel_after_boxes_clicks_and_scribbles_leaves_everything_unchanged(mrml, logic, preview):  # noqa: F811
    from SGPSegmentLib.preview import previewNode

    classes = ("vtkMRMLSegmentationNode", "vtkMRMLTableNode", "vtkMRMLPlotChartNode")
    volume, segmentation, ids = makeScene(mrml, noiseSeed=11, name="cancel prompts")
    before = allSegments(segmentation, volume)
    counts = [mrml.scene.GetNumberOfNodesByClass(c) for c in classes]
    view = sliceView(volume)
    session = startPreview(preview, logic, volume, segmentation, ids)
    preview.box(session, ids[1], rasOf(volume, 3, 50, 55), rasOf(volume, 3, 36, 36), view)
    preview.click(session, ids[1], rasOf(volume, 3, 44, 46), True, view)
    preview.scribble(session, ids[0], [rasOf(volume, 2, 24, 5), rasOf(volume, 2, 24, 40)],
                     False, view)  # fmt: skip
    preview.update(session, onlyIfChanged=True)
    assert preview.wait(session) == "done"
    assert session.result.prompted_by_structure[2] == [3]
    assert sameSegments(allSegments(segmentation, volume), before)
    preview.cancel(session)
    preview.poll(session)
    assert previewNode(segmentation) is None and not session.prompts
    assert sameSegments(allSegments(segmentation, volume), before)
    assert [mrml.scene.GetNumberOfNodesByClass(c) for c in classes] == counts
    assert not logic.canUndo(segmentation)


@pytest.mark.parametrize("overwrite", ["OverwriteAllSegments", "OverwriteNone"])
def test_not_here_is_sent_when_masking_overwrites(mrml, logic, preview, overwrite):  # noqa: F811
    from SGPSegmentLib.preview import notHereDefault, notHereMode

    volume, segmentation, ids = makeScene(mrml, noiseSeed=12, name="not here")
    liver, spleen = ids
    region = np.zeros(SHAPE, bool)
    region[:, 14:40, 10:36] = True  # over the liver everywhere: a leak there is kept out
    other = addSegment(segmentation, volume, "other", region)
    editorNode = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editorNode.SetOverwriteMode(getattr(editorNode, overwrite))
    mode = notHereMode(notHereDefault(editorNode), editorNode)
    session = startPreview(preview, logic, volume, segmentation, [liver], notHere=mode)
    request, labels = session.request, np.asarray(session.result.labels)
    predicted = [s for s in range(SHAPE[0]) if s not in LABELED]
    if overwrite == "OverwriteNone":
        assert mode == "off" and request.options.exclude is None and not request.excluded
        assert set(np.unique(labels)) <= {0, 1}
        return
    assert mode == "all" and request.excluded == {2: spleen, 3: other}
    assert request.options.exclude == [2, 3]
    assert set(np.unique(labels)) <= {0, 1}  # the "not here" segments are never labels
    spleenMask = segmentArray(segmentation, spleen, volume)
    for s in predicted:  # none of their voxels on a predicted slice
        assert not ((labels[s] == 1) & (region[s] | spleenMask[s])).any(), s
    # Turned off on the open preview: the next run sends nothing as "not here".
    assert preview.setNotHere(session, "off") is not None
    assert preview.wait(session) == "done"
    assert session.request.options.exclude is None
    preview.cancel(session)


# -------------------------------------------------------------- updates, range, quality


def test_drawing_during_a_preview_cancels_it_and_starts_a_new_run(mrml, logic, preview):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml, shape=LONG, labeled=(2, 20), name="drawing")
    session = preview.start(volume, segmentation, ids[:1], settings=logic.modelSettings(**RUN))
    firstRun = session.run
    assert preview.update(session, onlyIfChanged=True) is None  # nothing drawn: no new run
    drawn = segmentArray(segmentation, ids[0], volume).astype(np.uint8)
    drawn[11] = truth(LONG)[1][11]
    slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, ids[0], volume)
    assert preview.changedSegments(session) == ["liver"]
    assert preview.canApply(session)[0] is False  # no preview shown yet
    newRun = preview.update(session, onlyIfChanged=True)
    assert newRun is not None and firstRun.state == "cancelled" and session.runsStarted == 2
    assert newRun.request.labeledSegments[0].slices == [2, 11, 20]
    assert preview.wait(session) == "done" and session.result.labeled_by_structure[1] == [2, 11, 20]
    # Drawn again after this preview: Apply refuses, naming the segment, and writes nothing.
    drawn[15] = truth(LONG)[1][15]
    slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, ids[0], volume)
    current = allSegments(segmentation, volume)
    with pytest.raises(SGPInputError, match="'liver' changed after the preview"):
        preview.apply(session)
    assert sameSegments(allSegments(segmentation, volume), current)
    preview.cancel(session)


def test_slice_range_and_slices_to_check(mrml, logic, preview):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml, noiseSeed=8, name="range")
    with pytest.raises(SGPInputError, match="slice range 4..9 must lie within 0..5"):
        startPreview(preview, logic, volume, segmentation, ids, sliceRange=(4, 9))
    session = startPreview(preview, logic, volume, segmentation, ids, sliceRange=(1, 4))
    labels = np.asarray(session.result.labels)
    assert not labels[[0, 5]].any() and labels[[2, 3]].any()  # nothing outside the range
    items = preview.slicesToCheck(session, count=6)
    assert items and [i.confidence for i in items] == sorted(i.confidence for i in items)
    scores = {v: {int(r["slice"]): float(r["confidence"]) for r in s}
              for v, s in session.result.slice_scores.items()}  # fmt: skip
    for item in items:
        value = 1 if item.segmentId == ids[0] else 2
        assert item.slice not in LABELED and item.confidence == scores[value][item.slice]
    assert items[0].describe(0).startswith(f"{items[0].name}: Axial (K) slice {items[0].slice}")
    ras = preview.jumpTo(session, items[0])
    from SGPSegmentLib import mrml_io

    np.testing.assert_allclose(ras, mrml_io.sliceCenterRAS(volume, 0, items[0].slice))
    preview.cancel(session)


def test_auto_orientation_is_the_one_drawn_in(mrml, logic, preview):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml, segments=("liver",), name="coronal")
    mask = np.zeros(SHAPE, np.uint8)
    mask[:, 20, 10:30] = 1  # two coronal (J) strokes...
    mask[:, 40, 12:28] = 1
    segmentId = addSegment(segmentation, volume, "vessel", mask)
    assert preview.resolveAxis(volume, segmentation, [segmentId]) == 1
    assert preview.resolveAxis(volume, segmentation, ids) == 0
    assert preview.resolveAxis(volume, segmentation, ids, "I") == 2
    with pytest.raises(SGPInputError, match="Choose at least one segment"):
        preview.start(volume, segmentation, [], settings=logic.modelSettings(**RUN))


def test_preview_takes_engine_model_and_options_from_the_module_settings(mrml, logic, tmp_path):  # noqa: F811
    """One place for the settings: the effect passes what the module's parameter node holds."""
    import types

    volume, segmentation, _ = makeScene(mrml, name="case")
    referenceVolume, reference, _ = makeScene(mrml, name="reference")
    pn = types.SimpleNamespace(
        model="small",
        checkpointPath=tmp_path / "none.safetensors",
        device="cuda:0",
        imageSize=512,
        topK=3,
        intensity="ct_abdomen",
        interpolationPrior="both",
        parameterNode=mrml.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"),
    )
    logic.setReferenceCases(pn.parameterNode, [reference, segmentation])
    arguments = logic.previewArguments(pn, segmentation)
    assert arguments["settings"] == logic.modelSettings("small", None, "cuda:0", 512, 0)
    # The segmentation being previewed is never its own reference case.
    assert arguments["referenceCases"] == [(referenceVolume, reference)]
    assert (arguments["top_k"], arguments["intensity"]) == (3, "ct_abdomen")
    assert arguments["interpolation_prior"] == "both"  # the module's choice reaches previews
    # previews take support from the drawn slices bounding each interval: fast re-runs
    assert arguments["local_support"] is True
    assert logic.engineSummary(pn) == "Engine: this computer; model small at 512 px on cuda:0."


# ------------------------------------------------------------------------ effect's files


EFFECT_FILES = sorted(EFFECT_DIR.rglob("*.py"))
LIGHT_AT_MODULE_LEVEL = {"os", "qt", "slicer", "vtk", "SegmentEditorEffects", "SGPSegmentLib"}


def test_effect_files_compile_as_python_39_and_import_nothing_heavy_at_module_level():
    assert {p.name for p in EFFECT_FILES} >= {"SegmentEditorSGP.py", "SegmentEditorEffect.py"}
    for path in EFFECT_FILES:
        py_compile.compile(str(path), doraise=True)
        tree = ast.parse(path.read_text(), feature_version=(3, 9))  # an old Slicer still loads it
        for node in tree.body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in LIGHT_AT_MODULE_LEVEL, f"{path.name} imports {name} at module level"
                if top == "SGPSegmentLib":  # only the Python-3.9-safe parts before the check
                    assert name in ("SGPSegmentLib", "SGPSegmentLib.constants") or path.name == (
                        "panel.py"
                    ), f"{path.name} imports {name} before the Slicer version check"
        text = _codeWithoutDocstrings(tree)
        for heavy in ("torch", "numpy", "AddNewNodeByClass", "arrayFromSegment", "SlicerSGP."):
            if path.name != "SegmentEditorSGP.py":  # the self-test builds a scene
                assert heavy not in text, f"{path.name} uses {heavy}: that belongs in the Logic"


def _codeWithoutDocstrings(tree: ast.Module) -> str:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def test_effect_uses_only_widgets_its_ui_has_and_cmake_installs_everything():
    import xml.etree.ElementTree as ET

    from extension.test_module_packaging import cmakeSets

    ui = EFFECT_DIR / "Resources" / "UI" / "SegmentEditorSGP.ui"
    names = {w.get("name") for w in ET.parse(ui).iter("widget")}
    used = set()
    for path in EFFECT_FILES:
        used |= set(re.findall(r"self\.ui\.(\w+)", path.read_text()))
    assert used and used <= names, sorted(used - names)
    sets = cmakeSets(EFFECT_DIR / "CMakeLists.txt")
    listed = {
        EFFECT_DIR / p for p in sets["MODULE_PYTHON_SCRIPTS"] + sets["MODULE_PYTHON_RESOURCES"]
    }
    present = {p for p in EFFECT_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    present -= {EFFECT_DIR / "CMakeLists.txt"}
    assert listed == present, (
        sorted(map(str, listed - present)),
        sorted(map(str, present - listed)),
    )
    assert "add_subdirectory(SegmentEditorSGP)" in (ROOT / "CMakeLists.txt").read_text()
    effect = (EFFECT_DIR / "SegmentEditorSGPLib" / "SegmentEditorEffect.py").read_text()
    assert 'scriptedEffect.name = "SGP"' in effect and "def clone(self)" in effect
    module = (EFFECT_DIR / "SegmentEditorSGP.py").read_text()
    assert 'connect("startupCompleted()", self.registerEditorEffect)' in module
    assert "SegmentEditorSGPLib" in module and "SegmentEditorEffect.py" in module
    panel = (EFFECT_DIR / "SegmentEditorSGPWidgets" / "panel.py").read_text()
    assert "saveStateForUndo()" in panel and "rulesFromEditorNode" in panel
