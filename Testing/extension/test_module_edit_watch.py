"""The drawn-slice records kept in memory (SGPSegmentLib/edit_watch.py), on a real MRML scene.

* Opening the module (``watchEdits``), the effect's activation (``ensureWatching``) and the
  panel's list of drawn slices write nothing to any node: no tag, no attribute, no Modified.
  Strokes made then write nothing either.
* Strokes as the Paint effect makes them (the shared labelmap changed in place; only
  SourceRepresentationModified fires) are classified as before: a 2D stroke on a slice of axis
  k records that slice on k, a 3D edit records nothing; the Segment Editor's undo of a stroke
  takes its slice back, its redo puts it back.
* The record reaches the segment's tag when a run uses it (``prepareRun``), and comes back
  after saving and reloading the ``.seg.nrrd`` and through an undo that restores the tag.
* The fast changed-slices path (layer copies compared as words) finds exactly the slices the
  per-slice hashes find, on random edits of several shapes, with a labelmap shared by several
  segments, a layer whose extent grows, segments that move to another layer, and a restore.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from module_fixtures import makeScene, mrml, saveAndReload  # noqa: F401

SHAPE = (12, 40, 36)  # (K, J, I); I not a multiple of 8 on purpose


@pytest.fixture
def logic():
    from SGPSegmentLib import SGPSegmentCoreLogic

    return SGPSegmentCoreLogic()


def plainScene(env, shape=SHAPE, names=("liver", "spleen")):
    """A volume (identity-free grid from addVolumeFromArray) and empty segments on its grid."""
    import slicer

    volume = slicer.util.addVolumeFromArray(np.zeros(shape, np.float32), name="ct")
    segmentation = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = [segmentation.GetSegmentation().AddEmptySegment("", n) for n in names]
    return volume, segmentation, ids


def paint(segmentationNode, volumeNode, segmentId, mask, erase=False):
    """What an editor effect does: a modifier labelmap (``mask``'s bounding box, on the volume's
    grid) merged into the segment in place (Add: MODE_MERGE_MASK; Erase: MODE_MERGE_MIN)."""
    import slicer
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    ks, js, is_ = np.nonzero(mask)
    box = (slice(ks.min(), ks.max() + 1), slice(js.min(), js.max() + 1), slice(is_.min(), is_.max() + 1))
    values = mask[box].astype(np.uint8)
    if erase:
        values = np.where(values > 0, 0, 255).astype(np.uint8)
    modifier = slicer.vtkOrientedImageData()
    modifier.SetExtent(box[2].start, box[2].stop - 1, box[1].start, box[1].stop - 1,
                       box[0].start, box[0].stop - 1)  # fmt: skip
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    modifier.SetImageToWorldMatrix(m)
    modifier.GetPointData().SetScalars(numpy_to_vtk(values.reshape(-1), deep=True))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    mode = logic.MODE_MERGE_MIN if erase else logic.MODE_MERGE_MASK
    assert logic.SetBinaryLabelmapToSegment(modifier, segmentationNode, segmentId, mode,
                                            modifier.GetExtent())  # fmt: skip


def disk(shape, axis, index, center, radius):
    """A disk of ``radius`` on slice ``index`` of ``axis`` (a 2D stroke)."""
    grid = np.indices(shape)
    others = [a for a in range(3) if a != axis]
    inside = sum((grid[a] - c) ** 2 for a, c in zip(others, center, strict=True)) <= radius**2
    return inside & (grid[axis] == index)


def ball(shape, center, radius):
    grid = np.indices(shape)
    return sum((grid[a] - c) ** 2 for a, c in enumerate(center)) <= radius**2


def state(segmentationNode):
    """Everything opening the module must leave alone: the modified times of the node, its
    segmentation and each segment (a tag written with a new value changes the segment's), the
    tags the module writes, and the node's attributes."""
    from SGPSegmentLib.labeled_slices import TAG, tagText
    from SGPSegmentLib.undo import RUN_CHECKSUM_TAG, UNDO_TOKEN_ATTRIBUTE

    segmentation = segmentationNode.GetSegmentation()
    segments = {}
    for segmentId in segmentation.GetSegmentIDs():
        segment = segmentation.GetSegment(segmentId)
        tags = (tagText(segment), segment.HasTag(RUN_CHECKSUM_TAG))
        segments[segmentId] = (segment.GetMTime(), tags)
    names = segmentationNode.GetAttributeNames() or ()
    if not isinstance(names, (list, tuple)):
        names = [names.GetValue(i) for i in range(names.GetNumberOfValues())]
    attributes = {n: segmentationNode.GetAttribute(n) for n in names}
    assert TAG and UNDO_TOKEN_ATTRIBUTE not in attributes
    return segmentationNode.GetMTime(), segmentation.GetMTime(), segments, attributes


def tagOf(segmentationNode, segmentId):
    from SGPSegmentLib.labeled_slices import tagText

    return tagText(segmentationNode.GetSegmentation().GetSegment(segmentId))


# ------------------------------------------------------------------------ nothing written


def test_opening_the_module_and_drawing_write_nothing(mrml, logic):  # noqa: F811
    import vtk

    volume, segmentation, ids = makeScene(mrml)  # drawn before the module opens
    segmentation.GetSegmentation().CollapseBinaryLabelmaps(False)
    before = state(segmentation)
    events = []
    tag = segmentation.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *a: events.append(a))
    try:
        logic.watchEdits(segmentation, volume)  # module open
        logic.ensureWatching(segmentation, volume)  # the effect's activation
        found = logic.labeledSlices(volume, segmentation, ids, axis=0)  # the panel's list
        logic.watchEdits(segmentation, volume)  # a selector signal: same pair again
    finally:
        segmentation.RemoveObserver(tag)
    assert events == [] and state(segmentation) == before
    assert [f.slices for f in found] == [[1, 4], [1, 4]]  # first sight: the drawn slices
    assert all(tagOf(segmentation, s) is None for s in ids)
    # Strokes are recorded in memory only: the segments' tags stay as they were.
    paint(segmentation, volume, ids[0], disk(volume.GetImageData().GetDimensions()[::-1], 0, 3,
                                             (20, 20), 4))  # fmt: skip
    assert logic.labeledSlices(volume, segmentation, ids[:1], axis=0)[0].slices == [1, 3, 4]
    assert all(tagOf(segmentation, s) is None for s in ids)
    assert logic.records.isDirty(segmentation, ids[0])


