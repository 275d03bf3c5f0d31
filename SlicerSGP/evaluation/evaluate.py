"""``sgp eval``: volumetric Dice, IoU and HD95 per structure and per case.

Predictions come from files (``--pred``: what ``sgp segment`` wrote) or from running the model
(``--model``) the way ``sgp segment`` runs it (``Segmenter.segment``), with support from other
labeled cases (``--bank`` / ``--bank-cases``) or from a few ground-truth slices of each case
(``--support-slices N``; those slices are then left out of the metrics, since the engine returns
them exactly as drawn).

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

import argparse
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from SlicerSGP.errors import SGPInputError

# --------------------------------------------------------------------------- metrics


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
        edge = surface(_resize_nearest(_bool(mask), th, tw))
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


# --------------------------------------------------------------------------- running

def array_spacing(geometry, axis: int = 0) -> tuple[float, float, float]:
    """Spacing per array axis of a case stored with its slicing ``axis`` first."""
    sp = list(geometry.spacing)[::-1]  # ITK (x, y, z) -> array (K, J, I)
    return (sp[axis], *[sp[i] for i in range(3) if i != axis])


def bank_from_cases(cases: list, values: list[int]) -> dict:
    """A support bank (``{value: [SupportItem]}``) from labeled cases, with the rule
    ``io.load_support_sets`` uses: slices with the structure + as many without, evenly spaced."""
    from SlicerSGP.training.train import build_support_bank
    from SlicerSGP.types import SupportItem

    bank = build_support_bank(cases, values)
    return {v: [SupportItem(image=cases[b.case].slices01[b.slice],
                            mask=cases[b.case].labels[b.slice] == v,
                            source=f"{cases[b.case].name} slice {b.slice}") for b in items]
            for v, items in bank.items()}


def pick_support_slices(labels: np.ndarray, values: list[int], count: int) -> list[int]:
    """``count`` evenly spaced slices among those showing any of ``values``."""
    present = np.flatnonzero(np.isin(labels, values).reshape(labels.shape[0], -1).any(axis=1))
    if count <= 0 or present.size == 0:
        return []
    picks = np.linspace(0, present.size - 1, min(count, present.size)).round().astype(int)
    return sorted({int(present[i]) for i in picks})


@dataclass
class CasePrediction:
    case: Any
    labels: np.ndarray
    pseudo: dict[int, np.ndarray]
    support_slices: list[int]
    seconds: float


def predict_case(segmenter, case, values: list[int], options, *, bank: dict | None = None,
                 support_slices: int = 0) -> CasePrediction:
    """Run ``Segmenter.segment`` on one case as ``sgp segment`` would (raw intensities when the
    case kept them, slices along axis 0 of the stored case)."""
    from dataclasses import replace

    volume = case.image if case.image is not None else case.slices01
    opts = replace(options, axis=0)
    chosen = pick_support_slices(case.labels, values, support_slices) if support_slices else []
    labels = None
    if chosen:
        labels = np.zeros_like(case.labels)
        labels[chosen] = case.labels[chosen]
    names = {v: case.names.get(v, f"label_{v}") for v in values}
    t0 = time.perf_counter()
    res = segmenter.segment(volume, labels, names, opts,
                            support_slices=chosen if chosen else None,
                            support_bank=bank if bank else None)
    return CasePrediction(case, res.labels, res.pseudo_masks, chosen, time.perf_counter() - t0)


def _middle_slice(gt: np.ndarray, exclude: list[int]) -> int:
    areas = gt.reshape(gt.shape[0], -1).sum(axis=1).astype(float)
    areas[list(exclude)] = -1
    return int(np.argmax(areas))


def find_prediction(folder: Path, case_name: str) -> Path:
    """``folder/<case>.seg.nrrd`` (or any label-map ending), or ``folder/<case>/`` with a
    ``labels.*`` / ``segmentation.*`` / ``*.seg.nrrd`` file in it."""
    from SlicerSGP.data.datasets import _kind

    hits = [p for p in sorted(folder.iterdir())
            if p.is_file() and _kind(p) and p.name[: -len(_kind(p))] == case_name]
    sub = folder / case_name
    if not hits and sub.is_dir():
        hits = [p for p in sorted(sub.iterdir()) if p.is_file() and _kind(p)
                and (p.name.lower().startswith(("labels", "segmentation", "pred"))
                     or p.name.lower().endswith(".seg.nrrd"))]
    if not hits:
        raise SGPInputError(f"No prediction for case {case_name!r} in {folder}: expected "
                            f"{folder / (case_name + '.seg.nrrd')} (or .nii.gz/.nrrd/.png).")
    seg = [p for p in hits if p.name.lower().endswith(".seg.nrrd")]
    return (seg or hits)[0]


# --------------------------------------------------------------------------- CLI

def add_eval_subparser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="Dice, IoU and HD95 per structure and case (from predictions or by running a model)",
        description="Score segmentations of the labeled cases in DATA (same layouts as `sgp "
                    "train`): either prediction files (--pred) or the model run now (--model).",
    )
    p.add_argument("data", type=Path, help="dataset folder with the ground truth")
    p.add_argument("--cases", default=None, help="index ranges of cases to score (e.g. 40:100)")
    p.add_argument("--label", dest="structures", type=int, action="append",
                   help="label value to score (repeatable; default every value in the truth)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pred", type=Path, help="folder of predictions named <case>.seg.nrrd ...")
    src.add_argument("--model", help="SAM2.1 size or an SGP checkpoint (.safetensors) to run")
    g = p.add_argument_group("running the model")
    g.add_argument("--weights", default=None)
    g.add_argument("--device", default="auto")
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bank", type=Path, help="support bank folder (other labeled cases)")
    g.add_argument("--bank-cases", default=None,
                   help="use these cases of DATA (index ranges, e.g. 0:40) as the support bank")
    g.add_argument("--support-slices", type=int, default=0,
                   help="give the model N ground-truth slices of each case as support (they are "
                        "left out of the metrics)")
    g.add_argument("--top-k", type=int, default=4)
    g.add_argument("--memory-policy", choices=("least_similar", "fifo"), default="least_similar")
    g.add_argument("--no-pmg", action="store_true")
    g.add_argument("--no-pma", action="store_true")
    g.add_argument("--no-3d-memory", action="store_true")
    g.add_argument("--axis", default="k")
    g.add_argument("--intensity", default="auto")
    g.add_argument("--write-pred", type=Path, help="also write each prediction as "
                   "<folder>/<case>.seg.nrrd")
    o = p.add_argument_group("outputs")
    o.add_argument("--csv", type=Path, help="per case and structure rows (.csv)")
    o.add_argument("--json", type=Path, help="summary + rows (.json)")
    o.add_argument("--montage", type=Path, help="PNG montage: truth green, pseudo-mask blue, "
                   "final red, on the slice with the largest true area")
    o.add_argument("--montage-cases", type=int, default=24)
    o.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from SlicerSGP.cli import parse_axis
    from SlicerSGP.data import io
    from SlicerSGP.data.datasets import load_dataset, parse_split
    from SlicerSGP.types import SegmentOptions

    axis = parse_axis(args.axis)
    all_cases = load_dataset(args.data, axis=axis, intensity=args.intensity,
                             keep_raw=args.model is not None)
    idx, _ = parse_split(args.cases, len(all_cases))
    cases = [all_cases[i] for i in idx]
    if not cases:
        raise SGPInputError("No case selected for evaluation.")
    values = args.structures or sorted({v for c in cases for v in c.values()})
    if not values:
        raise SGPInputError("The ground truth holds no structure; give --label.")

    rows: list[Row] = []
    tiles: list[np.ndarray] = []
    t_start = time.perf_counter()
    segmenter = bank = None
    opts = None
    if args.model is not None:
        from SlicerSGP.method.segmenter import Segmenter

        if args.bank is not None:
            bank = io.load_support_sets(args.bank, structures=values, axis=axis,
                                        intensity=args.intensity)
        elif args.bank_cases is not None:
            b_idx, _ = parse_split(args.bank_cases, len(all_cases))
            overlap = sorted(set(b_idx) & set(idx))
            if overlap:
                raise SGPInputError(f"--bank-cases and --cases overlap ({overlap[:5]}...): a case "
                                    "must not be its own support.")
            bank = bank_from_cases([all_cases[i] for i in b_idx], values)
        elif not args.support_slices:
            raise SGPInputError("Running a model needs support: --bank DIR, --bank-cases RANGES "
                                "or --support-slices N.")
        segmenter = Segmenter(args.model, weights=args.weights, device=args.device,
                              image_size=args.image_size, seed=args.seed, dtype=args.dtype)
        opts = SegmentOptions(top_k=args.top_k, memory_policy=args.memory_policy,
                              use_pmg=not args.no_pmg, use_pma=not args.no_pma,
                              use_3d_memory=not args.no_3d_memory, intensity=args.intensity)
    bar = tqdm(cases, desc="eval", unit="case", disable=args.quiet, leave=False)
    for case in bar:
        spacing = array_spacing(case.geometry, case.axis if case.num_slices > 1 else 0)
        pseudo: dict[int, np.ndarray] = {}
        exclude: list[int] = []
        seconds = 0.0
        if segmenter is not None:
            pred = predict_case(segmenter, case, values, opts, bank=bank,
                                support_slices=args.support_slices)
            labels, pseudo, exclude, seconds = pred.labels, pred.pseudo, pred.support_slices, \
                pred.seconds
            if args.write_pred:
                from SlicerSGP.data import preprocess

                io.write_segmentation(args.write_pred / f"{case.name}.seg.nrrd",
                                      preprocess.restore_orientation(labels, case.axis),
                                      case.geometry,
                                      {v: case.names.get(v, f"label_{v}") for v in values})
        else:
            path = find_prediction(args.pred, case.name)
            from SlicerSGP.data import preprocess

            raw, _, _ = io.read_labels(path)
            if raw.shape[0] == 1 and case.num_slices == 1:
                labels = raw
            else:
                labels = preprocess.reorient(raw, case.axis)
        case_rows = evaluate_labels(labels, case.labels, values, spacing, case=case.name,
                                    names=case.names, exclude_slices=exclude)
        for r in case_rows:
            r.seconds = seconds
        rows.extend(case_rows)
        if args.montage and len(tiles) < args.montage_cases:
            v = values[0]
            k = _middle_slice(case.labels == v, exclude)
            ps = pseudo.get(v)
            tiles.append(montage_tile(case.slices01[k], case.labels[k] == v,
                                      ps[k] >= 0.5 if ps is not None else None, labels[k] == v))
    elapsed = time.perf_counter() - t_start
    written = []
    if args.csv:
        written.append(str(write_csv(rows, args.csv)))
    if args.json:
        written.append(str(write_json(rows, args.json, {"seconds": elapsed,
                                                        "source": args.model or str(args.pred)})))
    if args.montage:
        written.append(str(write_montage(tiles, args.montage)))
    print(f"scored {len(cases)} case(s) in {elapsed:.1f} s")
    print(f"{'structure':<20} {'cases':>5} {'Dice mean':>9} {'median':>7} {'IoU':>6} "
          f"{'HD95 mean':>9} {'inf':>4}")
    for s in summarize(rows).values():
        h = f"{s['hd95_mean']:.2f}" if s["hd95_mean"] is not None else "-"
        print(f"{s['structure'][:20]:<20} {s['cases']:>5} {s['dice_mean']:>9.4f} "
              f"{s['dice_median']:>7.4f} {s['iou_mean']:>6.4f} {h:>9} {s['hd95_infinite']:>4}")
    if written:
        print("wrote " + ", ".join(written))
    return 0


__all__ = ["Row", "add_eval_subparser", "bank_from_cases", "dice", "evaluate_labels", "hd95",
           "iou", "montage_tile", "predict_case", "summarize", "surface", "write_csv",
           "write_json", "write_montage"]
