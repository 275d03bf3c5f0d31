"""Boxes, clicks and scribbles of the SGP effect: the prompts a preview sends with every run.

A prompt belongs to one slice of one segment (along the preview's axis) and lives in the
preview session until Apply: nothing is written into the user's segments before, and Cancel
drops them. Every run sends them (``SlicePrompt``); the engine makes each prompted slice's mask
(SAM2's prompt encoder and decoder) and uses it as a drawn slice of that segment, so the rest
of the structure is propagated from it. Apply writes the prompted slices with the rest and
records them as drawn: from then on they are the user's slices like any other (edit them with
any effect).

* A **box** replaces the slice's prompt (a new box on the same slice starts afresh).
* A **click** adds a point to the slice's prompt (left: here, Shift or right: not here); before
  any preview is shown it starts one (a structure can start from one click). A click on a
  slice of a preview shown that has no prompt is a correction (:mod:`.refinement`), written
  into the segment at once as before.
* A **scribble** is a stroke: the points sampled along it, with the slice's current mask as
  SAM2's dense prompt, give the slice's new mask at once (the engine's ``refine_slice``), and
  every voxel the stroke crosses is set (left stroke) or cleared (Shift stroke): a stroke over
  a leak removes it whatever the model says. That mask is then sent as a drawn slice.

When the user draws on a prompted slice of that segment with another effect, the drawing wins
and the prompt is dropped (its slice was checksummed when the prompt was made).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from slicer.i18n import tr as _

from SGPSegmentLib import labeled_slices, mrml_io
from SGPSegmentLib.slice_geometry import SliceBox, SliceStroke
from SlicerSGP.errors import SGPInputError, SGPServiceError
from SlicerSGP.types import SegmentOptions, SlicePrompt


@dataclass
class PromptedSlice:
    """The prompt of one slice of one segment."""

    box: tuple[int, int, int, int] | None = None
    """``(x0, y0, x1, y1)``: columns and rows of two opposite corner voxels, inclusive."""
    points: list[tuple[int, int, bool]] = field(default_factory=list)
    """Clicks ``(x = column, y = row, positive)``."""
    mask: np.ndarray | None = None
    """The slice's mask before the clicks (SAM2's dense prompt), or None."""
    fixed: np.ndarray | None = None
    """A scribble's result: the slice's mask itself, sent as a drawn slice (no prompt)."""
    baseChecksum: int = 0
    """Checksum of the user's segment on this slice when the prompt was made."""

    def describe(self) -> str:
        if self.fixed is not None:
            return _("scribbled")
        parts = [_("box")] if self.box is not None else []
        positive = sum(1 for p in self.points if p[2])
        if positive:
            parts.append(_("{count} click(s) here").format(count=positive))
        if len(self.points) - positive:
            parts.append(_("{count} click(s) not here").format(count=len(self.points) - positive))
        return " + ".join(parts) or _("empty")

    def toSlicePrompt(self, value: int, k: int) -> SlicePrompt:
        return SlicePrompt(
            value=int(value),
            slice_index=int(k),
            box=None if self.box is None else tuple(float(v) for v in self.box),
            points=[(float(x), float(y), bool(p)) for x, y, p in self.points],
            mask=None if self.mask is None else np.asarray(self.mask, dtype=bool),
        )


PromptKey = tuple[str, int]
"""``(segment ID, slice along the preview's axis)``."""


def userSliceChecksum(segmentationNode, volumeNode, segmentId: str, axis: int, k: int) -> int:
    """Checksum of what the user's segment holds on slice ``k`` now."""
    mask = mrml_io.segmentArray(segmentationNode, segmentId, volumeNode)
    return labeled_slices.checksum(np.take(mask, int(k), axis=int(axis)))


def boxPrompt(box: SliceBox, baseChecksum: int) -> PromptedSlice:
    return PromptedSlice(box=tuple(int(v) for v in box.xyxy), baseChecksum=baseChecksum)