def test_a_scene_with_saved_records_opens_without_writes(mrml, logic):  # noqa: F811
    """A record found in a tag (saved earlier) is read, and an edit made since is found
    against its hashes, still without writing anything."""
    import slicer

    volume, segmentation, ids = makeScene(mrml)
    logic.prepareRun(volume, segmentation, ids)  # a run used the records: tags written
    saved = {s: tagOf(segmentation, s) for s in ids}
    assert all(saved.values())
    # A stroke on K slice 2 while no module watched (e.g. before the scene was saved).
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, ids[0], volume).astype(np.uint8)
    mask[2, 10:14, 10:14] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, ids[0], volume)
    other = type(logic)()  # a new session
    before = state(segmentation)
    other.watchEdits(segmentation, volume)
    found = other.labeledSlices(volume, segmentation, ids, axis=0)
    assert state(segmentation) == before
    assert [f.slices for f in found] == [[1, 2, 4], [1, 4]]
    assert {s: tagOf(segmentation, s) for s in ids} == saved


# --------------------------------------------------------------------- strokes classified


def test_paint_strokes_are_classified_per_axis(mrml, logic):  # noqa: F811
    volume, segmentation, ids = plainScene(mrml)
    logic.drawingAxis = 0
    logic.watchEdits(segmentation, volume)
    paint(segmentation, volume, ids[0], disk(SHAPE, 0, 5, (20, 18), 6))  # axial slice 5
    paint(segmentation, volume, ids[0], disk(SHAPE, 1, 22, (6, 20), 4))  # coronal slice 22
    paint(segmentation, volume, ids[0], disk(SHAPE, 2, 30, (8, 10), 3))  # sagittal slice 30
    paint(segmentation, volume, ids[1], disk(SHAPE, 0, 9, (30, 8), 5))  # the other segment
    drawn = logic.records.recordedSlices(segmentation, volume, ids[0])
    assert drawn == {0: [5], 1: [22], 2: [30]}
    assert logic.records.recordedSlices(segmentation, volume, ids[1]) == {0: [9], 1: [], 2: []}
    # A 3D edit (a sphere brush; then erasing a ball) records nothing on any axis.
    paint(segmentation, volume, ids[0], ball(SHAPE, (6, 20, 18), 3))
    paint(segmentation, volume, ids[0], ball(SHAPE, (5, 20, 18), 2), erase=True)
    assert logic.records.recordedSlices(segmentation, volume, ids[0]) == drawn
    # An erase stroke on one slice is drawing on that slice.
    paint(segmentation, volume, ids[0], disk(SHAPE, 0, 7, (20, 18), 2), erase=True)
    assert logic.records.recordedSlices(segmentation, volume, ids[0])[0] == [5, 7]


