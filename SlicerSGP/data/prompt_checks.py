"""Checks of slice prompts (:class:`~SlicerSGP.types.SlicePrompt`) against the volume: numpy
only, so the command line and the service refuse a bad box before a model loads."""

from __future__ import annotations

from collections.abc import Iterable
from math import isfinite

import numpy as np

from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import SlicePrompt, axis_label


def _where(p: SlicePrompt) -> str:
    return f"The prompt for label {p.value} on slice {p.slice_index}"


def _numbers(values: Iterable, count: int, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != count or not all(isfinite(v) for v in out):
        raise SGPInputError(f"{what} must be {count} finite numbers; got {values!r}.")
    return out


def check_prompts(prompts: Iterable[SlicePrompt] | None, shape: tuple[int, int, int],
                  axis: int, exclude: Iterable[int] | None) -> list[SlicePrompt]:
    """The prompts, each checked against the slices along ``axis`` (``shape`` = n, rows,
    columns), before anything is encoded. Boxes and clicks come back as plain floats."""
    n, h, w = shape
    out: list[SlicePrompt] = []
    seen: set[tuple[int, int]] = set()
    excluded = {int(v) for v in exclude or []}
    inside = f"the {w} x {h} slice (columns 0..{w - 1}, rows 0..{h - 1})"
    for p in prompts or []:
        if not isinstance(p, SlicePrompt):
            raise SGPInputError(f"A prompt must be a SlicePrompt; got {type(p).__name__}.")
        value, k = int(p.value), int(p.slice_index)
        where = _where(p)
        if value <= 0:
            raise SGPInputError(f"{where}: label values are 1, 2, ... (0 is background).")
        if value in excluded:
            raise SGPInputError(f"{where}: label {value} is also listed as 'not here' "
                                "(exclude); a structure is either segmented or excluded.")
        if not 0 <= k < n:
            raise SGPInputError(f"{where}: slice {k} is outside the volume: along axis "
                                f"{axis_label(axis)} it has slices 0..{n - 1}.")
        if (value, k) in seen:
            raise SGPInputError(f"{where}: a second prompt for the same structure and slice; "
                                "give one box (with any clicks) per structure and slice.")
        seen.add((value, k))
        box = None
        if p.box is not None:
            x0, y0, x1, y1 = box = _numbers(p.box, 4, f"{where}: the box (x0, y0, x1, y1)")
            if x0 > x1 or y0 > y1:
                raise SGPInputError(f"{where}: the box {p.box} is inverted: give the top-left "
                                    "corner (x0, y0) first, then the bottom-right (x1, y1), "
                                    "x0 <= x1 and y0 <= y1.")
            if x0 < 0 or y0 < 0 or x1 > w - 1 or y1 > h - 1:
                raise SGPInputError(f"{where}: the box {p.box} reaches outside {inside}.")
        points = []
        for point in p.points:
            if len(point) != 3:
                raise SGPInputError(f"{where}: a click is (x, y, positive); got {point!r}.")
            x, y = _numbers(point[:2], 2, f"{where}: a click's (x, y)")
            if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
                raise SGPInputError(f"{where}: the click ({x:g}, {y:g}) lies outside {inside}.")
            points.append((x, y, bool(point[2])))
        mask = None
        if p.mask is not None:
            mask = np.asarray(p.mask)
            if mask.shape != (h, w):
                raise SGPInputError(f"{where}: the current mask is {mask.shape} but the slice "
                                    f"is {(h, w)} (rows, columns): give that slice's mask.")
            mask = mask.astype(bool)
        if box is None and not points and mask is None:
            raise SGPInputError(f"{where} is empty: give a box, a click or the current mask.")
        out.append(SlicePrompt(value, k, box, points, mask))
    return out
