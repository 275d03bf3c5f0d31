"""Reading and writing images, label maps, Slicer segmentations and support banks.

Arrays are in ``(K, J, I)`` order (``(K, J, I, 3)`` for RGB), as SimpleITK's
``GetArrayFromImage`` gives them; :class:`~SlicerSGP.types.Geometry` follows ITK (LPS).
2D images (PNG, JPG, BMP, ...) become one-slice volumes ``(1, H, W[, 3])`` with a z spacing of 1.

Every writer writes to a hidden temporary file in the destination folder and then renames it
over the destination (``os.replace``), so a failed write leaves neither a partial file nor a
damaged previous file behind.
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SlicerSGP.data.preprocess import (
    evenly_spaced,
    intensity_range,
    normalize_intensity,
    validate_volume,
)
from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import Geometry, SupportItem

IMAGE_EXTENSIONS = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd",
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff",
)  # fmt: skip
"""File name endings read by :func:`read_image` / :func:`read_labels` (plus ``.seg.nrrd``)."""

GEOMETRY_TOLERANCE = 1e-3
"""Relative tolerance when a label map's geometry is compared with its image's: spacing relative
to the spacing, origin relative to the largest voxel size, direction (unit vectors) absolute."""

DEFAULT_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.945, 0.839, 0.569), (0.694, 0.478, 0.396), (0.435, 0.722, 0.824),
    (0.847, 0.396, 0.310), (0.867, 0.510, 0.396), (0.565, 0.933, 0.565),
    (0.753, 0.408, 0.345), (0.863, 0.961, 0.078), (0.306, 0.247, 0.000),
    (1.000, 0.980, 0.863), (0.902, 0.863, 0.275), (0.784, 0.784, 0.922),
)  # fmt: skip
"""Segment colours (RGB in [0, 1]) used when none are given, cycled by label value."""


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------


def geometry_from_sitk(img: sitk.Image) -> Geometry:
    """The :class:`Geometry` of a 2D or 3D SimpleITK image (2D: z origin 0, z spacing 1)."""
    dim = img.GetDimension()
    if dim == 3:
        return Geometry(
            origin=tuple(float(v) for v in img.GetOrigin()),
            spacing=tuple(float(v) for v in img.GetSpacing()),
            direction=tuple(float(v) for v in img.GetDirection()),
        )
    if dim == 2:
        ox, oy = img.GetOrigin()
        sx, sy = img.GetSpacing()
        d = img.GetDirection()
        return Geometry(
            origin=(float(ox), float(oy), 0.0),
            spacing=(float(sx), float(sy), 1.0),
            direction=(float(d[0]), float(d[1]), 0.0, float(d[2]), float(d[3]), 0.0, 0.0, 0.0, 1.0),
        )
    raise SGPInputError(f"Only 2D and 3D images are supported; this image is {dim}D.")


def sitk_from_array(
    array: np.ndarray, geometry: Geometry | None, is_vector: bool = False
) -> sitk.Image:
    """A 3D SimpleITK image from a ``(K, J, I)`` (or ``(K, J, I, C)`` with ``is_vector``) array."""
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    expected = 4 if is_vector else 3
    if arr.ndim != expected:
        raise SGPInputError(
            f"Expected a {'(K, J, I, C)' if is_vector else '(K, J, I)'} array; got shape {arr.shape}."
        )
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=is_vector)
    geometry = geometry or Geometry()
    img.SetOrigin(tuple(float(v) for v in geometry.origin))
    img.SetSpacing(tuple(float(v) for v in geometry.spacing))
    img.SetDirection(tuple(float(v) for v in geometry.direction))
    return img


def ijk_to_lps(geometry: Geometry) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) to LPS millimetres."""
    m = np.eye(4)
    m[:3, :3] = geometry.direction_matrix() * np.asarray(geometry.spacing, dtype=float)[None, :]
    m[:3, 3] = np.asarray(geometry.origin, dtype=float)
    return m