def test_undo_and_redo_of_a_stroke(mrml, logic):  # noqa: F811
    """The Segment Editor's undo (vtkSegmentationHistory) of a stroke takes its slice back."""
    import slicer

    volume, segmentation, ids = plainScene(mrml)
    logic.watchEdits(segmentation, volume)
    paint(segmentation, volume, ids[0], disk(SHAPE, 0, 4, (20, 18), 5))
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(segmentation.GetSegmentation())
    history.SaveState()  # the editor saves a state before each stroke
    paint(segmentation, volume, ids[0], disk(SHAPE, 0, 8, (12, 12), 4))
    assert logic.records.recordedSlices(segmentation, volume, ids[0])[0] == [4, 8]
    assert history.RestorePreviousState()
    assert logic.records.recordedSlices(segmentation, volume, ids[0])[0] == [4]
    assert history.RestoreNextState()
    assert logic.records.recordedSlices(segmentation, volume, ids[0])[0] == [4, 8]


# ------------------------------------------------------------- the tag, when a run uses it


def test_the_record_reaches_the_tag_when_a_run_uses_it(mrml, logic, tmp_path):  # noqa: F811
    volume, segmentation, ids = plainScene(mrml)
    logic.watchEdits(segmentation, volume)
    paint(segmentation, volume, ids[0], disk(SHAPE, 0, 3, (20, 18), 6))
    paint(segmentation, volume, ids[0], disk(SHAPE, 1, 25, (8, 18), 3))
    paint(segmentation, volume, ids[1], disk(SHAPE, 0, 6, (10, 10), 4))
    assert all(tagOf(segmentation, s) is None for s in ids)
    request = logic.prepareRun(volume, segmentation, ids, axis=0)
    assert [item.slices for item in request.labeledSegments] == [[3], [6]]
    from SGPSegmentLib.labeled_slices import LabeledSliceRecord

    record = LabeledSliceRecord.fromText(tagOf(segmentation, ids[0]), SHAPE)
    assert {a: sorted(v) for a, v in record.slices.items()} == {0: [3], 1: [25], 2: []}
    assert not logic.records.isDirty(segmentation, ids[0])
    # Prepared again with nothing new: the tag is not written again.
    mtime = segmentation.GetSegmentation().GetSegment(ids[0]).GetMTime()
    logic.prepareRun(volume, segmentation, ids, axis=0)
    assert segmentation.GetSegmentation().GetSegment(ids[0]).GetMTime() == mtime

    # Saved and reloaded as .seg.nrrd: another session reads the records from the tags.
    reloaded, newIds = saveAndReload(mrml, segmentation, tmp_path / "case.seg.nrrd")
    other = type(logic)()
    other.watchEdits(reloaded, volume)
    assert other.records.recordedSlices(reloaded, volume, newIds[0]) == {0: [3], 1: [25], 2: []}
    assert other.records.recordedSlices(reloaded, volume, newIds[1]) == {0: [6], 1: [], 2: []}


def test_an_undo_that_restores_the_tag_restores_the_record(mrml, logic):  # noqa: F811
    """A state saved after a run used the record holds it in the tag: restoring that state
    (the editor's undo over later edits) gives that record back."""
    import slicer

    volume, segmentation, ids = plainScene(mrml)
    logic.watchEdits(segmentation, volume)
    paint(segmentation, volume, ids[0], disk(SHAPE, 0, 3, (20, 18), 6))
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(segmentation.GetSegmentation())
    history.SetMaximumNumberOfStates(5)
    history.SaveState()  # before the next stroke: no tag yet
    paint(segmentation, volume, ids[0], disk(SHAPE, 0, 7, (20, 18), 6))
    logic.prepareRun(volume, segmentation, ids[:1], axis=0)  # tag: slices 3 and 7
    history.SaveState()  # before the next two strokes: the tag with 3 and 7
    paint(segmentation, volume, ids[0], disk(SHAPE, 0, 9, (20, 18), 3))
    paint(segmentation, volume, ids[0], disk(SHAPE, 0, 10, (20, 18), 3))
    logic.prepareRun(volume, segmentation, ids[:1], axis=0)  # tag: 3, 7, 9, 10
    assert logic.records.recordedSlices(segmentation, volume, ids[0])[0] == [3, 7, 9, 10]
    assert history.RestorePreviousState()  # back over both strokes: the tag says 3 and 7
    assert logic.records.recordedSlices(segmentation, volume, ids[0])[0] == [3, 7]
    assert history.RestorePreviousState()  # back to before stroke 7: no tag, voxels of 3
    assert logic.records.recordedSlices(segmentation, volume, ids[0])[0] == [3]


# ------------------------------------------------------- fast path == per-slice hashes


