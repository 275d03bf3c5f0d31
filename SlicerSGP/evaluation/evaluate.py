"""Predictions to score: run the model on a case the way ``sgp segment`` does, or find the
prediction file ``sgp segment`` wrote for it.

Support comes from other labeled cases (a bank folder, or other cases of the data set, built by
the rule the training support bank uses) or from a few ground-truth slices of each case (those
slices are then left out of the metrics, since the engine returns them exactly as drawn).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from SlicerSGP.data.files import file_stem, is_volume_file
from SlicerSGP.data.targets import build_support_bank
from SlicerSGP.errors import SGPInputError
from SlicerSGP.evaluation.baselines import run_baseline
from SlicerSGP.types import CancelCheck, ProgressCallback, SupportItem

__all__ = ["CasePrediction", "array_spacing", "bank_from_cases", "find_prediction",
           "middle_slice", "pick_support_slices", "predict_case"]


def array_spacing(geometry, axis: int = 0) -> tuple[float, float, float]:
    """Spacing per array axis of a case stored with its slicing ``axis`` first."""
    sp = list(geometry.spacing)[::-1]  # ITK (x, y, z) -> array (K, J, I)
    return (sp[axis], *[sp[i] for i in range(3) if i != axis])


def bank_from_cases(cases: list, values: list[int]) -> dict:
    """A support bank (``{value: [SupportItem]}``) from labeled cases, with the rule
    ``io.load_support_sets`` uses: slices with the structure + as many without, evenly spaced."""
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
    """One case's predicted label map (slices along axis 0, as the case is stored)."""

    case: Any
    labels: np.ndarray
    pseudo: dict[int, np.ndarray]
    support_slices: list[int]
    seconds: float


def predict_case(segmenter, case, values: list[int], options, *, bank: dict | None = None,
                 support_slices: int = 0, progress: ProgressCallback | None = None,
                 cancel: CancelCheck | None = None) -> CasePrediction:
    """Run ``Segmenter.segment`` on one case as ``sgp segment`` would (raw intensities when the
    case kept them, slices along axis 0 of the stored case)."""
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
                            support_bank=bank if bank else None, progress=progress,
                            cancel=cancel)
    return CasePrediction(case, res.labels, res.pseudo_masks, chosen, time.perf_counter() - t0)


def baseline_case(name: str, case, values: list[int], support_slices: int) -> CasePrediction:
    """What clinicians do today on the same slices ``predict_case`` gives the model:
    Fill between slices (``name`` 'interpolation') or nearest-slice copy ('nearest')."""
    chosen = pick_support_slices(case.labels, values, support_slices)
    if not chosen:
        raise SGPInputError("A baseline needs drawn slices: give --support-slices N (the same "
                            "N as for the model, so both start from the same slices).")
    t0 = time.perf_counter()
    labels = run_baseline(name, case.labels, dict.fromkeys(values, chosen))
    return CasePrediction(case, labels, {}, chosen, time.perf_counter() - t0)


def middle_slice(gt: np.ndarray, exclude: list[int]) -> int:
    """The slice (along axis 0) with the largest area of ``gt``, not in ``exclude``."""
    areas = gt.reshape(gt.shape[0], -1).sum(axis=1).astype(float)
    areas[list(exclude)] = -1
    return int(np.argmax(areas))


def find_prediction(folder: Path, case_name: str) -> Path:
    """``folder/<case>.seg.nrrd`` (or any label-map ending), or ``folder/<case>/`` with a
    ``labels.*`` / ``segmentation.*`` / ``*.seg.nrrd`` file in it."""
    hits = [p for p in sorted(folder.iterdir())
            if p.is_file() and is_volume_file(p) and file_stem(p) == case_name]
    sub = folder / case_name
    if not hits and sub.is_dir():
        hits = [p for p in sorted(sub.iterdir()) if p.is_file() and is_volume_file(p)
                and (p.name.lower().startswith(("labels", "segmentation", "pred"))
                     or p.name.lower().endswith(".seg.nrrd"))]
    if not hits:
        raise SGPInputError(f"No prediction for case {case_name!r} in {folder}: expected "
                            f"{folder / (case_name + '.seg.nrrd')} (or .nii.gz/.nrrd/.png).")
    seg = [p for p in hits if p.name.lower().endswith(".seg.nrrd")]
    return (seg or hits)[0]
