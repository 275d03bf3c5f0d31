"""SlicerSGP: few-shot volume segmentation with SAM2 and support-set guided prompting.

The engine knows nothing about Slicer: numpy volumes and geometry in, label maps,
probabilities, pseudo-masks and per-slice scores out.
"""

from SlicerSGP.errors import (
    Cancelled,
    SGPDeviceError,
    SGPError,
    SGPInputError,
    SGPServiceError,
    SGPWeightsError,
)
from SlicerSGP.types import Geometry, SegmentationResult, SegmentOptions, SupportItem

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "Geometry",
    "SGPDeviceError",
    "SGPError",
    "SGPInputError",
    "SGPServiceError",
    "SGPWeightsError",
    "SegmentOptions",
    "SegmentationResult",
    "SupportItem",
    "__version__",
]