def referenceHashes(mask, axis):
    """The per-slice hash as it was first written (one packbits per slice)."""
    slicesFirst = np.moveaxis(np.asarray(mask, dtype=bool), axis, 0)
    return [zlib.crc32(np.packbits(np.ascontiguousarray(s)).tobytes()) for s in slicesFirst]


def test_slice_hashes_and_changed_positions_match_their_plain_definitions():
    from SGPSegmentLib.edit_watch import changedPositions
    from SGPSegmentLib.labeled_slices import sliceHashes

    rng = np.random.default_rng(3)
    for shape in [(1, 1, 1), (5, 7, 9), (3, 13, 16), (4, 9, 8), (2, 1030, 3), (2, 9000, 17), SHAPE]:
        mask = rng.random(shape) < 0.3
        for axis in range(3):
            assert sliceHashes(mask, axis) == referenceHashes(mask, axis), (shape, axis)
    for size in [1, 7, 8, 9, 65536 + 5, 3 * (1 << 22) + 11]:
        for dtype in (np.uint8, np.int16):
            old = rng.integers(0, 3, size).astype(dtype)
            new = old.copy()
            where = rng.choice(size, min(size, 6), replace=False)
            new[where] += 1
            assert np.array_equal(changedPositions(old, new), np.flatnonzero(old != new))
            assert changedPositions(old, old.copy()).size == 0


def randomEdit(rng, shape):
    """A mask to paint or erase: a disk on one slice of a random axis, or a ball (3D)."""
    if rng.random() < 0.7:
        axis = int(rng.integers(0, 3))
        others = [n for a, n in enumerate(shape) if a != axis]
        center = [int(rng.integers(0, n)) for n in others]
        return disk(shape, axis, int(rng.integers(0, shape[axis])), center, int(rng.integers(1, 6)))
    center = [int(rng.integers(0, n)) for n in shape]
    return ball(shape, center, int(rng.integers(1, 4)))


@pytest.mark.parametrize("seed, shape", [(0, SHAPE), (1, (7, 33, 50)), (2, (20, 16, 24))])
def test_fast_changed_slices_agree_with_the_per_slice_hashes(mrml, seed, shape):  # noqa: F811
    """Every edit's changed slices, as the store finds them on the layer copies, equal the
    slices whose per-slice hash changed (the full path: resample, hash, compare)."""
    import slicer
    from SGPSegmentLib import mrml_io
    from SGPSegmentLib.edit_watch import RecordStore
    from SGPSegmentLib.labeled_slices import LabeledSliceRecord

    rng = np.random.default_rng(seed)
    volume, segmentation, ids = plainScene(mrml, shape, names=("a", "b", "c"))
    store = RecordStore()
    seen = {}

    def spy(entry, change, axis, record, original=store._apply):
        key = next(k for k, e in store._entries.items() if e is entry)
        seen[key[1]] = [set(s) for s in change.slices]
        original(entry, change, axis, record)

    store._apply = spy
    store.sync(segmentation, volume)
    masks = {s: mrml_io.segmentArray(segmentation, s, volume) for s in ids}
    changed = 0
    for step in range(40):
        segmentId = ids[int(rng.integers(0, len(ids)))]
        edit = randomEdit(rng, shape)
        kind = rng.random()
        if kind < 0.6:
            paint(segmentation, volume, segmentId, edit, erase=rng.random() < 0.3)
        elif kind < 0.8:  # replaced wholesale (a new layer object for the segment)
            new = masks[segmentId] ^ edit
            slicer.util.updateSegmentBinaryLabelmapFromArray(new.astype(np.uint8), segmentation,
                                                             segmentId, volume)  # fmt: skip
        elif kind < 0.9:  # segments put together in shared layers (or not)
            segmentation.GetSegmentation().CollapseBinaryLabelmaps(bool(rng.random() < 0.5))
        else:  # an undo-like restore of all segments at once
            history = slicer.vtkSegmentationHistory()
            history.SetSegmentation(segmentation.GetSegmentation())
            history.SaveState()
            paint(segmentation, volume, segmentId, edit)
            history.RestorePreviousState()
        seen.clear()
        store.sync(segmentation, volume)
        for s in ids:
            now = mrml_io.segmentArray(segmentation, s, volume)
            reference = LabeledSliceRecord(shape, hashes=[referenceHashes(masks[s], a)
                                                          for a in range(3)])  # fmt: skip
            expected = reference.changedSlices(now)
            assert seen.get(s, [set(), set(), set()]) == expected, (step, s)
            changed += any(expected)
            masks[s] = now
    assert changed >= 20  # the edits did change something most of the time
