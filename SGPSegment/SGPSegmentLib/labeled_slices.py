"""Which slices of a segment the user drew, per segment and per slicing axis.

A slice counts as labeled (support) along an axis only if the user drew it in that
orientation. The record is updated from edits, never re-derived from the voxels once it exists:

* First sight of a segment no run has written: its voxels are all the user's. The slices
  they occupy are recorded along the axis with the fewest occupied slices (the orientation the
  user drew in); the other axes get none.
* An edit (seen from the segmentation's modified events, or found when the record is read):
  the slices that changed along each axis are compared. A 2D stroke changes one slice along the
  axis it was drawn on (and many rows/columns along the other two), so that slice is recorded
  for that axis. A 3D edit (smoothing, margin, islands, a sphere brush) changes several slices
  along every axis and records nothing: such edits do not make slices "fully labeled". Edits
  are seen one by one while the module watches the segmentation; several strokes on different
  slices made while it did not watch count as one 3D edit (draw them again, or Refresh after
  each, to have them count).
* A run's result is written by the Logic, which then only moves the baseline.

Where it lives: the Logic keeps the records in memory (:mod:`.edit_watch`) and writes one into
its segment's tag only when a run uses it (a run or preview that sends those slices, a written
result), because ``vtkSegment::SetTag`` marks the segmentation modified. In the tag it is saved
with the scene and restored by undo; a record found in a tag is read and used. The tag holds a
baseline, a hash per slice along each axis, so edits made while the module was not watching
(or before a scene was saved and reloaded) are still found.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np
import vtk
from slicer.i18n import tr as _

TAG = "SGPSegment.labeledSlices"


@dataclass
class LabeledSegment:
    """One selected segment: the slices along the axis the user drew it on."""

    segmentId: str
    name: str
    value: int
    slices: list[int]
    voxelCounts: list[int]

    @property
    def totalVoxels(self) -> int:
        return int(sum(self.voxelCounts))

    def describe(self, axisLabel: str = "") -> str:
        if not self.slices:
            text = _("{name}: no slice drawn along {axis}") if axisLabel else _(
                "{name}: no slice drawn"
            )
        elif axisLabel:
            text = _("{name}: {count} labeled slice(s) along {axis}: {slices}")
        else:
            text = _("{name}: {count} labeled slice(s): {slices}")
        slices = ", ".join(
            f"{s} ({c} vx)" for s, c in zip(self.slices, self.voxelCounts, strict=True)
        )
        return text.format(name=self.name, axis=axisLabel, count=len(self.slices), slices=slices)


_TRANSPOSE8 = ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0))
"""Shifts and masks that transpose the 8 x 8 bit matrix held in a 64-bit word (8 bytes = 8
rows, bit b of a byte = column b), in three exchanges of sub-blocks."""


def _columnsPacked(rows: np.ndarray) -> np.ndarray:
    """``np.packbits`` of each column of a bool ``(R, I)`` matrix, one row of bytes per column,
    without moving single bits about: pack each row (8 columns a byte), transpose the 8 x 8
    bit tiles inside 64-bit words, then transpose bytes in cache-sized pieces."""
    r, i = rows.shape
    groups = -(-r // 8)
    packed = np.zeros((groups * 8, -(-i // 8)), dtype=np.uint8)
    packed[:r] = np.packbits(rows, axis=1, bitorder="little")
    width = packed.shape[1]
    # A word per 8 rows x 8 columns, the rows' order reversed (MSB-first once transposed).
    words = np.ascontiguousarray(packed.reshape(groups, 8, width)[:, ::-1, :].transpose(0, 2, 1))
    x = words.view("<u8")
    t = np.empty_like(x)
    for shift, mask in _TRANSPOSE8:
        shift, mask = np.uint64(shift), np.uint64(mask)
        np.right_shift(x, shift, out=t)
        t ^= x
        t &= mask
        x ^= t
        t <<= shift
        x ^= t
    tiles = x.view(np.uint8).reshape(groups, width * 8)  # [row group, column]
    columns = np.empty((i, groups), dtype=np.uint8)
    for first in range(0, groups, 2048):
        columns[:, first : first + 2048] = tiles[first : first + 2048, :i].T
    return columns


def sliceHashes(mask: np.ndarray, axis: int) -> list[int]:
    """One CRC32 per slice of a bool ``(K, J, I)`` mask along ``axis``: of the slice's bits
    packed in C order (``np.packbits`` of the flattened slice). Packed before the slices are
    gathered, so that no large strided copy is made."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    k, j, i = mask.shape
    if axis == 0:
        packed = np.packbits(mask.reshape(k, j * i), axis=1)
    elif axis == 2:
        # Slice i is column i of the (k * j, i) matrix.
        packed = _columnsPacked(mask.reshape(k * j, i))
    elif i % 8 == 0:
        # Rows of whole bytes: pack each row, then put the rows of slice j together.
        packed = np.ascontiguousarray(np.packbits(mask, axis=2).transpose(1, 0, 2))
        packed = packed.reshape(j, -1)
    else:
        packed = np.packbits(np.ascontiguousarray(mask.transpose(1, 0, 2)).reshape(j, -1), axis=1)
    return [zlib.crc32(row) for row in packed]


