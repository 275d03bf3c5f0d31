"""Where a write may change voxels, and which other segments it may take voxels from.

The Segment Editor's masking settings as explicit values the Logic takes (the effect reads
them from the editor's parameter node with :func:`rulesFromEditorNode`; the module passes
the default, which changes no other segment):

* ``overwrite``: ``'none'`` (segments may overlap; no other segment changes), ``'all'`` or
  ``'visible'`` (voxels a write adds to a segment are removed from all, or the visible, other
  segments), as the editor's "Modify other segments".
* ``maskMode``: the editor's "Editable area" (``vtkMRMLSegmentationNode.EditAllowed*``), with
  ``maskSegmentId`` for "inside one segment"; ``intensityRange``: its "Editable intensity
  range" of the source volume. Outside the editable area a segment keeps its voxels.

Only voxels a write *adds* are taken from other segments: overlaps that existed before stay,
so a run changes another segment's voxels only where it gives the same voxel to a selected
segment and ``overwrite`` allows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import slicer
from slicer.i18n import tr as _
from vtk.util.numpy_support import vtk_to_numpy

from SGPSegmentLib import mrml_io
from SlicerSGP.errors import SGPError, SGPInputError

OVERWRITE_MODES = ("none", "all", "visible")

_FROM_EDITOR = {0: "all", 1: "visible", 2: "none"}
"""vtkMRMLSegmentEditorNode.Overwrite{AllSegments, VisibleSegments, None} -> our names."""


@dataclass(frozen=True)
class EditRules:
    """What a write may change (see the module docstring)."""

    overwrite: str = "none"
    maskMode: int = 0
    """vtkMRMLSegmentationNode.EditAllowedEverywhere (0) ... EditAllowedInsideSingleSegment."""
    maskSegmentId: str = ""
    intensityRange: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.overwrite not in OVERWRITE_MODES:
            raise SGPInputError(
                _(
                    "overwrite must be one of {choices}; got {overwrite!r}."
                ).format(choices=", ".join(OVERWRITE_MODES), overwrite=self.overwrite)
            )
        last = slicer.vtkMRMLSegmentationNode.EditAllowed_Last
        if not 0 <= int(self.maskMode) < last:
            raise SGPInputError(
                _(
                    "maskMode must be a vtkMRMLSegmentationNode.EditAllowed* value "
                    "(0..{lastMode}); got {maskMode!r}."
                ).format(lastMode=last - 1, maskMode=self.maskMode)
            )
        if self.maskMode == slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment and (
            not self.maskSegmentId
        ):
            raise SGPInputError(
                _(
                    "The editable area is 'inside a single segment' but no segment is chosen "
                    "for it; choose one in the Segment Editor's Masking section."
                )
            )
        if self.intensityRange is not None and self.intensityRange[0] > self.intensityRange[1]:
            raise SGPInputError(
                _(
                    "The editable intensity range {intensityRange} is empty (low > high)."
                ).format(intensityRange=tuple(self.intensityRange))
            )

    @property
    def restrictsArea(self) -> bool:
        return (
            self.maskMode != slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere
            or self.intensityRange is not None
        )


def rulesFromEditorNode(editorNode) -> EditRules:
    """The masking settings of a Segment Editor parameter node (``vtkMRMLSegmentEditorNode``)."""
    intensity = None
    if editorNode.GetSourceVolumeIntensityMask():
        low, high = editorNode.GetSourceVolumeIntensityMaskRange()
        intensity = (float(low), float(high))
    return EditRules(
        overwrite=_FROM_EDITOR.get(int(editorNode.GetOverwriteMode()), "none"),
        maskMode=int(editorNode.GetMaskMode()),
        maskSegmentId=editorNode.GetMaskSegmentID() or "",
        intensityRange=intensity,
    )


def describe(rules: EditRules) -> str:
    """One line for the panel: what Apply may do to other segments."""
    other = {
        "none": _("Other segments are never changed (segments may overlap)."),
        "all": _("Voxels SGP adds are removed from all other segments."),
        "visible": _("Voxels SGP adds are removed from the visible other segments."),
    }[rules.overwrite]
    if rules.restrictsArea:
        other += " " + _("Only the editable area of the Masking settings is changed.")
    return other + " " + _("(Segment Editor: Masking)")


def editableMask(rules: EditRules, segmentationNode, segmentId: str, volumeNode):
    """Where ``segmentId`` may change, bool ``(K, J, I)`` on the volume's grid; None = everywhere.

    The area part is the segmentation node's own ``GenerateEditMask`` (what the editor uses);
    the segment's own voxels are always editable, as in the editor."""
    if not rules.restrictsArea:
        return None
    shape = mrml_io.volumeShape(volumeNode)
    editable = np.ones(shape, dtype=bool)
    if rules.maskMode != slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere:
        forbidden = slicer.vtkOrientedImageData()
        reference = mrml_io.referenceImage(volumeNode)
        if not segmentationNode.GenerateEditMask(
            forbidden, int(rules.maskMode), reference, segmentId, rules.maskSegmentId or ""
        ):
            raise SGPError(
                _(
                    "Could not compute the editable area of segmentation "
                    "'{segmentationName}'."
                ).format(segmentationName=segmentationNode.GetName())
            )
        scalars = forbidden.GetPointData().GetScalars()
        if tuple(forbidden.GetExtent()) != tuple(reference.GetExtent()) or scalars is None:
            raise SGPError(_("The editable area does not lie on the volume's grid."))
        editable &= vtk_to_numpy(scalars).reshape(shape) == 0  # non-zero = not editable
    if rules.intensityRange is not None:
        image = mrml_io.volumeArray(volumeNode)
        image = image[..., 0] if image.ndim == 4 else image  # the editor uses the first component
        low, high = rules.intensityRange
        editable &= (image >= low) & (image <= high)
    return editable


