"""One support set on disk: the slices a user drew, saved to be reused as support on new cases.

A support set is a folder in the ``--support-bank`` layout (a) of :mod:`.support_bank`, one
case sub-folder per structure, plus a manifest (:data:`MANIFEST`)::

    NAME/sgp-support-set.json   name, created, source, axis, geometry, intensity windows,
                                structures (value, name, colour, slices), sha256 of every file
    NAME/labels.json            structure names and colours
    NAME/01_liver/image.nrrd    the slices drawn for that structure, stacked (raw intensities)
    NAME/01_liver/labels.nrrd   that structure's mask on them (its label value, else 0)

Support semantics (docs/support-library.md): a structure's folder holds only the slices drawn
*for it*, so a slice drawn for another structure never teaches "absent here" (the bank loader
takes empty slices of a case only from the case of that structure). An empty mask in a
structure's own folder is a slice the user drew as empty for it, and does teach absence.

Intensity: the window the engine would have used on the source volume is stored (and the
percentile/min-max windows), so loading maps each slice exactly as the engine mapped it there.

Named sets in a library folder, their zip export and import: :mod:`.support_library`.
numpy and the standard library only (no torch, no SimpleITK: Slicer's process imports this);
its NRRD files are written and read by :mod:`.nrrd`.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from SlicerSGP.data.intensity import (
    CT_PRESETS,
    INTENSITY_MODES,
    intensity_range,
    normalize_intensity,
)
from SlicerSGP.data.nrrd import read_nrrd, write_nrrd
from SlicerSGP.errors import SGPInputError
from SlicerSGP.filesystem import atomic_write_text, file_sha256
from SlicerSGP.types import Geometry, SupportItem, axis_label

MANIFEST = "sgp-support-set.json"
FORMAT, FORMAT_VERSION = "sgp-support-set", 1


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically, in the manifest's layout (sorted keys)."""
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40] or "structure"


def _array_spacing(geometry: Geometry, axis: int) -> tuple[float, float, float]:
    """ITK spacing (x, y, z) of the stacked slices: in-plane as in the source, z = slice axis."""
    per_array_axis = tuple(reversed(geometry.spacing))  # (K, J, I) order
    rows, cols = [per_array_axis[a] for a in range(3) if a != axis]
    return float(cols), float(rows), float(per_array_axis[axis])


# ------------------------------------------------------------------------------ one set


def write_support_set(
    folder: str | os.PathLike,
    image: np.ndarray,
    masks: Mapping[int, np.ndarray],
    slices: Mapping[int, Sequence[int]],
    *,
    axis: int = 0,
    geometry: Geometry | None = None,
    names: Mapping[int, str] | None = None,
    colors: Mapping[int, Sequence[float]] | None = None,
    intensity: str = "auto",
    source: str = "",
    description: str = "",
    name: str = "",
) -> dict:
    """Write a support set into the new or empty ``folder``; returns its manifest.

    ``image``: ``(K, J, I)`` or ``(K, J, I, 3)``; ``masks``: per label value a bool ``(K, J, I)``
    mask (segments may overlap); ``slices``: per label value the slice indices along ``axis``
    that were drawn for it (only those are saved for it). ``intensity``: the mode the source
    was segmented with; its window on the whole source volume is stored.
    """
    from SlicerSGP import __version__

    image = np.asarray(image)
    if image.ndim not in (3, 4) or (image.ndim == 4 and image.shape[-1] != 3):
        raise SGPInputError(
            f"A support set needs a (K, J, I) or RGB volume; got shape {tuple(image.shape)}."
        )
    if int(axis) not in (0, 1, 2):
        raise SGPInputError(f"The slicing axis must be 0, 1 or 2 (k, j, i); got {axis!r}.")
    if intensity not in INTENSITY_MODES:
        raise SGPInputError(
            f"Unknown intensity mode {intensity!r}; use one of {', '.join(INTENSITY_MODES)}."
        )
    geometry, names, colors = geometry or Geometry(), dict(names or {}), dict(colors or {})
    values = sorted(int(v) for v in slices)
    if not values:
        raise SGPInputError(
            "No structure to save: give at least one structure with its drawn slices."
        )
    n = image.shape[axis]
    first = np.moveaxis(image, axis, 0)
    union = np.zeros(first.shape[:3], bool)
    chosen: dict[int, list[int]] = {}
    for v in values:
        label = names.get(v, f"label {v}")
        if v <= 0 or v not in masks or np.shape(masks[v]) != image.shape[:3]:
            raise SGPInputError(
                f"Structure {label!r} (value {v}) needs a positive label value "
                f"and a mask of the volume's shape {tuple(image.shape[:3])}."
            )
        ks = sorted({int(k) for k in slices[v]})
        if any(not 0 <= k < n for k in ks):
            raise SGPInputError(
                f"Slices {ks} of {label!r} are outside the volume: along axis "
                f"{axis_label(axis)} it has slices 0..{n - 1}."
            )
        mask = np.moveaxis(np.asarray(masks[v], bool), axis, 0)
        if not any(mask[k].any() for k in ks):
            raise SGPInputError(
                f"Structure {label!r} has no voxels on its drawn slices {ks}; "
                "draw it on at least one slice where it is visible."
            )
        chosen[v] = ks
        for k in ks:
            union[k] |= mask[k]
    drawn = first[union] if image.ndim == 3 else None
    window = intensity_range(image, intensity, drawn=drawn)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise SGPInputError(f"{folder} is not empty; a support set is written into a new folder.")
    spacing = _array_spacing(geometry, int(axis))
    entries, label_json = [], {}
    for index, v in enumerate(values, start=1):
        sub = f"{index:02d}_{_slug(names.get(v, f'label_{v}'))}"
        (folder / sub).mkdir()
        mask = np.moveaxis(np.asarray(masks[v], bool), axis, 0)
        ks = chosen[v]
        dtype = np.uint8 if v <= 255 else np.uint16 if v <= 65535 else np.int32
        lab = np.stack([mask[k] for k in ks]).astype(dtype) * dtype(v)
        stack = np.ascontiguousarray(np.stack([first[k] for k in ks]))
        write_nrrd(folder / sub / "image.nrrd", stack, spacing)
        write_nrrd(folder / sub / "labels.nrrd", lab, spacing)
        color = [float(c) for c in colors[v]] if v in colors else None
        entries.append(
            {
                "value": v,
                "name": names.get(v, f"label_{v}"),
                "color": color,
                "folder": sub,
                "slices": ks,
                "empty_slices": [k for k in ks if not mask[k].any()],
            }
        )
        label_json[str(v)] = {"name": entries[-1]["name"], **({"color": color} if color else {})}
    write_json(folder / "labels.json", label_json)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "engine_version": __version__,
        "source": source,
        "description": description,
        "axis": int(axis),
        "axis_label": axis_label(axis),
        "shape": [int(s) for s in image.shape[:3]],
        "rgb": image.ndim == 4,
        "geometry": {
            "origin": list(geometry.origin),
            "spacing": list(geometry.spacing),
            "direction": list(geometry.direction),
        },
        "intensity": {
            "mode": intensity,
            "window": list(window),
            "percentile": list(intensity_range(image, "percentile")),
            "none": list(intensity_range(image, "none")),
        },
        "structures": entries,
        "files": {
            p.relative_to(folder).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
            for p in files
        },
    }
    write_json(folder / MANIFEST, manifest)
    return manifest


