"""The drawn-slice records of the segments the Logic sees, kept in memory, and what each edit
changed, found cheaply on the GUI thread.

:mod:`.labeled_slices` says what counts as drawn. :class:`RecordStore` keeps those records per
segmentation node and segment *in memory* and writes one into its segment's tag only when a
run uses it (:meth:`RecordStore.flush` when a run or preview is prepared; :meth:`markWritten`,
:meth:`markDrawn` and :meth:`moveBaseline` when a result is written): ``vtkSegment::SetTag``
marks the segmentation modified, and opening the module or drawing must not make Slicer ask to
save a segmentation nobody changed. A record found in a tag (a scene saved earlier, or a state
an undo restored: the tag then differs from the one last seen) is read and used as before.

What an edit changed is found against a copy of each labelmap layer as last seen (segments that
share a layer share the copy; the copy is the baseline). When the layer still has the copy's
extent, the C library's memcmp finds the 64 KiB blocks that differ, within them 64-bit words
and then bytes locate the changed voxels, whose coordinates give the changed slices along each
axis (and the voxels for the undo check below), and the copy is updated where it changed. When
the extent changed (a stroke outside it grows the layer) the copy is put on the union of both
extents first. When a segment left its copy's layer (an undo restores saved layers; another
label value) its old and new voxels are compared on the union of their boxes. A segment not on
the volume's voxel lattice keeps the per-slice hashes of :mod:`.labeled_slices` (resampled by
the segmentation logic each time). A layer whose modified time did not change is not compared.

Undo of a stroke: the Segment Editor's undo restores a stroke's voxels, and the tag as it was
when the state was saved; the tag no longer changes with each stroke, so an edit that changes
exactly the voxels the segment's last recorded edit changed is taken as its undo (the slices
that edit added are removed again), and one that repeats an undone edit as its redo. A
restore takes a segment's labelmap away for a moment (``vtkSegmentationHistory`` copies the
saved segment in): while it is gone the old voxels stay the baseline, so that the restore is
compared as one edit.

Memory: one copy of each seen layer (its scalar type, one byte a voxel for Slicer's labelmaps:
75 MiB for a 512 x 512 x 300 layer, shared by the segments in it), kept for the
:data:`KEEP_SEGMENTATIONS` most recently used segmentations (watched or not, so that
switching between them costs nothing; beyond that :meth:`release` turns a baseline into
per-slice hashes and drops the copies; a segmentation removed from the scene is forgotten),
plus the voxel indices of the last few edits of each segment (8 bytes a changed voxel,
:data:`HISTORY` edits of at most :data:`HISTORY_VOXELS` voxels).
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, field

import numpy as np
import vtk
from slicer.i18n import tr as _
from vtk.util.numpy_support import vtk_to_numpy

from SGPSegmentLib import labeled_slices, mrml_io
from SGPSegmentLib.labeled_slices import LabeledSliceRecord, classifyEdit, sliceHashes
from SlicerSGP.errors import SGPInputError

HISTORY = 20
"""Edits kept per segment to recognise their undo (the Segment Editor keeps 10 by default)."""
HISTORY_VOXELS = 2_000_000
"""An edit that changes more voxels is not kept for that (a 3D edit; it records nothing)."""
KEEP_SEGMENTATIONS = 3
"""Segmentations whose layer copies are kept (the most recently used); older ones keep hashes."""


@dataclass
class _Layer:
    """Where a segment's voxels are now: a labelmap layer on the volume's grid."""

    address: str
    start: tuple[int, int, int]
    """Volume array index ``(k, j, i)`` of the layer's first voxel."""
    labels: np.ndarray
    """The layer's scalars as a ``(K, J, I)`` view (no copy)."""
    value: int
    mtime: int
    """The layer's modified time (includes its scalars'): unchanged = same voxels."""


_OFF_GRID = "off-grid"
_MISSING = "missing"
_EMPTY = ("empty",)
"""A pending baseline with no voxels."""
"""The segment has no labelmap at all: an undo or redo is restoring it (in steps)."""


