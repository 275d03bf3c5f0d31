"""Checks of what a caller hands the engine: options, label maps, structures, labeled slices."""

from __future__ import annotations

import numpy as np

from SlicerSGP.errors import SGPInputError
from SlicerSGP.method.memory import check_bank_options
from SlicerSGP.method.model import SGPModel
from SlicerSGP.method.prior import check_mode
from SlicerSGP.types import SegmentOptions, SupportItem, axis_label


def validate_options(opts: SegmentOptions, model: SGPModel) -> None:
    if opts.axis not in (0, 1, 2):
        raise SGPInputError(f"The slicing axis must be k, j or i (array axis 0, 1 or 2), got "
                            f"{opts.axis!r}.")
    check_bank_options(opts, model)
    if opts.stop_after_absent < 0 or not 0.0 <= opts.absent_below < 0.5:
        raise SGPInputError("stop_after_absent must be >= 0 (0 = no stop) and absent_below in "
                            f"[0, 0.5); got {opts.stop_after_absent} and "
                            f"{float(opts.absent_below):g}.")
    if not 0.0 <= opts.min_continuity <= 1.0:
        raise SGPInputError(f"min_continuity is a Dice in [0, 1] (0: no stop by continuity); "
                            f"got {float(opts.min_continuity):g}.")
    for value, limits in (opts.slice_limits or {}).items():
        if len(limits) != 2 or int(limits[0]) > int(limits[1]):
            raise SGPInputError(f"Slice limits of structure {value} must be [first, last] with "
                                f"first <= last; got {list(limits)}.")
    check_mode(opts.interpolation_prior)
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
                       bank: dict[int, list[SupportItem]] | None,
                       prompted: set[int] | None = None,
                       exclude: list[int] | None = None) -> dict[int, str]:
    """The structures to segment: those asked for, else every value drawn, prompted or in the
    bank, less the "not here" ones (``exclude``, which must be in the labels)."""
    present = {int(v) for v in np.unique(labels)} - {0} if labels is not None else set()
    excluded = {int(v) for v in exclude or []}
    missing = sorted(excluded - present)
    if missing:
        raise SGPInputError(f"Label value(s) {missing} are to be 'not here' (exclude) but the "
                            f"label map holds none of their voxels (present: "
                            f"{sorted(present) or 'none'}). Exclude values the label map holds.")
    available = (present - excluded) | set(prompted or ()) | {
        int(v) for v, items in (bank or {}).items() if items}
    if structures is None:
        if not available:
            raise SGPInputError("The labels hold no structure (all voxels are 0): draw the "
                                "structure on at least one slice.")
        return {v: f"Segment_{v}" for v in sorted(available)}
    if not structures:
        raise SGPInputError("No structure to segment was given.")
    both = sorted(excluded & {int(v) for v in structures})
    if both:
        raise SGPInputError(f"Label value(s) {both} are both to be segmented and 'not here' "
                            "(exclude): a structure is one or the other.")
    missing = [int(v) for v in structures if int(v) not in available]
    if missing:
        raise SGPInputError(
            f"Label value(s) {missing} are absent from the labels and the support bank "
            f"(present: {sorted(available) or 'none'}). Pick a label that was drawn, e.g. "
            f"--label {min(available) if available else 1}."
        )
    return {int(v): str(n) for v, n in structures.items()}


def _slice_list(slices: list[int] | None, n: int, axis: int, what: str) -> list[int]:
    if slices is None:
        return []
    bad = [int(k) for k in slices if not 0 <= int(k) < n]
    if bad:
        raise SGPInputError(f"{what} {bad} are outside the volume: along axis "
                            f"{axis_label(axis)} it has slices 0..{n - 1}.")
    return sorted({int(k) for k in slices})


def labeled_by_structure(lab: np.ndarray | None, structures: dict[int, str],
                         support_slices: list[int] | None, complete_slices: list[int] | None,
                         n: int, axis: int) -> dict[int, list[int]]:
    """Per structure, the slices that are its support (see DESIGN "Support semantics").

    A slice is support for a structure where that structure is drawn; a complete slice (marked
    so, or listed in ``support_slices``) is support for every structure, an empty mask there
    teaching "absent here". ``support_slices`` also limits which slices are read at all.
    """
    given = _slice_list(support_slices, n, axis, "Support slice(s)")
    complete = set(_slice_list(complete_slices, n, axis, "Complete slice(s)"))
    if support_slices is not None:
        if lab is None:
            raise SGPInputError("Support slices were given but no label map to read them from.")
        complete |= set(given)
    if lab is None:
        return {v: [] for v in structures}
    flat = lab.reshape(n, -1)
    out = {}
    for v in structures:
        drawn = {int(k) for k in np.flatnonzero((flat == v).any(axis=1))}
        if support_slices is not None:
            drawn &= set(given)
        out[v] = sorted(drawn | complete)
    return out


def slice_limits(opts: SegmentOptions, value: int) -> tuple[int, int] | None:
    """Structure ``value``'s [first, last] slice limits, if any (keys may arrive as strings
    from JSON)."""
    limits = opts.slice_limits or {}
    pair = limits.get(value, limits.get(str(value)))  # type: ignore[call-overload]
    return None if pair is None else (int(pair[0]), int(pair[1]))


def check_clicks(slice_index: int, points: list[tuple[float, float]], point_labels: list[int],
                 mask: np.ndarray | None, shape: tuple[int, int, int]) -> None:
    n, h, w = shape
    if not 0 <= int(slice_index) < n:
        raise SGPInputError(f"Slice {slice_index} is outside the volume (0..{n - 1}).")
    if not points or len(points) != len(point_labels):
        raise SGPInputError("Give at least one click, with one label (1 = include, "
                            "0 = exclude) per click.")
    if any(not (0 <= r < h and 0 <= c < w) for r, c in points):
        raise SGPInputError(f"A click lies outside the {h} x {w} slice.")
    if mask is not None and np.asarray(mask).shape != (h, w):
        raise SGPInputError(f"The current mask is {tuple(np.asarray(mask).shape)}, the slice "
                            f"{(h, w)}: give the mask of that slice.")


def check_support(labeled: dict[int, list[int]], structures: dict[int, str],
                  bank: dict[int, list[SupportItem]]) -> None:
    """Every structure needs a drawn (or prompted) slice or an example in the support bank."""
    if not any(labeled.values()) and not any(bank.get(v) for v in structures):
        raise SGPInputError(
            "No labeled slice: draw the structure on at least one slice (or pass "
            "--support-slices / a support bank of other labeled cases) and run again."
        )
    for v, name in structures.items():
        if not labeled[v] and not bank.get(v):
            raise SGPInputError(f"Structure {name!r} (label {v}) has no support: it is drawn "
                                "on no slice and the support bank holds no example of it. "
                                "Draw it on a slice, or leave it out.")
