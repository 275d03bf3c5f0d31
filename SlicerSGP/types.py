"""Data that crosses the engine's boundary: what callers give it and what it returns.

Array order everywhere is the one SimpleITK's ``GetArrayFromImage`` and Slicer's
``slicer.util.arrayFromVolume`` use: ``(K, J, I)`` for a scalar volume (slice, row, column of
the image grid) and ``(K, J, I, C)`` for a colour one. Geometry follows ITK (LPS), as SimpleITK
reports it; the Slicer Logic converts from RAS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

ProgressCallback = Callable[[str, float], None]
"""Called as ``progress(stage, fraction)`` with fraction in [0, 1] for the stage."""

CancelCheck = Callable[[], bool]
"""Returns True once the caller wants the run stopped; the engine then raises ``Cancelled``."""

AXIS_LABELS = {0: "k (axial)", 1: "j (coronal)", 2: "i (sagittal)"}
"""How messages name the slicing axis: the command line's --axis names, with the view an
axially acquired scan gives along it."""


def axis_label(axis: int) -> str:
    """Name of array axis 0/1/2 of ``(K, J, I)`` as users give it (``--axis k``)."""
    return AXIS_LABELS.get(int(axis), str(axis))


@dataclass(frozen=True)
class Geometry:
    """Physical placement of the voxel grid (ITK convention: LPS, direction row-major 3x3)."""

    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)


@dataclass
class SupportItem:
    """One 2D example: an image already mapped to [0, 1] intensities and a binary mask.

    ``image`` is ``(H, W)`` or ``(H, W, 3)`` float; ``mask`` is ``(H, W)`` bool. An empty mask is
    allowed and teaches "absent here". ``source`` says where it came from (for reports).
    """

    image: np.ndarray
    mask: np.ndarray
    source: str = ""


PRIOR_MODES = ("off", "prompt", "fuse", "both")
"""Where the interpolated contour between two drawn slices enters (SegmentOptions.interpolation_prior)."""
PRIOR_HELP = ("between two drawn slices, use their interpolation (Fill between slices) as a "
              "prior: 'prompt' PMA with it, 'fuse' it with each side (the interpolation stands "
              "unless the side re-predicts the drawn slice well), 'both', or 'off'")


@dataclass
class SlicePrompt:
    """A structure's prompt on one slice: a box, clicks and/or its current mask there.

    Coordinates are voxel column ``x`` and row ``y`` of the 2D slice
    ``np.moveaxis(volume, axis, 0)[slice_index]`` of the ``(K, J, I)`` array (rows J and columns
    I along axis 0, rows K and columns I along axis 1, rows K and columns J along axis 2), the
    frame ``Segmenter.refine_slice`` uses. The slice's mask is made by SAM2's prompt encoder and
    mask decoder on its features (a single box or a single click alone: SAM2's three masks, the
    one with the highest predicted IoU) and becomes a drawn slice of structure ``value``.
    """

    value: int
    """Label value of the structure (it need not be drawn anywhere)."""
    slice_index: int
    """Slice along the run's axis."""
    box: tuple[float, float, float, float] | None = None
    """``(x0, y0, x1, y1)``: columns and rows of the top-left and bottom-right corner voxels,
    inclusive (``x0 <= x1``, ``y0 <= y1``)."""
    points: list[tuple[float, float, bool]] = field(default_factory=list)
    """Clicks ``(x, y, positive)``: positive adds, negative says "not here"."""
    mask: np.ndarray | None = None
    """``(rows, columns)`` bool: the structure's current mask on the slice (SAM2's dense
    prompt), or None."""


