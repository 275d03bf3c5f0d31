"""Evaluation reports: per-case CSV, summary JSON, and contour montages (PNG)."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from SlicerSGP.errors import SGPInputError
from SlicerSGP.evaluation.metrics import Row, summarize, surface


def _fmt(x: float) -> str:
    return "inf" if isinstance(x, float) and math.isinf(x) else f"{x:.6g}"


def write_csv(rows: list[Row], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(asdict(rows[0]).keys()) if rows else [f for f in Row.__dataclass_fields__]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for r in rows:
            w.writerow([_fmt(v) if isinstance(v, float) else v for v in asdict(r).values()])
    return path


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_json(rows: list[Row], path: str | os.PathLike, extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"summary": summarize(rows), "cases": [asdict(r) for r in rows],
           "conventions": "Dice/IoU: both empty 1, one empty 0. HD95 in spacing units: both "
                          "empty 0, one empty infinite (null here).",
           **(extra or {})}
    path.write_text(json.dumps(_json_safe(doc), indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- montage

GT_COLOR = (0, 255, 0)
PSEUDO_COLOR = (0, 170, 255)
FINAL_COLOR = (255, 40, 40)


def _resize_nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    ys = np.minimum((np.arange(h) + 0.5) * a.shape[0] / h, a.shape[0] - 1).astype(int)
    xs = np.minimum((np.arange(w) + 0.5) * a.shape[1] / w, a.shape[1] - 1).astype(int)
    return a[ys][:, xs]


def montage_tile(image01: np.ndarray, gt: np.ndarray | None, pseudo: np.ndarray | None,
                 final: np.ndarray | None, tile: int = 192) -> np.ndarray:
    """One ``tile x tile`` RGB uint8 tile: the slice with contours (ground truth green, pseudo-mask
    blue, final red), aspect kept, black padding."""
    img = np.asarray(image01, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    h, w = img.shape[:2]
    s = tile / max(h, w)
    th, tw = max(1, round(h * s)), max(1, round(w * s))
    out = np.zeros((tile, tile, 3), np.uint8)
    view = (np.clip(_resize_nearest(img, th, tw), 0, 1) * 255).astype(np.uint8)
    for mask, color in ((pseudo, PSEUDO_COLOR), (gt, GT_COLOR), (final, FINAL_COLOR)):
        if mask is None:
            continue
        edge = surface(_resize_nearest(np.asarray(mask, dtype=bool), th, tw))
        view[edge] = color
    out[:th, :tw] = view
    return out


def write_montage(tiles: list[np.ndarray], path: str | os.PathLike, columns: int = 6) -> Path:
    """Tile RGB uint8 images into a grid (2 px gaps) and write a PNG (SimpleITK)."""
    import SimpleITK as sitk

    if not tiles:
        raise SGPInputError("Nothing to put in the montage.")
    t = tiles[0].shape[0]
    cols = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    gap = 2
    canvas = np.full((rows * (t + gap) - gap, cols * (t + gap) - gap, 3), 40, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[r * (t + gap):r * (t + gap) + t, c * (t + gap):c * (t + gap) + t] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(canvas, isVector=True), str(path))
    return path
