"""External support banks: folders of labeled cases turned into support sets, and their names.

A bank folder holds either

(a) labeled cases: sub-folders each with ``image.*`` + ``labels.*``, or a single such case; or
(b) 2D pairs ``images/NAME.*`` + ``masks/NAME.*``.

A saved support set (:mod:`.support_set`: layout (a) plus a manifest) is read through its
manifest: every slice saved for a structure, with the intensity window stored at save time.
Where a folder is expected, the name of a set in the support library
(:mod:`.support_library`) is accepted too.

Structure names (and colours) come from a bank-level description file (``labels.json``,
``labels.label``, ...), then from each case's own (its ``labels.json`` or ITK-SNAP ``.label``
beside the label map, or the segments of a ``.seg.nrrd``); the bank-level file wins.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from SlicerSGP.data.files import case_files, image_mask_pairs
from SlicerSGP.data.label_names import (
    LabelInfo,
    find_label_description,
    is_int,
    read_label_info,
)
from SlicerSGP.data.preprocess import (
    evenly_spaced,
    intensity_range,
    normalize_intensity,
    validate_volume,
)
from SlicerSGP.data.readers import read_image, read_labels
from SlicerSGP.data.support_library import resolve_support_bank
from SlicerSGP.data.support_set import is_support_set, read_support_set
from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import SupportItem, axis_label


def _label_maps(folder: Path) -> list[Path]:
    """The label maps of a bank, in the order :func:`load_support_sets` reads them."""
    pairs = image_mask_pairs(folder)
    if pairs is not None:
        return [mask for _, _, mask in pairs]
    single = case_files(folder)
    if single:
        return [single[1]]
    subs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return [files[1] for files in map(case_files, subs) if files]


def _bank_folder(folder: str | os.PathLike) -> Path:
    """A folder as is; else a support library set of that name; else the path unchanged (the
    caller reports it missing)."""
    path = Path(folder)
    if path.is_dir():
        return path
    try:
        return resolve_support_bank(folder)
    except SGPInputError:
        return path


def support_bank_info(folder: str | os.PathLike) -> LabelInfo:
    """Structure names and colours of a support bank (every layout :func:`load_support_sets`
    accepts): the bank's own description file first, then each case's, first one wins."""
    folder = _bank_folder(folder)
    if not folder.is_dir():
        return LabelInfo()
    found = find_label_description(folder)
    info = read_label_info(found) if found is not None else LabelInfo()
    for label_map in _label_maps(folder):
        info = info.fill_from(read_label_info(label_map))
    return info


def support_bank_names(folder: str | os.PathLike) -> dict[int, str]:
    """Structure names of a support bank folder (see :func:`support_bank_info`)."""
    return support_bank_info(folder).names


def _resolve_structures(structures, names: dict[int, str]) -> list[int] | None:
    if structures is None:
        return None
    if isinstance(structures, (int, str, np.integer)):
        structures = [structures]
    by_name = {n.lower(): v for v, n in names.items()}
    out = []
    for s in structures:
        if isinstance(s, str) and not is_int(s):
            if s.lower() not in by_name:
                raise SGPInputError(
                    f"Structure {s!r} is not named in the support bank; known: "
                    f"{', '.join(f'{v}={n}' for v, n in sorted(names.items())) or 'none'}."
                )
            out.append(by_name[s.lower()])
        else:
            out.append(int(s))
    return sorted(set(out))


def _collect(
    found: dict[int, list[SupportItem]],
    wanted: list[int] | None,
    names: dict[int, str],
    folder: Path,
) -> dict[int, list[SupportItem]]:
    if wanted is None:
        if not any(found.values()):
            raise SGPInputError(
                f"The support bank {folder} has no labeled voxels at all; label some slices first."
            )
        return {v: items for v, items in sorted(found.items()) if any(i.mask.any() for i in items)}
    missing = [v for v in wanted if not any(i.mask.any() for i in found.get(v, []))]
    if missing:
        present = sorted(v for v, items in found.items() if any(i.mask.any() for i in items))
        listed = ", ".join(f"{v} ({names.get(v, 'label_' + str(v))})" for v in present) or "none"
        raise SGPInputError(
            f"Label value(s) {missing} are not present anywhere in the support bank {folder}. "
            f"Present: {listed}. "
            "Pick label values that exist in the bank or add cases that contain them."
        )
    return {v: found[v] for v in wanted}


def _load_pairs(
    folder: Path,
    pairs: list[tuple[str, Path, Path]],
    wanted: list[int] | None,
    intensity: str,
) -> dict[int, list[SupportItem]]:
    loaded = []
    for _, im_path, mask_path in pairs:
        image, geom = read_image(im_path)
        validate_volume(image, 0)
        labels, _, _ = read_labels(mask_path, geom, reference_shape=image.shape[:3])
        lo, hi = intensity_range(image, intensity)
        loaded.append((im_path, normalize_intensity(image, lo, hi)[0], labels[0]))
    values = (
        wanted
        if wanted is not None
        else sorted({int(v) for _, _, lab in loaded for v in np.unique(lab) if v != 0})
    )
    with_s: dict[int, list[SupportItem]] = {}
    without_s: dict[int, list[SupportItem]] = {}
    for im_path, img01, lab in loaded:
        for v in values:
            mask = lab == v
            item = SupportItem(
                image=img01, mask=mask, source=f"{folder.name}/images/{im_path.name}"
            )
            (with_s if mask.any() else without_s).setdefault(v, []).append(item)
    found: dict[int, list[SupportItem]] = {}
    for v in values:
        pos, neg = with_s.get(v, []), without_s.get(v, [])
        keep = set(evenly_spaced(list(range(len(neg))), len(pos)))
        found[v] = pos + [item for i, item in enumerate(neg) if i in keep]
    return found


def _load_cases(
    cases: list[tuple[str, Path, Path]],
    wanted: list[int] | None,
    names: dict[int, str],
    intensity: str,
    axis: int,
) -> dict[int, list[SupportItem]]:
    found: dict[int, list[SupportItem]] = {}
    for case_name, image_path, labels_path in cases:
        image, geom = read_image(image_path)
        validate_volume(image, axis)
        labels, _, case_names = read_labels(labels_path, geom, reference_shape=image.shape[:3])
        for v, n in case_names.items():
            names.setdefault(v, n)
        lo, hi = intensity_range(image, intensity)
        img01 = np.moveaxis(normalize_intensity(image, lo, hi), axis, 0)
        lab = np.moveaxis(labels, axis, 0)
        values = wanted if wanted is not None else sorted(int(v) for v in np.unique(lab) if v != 0)
        for v in values:
            per_slice = (lab == v).reshape(lab.shape[0], -1).any(axis=1)
            present = [int(k) for k in np.flatnonzero(per_slice)]
            absent = [int(k) for k in np.flatnonzero(~per_slice)]
            chosen = sorted(present + evenly_spaced(absent, len(present)))
            items = found.setdefault(v, [])
            for k in chosen:
                items.append(SupportItem(
                    image=np.ascontiguousarray(img01[k]),
                    mask=np.ascontiguousarray(lab[k] == v),
                    source=f"{case_name} axis {axis_label(axis)} slice {k}",
                ))  # fmt: skip
    return found


def load_support_sets(
    folder: str | os.PathLike,
    *,
    structures: Iterable[int | str] | int | str | None = None,
    intensity: str = "auto",
    axis: int = 0,
    limit: int | None = None,
) -> dict[int, list[SupportItem]]:
    """Load a support bank as support sets: ``{label value: [SupportItem, ...]}``.

    Layouts (module docstring): (a) each volume gets one intensity mapping (``intensity``, see
    :func:`~SlicerSGP.data.preprocess.intensity_range`); every slice along ``axis`` that contains
    the structure is taken, plus empty slices of the same case, evenly spaced, at most as many
    as the non-empty ones; (b) each image is mapped on its own; images without the structure
    are kept evenly spaced, at most as many as those with it (``axis`` does not apply).

    ``structures``: label values (or names, :func:`support_bank_names`) to load; None = every
    value present. A requested value absent from the whole bank raises :class:`SGPInputError`.
    ``limit`` reads only the first ``limit`` cases / images (sorted by name).

    A saved support set (``folder`` holding its manifest, or the name of a set in the support
    library) gives every slice saved for each structure, mapped with the window stored at save
    time for ``intensity='auto'`` (:func:`~.support_set.window_for`); ``axis`` and ``limit``
    do not apply (its slices are 2D already).
    """
    folder = resolve_support_bank(folder)
    names = support_bank_names(folder)
    wanted = _resolve_structures(structures, names)
    if is_support_set(folder):
        found, set_names = read_support_set(folder, intensity=intensity)
        return _collect(found, wanted, {**set_names, **names}, folder)
    pairs = image_mask_pairs(folder)
    if pairs is not None:
        if not pairs:
            raise SGPInputError(
                f"No image/mask pairs in {folder}: images/NAME.png needs masks/NAME.png with the "
                "same NAME."
            )
        if limit is not None:
            pairs = pairs[: max(0, int(limit))]
        return _collect(_load_pairs(folder, pairs, wanted, intensity), wanted, names, folder)

    single = case_files(folder)
    cases = [(folder.name, *single)] if single else []
    if not cases:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            files = case_files(sub)
            if files:
                cases.append((sub.name, *files))
    if not cases:
        raise SGPInputError(
            f"{folder} is not a support bank: expected sub-folders with image.* and labels.* "
            "(e.g. image.nrrd + labels.nrrd + labels.json), a single such case, or images/ + "
            "masks/ folders of 2D pairs."
        )
    if limit is not None:
        cases = cases[: max(0, int(limit))]
    found = _load_cases(cases, wanted, names, intensity, axis)
    return _collect(found, wanted, names, folder)
