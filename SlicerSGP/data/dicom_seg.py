"""Writing a result as a DICOM Segmentation object (highdicom) that references the DICOM series it
was computed from: one segment per structure, with its name and colour, frames on the source
images' planes (so a PACS viewer shows it over them). Binary segmentation, empty frames left
out; structures are numbered 1..n in label-value order (DICOM wants consecutive segment numbers),
and each keeps its name and colour.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from SlicerSGP import __version__
from SlicerSGP.data.dicom import DicomSeries
from SlicerSGP.data.label_names import DEFAULT_COLORS, color01
from SlicerSGP.data.writers import atomic_write
from SlicerSGP.errors import SGPInputError

INSTALL = 'pip install "highdicom>=0.25" "pydicom>=3.0"'


def _libraries() -> tuple[Any, Any]:
    try:
        import highdicom
        import pydicom
    except ImportError as e:
        raise SGPInputError(f"Writing a DICOM Segmentation (.dcm) needs highdicom and pydicom "
                            f"({e}). Install them ({INSTALL}), or write --out NAME.seg.nrrd."
                            ) from None
    return highdicom, pydicom


def segment_numbers(label_map: np.ndarray, names: dict[int, str]) -> dict[int, int]:
    """Label value -> DICOM segment number (1..n in value order), for every named value and
    every value present."""
    present = {int(v) for v in np.unique(label_map) if v != 0}
    return {v: i for i, v in enumerate(sorted(present | {int(v) for v in names}), 1)}


def write_dicom_seg(path: str | os.PathLike, label_map: np.ndarray, source: DicomSeries,
                    names: dict[int, str], colors: dict[int, Any] | None = None, *,
                    description: str = "SlicerSGP segmentation") -> Path:
    """Write a ``(K, J, I)`` label map on ``source``'s grid (slice ``k`` = ``source``'s k-th
    file) as a DICOM Segmentation at ``path``, all or nothing."""
    hd, pydicom = _libraries()
    from pydicom.sr.codedict import codes

    images = [pydicom.dcmread(f) for f in source.series.files]
    labels = np.asarray(label_map)
    expected = (len(images), int(images[0].Rows), int(images[0].Columns))
    if labels.shape != expected:
        raise SGPInputError(f"The segmentation ({labels.shape}) is not on the grid of DICOM "
                            f"series {source.series.uid} ({expected}, slices x rows x columns).")
    if labels.size and labels.min() < 0:
        raise SGPInputError("Label values must be positive (0 is background).")
    numbers = segment_numbers(labels, names)
    if not numbers:
        raise SGPInputError("The segmentation is empty and names no structure: a DICOM "
                            "Segmentation needs at least one segment.")
    dtype = np.uint8 if len(numbers) <= 255 else np.uint16
    relabeled = np.zeros(labels.shape, dtype)
    for value, number in numbers.items():
        relabeled[labels == value] = number
    colors = {int(v): c for v, c in (colors or {}).items()}
    algorithm = hd.AlgorithmIdentificationSequence(
        name="SlicerSGP (SAM2-SGP)", version=__version__,
        family=codes.cid7162.ArtificialIntelligence)
    segments = []
    for value, number in numbers.items():
        rgb = color01(colors[value], f"colour of label {value}") if value in colors else \
            DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)]
        segments.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(names.get(value, f"Segment_{value}"))[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(
                *(int(round(float(c) * 255)) for c in rgb[:3]))))
    series_number = int(getattr(images[0], "SeriesNumber", 0) or 0) + 1000
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=relabeled,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(),
        series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="SlicerSGP", manufacturer_model_name="SAM2-SGP",
        software_versions=__version__, device_serial_number="none",
        content_description=description[:64], content_label="SGP",
        series_description=description[:64])
    return atomic_write(path, lambda tmp: seg.save_as(str(tmp)))