def withClick(previous: PromptedSlice | None, row: int, col: int, positive: bool,
              baseChecksum: int) -> PromptedSlice:  # fmt: skip
    """``previous`` (None: a new prompt) with one more click; a scribbled slice's mask becomes
    the dense prompt of its clicks."""
    point = (int(col), int(row), bool(positive))
    if previous is None:
        return PromptedSlice(points=[point], baseChecksum=baseChecksum)
    if previous.fixed is not None:
        return PromptedSlice(points=[point], mask=previous.fixed, baseChecksum=baseChecksum)
    return PromptedSlice(previous.box, [*previous.points, point], previous.mask, None,
                         previous.baseChecksum)  # fmt: skip


def scribbledMask(current: np.ndarray, stroke: SliceStroke, positive: bool, engineMask) -> np.ndarray:
    """The slice's mask after a stroke: the engine's answer with every crossed voxel set
    (positive stroke) or cleared (negative)."""
    mask = np.array(engineMask if engineMask is not None else current, dtype=bool, copy=True)
    crossed = stroke.voxelMask(mask.shape)
    mask[crossed] = bool(positive)
    return mask


def refineOnEngine(client, volumeId: str, volumeNode, axis: int, intensity: str, k: int,
                   points, labels, mask):  # fmt: skip
    """The engine's ``refine_slice`` answer (mask, iou) and the volume's id there (the volume
    is sent when the engine lacks it)."""
    options = SegmentOptions(axis=int(axis), intensity=str(intensity))
    args = (int(k), [(float(r), float(c)) for r, c in points], [int(v) for v in labels], mask)
    if volumeId:
        try:
            return (*client.refine_slice(volumeId, *args, options), volumeId)
        except SGPServiceError as exc:
            if getattr(exc, "error_type", None) != "volume_missing":
                raise
    volumeId = client.ensure_volume(
        mrml_io.volumeArray(volumeNode), mrml_io.volumeGeometry(volumeNode)
    )
    return (*client.refine_slice(volumeId, *args, options), volumeId)


def dropOverdrawn(prompts: dict, segmentationNode, volumeNode, axis: int) -> list[PromptKey]:
    """Remove the prompts whose slice the user drew on since (the drawing wins); returns them."""
    dropped = []
    masks: dict[str, np.ndarray] = {}
    for key, prompt in list(prompts.items()):
        segmentId, k = key
        if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            dropped.append(key)
            del prompts[key]
            continue
        if segmentId not in masks:
            masks[segmentId] = mrml_io.segmentArray(segmentationNode, segmentId, volumeNode)
        now = labeled_slices.checksum(np.take(masks[segmentId], int(k), axis=int(axis)))
        if now != prompt.baseChecksum:
            dropped.append(key)
            del prompts[key]
    return dropped


def promptsBySegment(prompts: dict) -> dict[str, dict[int, PromptedSlice]]:
    bySegment: dict[str, dict[int, PromptedSlice]] = {}
    for (segmentId, k), prompt in prompts.items():
        bySegment.setdefault(segmentId, {})[int(k)] = prompt
    return bySegment


def checkPromptsFitGrid(volumeNode, axis: int, prompts: dict) -> None:
    """A slice index outside the volume (the volume changed) is refused with its segment."""
    n = mrml_io.volumeShape(volumeNode)[axis]
    for segmentId, k in prompts:
        if not 0 <= int(k) < n:
            raise SGPInputError(
                _(
                    "A prompt of segment '{segmentId}' lies on slice {k}, outside the volume "
                    "(0..{lastSlice}); Cancel the preview and draw it again."
                ).format(segmentId=segmentId, k=k, lastSlice=n - 1)
            )


__all__ = [
    "PromptKey",
    "PromptedSlice",
    "boxPrompt",
    "checkPromptsFitGrid",
    "dropOverdrawn",
    "promptsBySegment",
    "refineOnEngine",
    "scribbledMask",
    "userSliceChecksum",
    "withClick",
]