@dataclass
class SegmentOptions:
    """Everything about how a run is done that is not the data itself."""

    axis: int = 0
    """Array axis to slice along: 0 = K (axial for an axial scan), 1 = J, 2 = I."""
    top_k: int = 4
    """Support items used per query slice (the K most similar); 1..16."""
    memory_size: int | None = None
    """3D memory bank size; None = K (top_k), as the paper sizes it, in training and inference."""
    memory_policy: str = "least_similar"
    """'least_similar' (paper) or 'fifo' (SAM2's rule)."""
    use_pmg: bool = True
    use_pma: bool = True
    use_3d_memory: bool = True
    bidirectional: bool = True
    intensity: str = "auto"
    """'auto', 'percentile', 'none', or a CT preset: 'ct_abdomen', 'ct_lung', 'ct_bone',
    'ct_brain', 'ct_soft_tissue'."""
    threshold: float = 0.5
    encode_batch_size: int | None = None
    """Slices per encoder batch; None = 1 on CPU (batching buys no speed there, only memory)
    and 8 on CUDA."""
    keep_pseudo_masks: bool = True
    complete_slices: list[int] | None = None
    """Slices (along ``axis``) on which every structure present is drawn: there an undrawn
    structure is taken as absent. Elsewhere a slice is support only for the structures drawn on
    it. Explicit ``support_slices`` given to ``segment`` count as complete."""
    stop_after_absent: int = 3
    """Past the outermost labeled slice, a sweep stops after this many consecutive slices on
    which the structure is confidently absent (0: sweep to the volume's edge)."""
    absent_below: float = 0.2
    """Presence (combined PMG x PMA object probability) under which a slice counts as absent;
    a slice over 0.5 resets the count (hysteresis)."""
    min_continuity: float = 0.5
    """Past the outermost labeled slice, a mask overlapping the last kept one by a Dice under
    this, or outgrowing it towards an end the drawn slices narrow to, has left the structure:
    it is not written and counts as absent (0: off; needs ``stop_after_absent``; see
    :mod:`SlicerSGP.method.extent`)."""
    reverse_quality: bool = True
    """Score each predicted slice by reverse propagation (RevSAM2): its mask predicts the
    nearest drawn slice back, and the Dice with the drawing is the slice's quality."""
    quality_fusion: bool = True
    """Weight each side's prediction by its quality as well as by distance (needs
    ``reverse_quality``)."""
    multi_view: bool = False
    """Also propagate along the other two axes (support from this axis's result) and average
    the probabilities; about three times the cost."""
    slice_limits: dict[int, list[int]] | None = None
    """Per structure value: [first, last] slice (inclusive, along ``axis``) it may occupy;
    outside, it is empty."""
    local_support: bool = False
    """Each slice picks its K support items among the drawn slices bounding its interval (and
    the support bank) instead of among all of the structure's drawn slices. A new drawn slice
    then changes only the two intervals beside it, so a re-run after a correction redoes only
    those; with all drawn slices, it also enters the top-K of most other slices."""
    reuse_results: bool = True
    """Reuse the slice results of this structure's last run on the same volume wherever all
    they depend on is unchanged (exact: the result is the same as without; a new drawn slice
    then redoes only the two intervals beside it and the slices whose support picks it).
    False recomputes every slice."""
    exclude: list[int] | None = None
    """Label values of the label map that are "not here" for every structure of the run: they
    are not segmented themselves (nor returned), and their voxels, on every slice exactly as
    given, are removed from each structure's mask on every predicted slice before that mask
    becomes the slice's memory (a leak into a neighbour is not carried on), from the drawn
    slices' memories, and from the result; on a prompted slice each one present gives a
    negative point (its deepest voxel in the box). Drawn slices stay as drawn. Structures of one
    run never overlap in ``labels`` (with or without this). A structure's last run is not
    reused while this is set."""
    interpolation_prior: str = "fuse"
    """Between two drawn slices, the interpolated contour (Fill between slices) as a prior:
    'prompt' (PMA's prompt), 'fuse' (blended into each side by its reverse-propagation
    quality), 'both', or 'off' (see SlicerSGP.method.prior)."""


@dataclass
class SegmentationResult:
    """What a run produces, in the input's ``(K, J, I)`` array order and geometry."""

    labels: np.ndarray
    """Integer label map: each voxel holds the value of the structure it belongs to, or 0."""
    probabilities: dict[int, np.ndarray]
    """Per structure value: foreground probability, float32 ``(K, J, I)``."""
    pseudo_masks: dict[int, np.ndarray]
    """Per structure value: PMG pseudo-mask probability, float32 ``(K, J, I)`` (empty if not kept)."""
    slice_scores: dict[int, np.ndarray]
    """Per structure value: structured array with one row per slice along ``axis`` (fields:
    slice, confidence, predicted_iou, object_score, pseudo_final_dice, quality, area_px,
    source: labeled, prompted, forward, backward, fused, seed or absent)."""
    structures: dict[int, str]
    axis: int
    labeled_slices: list[int]
    """Slices labeled for at least one structure (union); per structure below."""
    geometry: Geometry | None = None
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    labeled_by_structure: dict[int, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Things the caller should tell the user (e.g. every slice was labeled, nothing predicted)."""
    slices_predicted: dict[int, int] = field(default_factory=dict)
    """Per structure value: slice predictions this run made (a slice between two drawn slices
    is predicted from both sides and counts twice)."""
    slices_reused: dict[int, int] = field(default_factory=dict)
    """Per structure value: slice predictions taken unchanged from its last run on the volume."""
    prompted_by_structure: dict[int, list[int]] = field(default_factory=dict)
    """Per structure value: its slices made from prompts (:class:`SlicePrompt`); they count as
    labeled (in ``labeled_by_structure``), their score rows say ``prompted``."""
