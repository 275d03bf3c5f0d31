"""The user's strokes, watched as they happen: the observers on the segmentation the module
(or the SGP effect) works on, feeding the in-memory drawn-slice records of
:class:`~SGPSegmentLib.edit_watch.RecordStore` (the Logic's ``drawing`` role).

Writes nothing to the scene: the records stay in memory until a run uses them.
"""

from __future__ import annotations

from collections.abc import Callable

import slicer
import vtk

from SGPSegmentLib import request
from SGPSegmentLib.edit_watch import RecordStore


class DrawingWatch:
    """Observers of one (segmentation, volume) pair and the records they keep up to date."""

    def __init__(self, records: RecordStore, isApplying: Callable[[], bool]) -> None:
        self.records = records
        self.isApplying = isApplying
        """True while the Logic writes a result or an undo: those events are no strokes."""
        self.axis = 0
        """Axis a drawn dot or line (planar in several orientations) is recorded on."""
        self._watched: dict[str, tuple] = {}

    def labeledSlices(self, volumeNode, segmentationNode, segmentIds, axis=0):
        """Per selected segment, the slices along ``axis`` the user drew, with voxel counts."""
        pairs = request.labeledSegments(
            volumeNode, segmentationNode, list(segmentIds), axis, self.records
        )
        return [item for item, _ in pairs]

    def watchEdits(self, segmentationNode, volumeNode) -> None:
        """Record the user's strokes as they happen (see :mod:`.labeled_slices`)."""
        entry = self._watched.get(segmentationNode.GetID()) if segmentationNode else None
        if entry is not None and entry[0] is segmentationNode and entry[2] is volumeNode:
            # Watched already: only look at the segments now (edits since count as one).
            self.records.sync(segmentationNode, volumeNode, None, self.axis)
            return
        self.stopWatching()
        if segmentationNode is None or volumeNode is None or volumeNode.GetImageData() is None:
            return

        @vtk.calldata_type(vtk.VTK_STRING)
        def onSegmentModified(caller, event, segmentId=None):
            self._onSegmentModified(segmentationNode, volumeNode, segmentId)

        def onLabelmapModified(caller, event):
            self._onSegmentModified(segmentationNode, volumeNode, None)

        # A Paint/Draw stroke changes the shared labelmap in place: only the source
        # representation's event fires (no segment ID). Replacing a segment's labelmap, its
        # tags or an undo fire SegmentModified.
        tags = (
            segmentationNode.AddObserver(slicer.vtkSegmentation.SegmentModified, onSegmentModified),
            segmentationNode.AddObserver(
                slicer.vtkSegmentation.SourceRepresentationModified, onLabelmapModified
            ),
        )
        self._watched[segmentationNode.GetID()] = (segmentationNode, tags, volumeNode)
        # Baseline (or first record) of every segment now, so the next stroke is seen alone.
        self.records.sync(segmentationNode, volumeNode, None, self.axis)

    def stopWatching(self) -> None:
        for node, tags, _ in self._watched.values():
            for tag in tags:
                node.RemoveObserver(tag)
        self._watched.clear()

    def ensureWatching(self, segmentationNode, volumeNode) -> None:
        """Watch this pair unless it is watched already (the effect and the module share it)."""
        entry = self._watched.get(segmentationNode.GetID()) if segmentationNode else None
        if entry is None or entry[0] is not segmentationNode or entry[2] is not volumeNode:
            self.watchEdits(segmentationNode, volumeNode)

    def _onSegmentModified(self, segmentationNode, volumeNode, segmentId) -> None:
        # Shared-labelmap updates come without a segment ID: look at every segment then. A
        # write of the Logic itself (a run's result, its undo) only moves the baselines.
        self.records.sync(
            segmentationNode,
            volumeNode,
            [segmentId] if segmentId else None,
            self.axis,
            record=not self.isApplying(),
        )
