"""DICOM in, DICOM SEG out, with real data: a crop of the shared abdominal CT written as a DICOM
series (pydicom, oblique in-plane orientation), segmented by `sgp segment` from the series
folder, written as a DICOM Segmentation (highdicom) and read back with highdicom: the same
voxels, placed at the same points in space, as the .seg.nrrd of the same run, with the segment
names and colours, referencing every source image. A folder of two series asks for --series."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("highdicom")
import highdicom as hd  # noqa: E402
import slicerio  # noqa: E402
from dicom_series import write_ct_series  # noqa: E402
from pydicom import dcmread  # noqa: E402

from SlicerSGP.cli import main  # noqa: E402
from SlicerSGP.data import io  # noqa: E402
from SlicerSGP.data.datasets import load_dataset  # noqa: E402
from SlicerSGP.data.geometry import ijk_to_lps  # noqa: E402
from SlicerSGP.data.label_names import DEFAULT_COLORS  # noqa: E402
from SlicerSGP.types import Geometry  # noqa: E402

FAST = ["--model", "tiny", "--weights", "random", "--image-size", "256", "--device", "cpu",
        "--seed", "0", "--quiet"]
CROP = (slice(10, 14), slice(20, 68), slice(30, 94))  # 4 slices of 48 rows x 64 columns
STRUCTURES = {5: "liver", 6: "stomach"}
DRAWN = (0, 3)


@pytest.fixture(scope="module")
def case(sgp_data, tmp_path_factory):
    """(series folder, series UID, drawn label map file, the crop, its geometry)."""
    folder = tmp_path_factory.mktemp("dicom")
    volume, geometry = io.read_image(sgp_data / "ct_abdomen_small" / "image.nii.gz")
    labels, _, _ = io.read_labels(sgp_data / "ct_abdomen_small" / "labels.nii.gz")
    crop, truth = volume[CROP], labels[CROP]
    c, s = math.cos(0.5), math.sin(0.5)  # rows and columns turned in the patient's plane
    oblique = Geometry(origin=(10.0, -20.0, 30.0), spacing=geometry.spacing,
                       direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    uid = write_ct_series(folder / "series", crop, oblique, description="abdomen crop")
    drawn = np.zeros_like(truth, dtype=np.uint8)
    for k in DRAWN:
        for v in STRUCTURES:
            drawn[k][truth[k] == v] = v
    assert all((drawn == v).any() for v in STRUCTURES)
    io.write_volume(folder / "labels.nii.gz", drawn, oblique)
    (folder / "labels.json").write_text(json.dumps({str(k): n for k, n in STRUCTURES.items()}))
    return folder / "series", uid, folder / "labels.nii.gz", crop, oblique


def same_geometry(a: Geometry, b: Geometry) -> bool:
    return np.allclose(ijk_to_lps(a), ijk_to_lps(b), atol=1e-4)


def test_a_dicom_folder_is_read_as_its_volume_and_geometry(case):
    series, _, _, crop, geometry = case
    array, read = io.read_image(series)
    assert array.dtype == crop.dtype and np.array_equal(array, crop)
    assert same_geometry(read, geometry), read


def on_our_grid(volume: hd.Volume, geometry: Geometry, shape: tuple[int, ...]) -> np.ndarray:
    """highdicom's volume resampled by index onto our (K, J, I) grid: the map between the two
    index spaces must be a signed permutation with integer offsets (the same voxels, the same
    places); anything else fails here."""
    to_ours = np.linalg.inv(ijk_to_lps(geometry)) @ volume.affine  # theirs -> our (i, j, k)
    assert np.allclose(to_ours, np.round(to_ours), atol=1e-3), to_ours
    to_ours = np.round(to_ours).astype(int)
    theirs = np.indices(volume.array.shape).reshape(3, -1)
    ijk = to_ours[:3, :3] @ theirs + to_ours[:3, 3:4]
    out = np.full(shape, -1, dtype=np.int64)
    out[ijk[2], ijk[1], ijk[0]] = volume.array.reshape(-1)
    assert (out >= 0).all(), "highdicom's volume does not cover the grid"
    return out


def test_dicom_seg_equals_the_seg_nrrd_result(case, tmp_path, capsys):
    series, uid, labels, crop, geometry = case
    seg_nrrd, seg_dcm = tmp_path / "r.seg.nrrd", tmp_path / "r.dcm"
    for out in (seg_nrrd, seg_dcm):
        assert main(["segment", str(series), "--labels", str(labels), "--out", str(out),
                     *FAST]) == 0, capsys.readouterr().err
    expected, expected_geometry, names = io.read_labels(seg_nrrd)
    assert names == STRUCTURES and same_geometry(expected_geometry, geometry)
    seg = hd.seg.segread(seg_dcm)
    numbers = {seg.get_segment_description(n).segment_label: n
               for n in seg.get_segment_numbers()}
    assert sorted(numbers) == sorted(STRUCTURES.values())
    nrrd_colors = {s["name"]: s["color"] for s in
                   slicerio.read_segmentation(str(seg_nrrd), skip_voxels=True)["segments"]}
    for value, name in STRUCTURES.items():
        description = seg.get_segment_description(numbers[name])
        rgb = hd.color.CIELabColor.from_dicom_value(
            description.RecommendedDisplayCIELabValue).to_rgb()
        want = DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)]
        assert np.allclose(np.array(rgb) / 255, want, atol=0.01), (name, rgb)
        assert np.allclose(nrrd_colors[name], want, atol=0.01)
        volume = seg.get_volume(segment_numbers=[numbers[name]], combine_segments=True,
                                relabel=True)
        mask = on_our_grid(volume, geometry, crop.shape)
        assert np.array_equal(mask == 1, expected == value), name
        assert (expected == value).any()
    # It references every image of the source series, and carries its patient and study.
    files = sorted(series.iterdir())
    sources = {dcmread(f).SOPInstanceUID for f in files}
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == uid
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == sources
    first = dcmread(files[0])
    assert (seg.PatientID, seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (
        first.PatientID, first.StudyInstanceUID, first.FrameOfReferenceUID)


def test_a_folder_with_two_series_asks_for_one(case, tmp_path, capsys):
    series, uid, labels, crop, geometry = case
    both = tmp_path / "study"
    both.mkdir()
    for f in series.iterdir():
        (both / f.name).write_bytes(f.read_bytes())
    other = write_ct_series(both, crop[:, ::-1].copy(), geometry, description="second series",
                            series_number=2)
    rc = main(["segment", str(both), "--labels", str(labels), "--out",
               str(tmp_path / "r.seg.nrrd"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "holds 2 series" in err and "--series UID" in err, err
    assert f"{uid}  CT 'abdomen crop', 4 files" in err and f"{other}  CT 'second series'" in err
    assert not (tmp_path / "r.seg.nrrd").exists()
    array, _ = io.read_image(both, series=other)
    assert np.array_equal(array, crop[:, ::-1])
    with pytest.raises(Exception, match="is not a series of the DICOM folder"):
        io.read_image(both, series="1.2.3")


def test_a_dcm_output_needs_a_dicom_input(case, tmp_path, capsys, sgp_data):
    image = sgp_data / "ct_abdomen_small" / "image.nii.gz"
    rc = main(["segment", str(image), "--labels", str(sgp_data / "ct_abdomen_small" /
                                                       "labels.nii.gz"),
               "--out", str(tmp_path / "r.dcm"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "is not a DICOM series folder" in err and ".seg.nrrd" in err, err
    rc = main(["segment", str(image), "--series", "1.2.3", "--labels", "x",
               "--out", str(tmp_path / "r.seg.nrrd"), *FAST])
    assert rc == 2 and "leave --series out" in capsys.readouterr().err


def test_eval_reads_a_case_whose_image_is_a_dicom_folder(case, tmp_path):
    series, _, labels, crop, geometry = case
    folder = tmp_path / "cases" / "ct1"
    (folder / "image").mkdir(parents=True)
    for f in series.iterdir():
        (folder / "image" / f.name).write_bytes(f.read_bytes())
    (folder / "labels.nii.gz").write_bytes(labels.read_bytes())
    (case_,) = load_dataset(tmp_path / "cases", keep_raw=True)
    assert case_.name == "ct1" and np.array_equal(case_.image, crop)
    assert same_geometry(case_.geometry, geometry) and case_.values() == sorted(STRUCTURES)


def test_a_named_structure_found_nowhere_is_an_empty_segment(case, tmp_path):
    """Every structure asked for is a segment, even one the result holds nowhere (as in the
    .seg.nrrd); segment numbers run 1..n in label-value order whatever the values."""
    from SlicerSGP.data.dicom_seg import write_dicom_seg
    from SlicerSGP.data.readers import read_image_source

    series = case[0]
    volume, _, source = read_image_source(series)
    labels = np.zeros(volume.shape, np.uint16)
    labels[1, 5:20, 7:30] = 300
    write_dicom_seg(tmp_path / "r.dcm", labels, source, {7: "absent", 300: "found"})
    seg = hd.seg.segread(tmp_path / "r.dcm")
    assert [seg.get_segment_description(n).segment_label
            for n in seg.get_segment_numbers()] == ["absent", "found"]
    found = seg.get_volume(segment_numbers=[2], combine_segments=True, relabel=True)
    assert int(found.array.sum()) == int((labels == 300).sum())
    assert not seg.get_volume(segment_numbers=[1], combine_segments=True).array.any()
