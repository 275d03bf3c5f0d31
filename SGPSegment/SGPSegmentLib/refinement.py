"""Click refinement of one slice of a preview, and where a click or a slice view lies.

A click is a SAM2 point prompt (1 = include, 0 = exclude) on one slice along the preview's
axis; the slice's current mask (the preview's prediction, or what the user drew there) is the
dense prompt. The engine's ``refine_slice`` answers with the corrected slice, which is written
into the segment and recorded as a slice the user drew (it is the user's decision now), so the
next propagation starts from it. Further clicks on the same slice add to the clicks already
made there, on the same starting mask, until the slice is edited otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from slicer.i18n import tr as _

from SGPSegmentLib import edit_rules, labeled_slices, mrml_io, slice_geometry
from SGPSegmentLib.slice_geometry import axisText, isAligned
from SlicerSGP.errors import SGPInputError, SGPServiceError
from SlicerSGP.types import SegmentOptions


@dataclass
class SliceClicks:
    """The clicks made on one slice of one segment, and the mask they started from."""

    base: np.ndarray
    points: list[tuple[int, int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    writtenChecksum: int | None = None
    """Checksum of the slice as the last click wrote it (another edit starts afresh)."""


@dataclass
class RefineReport:
    segmentId: str
    slice: int
    point: tuple[int, int]
    positive: bool
    iou: float
    changedVoxels: int
    overwritten: list[str]

    def describe(self) -> str:
        text = (
            _(
                "Slice {slice} corrected (added at row {row}, column {column}); it now counts "
                "as drawn. Propagating again..."
            )
            if self.positive
            else _(
                "Slice {slice} corrected (removed at row {row}, column {column}); it now "
                "counts as drawn. Propagating again..."
            )
        )
        return text.format(slice=self.slice, row=self.point[0], column=self.point[1])


def clickOnSlice(volumeNode, axis: int, ras, inPlane=None) -> tuple[int, int, int]:
    """``(slice, row, col)`` of a world click: the slice along ``axis`` and the pixel in it
    (the slice's array without ``axis``, as the engine slices it)."""
    return slice_geometry.pointOnSlice(volumeNode, axis, ras, inPlane)


def sliceIndexFromViews(volumeNode, axis: int, sliceToRASMatrices) -> int:
    """The slice along ``axis`` shown by the first aligned view among ``sliceToRASMatrices``
    (each a slice node's 4x4 SliceToRAS), for 'slice range from view'."""
    axis = mrml_io.checkAxis(axis)
    shape = mrml_io.volumeShape(volumeNode)
    for matrix in sliceToRASMatrices:
        m = np.asarray(matrix, dtype=float).reshape(4, 4)
        origin = m[:3, 3]
        if not isAligned(volumeNode, axis, origin, (m[:3, 0], m[:3, 1])):
            continue
        k = int(np.round(mrml_io.rasToArrayIndex(volumeNode, origin)[axis]))
        if not 0 <= k < shape[axis]:
            raise SGPInputError(
                _(
                    "The view shows {orientation} position {k}, outside the volume "
                    "(0..{lastSlice})."
                ).format(orientation=axisText(axis), k=k, lastSlice=shape[axis] - 1)
            )
        return k
    raise SGPInputError(
        _(
            "No slice view shows {orientation} slices of the volume; set one to that orientation "
            "or type the slice number."
        ).format(orientation=axisText(axis))
    )


def takeSlice(mask: np.ndarray, axis: int, k: int) -> np.ndarray:
    return np.take(mask, int(k), axis=int(axis))


def putSlice(mask: np.ndarray, axis: int, k, values) -> np.ndarray:
    """A copy of ``mask`` with slice(s) ``k`` (an index or a list) along ``axis`` set."""
    out = np.array(mask, dtype=bool, copy=True)
    index: list[Any] = [slice(None)] * 3
    index[int(axis)] = [int(s) for s in k] if isinstance(k, (list, tuple)) else int(k)
    out[tuple(index)] = values
    return out


def refineOnEngine(client, session, volumeNode, k: int, clicks: SliceClicks):
    """The engine's corrected slice for ``clicks`` (the volume sent again if the engine
    dropped it)."""
    options = SegmentOptions(
        axis=session.axis, intensity=str(session.options.get("intensity", "auto"))
    )
    args = (k, [tuple(map(float, p)) for p in clicks.points], list(clicks.labels), clicks.base)
    try:
        if not session.volumeId:
            raise SGPInputError(_("Compute a preview before correcting it with clicks."))
        return client.refine_slice(session.volumeId, *args, options)
    except SGPServiceError as exc:
        if getattr(exc, "error_type", None) != "volume_missing":
            raise
    session.volumeId = client.ensure_volume(
        mrml_io.volumeArray(volumeNode), mrml_io.volumeGeometry(volumeNode)
    )
    return client.refine_slice(session.volumeId, *args, options)


def refineClick(core, session, segmentId: str, ras, positive: bool, inPlane=None, rules=None):
    """One click on the preview: correct that slice of ``segmentId`` with the engine, write it
    (under ``rules``), record it as drawn. The caller re-runs the propagation."""
    volumeNode, segmentationNode = session.nodes()
    if segmentId not in session.segmentIds:
        raise SGPInputError(_("Click refinement works on the segments of the preview; select one."))
    k, row, col = clickOnSlice(volumeNode, session.axis, ras, inPlane)
    axis = session.axis
    before = mrml_io.segmentArray(segmentationNode, segmentId, volumeNode)
    now = takeSlice(before, axis, k)
    clicks = session.clicks.get((segmentId, k))
    if clicks is None or clicks.writtenChecksum != labeled_slices.checksum(now):
        records = core.records
        drawn = records.recordedSlices(segmentationNode, volumeNode, segmentId, axis)[axis]
        clicks = SliceClicks(base=now.copy() if k in drawn else session.previewSlice(segmentId, k))
    clicks.points.append((row, col))
    clicks.labels.append(1 if positive else 0)
    client = core.engine.client(session.settings)
    refined, iou = refineOnEngine(client, session, volumeNode, k, clicks)
    wanted = putSlice(before, axis, k, np.asarray(refined, dtype=bool))
    final, others = edit_rules.applyRules(
        rules or edit_rules.EditRules(),
        segmentationNode,
        volumeNode,
        {segmentId: wanted},
        {segmentId: before},
    )
    mask = final[segmentId]
    core.runs.applying = True  # this write is recorded below, not by the edit watcher
    wasModifying = segmentationNode.StartModify()
    try:
        mrml_io.writeSegmentArray(mask, segmentationNode, segmentId, volumeNode)
        core.records.markDrawn(segmentationNode, volumeNode, segmentId, mask, axis, [k])
        for otherId, (old, new) in others.items():
            mrml_io.writeSegmentArray(new, segmentationNode, otherId, volumeNode)
            core.records.moveBaseline(segmentationNode, volumeNode, otherId, old, new)
    finally:
        segmentationNode.EndModify(wasModifying)
        core.runs.applying = False
    clicks.writtenChecksum = labeled_slices.checksum(takeSlice(mask, axis, k))
    session.clicks[(segmentId, k)] = clicks
    return RefineReport(
        segmentId=segmentId,
        slice=k,
        point=(row, col),
        positive=bool(positive),
        iou=float(iou),
        changedVoxels=int((mask != before).sum()),
        overwritten=list(others),
    )


__all__ = [
    "RefineReport",
    "SliceClicks",
    "clickOnSlice",
    "isAligned",
    "refineClick",
    "sliceIndexFromViews",
]