@dataclass(eq=False)
class _LayerCopy:
    """A layer's voxels as last seen (the baseline of the segments that point to it)."""

    address: str
    start: tuple[int, int, int]
    labels: np.ndarray
    mtime: int


@dataclass
class Change:
    """What one edit changed in one segment."""

    slices: list[set[int]]
    """Per array axis, the slices whose content changed."""
    index: np.ndarray | None = None
    """Flat volume-array indices of the changed voxels, ascending (None: only hashes known)."""

    def __bool__(self) -> bool:
        return any(self.slices)


@dataclass(eq=False)
class _Entry:
    record: LabeledSliceRecord
    segment: str
    """Address of the vtkSegment (a segment removed and added again is another one)."""
    tagText: str | None
    """The tag as last read or written: another text there means an undo or a reload."""
    copy: _LayerCopy | None = None
    value: int = 0
    hashed: bool = False
    """True: the baseline is ``record.hashes``; else ``copy == value`` (no copy: empty)."""
    dirty: bool = False
    """Changed since ``tagText``: written at the next :meth:`RecordStore.flush`."""
    undo: list = field(default_factory=list)
    redo: list = field(default_factory=list)
    pendingOld: tuple | None = None
    """Its voxels (a block) before a restore took its labelmap away; the baseline until the
    labelmap is back (so the restore is seen as one edit)."""


_OFFSETS: dict[tuple, object] = {}


def _matrixKey(getMatrix) -> tuple:
    m = vtk.vtkMatrix4x4()
    getMatrix(m)
    return tuple(m.GetElement(r, c) for r in range(3) for c in range(4))


def _gridOffset(volumeNode, layer):
    """:func:`.mrml_io._labelmapOffset`, remembered per pair of grids (it runs on each stroke)."""
    key = (_matrixKey(layer.GetImageToWorldMatrix), _matrixKey(volumeNode.GetIJKToRASMatrix))
    if key not in _OFFSETS:
        if len(_OFFSETS) > 64:
            _OFFSETS.clear()
        _OFFSETS[key] = mrml_io._labelmapOffset(volumeNode, layer)
    return _OFFSETS[key]


