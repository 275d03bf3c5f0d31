"""DICOM series as images: a folder of DICOM files is read with SimpleITK's series reader
(GDCM), one series at a time.

A folder holding one series is that image. A folder holding several (e.g. a study exported from
PACS) is refused with the list of its series (UID, description, number of files), and the one
wanted is named by its Series Instance UID (``--series UID``). The files of the series read are
kept in slice order (:class:`DicomSeries`), so that a DICOM Segmentation written for the result
(dicom_seg.py) references exactly the images it was computed from: slice ``k`` of the array is
``files[k]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SlicerSGP.data.geometry import geometry_from_sitk
from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import Geometry

SERIES_DESCRIPTION = "0008|103e"
MODALITY = "0008|0060"


@dataclass(frozen=True)
class SeriesInfo:
    uid: str
    description: str
    modality: str
    files: tuple[str, ...]
    """The series' files in slice order (SimpleITK's, along the slice normal)."""

    def line(self) -> str:
        what = " ".join(x for x in (self.modality, repr(self.description) if self.description
                                    else "(no description)") if x)
        return f"  {self.uid}  {what}, {len(self.files)} files"


@dataclass(frozen=True)
class DicomSeries:
    """What a DICOM image was read from: its folder and series."""

    folder: Path
    series: SeriesInfo


def _tag(path: str, tag: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """The DICOM series of ``folder`` (its files, not its sub-folders), by UID."""
    folder = str(folder)
    found = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        if files:
            found.append(SeriesInfo(uid, _tag(files[0], SERIES_DESCRIPTION),
                                    _tag(files[0], MODALITY), files))
    return sorted(found, key=lambda s: s.uid)


def is_dicom_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def pick_series(folder: Path, series: str | None) -> SeriesInfo:
    """The series of ``folder`` named ``series`` (its UID), or its only series."""
    found = list_series(folder)
    if not found:
        raise SGPInputError(
            f"{folder} is a folder without DICOM series; give the path of an image file, or of "
            "a folder of DICOM files (one series, or several and --series UID).")
    listing = "\n".join(s.line() for s in found)
    if series is None:
        if len(found) == 1:
            return found[0]
        raise SGPInputError(
            f"The DICOM folder {folder} holds {len(found)} series:\n{listing}\nName the one to "
            "segment with --series UID (sgp segment), or keep only that series in the folder "
            "(a case of sgp eval data).")
    chosen = [s for s in found if s.uid == series.strip()]
    if not chosen:
        raise SGPInputError(f"--series {series} is not a series of the DICOM folder {folder}, "
                            f"which holds:\n{listing}")
    return chosen[0]


def read_dicom_series(folder: str | Path, series: str | None = None,
                      ) -> tuple[np.ndarray, Geometry, DicomSeries]:
    """``(array (K, J, I), geometry (LPS), source)`` of one series of a DICOM folder."""
    folder = Path(folder)
    info = pick_series(folder, series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(info.files))
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise SGPInputError(f"Cannot read DICOM series {info.uid} of {folder} "
                            f"({lines[-1] if lines else 'unreadable'}).") from exc
    if img.GetDimension() not in (2, 3) or img.GetNumberOfComponentsPerPixel() not in (1, 3):
        raise SGPInputError(
            f"DICOM series {info.uid} of {folder} is not a 2D/3D scalar or RGB image "
            f"({img.GetDimension()}D, {img.GetNumberOfComponentsPerPixel()} components).")
    array = sitk.GetArrayFromImage(img)
    if img.GetDimension() == 2:  # one file: a one-slice volume, as for any 2D image
        array = array[np.newaxis]
    return array, geometry_from_sitk(img), DicomSeries(folder, info)
