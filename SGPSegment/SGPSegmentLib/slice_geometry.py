"""Where a box, a click or a stroke drawn in a slice view lies in the volume's array.

The effect hands over world (RAS) positions and the view's in-plane directions; these give the
slice along the chosen array axis (0 = K, 1 = J, 2 = I of ``(K, J, I)``) and the voxel row and
column in that slice, as the engine slices the array (``np.take(volume, k, axis)``: rows and
columns are the two remaining axes in order, so a K slice is ``(J, I)``, a J slice ``(K, I)``
and an I slice ``(K, J)``). Volumes with any direction matrix and a parent transform are
handled (:func:`.mrml_io.rasToArrayIndex`).

Qt-free: the effect only collects positions; everything here is tested on real MRML.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from slicer.i18n import tr as _

from SGPSegmentLib import mrml_io
from SGPSegmentLib.constants import AXIS_NAMES, axisDisplay
from SlicerSGP.errors import SGPInputError

ALIGNED_TOLERANCE = 1e-3
"""Largest out-of-plane part (relative) of a view's in-plane direction for an aligned view."""
STROKE_STEP = 3.0
"""Voxels between two points sampled along a stroke (at least; see :data:`MAX_STROKE_POINTS`)."""
MAX_STROKE_POINTS = 12
"""Points one stroke gives at most: SAM2 was trained with a few clicks, not dozens."""
MIN_BOX_VOXELS = 2
"""A box narrower than this (voxels, in either direction) is taken for a slip, not a box."""


def axisText(axis: int) -> str:
    return axisDisplay(AXIS_NAMES[axis])


def isAligned(volumeNode, axis: int, ras, inPlane) -> bool:
    """Whether a view whose in-plane directions (world) are ``inPlane`` shows slices along
    array ``axis`` of the volume (no oblique or other-orientation view)."""
    for direction in inPlane:
        d = mrml_io.directionInArrayAxes(volumeNode, ras, direction)
        norm = float(np.linalg.norm(d))
        if norm == 0.0 or abs(d[axis]) / norm > ALIGNED_TOLERANCE:
            return False
    return True


def viewAxis(volumeNode, ras, inPlane) -> int:
    """The array axis whose slices a view with in-plane directions ``inPlane`` shows at world
    point ``ras`` (a structure started in a view is propagated along that axis)."""
    for axis in range(3):
        if isAligned(volumeNode, axis, ras, inPlane):
            return axis
    raise SGPInputError(
        _(
            "This view is oblique to the volume's grid: draw in a view that shows Axial, Coronal "
            "or Sagittal slices of the volume (reset the view's orientation)."
        )
    )


def _checkView(volumeNode, axis: int, ras, inPlane) -> None:
    if inPlane is not None and not isAligned(volumeNode, axis, ras, inPlane):
        raise SGPInputError(
            _(
                "Draw in a view that shows {orientation} slices, the orientation of the preview "
                "(this view is another orientation or oblique)."
            ).format(orientation=axisText(axis))
        )


def sliceIndex(volumeNode, axis: int, ras) -> tuple[float, float, float]:
    """Continuous ``(slice, row, col)`` of a world point for slices along ``axis``."""
    index = mrml_io.rasToArrayIndex(volumeNode, ras)
    rest = [float(index[a]) for a in range(3) if a != axis]
    return float(index[axis]), rest[0], rest[1]


def _sliceOf(volumeNode, axis: int, ras) -> int:
    k = int(np.round(sliceIndex(volumeNode, axis, ras)[0]))
    n = mrml_io.volumeShape(volumeNode)[axis]
    if not 0 <= k < n:
        raise SGPInputError(
            _(
                "That position is outside the volume ({orientation} slice {k}, the volume has "
                "0..{lastSlice})."
            ).format(orientation=axisText(axis), k=k, lastSlice=n - 1)
        )
    return k


def sliceSize(volumeNode, axis: int) -> tuple[int, int]:
    """``(rows, columns)`` of a slice along ``axis``."""
    shape = mrml_io.volumeShape(volumeNode)
    rows, cols = (shape[a] for a in range(3) if a != axis)
    return rows, cols


def pointOnSlice(volumeNode, axis: int, ras, inPlane=None) -> tuple[int, int, int]:
    """``(slice, row, col)`` of a click (the voxel it falls in)."""
    axis = mrml_io.checkAxis(axis)
    _checkView(volumeNode, axis, ras, inPlane)
    k, row, col = (int(np.round(v)) for v in sliceIndex(volumeNode, axis, ras))
    rows, cols = sliceSize(volumeNode, axis)
    n = mrml_io.volumeShape(volumeNode)[axis]
    if not (0 <= k < n and 0 <= row < rows and 0 <= col < cols):
        raise SGPInputError(_("The click lies outside the volume."))
    return k, row, col


