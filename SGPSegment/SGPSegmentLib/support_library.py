"""The support library from Slicer: save a segmentation's drawn slices as a named support set,
and turn a saved set into support for a run (numpy and the engine's torch-free library; no Qt).

A set holds, per segment, only the slices drawn for that segment (:mod:`labeled_slices`), so
a slice drawn for one segment never tells another segment "absent here" on a new case. The
library folder is the engine's (``SlicerSGP.data.support_library.default_root``), so sets
saved here are listed by ``sgp support list`` and usable as ``sgp segment --support-bank``.
"""

from __future__ import annotations

import os

from SGPSegmentLib import mrml_io
from SGPSegmentLib.edit_watch import labeledSegments
from SlicerSGP.data.support_library import (
    SupportLibrary,
    SupportSetSummary,
    read_support_set,
    resolve_support_bank,
)
from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import SupportItem, axis_label


def _drawn(volumeNode, segmentationNode, ids: list[str], axis: int, drawnSlices, records=None):
    """``[(segmentId, name, slices, mask), ...]``: the given slices, else the recorded ones."""
    if drawnSlices is None:
        pairs = labeledSegments(volumeNode, segmentationNode, ids, axis, records)
        return [(item.segmentId, item.name, list(item.slices), mask) for item, mask in pairs]
    segmentation = segmentationNode.GetSegmentation()
    missing = [s for s in ids if s not in drawnSlices]
    if missing:
        raise SGPInputError(f"No drawn slices given for segment(s) {missing}.")
    return [
        (s, segmentation.GetSegment(s).GetName(), sorted(int(k) for k in drawnSlices[s]),
         mrml_io.segmentArray(segmentationNode, s, volumeNode))
        for s in ids
    ]  # fmt: skip


def saveSupportSet(
    name: str,
    volumeNode,
    segmentationNode,
    segmentIds=None,
    *,
    axis=0,
    drawnSlices: dict[str, list[int]] | None = None,
    intensity: str = "auto",
    description: str = "",
    library: str | os.PathLike | None = None,
    overwrite: bool = False,
    records=None,
) -> SupportSetSummary:
    """Save the selected segments' drawn slices (``drawnSlices``: ``{segmentId: [slice, ...]}``
    along ``axis``; default: the slices recorded as drawn) as support set ``name``.

    ``segmentIds`` None: every segment drawn along ``axis``. The segmentation is not changed
    (``records``: the Logic's drawn-slice records, kept in memory)."""
    mrml_io.checkVolume(volumeNode)
    if segmentationNode is None:
        raise SGPInputError("Select the segmentation whose drawn slices to save.")
    axis = mrml_io.checkAxis(axis)
    segmentation = segmentationNode.GetSegmentation()
    explicit = segmentIds is not None
    ids = [str(s) for s in segmentIds] if explicit else list(segmentation.GetSegmentIDs())
    for segmentId in ids:
        if segmentation.GetSegment(segmentId) is None:
            raise SGPInputError(
                f"Segment '{segmentId}' is not in segmentation '{segmentationNode.GetName()}'."
            )
    mrml_io.checkSameGrid(volumeNode, segmentationNode, ids)
    found = _drawn(volumeNode, segmentationNode, ids, axis, drawnSlices, records)
    undrawn = [segName for _, segName, slices, mask in found if not slices]
    if explicit and undrawn:
        raise SGPInputError(
            f"Segment(s) {', '.join(repr(n) for n in undrawn)} have no slice drawn along "
            f"{axis_label(axis)}: draw them on a slice first, or leave them out of the set."
        )
    found = [f for f in found if f[2]]
    if not found:
        raise SGPInputError(
            f"No segment of '{segmentationNode.GetName()}' has a slice drawn along "
            f"{axis_label(axis)}; draw some slices first."
        )
    values = {segmentId: value for value, (segmentId, *_) in enumerate(found, start=1)}
    return SupportLibrary(library).save(
        name,
        mrml_io.volumeArray(volumeNode),
        {values[s]: mask for s, _, _, mask in found},
        {values[s]: slices for s, _, slices, _ in found},
        axis=axis,
        geometry=mrml_io.volumeGeometry(volumeNode),
        names={values[s]: segName for s, segName, _, _ in found},
        colors={values[s]: tuple(segmentation.GetSegment(s).GetColor()) for s, *_ in found},
        intensity=intensity,
        source=volumeNode.GetName(),
        description=description,
        overwrite=overwrite,
    )


def supportBankFromLibrary(
    nameOrPath, structures: dict[int, str], *, intensity: str = "auto", library=None
) -> dict[int, list[SupportItem]]:
    """A run's ``supportBank`` from a saved set: its structures matched to ``structures``
    (``{value: segment name}``) by name, letter case ignored."""
    folder = resolve_support_bank(nameOrPath, SupportLibrary(library))
    items, names = read_support_set(folder, intensity=intensity)
    byName = {n.strip().lower(): v for v, n in names.items()}
    bank = {v: items[byName[n.strip().lower()]] for v, n in structures.items()
            if n.strip().lower() in byName}  # fmt: skip
    if not bank:
        raise SGPInputError(
            f"Support set '{folder.name}' holds {', '.join(repr(n) for n in names.values())}, "
            f"none named {' or '.join(repr(n) for n in structures.values())}; rename the "
            "segments to match, or pick another set."
        )
    return bank
