"""Reading images and label maps (NIfTI, NRRD, MetaImage, PNG/JPG/BMP/TIFF, Slicer .seg.nrrd;
an image may also be a folder holding a DICOM series, see dicom.py).

Arrays are in ``(K, J, I)`` order (``(K, J, I, 3)`` for RGB), as SimpleITK's
``GetArrayFromImage`` gives them; :class:`~SlicerSGP.types.Geometry` follows ITK (LPS).
2D images become one-slice volumes ``(1, H, W[, 3])`` with a z spacing of 1.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicerio

from SlicerSGP.data.dicom import DicomSeries, read_dicom_series
from SlicerSGP.data.files import SEGMENTATION_EXTENSION, file_kind
from SlicerSGP.data.geometry import (
    format_numbers,
    geometry_from_ijk_to_lps,
    geometry_from_sitk,
    geometry_mismatch,
)
from SlicerSGP.data.label_names import read_label_names, seg_nrrd_label_values
from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import Geometry


def _read_sitk(path: Path, what: str) -> sitk.Image:
    if not path.exists():
        raise SGPInputError(
            f"{what} file not found: {path}. Check the path (and the working folder)."
        )
    if path.is_dir():
        dicom = " or of a folder of DICOM files" if what == "Image" else ""
        raise SGPInputError(f"{what} path {path} is a folder; give the path of an image "
                            f"file{dicom}.")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[-1] if first else ""
        raise SGPInputError(
            f"Cannot read {what.lower()} file {path} ({detail}). Supported formats: NIfTI "
            "(.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), PNG, JPG, BMP, TIFF."
        ) from exc


def read_image(path: str | os.PathLike, series: str | None = None,
               ) -> tuple[np.ndarray, Geometry]:
    """Read an image: ``(array, geometry)``, array ``(K, J, I)`` or ``(K, J, I, 3)`` (RGB).

    2D images come back as ``(1, H, W)`` / ``(1, H, W, 3)`` with z spacing 1. 4D images and
    vector images with other than 1 or 3 components are rejected. A folder is read as a DICOM
    series (``series``: its Series Instance UID, needed when the folder holds several).
    """
    array, geometry, _ = read_image_source(path, series)
    return array, geometry


def read_image_source(path: str | os.PathLike, series: str | None = None,
                      ) -> tuple[np.ndarray, Geometry, DicomSeries | None]:
    """:func:`read_image`, and the DICOM series it came from (None for an image file)."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, series)
    if series is not None:
        raise SGPInputError(f"--series names a series of a DICOM folder, but {path} is a file; "
                            "leave --series out, or give the folder of the DICOM series.")
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
    return array, geometry, None


def _label_dtype(top: int) -> type:
    return np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32


def _read_seg_nrrd(path: Path) -> tuple[np.ndarray, Geometry, dict[int, str]]:
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
    # One layer with distinct label values keeps them; otherwise (several layers: overlapping
    # segments, or repeated values) segments are numbered 1..n in file order, the later
    # segment winning where they overlap. label_names reads the header the same way.
    values = seg_nrrd_label_values(segments, layers.shape[0])
    labels = np.zeros(layers.shape[1:], dtype=_label_dtype(max(values, default=0)))
    names: dict[int, str] = {}
    for value, s in zip(values, segments, strict=True):
        layer = int(s.get("layer", 0))
        if layer >= layers.shape[0]:
            raise SGPInputError(
                f"Segment {s.get('name')!r} in {path} refers to missing layer {layer}."
            )
        labels[layers[layer] == int(s.get("labelValue", 1))] = value
        names[value] = str(s.get("name", f"Segment_{value}"))
    return labels, geometry, dict(sorted(names.items()))


def _mismatch_message(
    path: Path,
    problem: str,
    labels: np.ndarray,
    geometry: Geometry,
    reference_geometry: Geometry | None,
    reference_shape: tuple[int, ...] | None,
) -> str:
    ref = reference_geometry or Geometry()
    ref_size = format_numbers(tuple(reference_shape)[:3]) if reference_shape is not None else "?"
    return (
        f"The label map {path} does not match the image: {problem}. Label map: size "
        f"{format_numbers(labels.shape)}, origin {format_numbers(geometry.origin, 4)}, spacing "
        f"{format_numbers(geometry.spacing, 4)}; image: size {ref_size}, origin "
        f"{format_numbers(ref.origin, 4)}, spacing {format_numbers(ref.spacing, 4)}. "
        "Resample the label map onto the image first (e.g. in Slicer: Resample Image "
        "(BRAINS) with the image as reference and nearest-neighbour interpolation, or "
        "Segmentations > Export to labelmap with the image as reference volume)."
    )


def read_labels(
    path: str | os.PathLike,
    reference_geometry: Geometry | None = None,
    *,
    reference_shape: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, Geometry, dict[int, str]]:
    """Read a label map: ``(labels, geometry, names)``.

    ``labels`` is an integer ``(K, J, I)`` array (2D masks: ``(1, H, W)``); ``names`` maps label
    value -> structure name. NIfTI/NRRD/MHA/PNG label maps take their names from a description
    file beside them (``<stem>.json``, ``labels.json``, an ITK-SNAP ``.label``, ...: see
    :mod:`SlicerSGP.data.label_names`); values without a name get ``label_<v>``. A Slicer
    ``.seg.nrrd`` carries its segment names and label values (overlapping segments in several
    layers are renumbered 1..n in file order).

    With ``reference_geometry`` (and ``reference_shape``, the image's ``(K, J, I)`` shape) the
    label map must lie on the image's voxel grid, else :class:`SGPInputError`.
    """
    path = Path(path)
    if file_kind(path) == SEGMENTATION_EXTENSION:
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
            problem = (
                f"size {format_numbers(labels.shape)} vs image "
                f"{format_numbers(tuple(reference_shape)[:3])} (K, J, I)"
            )
        elif reference_geometry is not None:
            problem = geometry_mismatch(geometry, reference_geometry)
        if problem is not None:
            raise SGPInputError(
                _mismatch_message(
                    path, problem, labels, geometry, reference_geometry, reference_shape
                )
            )
    return labels, geometry, names