def overwriteTargets(rules: EditRules, segmentationNode, writtenIds) -> list[str]:
    """The other segments a write may take voxels from."""
    if rules.overwrite == "none":
        return []
    written = set(writtenIds)
    others = [s for s in segmentationNode.GetSegmentation().GetSegmentIDs() if s not in written]
    if rules.overwrite == "visible":
        display = segmentationNode.GetDisplayNode()
        if display is None or not display.GetVisibility():
            return []
        others = [s for s in others if display.GetSegmentVisibility(s)]
    return others


def applyRules(
    rules: EditRules,
    segmentationNode,
    volumeNode,
    newMasks: dict[str, np.ndarray],
    before: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """What a write of ``newMasks`` (segment ID -> wanted mask) leaves, under ``rules``.

    Returns the final masks of the written segments (their ``before`` voxels kept outside the
    editable area) and, for each other segment that loses voxels, ``(before, after)``. Nothing
    is written here."""
    final: dict[str, np.ndarray] = {}
    added = None
    for segmentId, wanted in newMasks.items():
        old = before[segmentId]
        editable = editableMask(rules, segmentationNode, segmentId, volumeNode)
        mask = (
            np.asarray(wanted, dtype=bool) if editable is None else np.where(editable, wanted, old)
        )
        final[segmentId] = mask
        gained = mask & ~old
        added = gained if added is None else (added | gained)
    others: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if added is None or not added.any():
        return final, others
    for segmentId in overwriteTargets(rules, segmentationNode, newMasks):
        old = mrml_io.segmentArray(segmentationNode, segmentId, volumeNode)
        if (old & added).any():
            others[segmentId] = (old, old & ~added)
    return final, others


__all__ = [
    "EditRules",
    "OVERWRITE_MODES",
    "applyRules",
    "describe",
    "editableMask",
    "overwriteTargets",
    "rulesFromEditorNode",
]
