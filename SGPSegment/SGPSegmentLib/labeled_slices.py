"""Which slices of a segment the user drew, per segment and per slicing axis.

A slice counts as labeled (support) along an axis only if the user drew it in that
orientation. The record lives in a segment tag (saved with the segmentation, restored by undo)
and is updated from edits, never re-derived from the voxels once it exists:

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

The baseline is a hash per slice along each axis, stored with the record, so edits made while
the module was not watching (or before a scene was saved and reloaded) are still found.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import numpy as np
import vtk

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
        along = f" along {axisLabel}" if axisLabel else ""
        if not self.slices:
            return f"{self.name}: no slice drawn{along}"
        parts = ", ".join(
            f"{s} ({c} vx)" for s, c in zip(self.slices, self.voxelCounts, strict=True)
        )
        return f"{self.name}: {len(self.slices)} labeled slice(s){along}: {parts}"


def sliceHashes(mask: np.ndarray, axis: int) -> list[int]:
    """One CRC32 per slice of a bool ``(K, J, I)`` mask along ``axis``."""
    slicesFirst = np.moveaxis(np.asarray(mask, dtype=bool), axis, 0)
    return [zlib.crc32(np.packbits(np.ascontiguousarray(s)).tobytes()) for s in slicesFirst]


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
        holder = vtk.reference("")
        if not (segment.HasTag(TAG) and segment.GetTag(TAG, holder)):
            return None
        try:
            data = json.loads(str(holder))
            if tuple(data["shape"]) != tuple(shape):
                return None  # recorded on another grid: not this volume's slices
            slices = {int(a): [int(s) for s in v] for a, v in data["slices"].items()}
            return cls(shape, slices, [list(map(int, h)) for h in data["hashes"]], data["written"])
        except (ValueError, KeyError, TypeError):
            return None

    def write(self, segment) -> None:
        data = {
            "shape": list(self.shape),
            "slices": {str(a): sorted(int(s) for s in v) for a, v in self.slices.items()},
            "hashes": self.hashes,
            "written": self.written,
        }
        segment.SetTag(TAG, json.dumps(data, separators=(",", ":")))

    def setBaseline(self, mask: np.ndarray) -> None:
        self.hashes = [sliceHashes(mask, a) for a in range(3)]

    def changedSlices(self, mask: np.ndarray) -> list[set[int]]:
        now = [sliceHashes(mask, a) for a in range(3)]
        if any(len(h) != len(n) for h, n in zip(self.hashes, now, strict=True)):
            return [set(range(len(n))) for n in now]
        return [
            {i for i, (h, n) in enumerate(zip(old, new, strict=True)) if h != n}
            for old, new in zip(self.hashes, now, strict=True)
        ]

    def update(self, mask: np.ndarray, preferredAxis: int) -> bool:
        """Record the edits since the baseline; True if anything changed."""
        changed = self.changedSlices(mask)
        if not any(changed):
            return False
        drawn = classifyEdit(changed, preferredAxis)
        if drawn is not None:
            axis, slices = drawn
            self.slices[axis] |= slices
        self.setBaseline(mask)
        return True


def seedRecord(mask: np.ndarray) -> LabeledSliceRecord:
    """First sight of a segment no run has written: its voxels are the user's drawing."""
    record = LabeledSliceRecord(mask.shape)
    occupied = [
        [int(s) for s in np.flatnonzero(np.moveaxis(mask, a, 0).reshape(mask.shape[a], -1).any(1))]
        for a in range(3)
    ]
    if occupied[0]:
        axis = min(range(3), key=lambda a: (len(occupied[a]), a))
        record.slices[axis] = set(occupied[axis])
    record.setBaseline(mask)
    return record


def refreshRecord(segment, mask: np.ndarray, preferredAxis: int) -> LabeledSliceRecord:
    """The segment's record brought up to date with ``mask`` (its content now); saved if changed."""
    record = LabeledSliceRecord.read(segment, mask.shape)
    if record is None:
        record = seedRecord(mask)
        record.write(segment)
    elif record.update(mask, preferredAxis):
        record.write(segment)
    return record


def labeledSegment(segmentId, segment, value, mask, axis, preferredAxis=None) -> LabeledSegment:
    """The user's labeled slices of one segment along ``axis``, with voxel counts."""
    record = refreshRecord(segment, mask, axis if preferredAxis is None else preferredAxis)
    slices = sorted(record.slices[axis])
    counts = np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1).sum(axis=1)
    return LabeledSegment(
        segmentId=segmentId,
        name=segment.GetName(),
        value=value,
        slices=slices,
        voxelCounts=[int(counts[s]) for s in slices],
    )


def markWritten(segment, mask: np.ndarray, labeledAlong: dict[int, list[int]]) -> None:
    """After a run wrote ``mask``: keep the record's slices, move the baseline, flag as written."""
    record = LabeledSliceRecord.read(segment, mask.shape) or LabeledSliceRecord(mask.shape)
    for axis, slices in labeledAlong.items():
        record.slices[axis] |= {int(s) for s in slices}
    record.written = True
    record.setBaseline(mask)
    record.write(segment)


def markDrawn(segment, mask: np.ndarray, axis: int, slices) -> None:
    """After the Logic wrote ``mask`` whose ``slices`` along ``axis`` are now the user's (a
    click-corrected slice): record them as drawn there and move the baseline."""
    record = LabeledSliceRecord.read(segment, mask.shape) or LabeledSliceRecord(mask.shape)
    record.slices[int(axis)] |= {int(s) for s in slices}
    record.setBaseline(mask)
    record.write(segment)


def moveBaseline(segment, before: np.ndarray, after: np.ndarray) -> None:
    """Another segment lost voxels to a write (overwrite rules): that is no drawing, so only
    the baseline moves (a segment seen for the first time is recorded from ``before``)."""
    record = LabeledSliceRecord.read(segment, before.shape) or seedRecord(before)
    record.setBaseline(after)
    record.write(segment)


def recordedSlices(segment, shape) -> dict[int, list[int]]:
    """The drawn slices the record holds per axis (empty when there is no record yet)."""
    record = LabeledSliceRecord.read(segment, shape)
    if record is None:
        return {0: [], 1: [], 2: []}
    return {a: sorted(record.slices[a]) for a in range(3)}
