"""Where a box, click or stroke drawn in a slice view lands, and the "not here" option's default,
on real MRML (slicer-core); no engine needed.

* World (RAS) -> slice, row, column along each of the three array axes, on a volume whose grid
  is rotated, flipped, anisotropic and off the origin: the voxel found holds the value the
  engine reads at that slice, row and column (``np.moveaxis(volume, axis, 0)[k][row, col]``);
  the view's axis follows its in-plane directions; an oblique view is refused.
* Boxes: corners in any order, cut to the slice, refused outside it, as a line or across
  slices. Strokes: every voxel crossed, at most a dozen points spaced along it, ends kept.
* "Not here": on by default when the Segment Editor's Masking overwrites other segments, off
  with "Allow overlap"; with "visible segments" only the visible others are sent.
"""

from __future__ import annotations

import numpy as np
import pytest
import slicer
from module_fixtures import SHAPE, makeScene, mrml  # noqa: F401

from SlicerSGP.errors import SGPInputError

VOXEL = (3, 20, 41)  # (k, j, i)
VIEW_COLUMNS = {0: (0, 1), 1: (0, 2), 2: (1, 2)}
"""In-plane IJK columns (0 = I, 1 = J, 2 = K) of a view that shows slices along each axis."""


def rasOf(volume, k, j, i):
    from SGPSegmentLib import mrml_io

    return (mrml_io.ijkToRAS(volume) @ np.array([i, j, k, 1.0]))[:3]


def inPlane(volume, axis):
    from SGPSegmentLib import mrml_io

    m = mrml_io.ijkToRAS(volume)[:3, :3]
    return tuple(m[:, c] / np.linalg.norm(m[:, c]) for c in VIEW_COLUMNS[axis])


@pytest.fixture
def volume(mrml):  # noqa: F811
    volume, _, _ = makeScene(mrml, name="geometry")
    return volume


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_click_lands_on_the_voxel_the_engine_reads_along_each_axis(volume, axis):
    from SGPSegmentLib.slice_geometry import pointOnSlice, viewAxis

    image = slicer.util.arrayFromVolume(volume)
    k, j, i = VOXEL
    # A third of a voxel off in every direction still lands on the voxel.
    ras = rasOf(volume, k + 0.3, j - 0.3, i + 0.3)
    s, row, col = pointOnSlice(volume, axis, ras, inPlane(volume, axis))
    expected = {0: (k, j, i), 1: (j, k, i), 2: (i, k, j)}[axis]
    assert (s, row, col) == expected
    assert np.moveaxis(image, axis, 0)[s][row, col] == image[k, j, i]
    assert viewAxis(volume, ras, inPlane(volume, axis)) == axis
    other = (axis + 1) % 3
    with pytest.raises(SGPInputError, match="shows .* slices"):
        pointOnSlice(volume, axis, ras, inPlane(volume, other))


def test_an_oblique_view_and_a_click_outside_are_refused(volume):
    from SGPSegmentLib.slice_geometry import pointOnSlice, viewAxis

    a, b = inPlane(volume, 0)
    tilted = (a * np.cos(0.3) + np.cross(a, b) * np.sin(0.3), b)
    with pytest.raises(SGPInputError, match="oblique"):
        viewAxis(volume, rasOf(volume, *VOXEL), tilted)
    with pytest.raises(SGPInputError, match="outside the volume"):
        pointOnSlice(volume, 0, rasOf(volume, 3, 20, 70))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_box_is_normalised_and_cut_to_the_slice_along_each_axis(volume, axis):
    from SGPSegmentLib.slice_geometry import boxFromCorners, sliceSize

    k, j, i = VOXEL
    corners = {0: ((k, 30, 50), (k, 10, 20)), 1: ((5, j, 50), (1, j, 20)),
               2: ((5, 30, i), (1, 10, i))}[axis]  # fmt: skip
    start, end = (rasOf(volume, *c) for c in corners)
    box = boxFromCorners(volume, axis, start, end, inPlane(volume, axis))
    rowcol = [tuple(v for a, v in enumerate(c) if a != axis) for c in corners]
    (r0, c0), (r1, c1) = rowcol
    assert box.slice == corners[0][axis]
    assert (box.row0, box.col0, box.row1, box.col1) == (min(r0, r1), min(c0, c1),
                                                        max(r0, r1), max(c0, c1))  # fmt: skip
    assert box.xyxy == (box.col0, box.row0, box.col1, box.row1)
    assert box == boxFromCorners(volume, axis, end, start)  # corners in any order
    # Dragged past the volume's edge: cut to the slice.
    rows, cols = sliceSize(volume, axis)
    far = list(corners[0])
    rest = [a for a in range(3) if a != axis]
    far[rest[0]], far[rest[1]] = rows + 7, cols + 9
    cut = boxFromCorners(volume, axis, rasOf(volume, *far), end)
    assert (cut.row1, cut.col1) == (rows - 1, cols - 1)


