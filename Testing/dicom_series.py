"""Test fixture: write a volume as a DICOM CT series (one file per slice, pydicom), the way a
scanner export or PACS download lays one out, at a given ITK geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from SlicerSGP.types import Geometry


def write_ct_series(folder: Path, volume: np.ndarray, geometry: Geometry, *,
                    description: str, series_number: int = 1,
                    study_uid: str | None = None, frame_of_reference: str | None = None) -> str:
    """Write ``volume`` (K, J, I) int16 HU as files ``<series>_<k>.dcm`` in ``folder``; slice k
    lies at origin + k * spacing_k * (third direction column). Returns the Series UID."""
    folder.mkdir(parents=True, exist_ok=True)
    direction = geometry.direction_matrix()
    row_dir, col_dir, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    assert np.allclose(np.cross(row_dir, col_dir), normal), "a DICOM series is right-handed"
    series_uid = generate_uid()
    study_uid = study_uid or generate_uid()
    frame_of_reference = frame_of_reference or generate_uid()
    si, sj, sk = geometry.spacing
    for k, plane in enumerate(np.asarray(volume, np.int16)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = "Test^Abdomen", "SGP-TEST-1"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.SeriesDescription, ds.Modality = description, "CT"
        ds.Manufacturer = "test"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in
                                   np.asarray(geometry.origin) + k * sk * normal]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{sj:.6f}", f"{si:.6f}"]  # between rows, between columns
        ds.SliceThickness = f"{sk:.6f}"
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        ds.save_as(folder / f"{series_number}_{k:03d}.dcm", enforce_file_format=True)
    return series_uid
