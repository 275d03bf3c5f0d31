"""`sgp segment` end to end: real data in, Slicer-readable segmentations out; bad input out early."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch

from SlicerSGP.cli import main
from SlicerSGP.data import io
from SlicerSGP.types import Geometry

FAST = ["--weights", "random", "--image-size", "256", "--device", "cpu", "--quiet"]
ROTATED = Geometry(origin=(10.0, -20.0, 5.0), spacing=(0.8, 0.9, 2.5),
                   direction=(0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))


def seg_geometry(seg: dict) -> np.ndarray:
    return np.asarray(seg["ijkToLPS"], dtype=float)


def read_back(path: Path) -> tuple[np.ndarray, dict[int, str], np.ndarray]:
    """Voxels (K, J, I), {labelValue: name} and the IJK-to-LPS matrix of a .seg.nrrd."""
    seg = slicerio.read_segmentation(str(path))
    names = {int(s["labelValue"]): s["name"] for s in seg["segments"]}
    voxels = np.asarray(seg["voxels"])
    # slicerio keeps NRRD axis order (I, J, K); our arrays are (K, J, I).
    return voxels.transpose(2, 1, 0), names, seg_geometry(seg)


@pytest.fixture()
def small_case(tmp_path: Path):
    """A 20-slice volume with a rotated direction, labels drawn on slices 2 and 7."""
    rng = np.random.default_rng(1)
    vol = rng.normal(0, 30, (20, 48, 64)).astype(np.float32)
    yy, xx = np.mgrid[:48, :64]
    blob = ((yy - 24) / 10) ** 2 + ((xx - 30) / 14) ** 2 < 1
    vol[:, blob] += 200
    lab = np.zeros(vol.shape, np.uint8)
    lab[2][blob] = 1
    lab[7][blob] = 1
    lab[7, 5:9, 5:9] = 2
    img_path, lab_path = tmp_path / "image.nrrd", tmp_path / "labels.nrrd"
    io.write_volume(img_path, vol, ROTATED)
    sitk.WriteImage(io.sitk_from_array(lab, ROTATED), str(lab_path))
    (tmp_path / "labels.json").write_text(json.dumps({"1": "organ", "2": "lesion"}))
    return img_path, lab_path, vol, lab


def test_segment_small_case_round_trips_geometry_and_names(small_case, tmp_path, capsys):
    img, lab_path, vol, lab = small_case
    out = tmp_path / "out" / "result.seg.nrrd"
    scores = tmp_path / "out" / "scores.csv"
    rc = main(["segment", str(img), "--labels", str(lab_path), "--out", str(out),
               "--scores", str(scores), "--pseudo-masks", str(tmp_path / "out" / "p.seg.nrrd"),
               "--overlay", str(tmp_path / "out" / "overlay.png"),
               # slices 2 and 7 hold every structure present there (support semantics)
               "--complete-slices", "2,7", *FAST])
    assert rc == 0, capsys.readouterr().err
    voxels, names, ijk_to_lps = read_back(out)
    assert names == {1: "organ", 2: "lesion"}
    assert voxels.shape == vol.shape
    assert np.allclose(ijk_to_lps, io.ijk_to_lps(ROTATED), atol=1e-6)
    for k in (2, 7):  # the drawn slices come back exactly
        assert np.array_equal(voxels[k], lab[k])
    rows = scores.read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * vol.shape[0]
    assert "least confident slices" in capsys.readouterr().out
    overlay = sitk.ReadImage(str(tmp_path / "out" / "overlay.png"))
    assert overlay.GetNumberOfComponentsPerPixel() == 3 and overlay.GetSize()[0] > 192


def test_segment_along_another_axis(small_case, tmp_path, capsys):
    img, lab_path, vol, lab = small_case
    # Draw on two sagittal (I) planes instead.
    lab_i = np.zeros_like(lab)
    lab_i[:, :, 20] = (vol[:, :, 20] > 100)
    lab_i[:, :, 40] = (vol[:, :, 40] > 100)
    lab_path_i = tmp_path / "labels_i.nrrd"
    sitk.WriteImage(io.sitk_from_array(lab_i, ROTATED), str(lab_path_i))
    out = tmp_path / "axis_i.seg.nrrd"
    rc = main(["segment", str(img), "--labels", str(lab_path_i), "--out", str(out),
               "--axis", "sagittal", *FAST])
    assert rc == 0, capsys.readouterr().err
    voxels, _, _ = read_back(out)
    assert np.array_equal(voxels[:, :, 20], lab_i[:, :, 20])
    assert np.array_equal(voxels[:, :, 40], lab_i[:, :, 40])


CASES = {
    "mri_brain_tumor": ("mri_brain_tumor/image.nrrd", "mri_brain_tumor/labels.nrrd", []),
    "ct_abdomen_small": ("ct_abdomen_small/image.nii.gz", "ct_abdomen_small/labels.nii.gz",
                         ["--label", "5", "--label", "1", "--support-slices", "4,15,26"]),
    "ct_lesions": ("ct_lesions/CT_Lesion_000001_02_01_008-023/image.nrrd",
                   "ct_lesions/CT_Lesion_000001_02_01_008-023/labels.nrrd", []),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_segment_real_volumes(case, sgp_data, tmp_path, capsys):
    image_rel, labels_rel, extra = CASES[case]
    image, labels = sgp_data / image_rel, sgp_data / labels_rel
    out = tmp_path / f"{case}.seg.nrrd"
    rc = main(["segment", str(image), "--labels", str(labels), "--out", str(out), *extra, *FAST])
    assert rc == 0, capsys.readouterr().err
    ref = sitk.ReadImage(str(image))
    voxels, names, ijk_to_lps = read_back(out)
    assert voxels.shape == sitk.GetArrayFromImage(ref).shape[:3]
    assert np.allclose(ijk_to_lps, io.ijk_to_lps(io.geometry_from_sitk(ref)), atol=1e-4)
    expected_names = io.read_label_names(labels)
    drawn = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(labels))))
    wanted = [int(v) for v in extra[1:4:2]] if extra else sorted(set(drawn.tolist()) - {0})
    assert names == {v: expected_names[v] for v in wanted}


@pytest.mark.slow
def test_segment_2d_image_from_a_support_bank(sgp_data, tmp_path, capsys):
    wbc = sgp_data / "wbc"
    bank = tmp_path / "bank"
    (bank / "images").mkdir(parents=True)
    (bank / "masks").mkdir()
    for name in ("002.png", "003.png", "004.png"):
        shutil.copy(wbc / "images" / name, bank / "images" / name)
        shutil.copy(wbc / "masks" / name, bank / "masks" / name)
    shutil.copy(wbc / "labels.json", bank / "labels.json")
    out = tmp_path / "wbc.seg.nrrd"
    rc = main(["segment", str(wbc / "images" / "001.png"), "--support-bank", str(bank),
               "--label", "2", "--out", str(out), *FAST])
    assert rc == 0, capsys.readouterr().err
    voxels, names, _ = read_back(out)
    assert voxels.shape == (1, 300, 300)
    assert names == {2: json.loads((wbc / "labels.json").read_text())["2"]}


# ----------------------------------------------------------------------------- bad input

def run_bad(args: list[str], capsys, out: Path, code: int = 2) -> str:
    rc = main(["segment", *args, "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.startswith("error: ")
    assert not out.exists(), "a failed run must write nothing"
    assert not list(out.parent.glob("*.seg.nrrd"))
    return err


def test_no_labeled_slice(small_case, tmp_path, capsys):
    img, _, vol, _ = small_case
    empty = tmp_path / "empty.nrrd"
    sitk.WriteImage(io.sitk_from_array(np.zeros(vol.shape, np.uint8), ROTATED), str(empty))
    err = run_bad([str(img), "--labels", str(empty)], capsys, tmp_path / "o" / "x.seg.nrrd")
    assert "no structure" in err and "draw" in err


def test_support_mask_of_the_wrong_shape(small_case, tmp_path, capsys):
    img, _, vol, _ = small_case
    wrong = tmp_path / "wrong.nrrd"
    sitk.WriteImage(io.sitk_from_array(np.ones((10, 40, 64), np.uint8), ROTATED), str(wrong))
    err = run_bad([str(img), "--labels", str(wrong)], capsys, tmp_path / "o" / "x.seg.nrrd")
    assert "resample" in err.lower()


def test_label_value_absent(small_case, tmp_path, capsys):
    img, lab_path, _, _ = small_case
    err = run_bad([str(img), "--labels", str(lab_path), "--label", "9"], capsys,
                  tmp_path / "o" / "x.seg.nrrd")
    assert "[9]" in err and "absent" in err


def test_4d_input(small_case, tmp_path, capsys):
    img, lab_path, vol, _ = small_case
    four = tmp_path / "four.nrrd"
    series = sitk.JoinSeries([sitk.GetImageFromArray(vol), sitk.GetImageFromArray(vol)])
    sitk.WriteImage(series, str(four))
    err = run_bad([str(four), "--labels", str(lab_path)], capsys, tmp_path / "o" / "x.seg.nrrd")
    assert "4D" in err


def test_nan_voxels(small_case, tmp_path, capsys):
    _, lab_path, vol, _ = small_case
    bad = vol.copy()
    bad[3, 4, 5] = np.nan
    path = tmp_path / "nan.nrrd"
    io.write_volume(path, bad, ROTATED)
    err = run_bad([str(path), "--labels", str(lab_path)], capsys, tmp_path / "o" / "x.seg.nrrd")
    assert "NaN" in err


def test_volume_smaller_than_the_model_takes(tmp_path, capsys):
    vol = np.zeros((4, 8, 8), np.float32)
    lab = np.zeros((4, 8, 8), np.uint8)
    lab[1, 2:5, 2:5] = 1
    img, lab_path = tmp_path / "tiny.nrrd", tmp_path / "tiny_labels.nrrd"
    io.write_volume(img, vol, Geometry())
    sitk.WriteImage(io.sitk_from_array(lab, Geometry()), str(lab_path))
    err = run_bad([str(img), "--labels", str(lab_path)], capsys, tmp_path / "o" / "x.seg.nrrd")
    assert "8" in err and "16" in err


def test_truncated_checkpoint(small_case, tmp_path, capsys, monkeypatch):
    img, lab_path, _, _ = small_case
    monkeypatch.setenv("SGP_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "sam2.1_hiera_tiny.pt").write_bytes(b"\0" * 1000)
    out = tmp_path / "o" / "x.seg.nrrd"
    rc = main(["segment", str(img), "--labels", str(lab_path), "--out", str(out),
               "--weights", "tiny", "--image-size", "256", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "156" in err and "fetch" in err, err
    assert not out.exists()


def test_wrong_checkpoint_file(small_case, tmp_path, capsys):
    img, lab_path, _, _ = small_case
    wrong = tmp_path / "other.pt"
    torch.save({"model": {"not_sam2.weight": torch.zeros(2)}}, wrong)
    out = tmp_path / "o" / "x.seg.nrrd"
    rc = main(["segment", str(img), "--labels", str(lab_path), "--out", str(out),
               "--weights", str(wrong), "--image-size", "256", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "does not fit" in err, err
    assert not out.exists()


def test_unknown_model_name(small_case, tmp_path, capsys):
    img, lab_path, _, _ = small_case
    err = run_bad([str(img), "--labels", str(lab_path), "--model", "huge"], capsys,
                  tmp_path / "o" / "x.seg.nrrd")
    assert "tiny" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(small_case, tmp_path, capsys):
    img, lab_path, _, _ = small_case
    out = tmp_path / "o" / "x.seg.nrrd"
    rc = main(["segment", str(img), "--labels", str(lab_path), "--out", str(out),
               "--weights", "random", "--device", "cuda", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "--device cpu" in err, err
    assert not out.exists()