def test_a_box_outside_as_a_line_or_across_slices_is_refused(volume):
    from SGPSegmentLib.slice_geometry import boxFromCorners

    with pytest.raises(SGPInputError, match="outside the volume"):
        boxFromCorners(volume, 0, rasOf(volume, 3, 70, 70), rasOf(volume, 3, 90, 80))
    with pytest.raises(SGPInputError, match="too small"):
        boxFromCorners(volume, 0, rasOf(volume, 3, 20, 10), rasOf(volume, 3, 20, 40))
    with pytest.raises(SGPInputError, match="different slices"):
        boxFromCorners(volume, 0, rasOf(volume, 3, 10, 10), rasOf(volume, 4, 30, 40))


def test_a_stroke_gives_every_voxel_it_crosses_and_a_few_points_along_it(volume):
    from SGPSegmentLib.slice_geometry import MAX_STROKE_POINTS, strokeOnSlice

    # Along row 20 from column 5 to 60 (through a point in between), on slice 3.
    path = [rasOf(volume, 3, 20, 5), rasOf(volume, 3, 20, 30), rasOf(volume, 3, 20, 60)]
    stroke = strokeOnSlice(volume, 0, path, inPlane(volume, 0))
    assert stroke.slice == 3
    assert sorted(stroke.voxels) == [(20, c) for c in range(5, 61)]
    assert 2 < len(stroke.points) <= MAX_STROKE_POINTS
    assert stroke.points[0] == (20, 5) and stroke.points[-1] == (20, 60)
    columns = [c for _, c in stroke.points]
    assert columns == sorted(columns) and min(np.diff(columns)) >= 3
    mask = stroke.voxelMask((64, 64))
    assert mask.sum() == 56 and mask[20, 5:61].all()
    # A diagonal stroke leaving the volume: the part inside, without gaps (8-connected).
    out = strokeOnSlice(volume, 0, [rasOf(volume, 3, 50, 50), rasOf(volume, 3, 80, 80)])
    rows = sorted(r for r, _ in out.voxels)
    assert rows[0] == 50 and rows[-1] == 63 and len(set(rows)) == 14
    assert all(r < 64 and c < 64 for r, c in out.voxels)
    with pytest.raises(SGPInputError, match="outside the volume"):
        strokeOnSlice(volume, 0, [rasOf(volume, 3, 70, 70), rasOf(volume, 3, 80, 90)])
    short = strokeOnSlice(volume, 0, [rasOf(volume, 3, 20, 10), rasOf(volume, 3, 20, 11)])
    assert short.points == ((20, 10), (20, 11)) or short.points == ((20, 10),)


def test_not_here_follows_the_segment_editors_overwrite_setting(mrml):  # noqa: F811
    from SGPSegmentLib.preview import notHereDefault, notHereMode, notHereSegments

    volume, segmentation, ids = makeScene(mrml, name="not here")
    liver, spleen = ids
    hidden = segmentation.GetSegmentation().AddEmptySegment("", "hidden")
    segmentation.GetDisplayNode().SetSegmentVisibility(hidden, False)
    editorNode = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")

    editorNode.SetOverwriteMode(editorNode.OverwriteAllSegments)
    assert notHereDefault(editorNode) and notHereMode(True, editorNode) == "all"
    assert notHereSegments(segmentation, [liver], "all") == [spleen, hidden]
    editorNode.SetOverwriteMode(editorNode.OverwriteVisibleSegments)
    assert notHereDefault(editorNode) and notHereMode(True, editorNode) == "visible"
    assert notHereSegments(segmentation, [liver], "visible") == [spleen]
    editorNode.SetOverwriteMode(editorNode.OverwriteNone)
    assert not notHereDefault(editorNode)
    assert notHereMode(True, editorNode) == "all"  # ticked by hand: every other segment
    assert notHereMode(False, editorNode) == "off"
    assert notHereSegments(segmentation, [liver], "off") == []
    assert notHereSegments(segmentation, [liver, spleen], "all") == [hidden]
    with pytest.raises(SGPInputError, match="must be one of off, all, visible"):
        notHereSegments(segmentation, [liver], "some")
    assert SHAPE[0] == slicer.util.arrayFromVolume(volume).shape[0]


def test_a_prompt_in_a_view_of_another_orientation_than_the_preview_is_refused(volume):
    from SGPSegmentLib.preview import PreviewLogic

    ras = rasOf(volume, *VOXEL)
    assert PreviewLogic.promptAxis(volume, ras, inPlane(volume, 2)) == 2
    assert PreviewLogic.promptAxis(volume, ras, inPlane(volume, 1), previewAxis=1) == 1
    with pytest.raises(SGPInputError, match=r"runs along Axial \(K\) slices"):
        PreviewLogic.promptAxis(volume, ras, inPlane(volume, 1), previewAxis=0)
