"""Checks of what a caller hands the engine: options, label maps, structures, labeled slices."""

from __future__ import annotations

import numpy as np

from SlicerSGP.errors import SGPInputError
from SlicerSGP.method.memory import check_bank_options
from SlicerSGP.method.model import SGPModel
from SlicerSGP.types import SegmentOptions, SupportItem, axis_label


def validate_options(opts: SegmentOptions, model: SGPModel) -> None:
    if opts.axis not in (0, 1, 2):
        raise SGPInputError(f"The slicing axis must be k, j or i (array axis 0, 1 or 2), got "
                            f"{opts.axis!r}.")
    if opts.top_k < 1:
        raise SGPInputError(f"top_k must be at least 1, got {opts.top_k}.")
    check_bank_options(opts, model)
    if not 0.0 < opts.threshold < 1.0:
        raise SGPInputError(f"threshold must lie in (0, 1), got {float(opts.threshold):g}.")


def check_labels(labels: np.ndarray, spatial: tuple[int, ...]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != tuple(spatial):
        raise SGPInputError(
            f"The label map has shape {tuple(int(s) for s in labels.shape)} but the image has "
            f"{tuple(int(s) for s in spatial)}: they must share the voxel grid. Resample the "
            "labels onto the image first."
        )
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise SGPInputError("The label map holds non-integer values: it must be a label "
                                "map (0 = background, 1, 2, ... = structures).")
        labels = labels.astype(np.int64)
    return labels


def resolve_structures(structures: dict[int, str] | None, labels: np.ndarray | None,
                       bank: dict[int, list[SupportItem]] | None) -> dict[int, str]:
    present = {int(v) for v in np.unique(labels)} - {0} if labels is not None else set()
    available = present | {int(v) for v, items in (bank or {}).items() if items}
    if structures is None:
        if not available:
            raise SGPInputError("The labels hold no structure (all voxels are 0): draw the "
                                "structure on at least one slice.")
        return {v: f"Segment_{v}" for v in sorted(available)}
    if not structures:
        raise SGPInputError("No structure to segment was given.")
    missing = [int(v) for v in structures if int(v) not in available]
    if missing:
        raise SGPInputError(
            f"Label value(s) {missing} are absent from the labels and the support bank "
            f"(present: {sorted(available) or 'none'}). Pick a label that was drawn, e.g. "
            f"--label {min(available) if available else 1}."
        )
    return {int(v): str(n) for v, n in structures.items()}


def labeled_slices(lab: np.ndarray | None, structures: dict[int, str],
                   support_slices: list[int] | None, n: int, axis: int) -> list[int]:
    """Slices counted as labeled: those given, or those where any requested structure is drawn.

    A labeled slice is taken as fully annotated for every requested structure (an empty mask
    there means "absent here").
    """
    if support_slices is not None:
        bad = [int(k) for k in support_slices if not 0 <= int(k) < n]
        if bad:
            raise SGPInputError(f"Support slice(s) {bad} are outside the volume: along axis "
                                f"{axis_label(axis)} it has slices 0..{n - 1}.")
        if lab is None:
            raise SGPInputError("Support slices were given but no label map to read them from.")
        return sorted({int(k) for k in support_slices})
    if lab is None:
        return []
    drawn = np.isin(lab, list(structures)).reshape(n, -1).any(axis=1)
    return [int(k) for k in np.flatnonzero(drawn)]
