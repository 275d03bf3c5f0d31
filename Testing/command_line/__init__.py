"""Tests of the sgp commands on real files: segment, segment-batch, eval, DICOM in and out."""