def geometry_from_ijk_to_lps(matrix) -> Geometry:
    """Inverse of :func:`ijk_to_lps` (spacing = column lengths, direction = unit columns)."""
    m = np.asarray(matrix, dtype=float)
    cols = m[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    if np.any(spacing <= 0):
        raise SGPInputError(f"Voxel-to-physical matrix has a zero-length axis: {cols.tolist()}.")
    direction = cols / spacing[None, :]
    return Geometry(
        origin=tuple(float(v) for v in m[:3, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=tuple(float(v) for v in direction.reshape(-1)),
    )


def _geometry_mismatch(geom: Geometry, ref: Geometry) -> str | None:
    tol = GEOMETRY_TOLERANCE
    sp, rsp = np.asarray(geom.spacing, float), np.asarray(ref.spacing, float)
    if np.any(np.abs(sp - rsp) > tol * np.abs(rsp)):
        return f"spacing {tuple(sp.round(6))} vs image {tuple(rsp.round(6))}"
    o, ro = np.asarray(geom.origin, float), np.asarray(ref.origin, float)
    if np.any(np.abs(o - ro) > tol * max(float(rsp.max()), 1e-12)):
        return f"origin {tuple(o.round(4))} vs image {tuple(ro.round(4))}"
    d, rd = geom.direction_matrix(), ref.direction_matrix()
    if np.any(np.abs(d - rd) > tol):
        return (
            f"direction {tuple(d.reshape(-1).round(4))} vs image {tuple(rd.reshape(-1).round(4))}"
        )
    return None


def _image_name_kind(path: Path) -> str:
    name = path.name.lower()
    for ext in (".seg.nrrd", *IMAGE_EXTENSIONS):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _read_sitk(path: Path, what: str) -> sitk.Image:
    if not path.exists():
        raise SGPInputError(
            f"{what} file not found: {path}. Check the path (and the working folder)."
        )
    if path.is_dir():
        raise SGPInputError(f"{what} path {path} is a folder; give the path of an image file.")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[-1] if first else ""
        raise SGPInputError(
            f"Cannot read {what.lower()} file {path} ({detail}). Supported formats: NIfTI "
            "(.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), PNG, JPG, BMP, TIFF."
        ) from exc


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read an image: ``(array, geometry)``, array ``(K, J, I)`` or ``(K, J, I, 3)`` (RGB).

    2D images come back as ``(1, H, W)`` / ``(1, H, W, 3)`` with z spacing 1. 4D images and
    vector images with other than 1 or 3 components are rejected.
    """
    path = Path(path)
    img = _read_sitk(path, "Image")
    dim, ncomp = img.GetDimension(), img.GetNumberOfComponentsPerPixel()
    if dim not in (2, 3):
        raise SGPInputError(
            f"{path} is a {dim}D image (size {img.GetSize()}); 4D input is not supported: pick one "
            "time point / channel first and save it as a 3D volume (e.g. in Slicer: Sequences, "
            "or SimpleITK's Extract)."
        )
    if ncomp not in (1, 3):
        raise SGPInputError(
            f"{path} has {ncomp} components per voxel; only scalar or RGB (3) images are "
            "supported. Pick one component, or for RGBA drop the alpha channel, and save again."
        )
    geometry = geometry_from_sitk(img)
    array = sitk.GetArrayFromImage(img)
    if dim == 2:
        array = array[np.newaxis]
    return array, geometry


def _label_names_file(path: Path) -> Path | None:
    name = path.name
    kind = _image_name_kind(path)
    stem = name[: -len(kind)] if kind and name.lower().endswith(kind) else path.stem
    # beside the file, then one folder up (images/ + masks/ layouts keep labels.json there)
    for candidate in (path.with_name(stem + ".json"), path.with_name("labels.json"),
                      path.parent.parent / "labels.json"):  # fmt: skip
        if candidate.is_file():
            return candidate
    return None


def read_label_names(path: str | os.PathLike) -> dict[int, str]:
    """Label names from a JSON file: ``{"1": "liver", ...}`` (or ``{"liver": 1, ...}``).

    ``path`` may be the JSON file itself, a label map (``<stem>.json`` or ``labels.json`` beside
    it, else ``labels.json`` in the folder above) or a folder (its ``labels.json``). No file -> ``{}``.
    """
    path = Path(path)
    if path.is_dir():
        json_path = path / "labels.json"
        json_path = json_path if json_path.is_file() else None
    elif path.suffix.lower() == ".json":
        json_path = path if path.is_file() else None
    else:
        json_path = _label_names_file(path)
    if json_path is None:
        return {}
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SGPInputError(
            f"Cannot read label names from {json_path}: {exc}. Fix or remove the file."
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("labels"), (dict, list)):
        data = data["labels"]
    names: dict[int, str] = {}
    try:
        if isinstance(data, list):  # [{"value": 1, "name": "liver"}, ...]
            for entry in data:
                names[int(entry["value"])] = str(entry["name"])
        elif isinstance(data, dict):
            for key, value in data.items():
                if (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and not _is_int(key)
                ):
                    names[int(value)] = str(key)  # {"liver": 1}
                else:
                    names[int(key)] = str(value)  # {"1": "liver"}
        else:
            raise TypeError(type(data).__name__)
    except (KeyError, TypeError, ValueError) as exc:
        raise SGPInputError(
            f'Label names in {json_path} are not in the expected form {{"1": "liver", ...}} ({exc}).'
        ) from exc
    return dict(sorted(names.items()))


def _is_int(text) -> bool:
    try:
        int(text)
    except (TypeError, ValueError):
        return False
    return True


def _read_seg_nrrd(path: Path) -> tuple[np.ndarray, Geometry, dict[int, str]]:
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio/pynrrd raise a variety of errors
        raise SGPInputError(f"Cannot read segmentation {path}: {exc}.") from exc
    voxels = seg.get("voxels")
    if voxels is None or voxels.ndim not in (3, 4):
        raise SGPInputError(f"Segmentation {path} has no 3D voxel data.")
    geometry = geometry_from_ijk_to_lps(seg["ijkToLPS"])
    segments = list(seg.get("segments", []))
    # slicerio gives (i, j, k) or (layer, i, j, k); we want (k, j, i).
    layers = voxels[np.newaxis] if voxels.ndim == 3 else voxels
    layers = np.transpose(layers, (0, 3, 2, 1))
    shape = layers.shape[1:]
    single = layers.shape[0] == 1 and all(int(s.get("layer", 0)) == 0 for s in segments)
    values = [int(s.get("labelValue", 1)) for s in segments]
    if single and len(set(values)) == len(values) and all(v > 0 for v in values):
        # One layer with distinct label values: keep the values as they are.
        out_dtype = (
            np.uint8
            if max(values, default=0) <= 255
            else np.uint16
            if max(values) <= 65535
            else np.int32
        )
        labels = np.zeros(shape, dtype=out_dtype)
        for v in values:
            labels[layers[0] == v] = v
        names = {
            v: str(s.get("name", f"Segment_{v}")) for v, s in zip(values, segments, strict=True)
        }
        return labels, geometry, dict(sorted(names.items()))
    # Several layers (overlapping segments) or repeated values: number segments 1..n in file
    # order; where segments overlap, the later one wins.
    n = len(segments)
    labels = np.zeros(shape, dtype=np.uint8 if n <= 255 else np.uint16)
    names = {}
    for index, s in enumerate(segments, start=1):
        layer = int(s.get("layer", 0))
        if layer >= layers.shape[0]:
            raise SGPInputError(
                f"Segment {s.get('name')!r} in {path} refers to missing layer {layer}."
            )
        labels[layers[layer] == int(s.get("labelValue", 1))] = index
        names[index] = str(s.get("name", f"Segment_{index}"))
    return labels, geometry, names


def read_labels(
    path: str | os.PathLike,
    reference_geometry: Geometry | None = None,
    *,
    reference_shape: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, Geometry, dict[int, str]]:
    """Read a label map: ``(labels, geometry, names)``.

    ``labels`` is an integer ``(K, J, I)`` array (2D masks: ``(1, H, W)``); ``names`` maps label
    value -> structure name. NIfTI/NRRD/MHA/PNG label maps take their names from ``<stem>.json``
    or ``labels.json`` beside the file, else ``labels.json`` one folder up (values without a name
    get ``label_<v>``); a Slicer
    ``.seg.nrrd`` carries its segment names and label values (overlapping segments in several
    layers are renumbered 1..n in file order).

    With ``reference_geometry`` (and ``reference_shape``, the image's ``(K, J, I)`` shape) the
    label map must lie on the image's voxel grid, else :class:`SGPInputError`.
    """
    path = Path(path)
    if path.name.lower().endswith(".seg.nrrd"):
        if not path.is_file():
            raise SGPInputError(
                f"Label file not found: {path}. Check the path (and the working folder)."
            )
        labels, geometry, names = _read_seg_nrrd(path)
    else:
        img = _read_sitk(path, "Label")
        if img.GetNumberOfComponentsPerPixel() != 1 or img.GetDimension() not in (2, 3):
            raise SGPInputError(
                f"{path} is not a scalar 2D/3D label map ({img.GetDimension()}D, "
                f"{img.GetNumberOfComponentsPerPixel()} components per voxel). Save one integer "
                "label value per voxel (0 = background)."
            )
        geometry = geometry_from_sitk(img)
        labels = sitk.GetArrayFromImage(img)
        if img.GetDimension() == 2:
            labels = labels[np.newaxis]
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
                raise SGPInputError(
                    f"{path} holds non-integer values (a probability map?); a label map needs one "
                    "integer label value per voxel. Threshold it and save it as integers."
                )
            labels = labels.astype(np.int32)
        if labels.size and labels.min() < 0:
            raise SGPInputError(
                f"{path} has negative label values; use 0 for background and 1.. for structures."
            )
        present = [int(v) for v in np.unique(labels) if v != 0]
        names = read_label_names(path)
        for v in present:
            names.setdefault(v, f"label_{v}")
        names = dict(sorted(names.items()))

    if reference_geometry is not None or reference_shape is not None:
        problem = None
        if reference_shape is not None and tuple(labels.shape) != tuple(reference_shape)[:3]:
            problem = f"size {tuple(labels.shape)} vs image {tuple(reference_shape)[:3]} (K, J, I)"
        elif reference_geometry is not None:
            problem = _geometry_mismatch(geometry, reference_geometry)
        if problem is not None:
            ref = reference_geometry or Geometry()
            raise SGPInputError(
                f"The label map {path} does not match the image: {problem}. Label map: size "
                f"{tuple(labels.shape)}, origin {tuple(np.round(geometry.origin, 4))}, spacing "
                f"{tuple(np.round(geometry.spacing, 4))}; image: size "
                f"{tuple(reference_shape)[:3] if reference_shape is not None else '?'}, origin "
                f"{tuple(np.round(ref.origin, 4))}, spacing {tuple(np.round(ref.spacing, 4))}. "
                "Resample the label map onto the image first (e.g. in Slicer: Resample Image "
                "(BRAINS) with the image as reference and nearest-neighbour interpolation, or "
                "Segmentations > Export to labelmap with the image as reference volume)."
            )
    return labels, geometry, names


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _atomic_write(path: str | os.PathLike, writer) -> Path:
    """Call ``writer(tmp_path)`` then move the result onto ``path``; on failure remove it."""
    path = Path(path)
    if path.is_dir():
        raise SGPInputError(f"Output path {path} is a folder; give a file name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return path


def _color01(color) -> list[float]:
    c = [float(v) for v in color][:3]
    if len(c) != 3:
        raise SGPInputError(f"A segment colour needs 3 components (R, G, B); got {color!r}.")
    if any(v > 1.0 for v in c):
        c = [v / 255.0 for v in c]
    return [min(max(v, 0.0), 1.0) for v in c]


def write_segmentation(
    path: str | os.PathLike,
    label_map: np.ndarray,
    geometry: Geometry,
    names: dict[int, str],
    colors: dict[int, tuple] | None = None,
) -> Path:
    """Write a ``(K, J, I)`` label map as a Slicer ``.seg.nrrd`` with named segments.

    One layer; one segment per label value in ``names`` (empty segments included) and per value
    present in the map (unnamed ones are called ``Segment_<v>``); segment ID ``Segment_<v>``,
    labelValue ``v``, colour from ``colors`` (RGB in [0, 1] or 0-255) or a default palette.
    """
    import slicerio

    labels = np.asarray(label_map)
    if labels.ndim != 3:
        raise SGPInputError(f"A label map must be (K, J, I); got shape {labels.shape}.")
    if labels.dtype == np.bool_:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.array_equal(labels, np.round(labels)):
            raise SGPInputError(
                "The label map has non-integer values; threshold it before writing."
            )
        labels = labels.astype(np.int64)
    present = [int(v) for v in np.unique(labels) if v != 0]
    values = sorted(set(present) | {int(v) for v in names})
    if any(v <= 0 for v in values) or (labels.size and labels.min() < 0):
        raise SGPInputError("Label values must be positive (0 is background); found a value <= 0.")
    top = max(values, default=0)
    dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32
    voxels = np.ascontiguousarray(
        np.transpose(labels.astype(dtype, copy=False), (2, 1, 0))
    )  # (i, j, k)
    size_i, size_j, size_k = voxels.shape
    extent = [0, size_i - 1, 0, size_j - 1, 0, size_k - 1]
    matrix = ijk_to_lps(geometry)
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix
    reference = (
        ";".join(f"{v:.17g}" for v in ijk_to_ras.reshape(-1))
        + ";"
        + ";".join(str(e) for e in extent)
        + ";"
    )
    segments = []
    for v in values:
        color = (colors or {}).get(v)
        segments.append({
            "id": f"Segment_{v}",
            "name": str(names.get(v, f"Segment_{v}")),
            "nameAutoGenerated": False,
            "labelValue": v,
            "layer": 0,
            "color": _color01(color) if color is not None else list(DEFAULT_COLORS[(v - 1) % len(DEFAULT_COLORS)]),
            "colorAutoGenerated": color is None,
            "extent": extent,
        })  # fmt: skip
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": matrix,
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "conversionParameters": [{
            "name": "Reference image geometry",
            "value": reference,
            "description": "Image geometry description string determining the geometry of the "
                           "labelmap that is created in course of conversion.",
        }],
        "segments": segments,
    }  # fmt: skip
    return _atomic_write(path, lambda tmp: slicerio.write_segmentation(str(tmp), segmentation))


def write_volume(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> Path:
    """Write a ``(K, J, I)`` (or RGB ``(K, J, I, 3)``) array, e.g. a probability map, with SimpleITK
    (format from the extension: ``.nrrd``, ``.nii.gz``, ``.mha``, ...), compressed."""
    arr = np.asarray(array)
    img = sitk_from_array(arr, geometry, is_vector=arr.ndim == 4)
    return _atomic_write(path, lambda tmp: sitk.WriteImage(img, str(tmp), True))


def write_score_table(
    path: str | os.PathLike,
    result_scores: dict[int, np.ndarray],
    names: dict[int, str],
) -> Path:
    """Write per-slice scores as CSV: columns ``label, structure`` then the structured array's
    fields (one row per structure and slice)."""
    fields: list[str] = []
    for scores in result_scores.values():
        for name in np.asarray(scores).dtype.names or ():
            if name not in fields:
                fields.append(name)

    def _value(v):
        if isinstance(v, bytes):
            return v.decode("utf-8", "replace")
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float):
            return f"{v:.6g}"
        return v

    def writer(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            out = csv.writer(fh)
            out.writerow(["label", "structure", *fields])
            for value in sorted(result_scores):
                scores = np.asarray(result_scores[value])
                own = scores.dtype.names or ()
                for row in scores:
                    out.writerow([value, names.get(value, f"label_{value}"),
                                  *(_value(row[f]) if f in own else "" for f in fields)])  # fmt: skip

    return _atomic_write(path, writer)


# --------------------------------------------------------------------------------------------
# Support bank
# --------------------------------------------------------------------------------------------


def _find_prefixed(folder: Path, prefixes: Iterable[str]) -> Path | None:
    for prefix in prefixes:
        for candidate in sorted(folder.iterdir()):
            name = candidate.name.lower()
            if candidate.is_file() and name.startswith(prefix + ".") and not name.endswith(".json"):
                if _image_name_kind(candidate) in (".seg.nrrd", *IMAGE_EXTENSIONS):
                    return candidate
    return None


def _case_files(folder: Path) -> tuple[Path, Path] | None:
    image = _find_prefixed(folder, ("image",))
    labels = _find_prefixed(folder, ("labels", "label", "segmentation", "mask"))
    return (image, labels) if image and labels else None


def _resolve_structures(structures, names: dict[int, str]) -> list[int] | None:
    if structures is None:
        return None
    if isinstance(structures, (int, str, np.integer)):
        structures = [structures]
    by_name = {n.lower(): v for v, n in names.items()}
    out = []
    for s in structures:
        if isinstance(s, str) and not _is_int(s):
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
):
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


def support_bank_names(folder: str | os.PathLike) -> dict[int, str]:
    """Structure names of a support bank folder (its ``labels.json``, or its first case's)."""
    folder = Path(folder)
    names = read_label_names(folder)
    if names:
        return names
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        files = _case_files(sub)
        if files:
            names = read_label_names(files[1])
            if names:
                return names
    return {}


def load_support_sets(
    folder: str | os.PathLike,
    *,
    structures: Iterable[int | str] | int | str | None = None,
    intensity: str = "auto",
    axis: int = 0,
    limit: int | None = None,
) -> dict[int, list[SupportItem]]:
    """Load a support bank as support sets: ``{label value: [SupportItem, ...]}``.

    The folder holds either

    (a) labeled cases: sub-folders each with ``image.*`` + ``labels.*`` (+ ``labels.json``), or a
        single such case. Each volume gets one intensity mapping (``intensity``, see
        :func:`~SlicerSGP.data.preprocess.intensity_range`); every slice along ``axis`` that contains
        the structure is taken, plus empty slices of the same case, evenly spaced, at most as
        many as the non-empty ones; or
    (b) 2D pairs ``images/NAME.*`` + ``masks/NAME.*`` (+ ``labels.json`` in the folder); each image
        is mapped on its own; images without the structure are kept evenly spaced, at most as
        many as those with it (``axis`` does not apply).

    ``structures``: label values (or names from labels.json) to load; None = every value present.
    A requested value absent from the whole bank raises :class:`SGPInputError`. ``limit`` reads
    only the first ``limit`` cases / images (sorted by name).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SGPInputError(
            f"Support bank folder not found: {folder}. Give a folder of labeled cases."
        )
    names = support_bank_names(folder)
    wanted = _resolve_structures(structures, names)
    found: dict[int, list[SupportItem]] = {}

    images_dir, masks_dir = folder / "images", folder / "masks"
    if images_dir.is_dir() and masks_dir.is_dir():
        masks_by_stem = {}
        for m in sorted(masks_dir.iterdir()):
            if m.is_file() and _image_name_kind(m) in IMAGE_EXTENSIONS:
                masks_by_stem.setdefault(m.name[: -len(_image_name_kind(m))], m)
        pairs = []
        for im in sorted(images_dir.iterdir()):
            kind = _image_name_kind(im)
            if im.is_file() and kind in IMAGE_EXTENSIONS and im.name[: -len(kind)] in masks_by_stem:
                pairs.append((im, masks_by_stem[im.name[: -len(kind)]]))
        if not pairs:
            raise SGPInputError(
                f"No image/mask pairs in {folder}: images/NAME.png needs masks/NAME.png with the same NAME."
            )
        if limit is not None:
            pairs = pairs[: max(0, int(limit))]
        with_s: dict[int, list[SupportItem]] = {}
        without_s: dict[int, list[SupportItem]] = {}
        loaded = []
        for im_path, mask_path in pairs:
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
        for im_path, img01, lab in loaded:
            for v in values:
                mask = lab == v
                item = SupportItem(
                    image=img01, mask=mask, source=f"{folder.name}/images/{im_path.name}"
                )
                (with_s if mask.any() else without_s).setdefault(v, []).append(item)
        for v in values:
            pos = with_s.get(v, [])
            neg = without_s.get(v, [])
            keep = set(evenly_spaced(list(range(len(neg))), len(pos)))
            found[v] = pos + [item for i, item in enumerate(neg) if i in keep]
        return _collect(found, wanted, names, folder)

    single = _case_files(folder)
    cases = [(folder.name, *single)] if single else []
    if not cases:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            files = _case_files(sub)
            if files:
                cases.append((sub.name, *files))
    if not cases:
        raise SGPInputError(
            f"{folder} is not a support bank: expected sub-folders with image.* and labels.* "
            "(e.g. image.nrrd + labels.nrrd + labels.json), a single such case, or images/ + masks/ "
            "folders of 2D pairs."
        )
    if limit is not None:
        cases = cases[: max(0, int(limit))]
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
                    source=f"{case_name} axis {axis} slice {k}",
                ))  # fmt: skip
    return _collect(found, wanted, names, folder)