def _damaged(folder: Path, problem: str) -> SGPInputError:
    return SGPInputError(
        f"Support set {folder} is damaged: {problem}. Delete it and save or import it again."
    )


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of the set in ``folder``, its fields checked."""
    folder = Path(folder)
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _damaged(folder, f"its {MANIFEST} cannot be read ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _damaged(folder, f"{MANIFEST} is not a support set manifest")
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise SGPInputError(
            f"Support set {folder} has format version {data['format_version']}; "
            "this SlicerSGP reads up to 1. Update SlicerSGP."
        )
    try:
        files = {str(k): (str(v["sha256"]), int(v["size"])) for k, v in data["files"].items()}
        for s in data["structures"]:
            int(s["value"]), str(s["name"]), [int(k) for k in s["slices"]]
            if (
                f"{s['folder']}/image.nrrd" not in files
                or f"{s['folder']}/labels.nrrd" not in files
            ):
                raise KeyError(f"files of {s['folder']}")
        [float(w) for w in data["intensity"]["window"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _damaged(folder, f"{MANIFEST} lacks or garbles {exc}") from exc
    for rel in files:
        safe_member(rel)
    return data


def verify_files(folder: str | os.PathLike, manifest: dict | None = None) -> None:
    """Every file the manifest lists is there with its size and sha256."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    for rel, meta in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise _damaged(folder, f"{rel} is missing")
        if path.stat().st_size != int(meta["size"]) or file_sha256(path) != meta["sha256"]:
            raise _damaged(folder, f"{rel} does not match its sha256")


def window_for(manifest: dict, intensity: str = "auto") -> tuple[float, float]:
    """The window to map the set's slices with: 'auto' = the one stored at save time."""
    stored = manifest["intensity"]
    if intensity in ("auto", stored.get("mode")):
        lo, hi = stored["window"]
    elif intensity in CT_PRESETS:
        lo, hi = intensity_range(np.zeros(1), intensity)
    elif intensity in ("percentile", "none"):
        lo, hi = stored[intensity]
    else:
        raise SGPInputError(
            f"Unknown intensity mode {intensity!r}; use one of {', '.join(INTENSITY_MODES)}."
        )
    return float(lo), float(hi)


def read_support_set(
    folder: str | os.PathLike, *, intensity: str = "auto", verify: bool = True
) -> tuple[dict[int, list[SupportItem]], dict[int, str]]:
    """``({value: [SupportItem, ...]}, {value: name})``: every slice saved for a structure,
    mapped with the stored window (see :func:`window_for`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    lo, hi = window_for(manifest, intensity)
    found: dict[int, list[SupportItem]] = {}
    for s in manifest["structures"]:
        value, ks = int(s["value"]), [int(k) for k in s["slices"]]
        try:
            stack = read_nrrd(folder / s["folder"] / "image.nrrd")
            lab = read_nrrd(folder / s["folder"] / "labels.nrrd")
        except (OSError, ValueError, KeyError, EOFError, gzip.BadGzipFile) as exc:
            raise _damaged(folder, f"{s['folder']} cannot be read ({exc})") from exc
        if stack.shape[0] != len(ks) or lab.shape != stack.shape[:3]:
            raise _damaged(folder, f"{s['folder']} does not hold its {len(ks)} slices")
        image01 = normalize_intensity(stack, lo, hi)
        found[value] = [SupportItem(
            image=np.ascontiguousarray(image01[i]), mask=np.ascontiguousarray(lab[i] == value),
            source=f"{manifest.get('name') or folder.name}: {s['name']} "
                   f"{axis_label(manifest['axis'])} slice {k}")
            for i, k in enumerate(ks)]  # fmt: skip
    return found, {int(s["value"]): str(s["name"]) for s in manifest["structures"]}


def is_support_set(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def safe_member(name: str) -> str:
    """A relative path inside a set, refused if it could leave it (zip-slip)."""
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or ":" in name
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise SGPInputError(
            f"Refused: the path {name!r} in the support set would leave its "
            "folder (absolute, '..', or a drive). The file is not a support set "
            "exported by SlicerSGP."
        )
    return name
