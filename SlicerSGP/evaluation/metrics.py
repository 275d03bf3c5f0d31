"""Volumetric Dice, IoU and HD95 per structure and per case (what ``sgp eval`` reports).

Conventions (documented choices):

* Dice and IoU are computed once per case over the whole volume (not per slice and averaged).
  Both masks empty -> Dice 1, IoU 1 (nothing to find, nothing found); exactly one empty ->
  Dice 0, IoU 0.
* HD95 is in physical units (the image spacing, mm for medical volumes; pixels for 2D images
  without a spacing): the larger of the two directed 95th-percentile surface distances (the
  definition medpy uses), surfaces being mask voxels with a background face-neighbour (the
  image border counts as background), distances from ``scipy.ndimage.distance_transform_edt``
  with ``sampling=spacing``; axes of length 1 are dropped first (a one-slice volume is
  scored as the 2D image it is). Both empty -> 0; exactly one empty -> ``inf`` (written as ``inf``
  in CSV and ``null`` in JSON; summaries average the finite values and count the others).
"""


from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from SlicerSGP.errors import SGPInputError


def _bool(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(bool)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Volumetric Dice; both empty -> 1.0, one empty -> 0.0."""
    p, g = _bool(pred), _bool(gt)
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Volumetric IoU (Jaccard); both empty -> 1.0, one empty -> 0.0."""
    p, g = _bool(pred), _bool(gt)
    union = int(np.logical_or(p, g).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, g).sum()) / union


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face-neighbour outside it (border = outside)."""
    m = _bool(mask)
    if not m.any():
        return m
    structure = ndimage.generate_binary_structure(m.ndim, 1)
    return m & ~ndimage.binary_erosion(m, structure=structure, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances from each surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    sa, sb = surface(a), surface(b)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    return dist_to_b[sa]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing=None) -> float:
    """95th-percentile Hausdorff distance in physical units (see the module docstring).

    ``spacing``: voxel size per array axis (same order as the arrays); None = 1.
    Both empty -> 0.0; exactly one empty -> ``inf``.
    """
    p, g = _bool(pred), _bool(gt)
    if p.shape != g.shape:
        raise SGPInputError(f"Prediction shape {p.shape} differs from ground truth {g.shape}.")
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return math.inf
    sp = (1.0,) * p.ndim if spacing is None else tuple(float(s) for s in spacing)
    if len(sp) != p.ndim:
        raise SGPInputError(f"spacing {sp} does not match the {p.ndim}D masks.")
    # A one-slice volume is a 2D image: drop length-1 axes, or every pixel would be "surface"
    # (its neighbours across the missing axis lie outside the image).
    keep = [i for i, n in enumerate(p.shape) if n > 1] or [0]
    shape = tuple(p.shape[i] for i in keep)
    p, g, sp = p.reshape(shape), g.reshape(shape), tuple(sp[i] for i in keep)
    d1 = surface_distances(p, g, sp)
    d2 = surface_distances(g, p, sp)
    return float(max(np.percentile(d1, 95), np.percentile(d2, 95)))


def structure_metrics(pred: np.ndarray, gt: np.ndarray, spacing=None) -> dict[str, float]:
    p, g = _bool(pred), _bool(gt)
    voxel = float(np.prod(spacing)) if spacing is not None else 1.0
    return {
        "dice": dice(p, g), "iou": iou(p, g), "hd95": hd95(p, g, spacing),
        "gt_voxels": int(g.sum()), "pred_voxels": int(p.sum()),
        "gt_volume": float(g.sum()) * voxel, "pred_volume": float(p.sum()) * voxel,
    }


@dataclass
class Row:
    """Metrics of one structure in one case."""

    case: str
    value: int
    structure: str
    dice: float
    iou: float
    hd95: float
    gt_voxels: int
    pred_voxels: int
    gt_volume: float
    pred_volume: float
    slices_scored: int = 0
    seconds: float = 0.0


def evaluate_labels(pred: np.ndarray, gt: np.ndarray, values: list[int], spacing=None,
                    *, case: str = "", names: dict[int, str] | None = None,
                    exclude_slices: list[int] | None = None) -> list[Row]:
    """Metrics per structure value of two label maps on the same grid (slices along axis 0).

    ``exclude_slices``: slices left out (e.g. the support slices the engine returns as drawn).
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise SGPInputError(f"Case {case!r}: prediction shape {pred.shape} differs from the "
                            f"ground truth {gt.shape}; they must share the voxel grid.")
    if exclude_slices:
        keep = np.setdiff1d(np.arange(gt.shape[0]), np.asarray(exclude_slices, int))
        pred, gt = pred[keep], gt[keep]
    rows = []
    for v in values:
        m = structure_metrics(pred == v, gt == v, spacing)
        rows.append(Row(case, int(v), (names or {}).get(v, f"label_{v}"), slices_scored=gt.shape[0],
                        **m))
    return rows


def summarize(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """Per structure: mean / median / std of Dice and IoU, HD95 over the finite cases."""
    out: dict[str, dict[str, Any]] = {}
    for v in sorted({r.value for r in rows}):
        rs = [r for r in rows if r.value == v]
        d = np.array([r.dice for r in rs])
        j = np.array([r.iou for r in rs])
        h = np.array([r.hd95 for r in rs])
        fin = h[np.isfinite(h)]
        out[str(v)] = {
            "structure": rs[0].structure, "cases": len(rs),
            "dice_mean": float(d.mean()), "dice_median": float(np.median(d)),
            "dice_std": float(d.std()), "iou_mean": float(j.mean()),
            "hd95_mean": float(fin.mean()) if fin.size else None,
            "hd95_median": float(np.median(fin)) if fin.size else None,
            "hd95_infinite": int((~np.isfinite(h)).sum()),
        }
    return out
