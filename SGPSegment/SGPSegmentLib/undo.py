"""The Logic's own one-level undo of a written result (console, module panel, tests).

It goes through the segmentation's saved state (``vtkSegmentationHistory``, all segments, so
segments a result took voxels from come back too) and refuses when a segment was edited after
the write (its checksum tag differs), so a later manual edit is never silently wiped. The
Segment Editor effect also saves the editor's own undo state before it writes.
"""

from __future__ import annotations

import uuid
from typing import Any

import slicer
import vtk
from slicer.i18n import tr as _

from SGPSegmentLib import labeled_slices, mrml_io
from SlicerSGP.errors import SGPError, SGPInputError

UNDO_TOKEN_ATTRIBUTE = "SGPSegment.undoToken"
RUN_CHECKSUM_TAG = "SGPSegment.runChecksum"
"""Checksum of what the last run wrote into a segment (for Undo's 'edited since?' check)."""


class RunHistory:
    """Saved states per segmentation node (a token attribute ties them to that node)."""

    def __init__(self) -> None:
        self._histories: dict[str, tuple[str, Any]] = {}

    def clear(self) -> None:
        self._histories.clear()

    def _history(self, segmentationNode, create: bool = True):
        token = segmentationNode.GetAttribute(UNDO_TOKEN_ATTRIBUTE)
        entry = self._histories.get(segmentationNode.GetID())
        if entry is not None and token and entry[0] == token:
            return entry[1]
        if not create:
            return None
        token = uuid.uuid4().hex
        segmentationNode.SetAttribute(UNDO_TOKEN_ATTRIBUTE, token)
        history = slicer.vtkSegmentationHistory()
        history.SetMaximumNumberOfStates(2)
        history.SetSegmentation(segmentationNode.GetSegmentation())
        self._histories[segmentationNode.GetID()] = (token, history)
        return history

    def save(self, segmentationNode):
        """Save the segmentation's state now (before a write); returns the history."""
        history = self._history(segmentationNode)
        history.SaveState()
        return history

    def canUndo(self, segmentationNode) -> bool:
        history = self._history(segmentationNode, create=False) if segmentationNode else None
        return bool(history is not None and history.IsRestorePreviousStateAvailable())

    def editedSinceRun(self, segmentationNode, volumeNode) -> list[str]:
        """Names of segments whose content differs from what the last run wrote."""
        edited = []
        segmentation = segmentationNode.GetSegmentation()
        for segmentId in segmentation.GetSegmentIDs():
            segment = segmentation.GetSegment(segmentId)
            holder = vtk.reference("")
            if not (segment.HasTag(RUN_CHECKSUM_TAG) and segment.GetTag(RUN_CHECKSUM_TAG, holder)):
                continue
            mask = mrml_io.segmentArray(segmentationNode, segmentId, volumeNode)
            if str(labeled_slices.checksum(mask)) != str(holder):
                edited.append(segment.GetName())
        return edited

    def undo(self, segmentationNode, volumeNode) -> None:
        """Restore the segmentation as it was before the last result was written.

        Refuses (SGPInputError) when a segment was edited after the run, naming it."""
        if not self.canUndo(segmentationNode):
            raise SGPInputError(_("There is no SGP result to undo for this segmentation."))
        edited = self.editedSinceRun(segmentationNode, volumeNode)
        if edited:
            raise SGPInputError(
                _(
                    "Segment(s) {segments} were edited after the SGP run; undoing the run "
                    "would wipe those edits, so nothing was changed. Use the Segment "
                    "Editor's undo to step back through your edits first."
                ).format(segments=", ".join(repr(n) for n in edited))
            )
        history = self._history(segmentationNode, create=False)
        if not history.RestorePreviousState():
            raise SGPError(_("The segmentation's saved state could not be restored."))
        history.RemoveAllStates()  # one level: the run's own undo
