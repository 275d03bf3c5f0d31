"""Names and choices the module shows; no imports beyond the standard library at import time.

Kept free of the engine and of Python >= 3.10 syntax so that the module can show its
"needs Slicer 5.10" message on an older Slicer (Python 3.9) before anything else is imported.
Texts for people are translated when asked for (``slicer.i18n``, imported then: Slicer 5.4 on).
"""

AXIS_NAMES = ("K", "J", "I")
"""Array axes of ``slicer.util.arrayFromVolume``: 0 = K (slice), 1 = J (row), 2 = I (column)."""

AXIS_DISPLAY = {"K": "Axial (K)", "J": "Coronal (J)", "I": "Sagittal (I)"}
"""What clinicians see: the view an axially acquired scan gives along each array axis (in
English; :func:`axisDisplay` gives it in the user's language)."""


def axisDisplay(name: str) -> str:
    """``AXIS_DISPLAY[name]`` in the user's language."""
    from slicer.i18n import tr as _

    return {"K": _("Axial (K)"), "J": _("Coronal (J)"), "I": _("Sagittal (I)")}[name]

MODEL_SIZES = ("tiny", "small", "base_plus", "large")
"""SAM2.1 sizes the engine knows; anything else is a trained SGP checkpoint path."""

IMAGE_SIZES = (1024, 768, 512, 256)
"""Model input sizes offered (SAM2's native size is 1024)."""

INTENSITY_MODES = (
    "auto",
    "percentile",
    "none",
    "ct_abdomen",
    "ct_lung",
    "ct_bone",
    "ct_brain",
    "ct_soft_tissue",
)

INTERPOLATION_PRIORS = ("off", "prompt", "fuse", "both")
"""Where the interpolated contour between two drawn slices enters (the engine's PRIOR_MODES)."""

DEFAULT_INTERPOLATION_PRIOR = "fuse"
"""The engine's default (SegmentOptions.interpolation_prior)."""

ENGINE_MODES = ("local", "remote")
"""Where the engine runs: this computer (a server the module starts) or a remote server."""

MINIMUM_SLICER = (5, 10)
"""Slicer 5.10 is the first with Python 3.12; sam2 needs Python >= 3.10."""

README_URL = "https://github.com/SlicerSGP/SlicerSGP#readme"


def slicerVersionProblem(major: int, minor: int) -> str:
    """A message for a Slicer older than :data:`MINIMUM_SLICER`, or '' when it is new enough."""
    if (int(major), int(minor)) >= MINIMUM_SLICER:
        return ""
    from slicer.i18n import tr as _

    return (
        _(
            "SGP Segment needs 3D Slicer {neededMajor}.{neededMinor} or later (this is "
            "{major}.{minor}): the segmentation engine needs Python 3.10 or later, which "
            "Slicer ships from 5.10 on. Install a current Slicer from download.slicer.org."
        ).format(
            neededMajor=MINIMUM_SLICER[0], neededMinor=MINIMUM_SLICER[1], major=major, minor=minor
        )
    )

PROMPT_MODES = ("box", "scribble")
"""What a left drag does in a slice view with the SGP effect: a box, or a scribble (a click is
a click in both)."""

PROMPT_MODE_KEYS = {"x": "box", "s": "scribble"}
"""Keys (mouse over a slice view) that choose a mode; keys Slicer's slice views and Segment
Editor already use (b, f, g, r, t, v, i, q, w, z, y, digits, space) are avoided."""