def _locate(segmentationNode, segmentId, volumeNode):
    """The segment's layer (:class:`_Layer`), None when it has no voxels, ``_OFF_GRID``, or
    ``_MISSING`` while it has no labelmap (a restore in progress)."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    layer = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
    if layer is None:
        return _MISSING
    scalars = layer.GetPointData().GetScalars()
    if scalars is None or mrml_io._isEmptyExtent(layer.GetExtent()):
        return None
    offset = _gridOffset(volumeNode, layer)
    if offset is None or scalars.GetNumberOfComponents() != 1:
        return _OFF_GRID
    extent = layer.GetExtent()
    volumeExtent = volumeNode.GetImageData().GetExtent()
    start = tuple(
        int(extent[2 * c] + offset[c] - volumeExtent[2 * c]) for c in (2, 1, 0)
    )
    dims = layer.GetDimensions()
    labels = vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0])
    return _Layer(
        layer.__this__, start, labels, int(segment.GetLabelValue()), int(layer.GetMTime())
    )


def _overlap(start, dims, shape):
    """(volume index, block index) of a block at ``start`` inside the volume, or None."""
    volume, block = [], []
    for a in range(3):
        low, high = max(start[a], 0), min(start[a] + dims[a], shape[a])
        if high <= low:
            return None
        volume.append(slice(low, high))
        block.append(slice(low - start[a], high - start[a]))
    return tuple(volume), tuple(block)


def _libcMemcmp():
    """The C library's ``memcmp`` (reads both buffers once, stops at the first difference,
    writes nothing), or None where it cannot be found (numpy alone is used then)."""
    try:
        library = ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)
        function = library.memcmp
        function.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        function.restype = ctypes.c_int
        probe = (ctypes.c_char * 2)(b"a", b"b")
        if function(probe, ctypes.byref(probe, 1), 1) == 0:
            return None
        return function
    except (AttributeError, OSError, TypeError):
        return None


_MEMCMP = _libcMemcmp()
_CHUNK = 1 << 22
_BLOCK = 1 << 16


def _differingRanges(a: np.ndarray, b: np.ndarray) -> list[tuple[int, int]]:
    """Byte ranges (64 KiB blocks) where two equal-sized byte arrays differ, with memcmp:
    4 MiB chunks first, then the blocks of the chunks that differ."""
    size = a.size
    if _MEMCMP is None:
        return [(0, size)]
    pa, pb = a.ctypes.data, b.ctypes.data
    ranges = []
    for start in range(0, size, _CHUNK):
        stop = min(start + _CHUNK, size)
        if not _MEMCMP(pa + start, pb + start, stop - start):
            continue
        for first in range(start, stop, _BLOCK):
            last = min(first + _BLOCK, stop)
            if _MEMCMP(pa + first, pb + first, last - first):
                ranges.append((first, last))
    return ranges


def changedPositions(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Flat indices where two arrays of one shape and type differ. Blocks that differ are
    found with memcmp; within them, 64-bit words are compared, then the differing words byte
    by byte."""
    a = np.ascontiguousarray(old).reshape(-1).view(np.uint8)
    b = np.ascontiguousarray(new).reshape(-1).view(np.uint8)
    found = [np.empty(0, dtype=np.int64)]
    for first, last in _differingRanges(a, b):
        x, y = a[first:last], b[first:last]
        whole = x.size - x.size % 8
        words = np.flatnonzero(x[:whole].view(np.uint64) != y[:whole].view(np.uint64))
        if words.size:
            differ = x[:whole].reshape(-1, 8)[words] != y[:whole].reshape(-1, 8)[words]
            found.append((words[:, None] * 8 + np.arange(8))[differ] + first)
        found.append(np.flatnonzero(x[whole:] != y[whole:]) + whole + first)
    return np.unique(np.concatenate(found) // old.itemsize)


def _changeFromCoords(coords, shape) -> Change:
    kk, jj, ii = coords
    return Change(
        slices=[set(np.unique(c).tolist()) for c in coords],
        index=np.ravel_multi_index((kk, jj, ii), shape).astype(np.int64),
    )


def _block(labels, start, value):
    """A segment's voxels as a block: (bool array of ``labels == value``, its start)."""
    return (np.equal(labels, value), tuple(start))


def _toGrid(block, shape) -> np.ndarray:
    """A block (None: empty) as a bool volume mask (cropped to the volume)."""
    mask = np.zeros(shape, dtype=bool)
    where = None if block is None else _overlap(block[1], block[0].shape, shape)
    if where is not None:
        mask[where[0]] = block[0][where[1]]
    return mask


def blockChange(old, new, shape) -> Change:
    """The change between two blocks (None = empty), on the union of their boxes (not the
    whole volume); voxels outside the volume do not count."""
    parts = [b for b in (old, new) if b is not None]
    if not parts:
        return Change([set(), set(), set()], np.empty(0, dtype=np.int64))
    start = tuple(min(b[1][a] for b in parts) for a in range(3))
    end = tuple(max(b[1][a] + b[0].shape[a] for b in parts) for a in range(3))
    dims = tuple(e - s for e, s in zip(end, start, strict=True))

    def placed(block):
        if block[1] == start and block[0].shape == dims:
            return block[0]
        out = np.zeros(dims, dtype=bool)
        index = tuple(
            slice(b - s, b - s + n) for b, s, n in zip(block[1], start, block[0].shape, strict=True)
        )
        out[index] = block[0]
        return out

    if old is None or new is None:
        differ = placed(parts[0])
    else:
        differ = placed(old) != placed(new)
    coords = [c + s for c, s in zip(np.nonzero(differ), start, strict=True)]
    inside = np.ones(coords[0].shape, dtype=bool)
    for c, n in zip(coords, shape, strict=True):
        inside &= (c >= 0) & (c < n)
    return _changeFromCoords(tuple(c[inside] for c in coords), shape)


class RecordStore:
    """The drawn-slice records in memory (see the module docstring). Keyed by segmentation node
    ID and segment ID; every method takes the volume whose grid the slices are on."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._copies: dict[str, _LayerCopy] = {}
        self._nodes: dict[str, object] = {}
        """The segmentation nodes seen, least recently used first."""
        self._busy: set[int] = set()

    def clear(self) -> None:
        self._entries.clear()
        self._copies.clear()
        self._nodes.clear()

    # ------------------------------------------------------------------------ reading

    def sync(self, segmentationNode, volumeNode, segmentIds=None, preferredAxis=0, record=True):
        """Bring the records of ``segmentIds`` (None: all) up to date with the voxels: each
        change since the last look is one edit (``record`` False: a write of the Logic, which
        only moves the baseline). Writes nothing to the scene."""
        if segmentationNode is None or volumeNode is None or volumeNode.GetImageData() is None:
            return
        segmentation = segmentationNode.GetSegmentation()
        ids = list(segmentation.GetSegmentIDs()) if segmentIds is None else list(segmentIds)
        for segmentId in ids:
            self._sync(segmentationNode, volumeNode, segmentId, preferredAxis, record)
        self._touch(segmentationNode)

    def refresh(self, segmentationNode, volumeNode, segmentId, preferredAxis=0):
        """The segment's record, brought up to date (nothing is written)."""
        entry = self._sync(segmentationNode, volumeNode, segmentId, preferredAxis, True)
        self._touch(segmentationNode)
        return entry.record

    def recordedSlices(self, segmentationNode, volumeNode, segmentId, preferredAxis=0):
        """``{axis: [slices]}`` the user drew, brought up to date."""
        record = self.refresh(segmentationNode, volumeNode, segmentId, preferredAxis)
        return {a: sorted(record.slices[a]) for a in range(3)}

    def isDirty(self, segmentationNode, segmentId) -> bool:
        """Whether the record holds more than the segment's tag (a flush would write it)."""
        entry = self._entries.get((segmentationNode.GetID(), segmentId))
        return entry is not None and entry.dirty

    # ------------------------------------------------------------------------ writing

    def flush(self, segmentationNode, volumeNode, segmentId, mask) -> bool:
        """Write the record into the segment's tag if it holds more than the tag (a run uses
        it). ``mask``: the segment now, on the volume's grid. True if the tag was written."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        entry = self._valid(segmentationNode, segmentId, segment, volumeNode)
        if entry is None:
            entry = self._sync(segmentationNode, volumeNode, segmentId, 0, True)
        if not entry.dirty and entry.tagText == labeled_slices.tagText(segment):
            return False
        self._write(entry, segment, mask)
        return True

    def markWritten(self, segmentationNode, volumeNode, segmentId, mask, labeledAlong) -> None:
        """After a run wrote ``mask``: keep the record's slices (plus ``labeledAlong``:
        ``{axis: [slices]}``), move the baseline, flag as written, save the tag."""
        entry, segment = self._forWrite(segmentationNode, volumeNode, segmentId, None)
        for axis, slices in labeledAlong.items():
            entry.record.slices[int(axis)] |= {int(s) for s in slices}
        entry.record.written = True
        self._written(entry, segmentationNode, volumeNode, segmentId, segment, mask)

    def markDrawn(self, segmentationNode, volumeNode, segmentId, mask, axis, slices) -> None:
        """After the Logic wrote ``mask`` whose ``slices`` along ``axis`` are now the user's (a
        click-corrected slice): record them as drawn there, move the baseline, save the tag."""
        entry, segment = self._forWrite(segmentationNode, volumeNode, segmentId, None)
        entry.record.slices[int(axis)] |= {int(s) for s in slices}
        self._written(entry, segmentationNode, volumeNode, segmentId, segment, mask)

    def moveBaseline(self, segmentationNode, volumeNode, segmentId, before, after) -> None:
        """Another segment lost voxels to a write (overwrite rules): that is no drawing, so only
        the baseline moves (a segment seen for the first time is recorded from ``before``)."""
        entry, segment = self._forWrite(segmentationNode, volumeNode, segmentId, before)
        self._written(entry, segmentationNode, volumeNode, segmentId, segment, after)

    def release(self, segmentationNode) -> None:
        """Stop keeping layer copies for this segmentation: baselines become per-slice hashes
        (edits made from now on are found when the record is next read, as one edit). Done
        for the least recently used segmentations beyond :data:`KEEP_SEGMENTATIONS`."""
        nodeId = segmentationNode.GetID()
        for (owner, _segmentId), entry in list(self._entries.items()):
            if owner != nodeId or entry.hashed:
                continue
            copy = entry.copy
            block = None if entry.pendingOld is _EMPTY else entry.pendingOld
            if entry.pendingOld is None and copy is not None:
                block = _block(copy.labels, copy.start, entry.value)
            mask = _toGrid(block, entry.record.shape)
            entry.record.hashes = [sliceHashes(mask, a) for a in range(3)]
            entry.hashed, entry.copy, entry.pendingOld = True, None, None
            entry.undo.clear()
            entry.redo.clear()
        self._prune()

    def _touch(self, segmentationNode) -> None:
        """``segmentationNode`` is in use: most recent; copies of older ones beyond the limit
        are released, and those of nodes no longer in a scene are dropped."""
        nodeId = segmentationNode.GetID()
        self._nodes.pop(nodeId, None)
        self._nodes[nodeId] = segmentationNode
        for other, node in list(self._nodes.items()):
            if node.GetScene() is None or node.GetID() != other:
                del self._nodes[other]
                self._entries = {k: e for k, e in self._entries.items() if k[0] != other}
        holding = [n for n in self._nodes if any(
            k[0] == n and e.copy is not None for k, e in self._entries.items())]
        for other in holding[: max(0, len(holding) - KEEP_SEGMENTATIONS)]:
            if other != nodeId:
                self.release(self._nodes[other])
        self._prune()

    def _prune(self) -> None:
        """Forget copies no segment points to (layers an undo or a reload replaced)."""
        referenced = {id(e.copy) for e in self._entries.values() if e.copy is not None}
        self._copies = {a: c for a, c in self._copies.items() if id(c) in referenced}

    # ----------------------------------------------------------------------- internals

    def _valid(self, segmentationNode, segmentId, segment, volumeNode) -> _Entry | None:
        entry = self._entries.get((segmentationNode.GetID(), segmentId))
        if (
            entry is None
            or segment is None
            or entry.segment != segment.__this__
            or entry.record.shape != tuple(mrml_io.volumeShape(volumeNode))
            or entry.tagText != labeled_slices.tagText(segment)
        ):
            return None
        return entry

    def _sync(self, segmentationNode, volumeNode, segmentId, axis, record) -> _Entry | None:
        key = (segmentationNode.GetID(), segmentId)
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            self._entries.pop(key, None)
            return None
        where = _locate(segmentationNode, segmentId, volumeNode)
        entry = self._valid(segmentationNode, segmentId, segment, volumeNode)
        if where is _MISSING:
            if entry is not None:
                self._suspend(entry)
                return entry
            where = None
        if entry is None:
            return self._adopt(segmentationNode, volumeNode, segmentId, segment, where, axis, record)
        copy = entry.copy
        if (
            not entry.hashed
            and copy is not None
            and isinstance(where, _Layer)
            and where.address == copy.address
            and where.value == entry.value
        ):
            self._syncCopy(copy, segmentationNode, volumeNode, axis, record)
        else:
            self._move(entry, segmentationNode, volumeNode, segmentId, where, axis, record)
        return entry

    @staticmethod
    def _suspend(entry: _Entry) -> None:
        """The segment's labelmap is gone for a moment: keep its voxels as the baseline."""
        if entry.hashed or entry.pendingOld is not None:
            return
        copy = entry.copy
        entry.pendingOld = _EMPTY if copy is None else _block(copy.labels, copy.start, entry.value)
        entry.copy = None

    def _adopt(
        self, segmentationNode, volumeNode, segmentId, segment, where, axis, record=True
    ) -> _Entry:
        """First look at a segment (or its tag changed behind us): the tag's record brought up
        to date with the voxels (one edit), or a first-sight record; baseline = the voxels."""
        shape = tuple(mrml_io.volumeShape(volumeNode))
        text = labeled_slices.tagText(segment)
        key = (segmentationNode.GetID(), segmentId)
        self._entries.pop(key, None)
        entry = _Entry(LabeledSliceRecord(shape), segment.__this__, text)
        block = self._attach(entry, segmentationNode, volumeNode, segmentId, where, axis, record)
        mask = _toGrid(block, shape)
        found = LabeledSliceRecord.fromText(text, shape)
        if found is None:
            found = labeled_slices.seedRecord(mask, baseline=entry.hashed)
            entry.dirty = True
        else:
            entry.dirty = found.update(mask, axis)
        if not entry.hashed:
            found.hashes = [[], [], []]  # the copy is the baseline
        entry.record = found
        self._entries[key] = entry
        return entry

    def _attach(self, entry, segmentationNode, volumeNode, segmentId, where, axis, record):
        """Make the segment's voxels now the entry's baseline; returns them as a block (None:
        no voxels)."""
        entry.copy = None
        if isinstance(where, _Layer):
            copy = self._copyFor(where, segmentationNode, volumeNode, axis, record)
            entry.copy, entry.value, entry.hashed = copy, where.value, False
            return _block(copy.labels, copy.start, where.value)
        if where is None or where is _MISSING:
            entry.hashed = False
            entry.value = int(
                segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
            )
            return None
        mask = mrml_io.segmentArray(segmentationNode, segmentId, volumeNode)
        entry.hashed = True
        entry.record.hashes = [sliceHashes(mask, a) for a in range(3)]
        return (mask, (0, 0, 0))

    def _copyFor(self, where: _Layer, segmentationNode, volumeNode, axis, record) -> _LayerCopy:
        """The up-to-date copy of layer ``where`` (its members' edits recorded first)."""
        copy = self._copies.get(where.address)
        members = copy is not None and any(e.copy is copy for e in self._entries.values())
        if members and id(copy) not in self._busy:
            self._syncCopy(copy, segmentationNode, volumeNode, axis, record)
            copy = self._copies.get(where.address)
            members = copy is not None and any(e.copy is copy for e in self._entries.values())
        if (
            members
            and copy.start == where.start
            and copy.labels.shape == where.labels.shape
            and copy.labels.dtype == where.labels.dtype
        ):
            return copy
        copy = _LayerCopy(where.address, where.start, where.labels.copy(), where.mtime)
        self._copies[where.address] = copy
        return copy

    def _syncCopy(self, copy: _LayerCopy, segmentationNode, volumeNode, axis, record) -> None:
        """Compare a copy with its layer now: the edits of every segment in it, copy updated."""
        if id(copy) in self._busy:
            return
        self._busy.add(id(copy))
        try:
            shape = tuple(mrml_io.volumeShape(volumeNode))
            segmentation = segmentationNode.GetSegmentation()
            nodeId = segmentationNode.GetID()
            stay, leave, layer = [], [], None
            for key, entry in list(self._entries.items()):
                if entry.copy is not copy:
                    continue
                segment = segmentation.GetSegment(key[1]) if key[0] == nodeId else None
                if segment is None:
                    if key[0] == nodeId:
                        del self._entries[key]
                    continue
                where = _locate(segmentationNode, key[1], volumeNode)
                if where is _MISSING:
                    self._suspend(entry)
                elif self._valid(segmentationNode, key[1], segment, volumeNode) is None:
                    entry.copy = None  # re-read from its tag below
                    leave.append((key, entry, segment, where, False))
                elif (
                    isinstance(where, _Layer)
                    and where.address == copy.address
                    and where.value == entry.value
                ):
                    stay.append((entry, where))
                    layer = where
                else:
                    # Left this layer: its old voxels now, before the copy changes.
                    old = _block(copy.labels, copy.start, entry.value)
                    entry.copy = None
                    leave.append((key, entry, segment, where, old))
            if stay:
                coords, oldValues, newValues = self._update(copy, layer, shape)
                for entry, _ in stay:
                    hit = (oldValues == entry.value) != (newValues == entry.value)
                    if hit.any():
                        change = _changeFromCoords(tuple(c[hit] for c in coords), shape)
                        self._apply(entry, change, axis, record)
            elif self._copies.get(copy.address) is copy:
                del self._copies[copy.address]
            for key, entry, segment, where, old in leave:
                if old is False:
                    self._adopt(segmentationNode, volumeNode, key[1], segment, where, axis, record)
                else:
                    self._move(entry, segmentationNode, volumeNode, key[1], where, axis, record, old)
        finally:
            self._busy.discard(id(copy))

    @staticmethod
    def _update(copy: _LayerCopy, layer: _Layer, shape):
        """The changed voxels between a copy and its layer (volume coordinates inside the
        volume, old and new labels); the copy becomes the layer's voxels."""
        new = layer.labels
        sameGrid = (
            copy.start == layer.start
            and copy.labels.shape == new.shape
            and copy.labels.dtype == new.dtype
        )
        if sameGrid and copy.mtime == layer.mtime:
            nothing = np.empty(0, dtype=np.int64)
            return (nothing, nothing, nothing), nothing, nothing
        copy.mtime = layer.mtime
        if sameGrid:
            positions = changedPositions(copy.labels, new)
            flat = copy.labels.reshape(-1)
            oldValues = flat[positions]
            newValues = new.reshape(-1)[positions]
            flat[positions] = newValues
            start, dims = copy.start, new.shape
        else:
            # The extent changed: compare on the union of both extents.
            start = tuple(min(a, b) for a, b in zip(copy.start, layer.start, strict=True))
            end = tuple(
                max(a + n, b + m)
                for a, n, b, m in zip(
                    copy.start, copy.labels.shape, layer.start, new.shape, strict=True
                )
            )
            dims = tuple(e - s for e, s in zip(end, start, strict=True))

            def onUnion(labels, at):
                block = np.zeros(dims, dtype=new.dtype)
                index = tuple(
                    slice(a - s, a - s + n) for a, s, n in zip(at, start, labels.shape, strict=True)
                )
                block[index] = labels
                return block

            old = onUnion(copy.labels, copy.start)
            grownOnly = start == layer.start and dims == new.shape
            newBlock = new if grownOnly else onUnion(new, layer.start)
            positions = changedPositions(old, newBlock)
            oldValues = old.reshape(-1)[positions]
            newValues = newBlock.reshape(-1)[positions]
            if grownOnly:
                old.reshape(-1)[positions] = newValues
                copy.labels = old
            else:
                copy.labels = new.copy()
            copy.start = layer.start
        coords = [c + s for c, s in zip(np.unravel_index(positions, dims), start, strict=True)]
        inside = np.ones(positions.shape, dtype=bool)
        for c, n in zip(coords, shape, strict=True):
            inside &= (c >= 0) & (c < n)
        return (
            tuple(c[inside] for c in coords),
            oldValues[inside],
            newValues[inside],
        )

    def _move(self, entry, segmentationNode, volumeNode, segmentId, where, axis, record, old=None):
        """The segment's voxels are no longer (only) in its copy: compare on the volume's grid
        (or by hashes), and make its voxels now the baseline."""
        shape = entry.record.shape
        wasHashed = entry.hashed
        if entry.pendingOld is not None:
            old, entry.pendingOld = entry.pendingOld, None
            old = None if old is _EMPTY else old
        elif old is None and not wasHashed and entry.copy is not None:
            old = _block(entry.copy.labels, entry.copy.start, entry.value)
        hashes = entry.record.hashes
        new = self._attach(entry, segmentationNode, volumeNode, segmentId, where, axis, record)
        if wasHashed:
            mask = _toGrid(new, shape)
            now = [sliceHashes(mask, a) for a in range(3)]
            entry.record.hashes = hashes
            change = Change(entry.record.changedSlices(mask, now))
            entry.record.hashes = now if entry.hashed else [[], [], []]
        else:
            change = blockChange(old, new, shape)
        self._apply(entry, change, axis, record)

    @staticmethod
    def _apply(entry: _Entry, change: Change, axis: int, record: bool) -> None:
        """Record one edit of one segment (``record`` False: only the baseline moved). An edit
        that toggles exactly the voxels of the last recorded edit is its undo (the slices it
        added are taken back); one that toggles those of the last undone edit, its redo."""
        if not change:
            return
        entry.dirty = True
        index = change.index
        if not record or index is None or index.size > HISTORY_VOXELS:
            entry.undo.clear()
            entry.redo.clear()
            if not record:
                return
        slices = entry.record.slices
        for stack, other, undoing in ((entry.undo, entry.redo, True), (entry.redo, entry.undo, False)):
            if stack and np.array_equal(stack[-1][0], index):
                done = stack.pop()
                for a, added in done[1].items():
                    if undoing:
                        slices[a] -= added
                    else:
                        slices[a] |= added
                other.append(done)
                return
        entry.redo.clear()
        drawn = classifyEdit(change.slices, axis)
        added = {}
        if drawn is not None:
            a, found = drawn
            added = {a: found - slices[a]}
            slices[a] |= found
        if index is not None and index.size <= HISTORY_VOXELS:
            entry.undo.append((index, added))
            del entry.undo[:-HISTORY]

    def _forWrite(self, segmentationNode, volumeNode, segmentId, before):
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        shape = tuple(mrml_io.volumeShape(volumeNode))
        entry = self._valid(segmentationNode, segmentId, segment, volumeNode)
        if entry is None:
            text = labeled_slices.tagText(segment)
            found = LabeledSliceRecord.fromText(text, shape)
            if found is None:
                found = (
                    labeled_slices.seedRecord(before, baseline=False)
                    if before is not None
                    else LabeledSliceRecord(shape)
                )
            entry = _Entry(found, segment.__this__, text)
            self._entries[(segmentationNode.GetID(), segmentId)] = entry
        return entry, segment

    def _written(self, entry, segmentationNode, volumeNode, segmentId, segment, mask) -> None:
        """The Logic wrote ``mask`` into the segment: it is the baseline; save the tag."""
        entry.undo.clear()
        entry.redo.clear()
        where = _locate(segmentationNode, segmentId, volumeNode)
        self._attach(entry, segmentationNode, volumeNode, segmentId, where, 0, False)
        self._write(entry, segment, mask)
        self._touch(segmentationNode)

    @staticmethod
    def _write(entry: _Entry, segment, mask) -> None:
        entry.record.hashes = [sliceHashes(mask, a) for a in range(3)]
        text = entry.record.text()
        segment.SetTag(labeled_slices.TAG, text)
        entry.tagText, entry.dirty = text, False
        if not entry.hashed:
            entry.record.hashes = [[], [], []]


