"""Result assembly: fused probabilities -> label map, per-slice score tables, drawn slices kept."""

from __future__ import annotations

import numpy as np

from SlicerSGP.data import preprocess
from SlicerSGP.errors import SGPInputError
from SlicerSGP.method.propagation import Accumulator
from SlicerSGP.types import SegmentationResult, SegmentOptions

SCORE_DTYPE = np.dtype([
    ("slice", "i4"), ("confidence", "f4"), ("predicted_iou", "f4"), ("object_score", "f4"),
    ("pseudo_final_dice", "f4"), ("quality", "f4"), ("area_px", "i8"), ("source", "U8"),
])
SCORE_FIELDS = ("predicted_iou", "object_score", "pseudo_final_dice")


def label_dtype(values: list[int]) -> np.dtype:
    """The smallest integer type that holds every label value (and 0)."""
    lo, hi = min(values, default=0), max(values, default=0)
    for dtype in (np.uint8, np.uint16, np.uint32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= min(lo, 0) and hi <= info.max:
            return np.dtype(dtype)
    raise SGPInputError(f"Label values {lo}..{hi} do not fit a 64-bit integer label map: "
                        "renumber the structures.")


def label_map_from_probabilities(probabilities: dict[int, np.ndarray], threshold: float,
                                 shape: tuple[int, ...]) -> np.ndarray:
    """Each voxel gets the most probable structure if that probability reaches ``threshold``."""
    values = list(probabilities)
    dtype = label_dtype(values)
    out = np.zeros(shape, dtype)
    if len(values) == 1:
        out[probabilities[values[0]] >= threshold] = values[0]
        return out
    lut = np.asarray(values, dtype)
    for k in range(shape[0]):  # slice by slice: no volume-sized stack or int64 argmax
        stack = np.stack([probabilities[v][k] for v in values])
        best = stack.argmax(axis=0)
        out[k] = np.where(stack.max(axis=0) >= threshold, lut[best], 0)
    return out


def score_table(acc: Accumulator | None, n: int, labeled: list[int],
                prompted: dict[int, float] | None = None) -> np.ndarray:
    """One row per slice: confidence = SAM2's predicted IoU x presence x reverse-propagation
    quality (where scored), pseudo/final agreement, source ("labeled", "prompted" (made from a
    prompt, its predicted IoU SAM2's), "forward", "backward", "fused", "seed", or "absent"
    where no sweep reached the slice: past the structure's end or outside its slice limits)."""
    prompted = prompted or {}
    table = np.zeros(n, SCORE_DTYPE)
    table["slice"] = np.arange(n)
    drawn = set(labeled)
    for j in range(n):
        if j in drawn:
            for name in ("confidence", "quality", *SCORE_FIELDS):
                table[j][name] = 1.0
            table[j]["source"] = "labeled"
            if j in prompted:
                table[j]["source"] = "prompted"
                table[j]["predicted_iou"] = prompted[j]
            continue
        entries = acc.scores.get(j, []) if acc is not None else []
        tw = sum(w for w, _ in entries) or 1.0
        for name in SCORE_FIELDS:
            table[j][name] = sum(w * e[name] for w, e in entries) / tw
        scored = [(w, e["quality"]) for w, e in entries if np.isfinite(e["quality"])]
        quality = (sum(w * q for w, q in scored) / sum(w for w, _ in scored)) if scored \
            else float("nan")
        table[j]["quality"] = quality
        table[j]["confidence"] = table[j]["predicted_iou"] * table[j]["object_score"] * (
            quality if np.isfinite(quality) else 1.0)
        src = acc.sources.get(j, set()) if acc is not None else set()
        table[j]["source"] = "fused" if len(src) > 1 else (next(iter(src)) if src else "absent")
    return table


def assemble(per_structure: dict[int, Accumulator | None], structures: dict[int, str],
             lab: np.ndarray | None, labeled: dict[int, list[int]], opts: SegmentOptions,
             shape: tuple[int, int, int],
             prompted: dict[int, dict[int, float]] | None = None) -> SegmentationResult:
    """Normalise the accumulated sums in place (no volume-sized copies) and build the result.

    ``labeled`` gives each structure's support slices; there its drawn voxels come back exactly.
    ``prompted``: per structure, its slices made from prompts (their predicted IoU).
    An accumulator of None means nothing was predicted (every slice is labeled).
    """
    n = shape[0]
    probabilities, pseudo_masks, scores = {}, {}, {}
    for value, acc in per_structure.items():
        if acc is None:
            prob = np.zeros(shape, np.float32)
            pseudo = np.zeros(shape, np.float32) if opts.keep_pseudo_masks else None
        else:
            prob = acc.prob
            prob /= np.maximum(acc.weight, 1e-12)[:, None, None]
            pseudo = acc.pseudo
            if pseudo is not None:
                pseudo /= np.maximum(acc.pseudo_weight, 1e-12)[:, None, None]
        for k in labeled[value]:
            user = (lab[k] == value) if lab is not None else np.zeros(shape[1:], bool)
            prob[k] = user
            if pseudo is not None:
                pseudo[k] = user
        probabilities[value] = prob
        if pseudo is not None:
            pseudo_masks[value] = pseudo
        scores[value] = score_table(acc, n, labeled[value], (prompted or {}).get(value))

    label_map = label_map_from_probabilities(probabilities, opts.threshold, shape)
    if lab is not None:
        for value in structures:
            for k in labeled[value]:
                # The user's strokes of this structure come back exactly as drawn.
                label_map[k][lab[k] == value] = value
    for value, table in scores.items():
        table["area_px"] = (label_map == value).reshape(n, -1).sum(axis=1)
    union = sorted({k for ks in labeled.values() for k in ks})
    return SegmentationResult(
        labels=label_map, probabilities=probabilities, pseudo_masks=pseudo_masks,
        slice_scores=scores, structures=dict(structures), axis=opts.axis,
        labeled_slices=union, labeled_by_structure={v: list(ks) for v, ks in labeled.items()},
        prompted_by_structure={v: sorted(ks) for v, ks in (prompted or {}).items()},
    )


def restore_order(result: SegmentationResult, axis: int) -> None:
    """Back to the input's array order, contiguous (callers hand these to VTK and ITK)."""
    def restore(arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(preprocess.restore_orientation(arr, axis))

    result.labels = restore(result.labels)
    for d in (result.probabilities, result.pseudo_masks):
        for k in d:
            d[k] = restore(d[k])


def count_predictions(result: SegmentationResult,
                      per_structure: dict[int, Accumulator | None]) -> None:
    """Per structure, slice predictions made and reused in this run (a slice reached from both
    sides counts twice), on the result, summed in its stats and, on a re-run, in its notes."""
    result.slices_predicted = {v: acc.predicted if acc else 0 for v, acc in per_structure.items()}
    result.slices_reused = {v: acc.reused if acc else 0 for v, acc in per_structure.items()}
    predicted = result.stats["slices_predicted"] = sum(result.slices_predicted.values())
    reused = result.stats["slices_reused"] = sum(result.slices_reused.values())
    if reused:
        result.notes.append(f"Re-run: {predicted} slice predictions recomputed, {reused} reused "
                            "from the last run on this volume (all they depend on was unchanged).")


def clear_excluded(result: SegmentationResult, labels: np.ndarray | None,
                   exclude: list[int] | None) -> None:
    """The "not here" voxels (``labels`` in ``exclude``, input order) belong to no structure of
    the result: cleared from its label map and probabilities."""
    if labels is None or not exclude:
        return
    region = np.isin(labels, [int(v) for v in exclude])
    result.labels[region] = 0
    for prob in result.probabilities.values():
        prob[region] = 0.0
    moved = np.moveaxis(result.labels, result.axis, 0)
    for value, table in result.slice_scores.items():
        table["area_px"] = (moved == value).reshape(moved.shape[0], -1).sum(axis=1)
