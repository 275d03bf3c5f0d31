"""The parts of the SGPSegment module that need MRML but no Qt (importable from slicer-core)."""

from SGPSegmentLib.logic import (
    LabeledSegment,
    RunJob,
    RunRequest,
    SGPSegmentCoreLogic,
    WriteReport,
)

__all__ = ["LabeledSegment", "RunJob", "RunRequest", "SGPSegmentCoreLogic", "WriteReport"]