def labeledSegments(volumeNode, segmentationNode, segmentIds, axis, records=None):
    """``[(LabeledSegment, mask), ...]`` for the selected segments, records brought up to date
    in ``records`` (the Logic's :class:`.edit_watch.RecordStore`; None: a new one). Nothing is
    written to the scene."""
    mrml_io.checkVolume(volumeNode)
    if segmentationNode is None:
        raise SGPInputError(_("Select a segmentation."))
    axis = mrml_io.checkAxis(axis)
    records = RecordStore() if records is None else records
    segmentation = segmentationNode.GetSegmentation()
    found = []
    for index, segmentId in enumerate(segmentIds):
        segment = segmentation.GetSegment(segmentId)
        if segment is None:
            raise SGPInputError(
                _(
                    "Segment '{segmentId}' is not in segmentation '{segmentationName}'."
                ).format(segmentId=segmentId, segmentationName=segmentationNode.GetName())
            )
        mask = mrml_io.segmentArray(segmentationNode, segmentId, volumeNode)
        record = records.refresh(segmentationNode, volumeNode, segmentId, axis)
        item = labeled_slices.labeledSegment(segmentId, segment, index + 1, mask, axis, record)
        found.append((item, mask))
    return found


__all__ = ["Change", "RecordStore", "blockChange", "changedPositions", "labeledSegments"]
