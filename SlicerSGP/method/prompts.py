"""Slices made from prompts, and the voxels other structures mark "not here".

A :class:`~SlicerSGP.types.SlicePrompt` (a box, clicks and/or the current mask on one slice)
becomes that slice's mask through SAM2's own prompt encoder and mask decoder on the slice's
cached features (:meth:`SlicePredictor.from_prompts`): a box as two points labeled 2 and 3,
ahead of the clicks (1 include, 0 exclude), as SAM2's image predictor orders them; a lone box
or a lone click gets SAM2's three masks and the one with the highest predicted IoU. The mask
then counts as a drawn slice of its structure.

With ``SegmentOptions.exclude``, the listed structures' voxels are "not here" for every
structure of the run: each one present on a prompted slice gives a negative point (its deepest
voxel inside the box) and is cleared from the mask; on predicted slices (and in the drawn
slices' memories) :func:`exclusion_lookup` gives the model pixels to clear before the mask
becomes memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

from SlicerSGP.data.preprocess import LetterboxTransform
from SlicerSGP.method.assembly import label_dtype
from SlicerSGP.method.encoding import VolumeFeatures
from SlicerSGP.method.slice_predictor import SlicePredictor
from SlicerSGP.types import CancelCheck, SegmentOptions, SlicePrompt

BOX_LABELS = (2, 3)
"""SAM2's point labels of a box's top-left and bottom-right corners."""


def window_voxels(vol: np.ndarray, prompts: list[SlicePrompt]) -> np.ndarray:
    """Voxels the prompts point at (inside boxes, under positive clicks): with the drawn ones
    they choose the CT window, as drawn voxels do."""
    parts = []
    for p in prompts:
        if p.box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in p.box)
            parts.append(vol[p.slice_index, y0:y1 + 1, x0:x1 + 1].reshape(-1))
        for x, y, positive in p.points:
            if positive:
                parts.append(vol[p.slice_index, int(round(y)), int(round(x))].reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0, vol.dtype)


def deepest_voxel(region: np.ndarray) -> tuple[float, float] | None:
    """(column, row) of the voxel of ``region`` farthest from its edge (None if empty)."""
    if not region.any():
        return None
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(c), float(r)


def sam_prompt(p: SlicePrompt, not_here: dict[int, np.ndarray]) -> tuple[np.ndarray, list[int],
                                                                          bool]:
    """SAM2's points of one prompt: box corners (2, 3) first, then the clicks (1 / 0), then a
    negative point for each excluded structure on the slice (inside the box if there is one).
    Returns (N, 2) voxel (column, row), their labels, and whether to take SAM2's multimask
    output (a lone box or a lone click, no mask)."""
    xy: list[tuple[float, float]] = []
    labels: list[int] = []
    if p.box is not None:
        x0, y0, x1, y1 = p.box
        xy += [(x0, y0), (x1, y1)]
        labels += list(BOX_LABELS)
    for x, y, positive in p.points:
        xy.append((x, y))
        labels.append(1 if positive else 0)
    negatives = 0
    for region in not_here.values():
        if p.box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in p.box)
            window = np.zeros_like(region)
            window[y0:y1 + 1, x0:x1 + 1] = True
            region = region & window
        point = deepest_voxel(region)
        if point is not None:
            xy.append(point)
            labels.append(0)
            negatives += 1
    lone = (p.box is not None and not p.points) or (p.box is None and len(p.points) == 1)
    multimask = lone and negatives == 0 and p.mask is None
    return np.asarray(xy, np.float64).reshape(-1, 2), labels, multimask


def apply_prompts(predictor: SlicePredictor,
                  features: tuple[np.ndarray, LetterboxTransform, VolumeFeatures],
                  lab: np.ndarray | None, prompts: list[SlicePrompt], opts: SegmentOptions,
                  labeled: dict[int, list[int]], stop: CancelCheck, timings: dict[str, float],
                  ) -> tuple[np.ndarray, dict[int, dict[int, float]], list[str]]:
    """Each prompt's mask written into a copy of the (reoriented) label map ``lab``, its slice
    added to the structure's ``labeled`` ones.

    The mask replaces its structure's voxels on the slice and never overwrites another
    structure's (a later prompt on the same slice yields to an earlier one). Returns the new
    label map, per structure {prompted slice: SAM2's predicted IoU}, and notes for the user.
    """
    t0 = time.perf_counter()
    slices01, transform, feats = features
    values = [int(v) for v in np.unique(lab)] if lab is not None else []
    dtype = label_dtype(values + [p.value for p in prompts])
    out = np.zeros(slices01.shape[:3], dtype) if lab is None else np.array(lab, dtype=dtype)
    excluded = sorted({int(v) for v in opts.exclude or []})
    feats.ensure(sorted({p.slice_index for p in prompts}), None, stop)
    prompted: dict[int, dict[int, float]] = {}
    notes: list[str] = []
    for p in prompts:
        k = p.slice_index
        not_here = {v: out[k] == v for v in excluded}
        xy, labels, multimask = sam_prompt(p, not_here)
        mask, iou = predictor.from_prompts(feats, k, transform, xy, labels, p.mask, multimask)
        mine = out[k] == p.value
        mask &= (out[k] == 0) | mine  # never over another structure, drawn or "not here"
        out[k][mine] = 0
        out[k][mask] = p.value
        prompted.setdefault(p.value, {})[k] = iou
        if not mask.any():
            notes.append(f"The prompt for label {p.value} on slice {k} gave an empty mask: "
                         "that slice says 'absent here'. Draw a larger box or add a click inside "
                         "the structure.")
    for v, ks in prompted.items():
        labeled[v] = sorted(set(labeled[v]) | set(ks))
    timings["prompts"] = time.perf_counter() - t0
    return out, prompted, notes


def exclusion_lookup(lab: np.ndarray | None, exclude: list[int] | None,
                     transform: LetterboxTransform, device: torch.device,
                     ) -> Callable[[int], torch.Tensor | None] | None:
    """Slice -> (1, 1, S, S) bool model pixels touched by an excluded structure's voxels
    (None where there are none), or None without exclusion."""
    if lab is None or not exclude:
        return None
    values = [int(v) for v in exclude]

    def of(j: int) -> torch.Tensor | None:
        region = np.isin(lab[j], values)
        if not region.any():
            return None
        m = transform.mask_to_model(torch.from_numpy(region[None, None].astype(np.float32)),
                                    cover=True)
        return (m > 0).to(device)

    return of
