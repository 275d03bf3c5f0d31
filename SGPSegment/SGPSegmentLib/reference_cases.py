"""Other, already segmented cases in the scene as extra support (numpy only, no torch).

The intensity mapping is the engine's own (``SlicerSGP.data.intensity`` is numpy only), so a
reference case is mapped exactly as the engine maps a volume.
"""

from __future__ import annotations

import numpy as np
from slicer.i18n import tr as _

from SGPSegmentLib import mrml_io
from SGPSegmentLib.constants import AXIS_NAMES
from SlicerSGP.data.intensity import evenly_spaced, intensity_range, normalize_intensity
from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import SupportItem

MAX_REFERENCE_SLICES_PER_STRUCTURE = 64
"""Reference-case support items kept per structure (evenly spaced beyond this)."""
REFERENCE_CASE_ROLE = "SGPReferenceCase"
"""Node reference role (on the parameter node) of each reference-case segmentation."""


def setReferenceCases(parameterNode, segmentationNodes) -> None:
    """Store the reference cases as node references on the (MRML) parameter node, so that
    they are saved with the scene and follow node ID changes on import."""
    parameterNode.RemoveNodeReferenceIDs(REFERENCE_CASE_ROLE)
    for node in segmentationNodes:
        parameterNode.AddNodeReferenceID(REFERENCE_CASE_ROLE, node.GetID())


def referenceCaseNodes(parameterNode) -> list:
    n = parameterNode.GetNumberOfNodeReferences(REFERENCE_CASE_ROLE)
    nodes = [parameterNode.GetNthNodeReference(REFERENCE_CASE_ROLE, i) for i in range(n)]
    return [node for node in nodes if node is not None]


def referenceCases(segmentationNodes, exclude=None) -> list:
    """``(volumeNode, segmentationNode)`` pairs for the reference segmentations."""
    return [
        (mrml_io.referenceVolumeForSegmentation(node), node)
        for node in segmentationNodes
        if node is not None and node is not exclude
    ]

def _matchSegments(refSegmentation, structures: dict[int, str]) -> dict[int, str | None]:
    refSegments = refSegmentation.GetSegmentation()
    byName = {}
    for segmentId in refSegments.GetSegmentIDs():
        byName.setdefault(refSegments.GetSegment(segmentId).GetName().strip().lower(), segmentId)
    matched = {v: byName.get(n.strip().lower()) for v, n in structures.items()}
    if not any(matched.values()):
        raise SGPInputError(
            _(
                "Reference case '{refSegmentationName}' has no segment named {segmentNames}; "
                "rename its segments to match, or remove it from the reference cases."
            ).format(
                refSegmentationName=refSegmentation.GetName(),
                segmentNames=" or ".join(repr(n) for n in structures.values()),
            )
        )
    return matched


def supportBankFromScene(referenceCases, structures: dict[int, str], *, axis=0, intensity="auto"):
    """Support items from ``(volumeNode, segmentationNode)`` pairs, matched by segment name.

    Per structure: every slice along ``axis`` that contains it plus as many evenly spaced
    slices without it (they teach "absent here"), at most
    :data:`MAX_REFERENCE_SLICES_PER_STRUCTURE` in all.
    """
    bank: dict[int, list[SupportItem]] = {v: [] for v in structures}
    for refVolume, refSegmentation in referenceCases:
        mrml_io.checkVolume(refVolume)
        if refSegmentation is None:
            raise SGPInputError(_(
                "Reference case '{refVolumeName}' has no segmentation."
            ).format(refVolumeName=refVolume.GetName()))
        matched = _matchSegments(refSegmentation, structures)
        mrml_io.checkSameGrid(refVolume, refSegmentation, [s for s in matched.values() if s])
        image = mrml_io.volumeArray(refVolume)
        lo, hi = intensity_range(image, intensity)
        image01 = np.moveaxis(normalize_intensity(image, lo, hi), axis, 0)
        del image
        for value, segmentId in matched.items():
            if not segmentId:
                continue
            mask = np.moveaxis(mrml_io.segmentArray(refSegmentation, segmentId, refVolume), axis, 0)
            perSlice = mask.reshape(mask.shape[0], -1).any(axis=1)
            present = [int(k) for k in np.flatnonzero(perSlice)]
            absent = [int(k) for k in np.flatnonzero(~perSlice)]
            chosen = sorted(
                evenly_spaced(
                    sorted(present + evenly_spaced(absent, len(present))),
                    MAX_REFERENCE_SLICES_PER_STRUCTURE,
                )
            )
            for k in chosen:
                bank[value].append(
                    SupportItem(
                        image=np.ascontiguousarray(image01[k]),
                        mask=np.ascontiguousarray(mask[k]),
                        source=f"{refVolume.GetName()} {AXIS_NAMES[axis]}={k}",
                    )
                )
    return {v: items for v, items in bank.items() if items}
