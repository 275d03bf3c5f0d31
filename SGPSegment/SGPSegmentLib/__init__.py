"""The parts of the SGPSegment module that need MRML but no Qt (importable with slicer-core).

May import slicer (MRML; ``slicer.i18n`` for texts shown to people), vtk, numpy, packaging and
the engine's torch-free parts (SlicerSGP.errors, .types, .filesystem, .service.client,
.service.launcher); never torch, qt or ctk.
"""

from SGPSegmentLib.labeled_slices import LabeledSegment
from SGPSegmentLib.logic import SGPSegmentCoreLogic
from SGPSegmentLib.request import RunRequest
from SGPSegmentLib.runs import Run, WriteReport

__all__ = ["LabeledSegment", "Run", "RunRequest", "SGPSegmentCoreLogic", "WriteReport"]