def checksum(mask: np.ndarray) -> int:
    """CRC32 of a whole bool mask (with its shape), for 'changed since?' checks."""
    data = np.packbits(np.ascontiguousarray(mask, dtype=bool)).tobytes()
    return zlib.crc32(repr(tuple(mask.shape)).encode() + data)


def classifyEdit(changed: list[set[int]], preferredAxis: int) -> tuple[int, set[int]] | None:
    """(axis, slices) an edit was drawn on, or None for a 3D edit.

    ``changed[a]``: the slice indices along array axis ``a`` whose content changed. A stroke
    drawn on a slice changes exactly that one slice along its axis; an edit that changes
    several slices along every axis (smoothing, margin, islands, a sphere brush, threshold in
    3D) is not a drawing on any slice. A dot or a short line is planar in several orientations:
    it is recorded on the preferred axis (the one chosen in the module) when that is one of them.
    """
    single = [a for a in range(3) if len(changed[a]) == 1]
    if not single:
        return None
    axis = preferredAxis if preferredAxis in single else single[0]
    return axis, set(changed[axis])


class LabeledSliceRecord:
    """The record of one segment (read from and written to its tag)."""

    def __init__(self, shape, slices=None, hashes=None, written: bool = False) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.slices: dict[int, set[int]] = {a: set((slices or {}).get(a, ())) for a in range(3)}
        self.hashes: list[list[int]] = hashes or [[], [], []]
        self.written = bool(written)
        """True once a run wrote this segment: its voxels are no longer all the user's."""

    @classmethod
    def read(cls, segment, shape) -> LabeledSliceRecord | None:
        return cls.fromText(tagText(segment), shape)

    @classmethod
    def fromText(cls, text: str | None, shape) -> LabeledSliceRecord | None:
        if text is None:
            return None
        try:
            data = json.loads(text)
            if tuple(data["shape"]) != tuple(shape):
                return None  # recorded on another grid: not this volume's slices
            slices = {int(a): [int(s) for s in v] for a, v in data["slices"].items()}
            return cls(shape, slices, [list(map(int, h)) for h in data["hashes"]], data["written"])
        except (ValueError, KeyError, TypeError):
            return None

    def text(self) -> str:
        """The record as the tag holds it (JSON)."""
        data = {
            "shape": list(self.shape),
            "slices": {str(a): sorted(int(s) for s in v) for a, v in self.slices.items()},
            "hashes": self.hashes,
            "written": self.written,
        }
        return json.dumps(data, separators=(",", ":"))

    def write(self, segment) -> None:
        """Into the segment's tag (marks the segmentation modified when the text changes)."""
        segment.SetTag(TAG, self.text())

    def setBaseline(self, mask: np.ndarray) -> None:
        self.hashes = [sliceHashes(mask, a) for a in range(3)]

    def changedSlices(self, mask: np.ndarray, now=None) -> list[set[int]]:
        """Per axis, the slices whose hash differs from the baseline (``now``: the mask's
        hashes, if already computed)."""
        now = now if now is not None else [sliceHashes(mask, a) for a in range(3)]
        if any(len(h) != len(n) for h, n in zip(self.hashes, now, strict=True)):
            return [set(range(len(n))) for n in now]
        return [
            {i for i, (h, n) in enumerate(zip(old, new, strict=True)) if h != n}
            for old, new in zip(self.hashes, now, strict=True)
        ]

    def update(self, mask: np.ndarray, preferredAxis: int) -> bool:
        """Record the edits since the baseline; True if anything changed."""
        now = [sliceHashes(mask, a) for a in range(3)]
        changed = self.changedSlices(mask, now)
        if not any(changed):
            return False
        drawn = classifyEdit(changed, preferredAxis)
        if drawn is not None:
            axis, slices = drawn
            self.slices[axis] |= slices
        self.hashes = now
        return True


def occupiedSlices(mask: np.ndarray) -> list[list[int]]:
    """Per array axis, the slices where ``mask`` has a voxel."""
    others = ((1, 2), (0, 2), (0, 1))
    return [[int(s) for s in np.flatnonzero(mask.any(axis=others[a]))] for a in range(3)]


def seedRecord(mask: np.ndarray, baseline: bool = True) -> LabeledSliceRecord:
    """First sight of a segment no run has written: its voxels are the user's drawing
    (``baseline`` False: no hashes, the caller keeps the baseline)."""
    record = LabeledSliceRecord(mask.shape)
    occupied = occupiedSlices(mask)
    if occupied[0]:
        axis = min(range(3), key=lambda a: (len(occupied[a]), a))
        record.slices[axis] = set(occupied[axis])
    if baseline:
        record.setBaseline(mask)
    return record


def tagText(segment) -> str | None:
    """The record's tag as text (None when the segment has none)."""
    holder = vtk.reference("")
    if not (segment.HasTag(TAG) and segment.GetTag(TAG, holder)):
        return None
    return str(holder)


def labeledSegment(segmentId, segment, value, mask, axis, record) -> LabeledSegment:
    """The user's labeled slices of one segment along ``axis`` (from its ``record``, brought up
    to date with ``mask``), with voxel counts."""
    slices = sorted(record.slices[axis])
    others = ((1, 2), (0, 2), (0, 1))[axis]
    counts = mask.sum(axis=others) if slices else []
    return LabeledSegment(
        segmentId=segmentId,
        name=segment.GetName(),
        value=value,
        slices=slices,
        voxelCounts=[int(counts[s]) for s in slices],
    )
