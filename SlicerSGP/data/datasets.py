"""Training and evaluation data: labeled cases read into slice stacks.

A dataset folder holds either

(a) 2D pairs ``images/NAME.*`` + ``masks/NAME.*`` (+ ``labels.json`` or an ITK-SNAP
    ``labels.label``: :mod:`~SlicerSGP.data.label_names`): each image is a one-slice
    case (``(1, H, W[, 3])``);
(b) labeled cases: sub-folders each with ``image.*`` + ``labels.*`` (NIfTI, NRRD, MHA, PNG; the
    labels may be a Slicer ``.seg.nrrd``), optionally ``labels.json`` / ``.label``; or a single
    such case.

Every case gets one intensity mapping (per volume, never per slice: ``preprocess``) and is
stored reoriented so that slices run along the first axis. Cases are sorted by name, so a split
by index (:func:`split_cases`) is reproducible.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from SlicerSGP.data import preprocess
from SlicerSGP.data.files import (
    LABEL_PREFIXES,
    case_files,
    file_kind,
    image_mask_pairs,
    is_volume_file,
)
from SlicerSGP.data.label_names import read_label_names
from SlicerSGP.data.readers import read_image, read_labels
from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import Geometry


@dataclass
class CaseRef:
    """Where one labeled case lives on disk."""

    name: str
    image: Path
    labels: Path


@dataclass
class Case:
    """One labeled case, ready for the model: slices along the first axis."""

    name: str
    slices01: np.ndarray
    """(N, H, W) or (N, H, W, 3) float32 in [0, 1] (one intensity mapping for the case)."""
    labels: np.ndarray
    """(N, H, W) integer label map, same slice order as ``slices01``."""
    geometry: Geometry
    axis: int = 0
    names: dict[int, str] = field(default_factory=dict)
    ref: CaseRef | None = None
    image: np.ndarray | None = None
    """The raw intensities, same slice order (what ``sgp segment`` would read), if kept."""

    @property
    def num_slices(self) -> int:
        return int(self.slices01.shape[0])

    def values(self) -> list[int]:
        return sorted(int(v) for v in np.unique(self.labels) if v != 0)

    def slices_with(self, value: int) -> list[int]:
        per = (self.labels == value).reshape(self.num_slices, -1).any(axis=1)
        return [int(k) for k in np.flatnonzero(per)]


def _kind(path: Path) -> str:
    """The known image/label-map ending of ``path``, or ``""``."""
    return file_kind(path) if is_volume_file(path) else ""


def _case_in(folder: Path) -> CaseRef | None:
    files = case_files(folder)
    return CaseRef(folder.name, *files) if files else None


def find_cases(folder: str | os.PathLike) -> list[CaseRef]:
    """The labeled cases in ``folder`` (layouts in the module docstring), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SGPInputError(f"Dataset folder not found: {folder}.")
    pairs = image_mask_pairs(folder)
    if pairs is not None:
        if not pairs:
            raise SGPInputError(
                f"No image/mask pairs in {folder}: images/NAME.png needs "
                "masks/NAME.png with the same NAME."
            )
        return [CaseRef(stem, image, mask) for stem, image, mask in pairs]
    single = _case_in(folder)
    if single:
        return [single]
    refs = [r for r in (_case_in(sub) for sub in sorted(folder.iterdir()) if sub.is_dir()) if r]
    if not refs:
        raise SGPInputError(
            f"{folder} holds no labeled cases: expected images/ + masks/ (2D pairs), sub-folders "
            "with image.* (or an image/ folder of DICOM files) + labels.* (NIfTI, NRRD, "
            ".seg.nrrd), or a single such case."
        )
    return refs


def load_case(
    ref: CaseRef, axis: int = 0, intensity: str = "auto", *, keep_raw: bool = False
) -> Case:
    """Read one case, map its intensities once, and put the slicing axis first."""
    image, geometry = read_image(ref.image)
    if image.shape[0] == 1:
        axis = 0  # a 2D image has one slice whatever the axis
    preprocess.validate_volume(image, axis)
    labels, _, names = read_labels(ref.labels, geometry, reference_shape=image.shape[:3])
    lo, hi = preprocess.intensity_range(image, intensity)
    slices01 = np.ascontiguousarray(
        preprocess.reorient(preprocess.normalize_intensity(image, lo, hi), axis)
    )
    lab = np.ascontiguousarray(preprocess.reorient(labels, axis)).astype(np.int32)
    raw = np.ascontiguousarray(preprocess.reorient(image, axis)) if keep_raw else None
    return Case(ref.name, slices01, lab, geometry, axis, names, ref, raw)


def load_dataset(
    folder: str | os.PathLike,
    *,
    axis: int = 0,
    intensity: str = "auto",
    limit: int | None = None,
    keep_raw: bool = False,
) -> list[Case]:
    refs = find_cases(folder)
    if limit is not None:
        refs = refs[: max(0, int(limit))]
    names = read_label_names(folder)
    cases = [load_case(r, axis, intensity, keep_raw=keep_raw) for r in refs]
    for c in cases:
        for v, n in names.items():
            c.names.setdefault(v, n)
    return cases


def split_cases(
    items: list, train: int | float, *, test: int | float | None = None
) -> tuple[list, list]:
    """Split by position (items are sorted by name): the first ``train`` items train (an int,
    or a fraction of the list), the rest (or the next ``test`` of them) are held out."""
    n = len(items)
    n_train = int(round(train * n)) if isinstance(train, float) and train <= 1 else int(train)
    n_train = max(0, min(n, n_train))
    rest = items[n_train:]
    if test is not None:
        n_test = int(round(test * n)) if isinstance(test, float) and test <= 1 else int(test)
        rest = rest[:n_test]
    return items[:n_train], rest


def parse_split(text: str | None, n: int) -> tuple[list[int], list[int]]:
    """``'0:60'`` / ``'0:60,80:100'`` -> indices; used by ``--train-cases`` / ``--eval-cases``."""
    if not text:
        return list(range(n)), []
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            a, b = part.split(":", 1)
            out.extend(range(int(a or 0), min(n, int(b) if b else n)))
        else:
            out.append(int(part))
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise SGPInputError(f"Case index(es) {bad[:5]} are outside 0..{n - 1}.")
    return out, [i for i in range(n) if i not in set(out)]


__all__ = [
    "LABEL_PREFIXES",
    "Case",
    "CaseRef",
    "find_cases",
    "load_case",
    "load_dataset",
    "parse_split",
    "split_cases",
]