@dataclass(frozen=True)
class SliceBox:
    """A box on one slice: voxel rows ``row0..row1`` and columns ``col0..col1`` (inclusive)."""

    slice: int
    row0: int
    col0: int
    row1: int
    col1: int

    @property
    def xyxy(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` = (column, row) of two opposite corners, as SAM2 takes a box."""
        return self.col0, self.row0, self.col1, self.row1

    def describe(self) -> str:
        return (
            _(
                "rows {row0}..{row1}, columns {col0}..{col1} of slice {slice}"
            ).format(
                row0=self.row0, row1=self.row1, col0=self.col0, col1=self.col1, slice=self.slice
            )
        )


def boxFromCorners(volumeNode, axis: int, rasStart, rasEnd, inPlane=None) -> SliceBox:
    """The box dragged from ``rasStart`` to ``rasEnd`` in a view along ``axis``: corners in
    any order, cut to the slice; refused when it lies outside the slice or is a mere line."""
    axis = mrml_io.checkAxis(axis)
    _checkView(volumeNode, axis, rasStart, inPlane)
    k = _sliceOf(volumeNode, axis, rasStart)
    _k, r0, c0 = sliceIndex(volumeNode, axis, rasStart)
    kEnd, r1, c1 = sliceIndex(volumeNode, axis, rasEnd)
    if abs(kEnd - k) > 0.5:
        raise SGPInputError(
            _(
                "The box's corners lie on different slices ({k} and {endSlice}); drag it "
                "within one slice view."
            ).format(k=k, endSlice=int(np.round(kEnd)))
        )
    rows, cols = sliceSize(volumeNode, axis)
    top, bottom = sorted((int(np.round(r0)), int(np.round(r1))))
    left, right = sorted((int(np.round(c0)), int(np.round(c1))))
    if bottom < 0 or right < 0 or top >= rows or left >= cols:
        raise SGPInputError(_("The box lies outside the volume; drag it over the structure."))
    box = SliceBox(
        k, max(top, 0), max(left, 0), min(bottom, rows - 1), min(right, cols - 1)
    )
    if box.row1 - box.row0 + 1 < MIN_BOX_VOXELS or box.col1 - box.col0 + 1 < MIN_BOX_VOXELS:
        raise SGPInputError(
            _(
                "The box is too small ({prompt}): drag a rectangle around the structure, or "
                "click on it instead."
            ).format(prompt=box.describe())
        )
    return box


@dataclass(frozen=True)
class SliceStroke:
    """A stroke on one slice: the points sampled along it (SAM2 point prompts) and every voxel
    it crosses (``(row, col)`` each)."""

    slice: int
    points: tuple[tuple[int, int], ...]
    voxels: tuple[tuple[int, int], ...]

    def voxelMask(self, shape) -> np.ndarray:
        mask = np.zeros(shape, dtype=bool)
        if self.voxels:
            rows, cols = np.array(self.voxels).T
            mask[rows, cols] = True
        return mask


def strokeOnSlice(
    volumeNode,
    axis: int,
    rasPoints,
    inPlane=None,
    step: float = STROKE_STEP,
    maxPoints: int = MAX_STROKE_POINTS,
) -> SliceStroke:
    """A stroke through world points ``rasPoints`` (in drawing order) in a view along ``axis``:
    the voxels it crosses and at most ``maxPoints`` points evenly spaced along it (at least
    ``step`` voxels apart; its first and last point always). The part outside the slice is
    dropped."""
    axis = mrml_io.checkAxis(axis)
    if len(rasPoints) == 0:
        raise SGPInputError(_("The stroke has no points."))
    _checkView(volumeNode, axis, rasPoints[0], inPlane)
    k = _sliceOf(volumeNode, axis, rasPoints[0])
    path = np.array([sliceIndex(volumeNode, axis, p)[1:] for p in rasPoints], dtype=float)
    rows, cols = sliceSize(volumeNode, axis)
    # Voxels crossed: the polyline sampled every half voxel.
    dense = [path[:1]]
    for a, b in zip(path[:-1], path[1:], strict=True):
        n = max(1, int(np.ceil(np.linalg.norm(b - a) * 2)))
        dense.append(a + (b - a) * (np.arange(1, n + 1)[:, None] / n))
    dense = np.concatenate(dense)
    inside = (
        (dense[:, 0] > -0.5) & (dense[:, 0] < rows - 0.5)
        & (dense[:, 1] > -0.5) & (dense[:, 1] < cols - 0.5)
    )  # fmt: skip
    if not inside.any():
        raise SGPInputError(_("The stroke lies outside the volume."))
    voxels = _unique(np.round(dense[inside]).astype(int))
    # Points evenly spaced by arc length along the part inside the slice.
    kept = dense[inside]
    lengths = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(kept, axis=0), axis=1))]
    total = float(lengths[-1])
    count = int(min(maxPoints, max(1, np.floor(total / max(step, 1e-6)) + 1)))
    targets = np.linspace(0.0, total, count) if count > 1 else np.array([0.0])
    picks = kept[np.minimum(np.searchsorted(lengths, targets), len(kept) - 1)]
    points = _unique(np.round(picks).astype(int))
    return SliceStroke(k, tuple(points), tuple(voxels))


def _unique(coords: np.ndarray) -> list[tuple[int, int]]:
    """The ``(row, col)`` pairs in first-seen order, each once."""
    seen: dict[tuple[int, int], None] = {}
    for r, c in coords:
        seen.setdefault((int(r), int(c)), None)
    return list(seen)


__all__ = [
    "SliceBox",
    "SliceStroke",
    "axisText",
    "boxFromCorners",
    "isAligned",
    "pointOnSlice",
    "sliceIndex",
    "sliceSize",
    "strokeOnSlice",
    "viewAxis",
]
