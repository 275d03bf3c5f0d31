"""Preprocessing and I/O: orientation, letterbox, intensity, validation, files, support banks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
import torch.nn.functional as F

from SlicerSGP.data import io as sgp_io
from SlicerSGP.data.preprocess import (
    CT_PRESETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LetterboxTransform,
    intensity_range,
    normalize_intensity,
    reorient,
    restore_orientation,
    to_model_input,
    validate_volume,
)
from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import Geometry, SupportItem


def _rotated_geometry() -> Geometry:
    a, b = np.deg2rad(30.0), np.deg2rad(-20.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    d = rz @ rx
    return Geometry(
        origin=(-12.5, 33.25, 101.0), spacing=(0.7, 1.3, 2.5), direction=tuple(d.reshape(-1))
    )


def _blob(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A random smooth binary blob (a few overlapping ellipses)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    mask = np.zeros((h, w), bool)
    for _ in range(4):
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        ry, rx = rng.uniform(0.08, 0.25) * h, rng.uniform(0.08, 0.25) * w
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return mask


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels within 1 pixel (8-neighbourhood) of the mask's boundary."""
    p = np.pad(mask, 1, mode="edge")
    h, w = mask.shape
    shifted = [
        p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    ]
    return np.any([s != mask for s in shifted], axis=0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ---------------------------------------------------------------------------------------------
# Orientation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("rgb", [False, True])
def test_reorient_round_trip(axis, rgb):
    rng = np.random.default_rng(axis)
    shape = (5, 7, 9, 3) if rgb else (5, 7, 9)
    vol = rng.normal(size=shape).astype(np.float32)
    moved = reorient(vol, axis)
    assert moved.shape[0] == shape[axis]
    assert moved.shape[1:3] == tuple(s for i, s in enumerate(shape[:3]) if i != axis)
    if rgb:
        assert moved.shape[-1] == 3
    # slice k along `axis` is moved[k]
    assert np.array_equal(moved[2], np.take(vol, 2, axis=axis))
    back = restore_orientation(np.ascontiguousarray(moved), axis)
    assert back.shape == vol.shape
    assert np.array_equal(back, vol)
    # torch tensors too
    t = torch.from_numpy(vol)
    assert torch.equal(restore_orientation(reorient(t, axis).contiguous(), axis), t)


def test_reorient_rejects_bad_axis():
    with pytest.raises(SGPInputError, match="axis"):
        reorient(np.zeros((4, 4, 4)), 3)


# ---------------------------------------------------------------------------------------------
# Letterbox
# ---------------------------------------------------------------------------------------------


def test_letterbox_geometry():
    t = LetterboxTransform(300, 200, 1024)
    assert (t.resized_h, t.resized_w) == (1024, 683)
    t = LetterboxTransform(200, 300, 256)
    assert (t.resized_h, t.resized_w) == (171, 256)


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_letterbox_mask_round_trip(shape):
    h, w = shape
    mask = _blob(h, w, seed=h)
    t = LetterboxTransform(h, w, 1024)
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    model = t.mask_to_model(m)
    assert model.shape == (1, 1, 1024, 1024)
    assert set(torch.unique(model).tolist()) <= {0.0, 1.0}
    # the padding is background
    assert model[..., t.resized_h :, :].sum() == 0 and model[..., :, t.resized_w :].sum() == 0

    for s in (1024, 256):  # full-resolution and SAM2's low-resolution logits
        model_s = (
            model
            if s == 1024
            else F.interpolate(model, size=(s, s), mode="bilinear", antialias=True)
        )
        logits = model_s * 20.0 - 10.0
        back = t.logits_to_image(logits)
        assert back.shape == (1, 1, h, w)
        rec = (back[0, 0] > 0).numpy()
        iou = _iou(rec, mask)
        assert iou >= 0.99, (s, iou)
        # every disagreement lies within 1 pixel of the mask's border
        assert not np.any((rec != mask) & ~_boundary(mask)), s


def test_letterbox_identity_is_bit_exact():
    size = 64
    mask = _blob(size, size, seed=3)
    t = LetterboxTransform(size, size, size)
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    assert torch.equal(t.mask_to_model(m), m)
    logits = torch.randn(2, 1, size, size)
    assert torch.equal(t.logits_to_image(logits), logits)
    img = torch.randn(2, 3, size, size)
    assert torch.equal(t.image_to_model(img), img)


def test_logits_to_image_fractional_region_is_exact_for_linear_ramps():
    # A ramp that is linear in model-space x must come back linear in image x, sampled at the
    # exact original pixel centres: value(x) = (x + 0.5) * resized_w / W in model-pixel units.
    t = LetterboxTransform(30, 20, 64)  # resized 64 x 43 (fractional at s=32: 21.5 px)
    s = 32
    ramp = (torch.arange(s, dtype=torch.float64) + 0.5) * (64 / s)  # model-pixel centre coords
    logits = ramp.view(1, 1, 1, s).expand(1, 1, s, s).clone()
    back = t.logits_to_image(logits)[0, 0]
    expected = (torch.arange(20, dtype=torch.float64) + 0.5) * t.resized_w / 20
    assert torch.allclose(back[5], expected, atol=1e-9)


def test_to_model_input_normalises_then_pads_with_mean():
    t = LetterboxTransform(40, 20, 64)
    gray = np.full((2, 40, 20), 0.5, np.float32)
    x = to_model_input(gray, t)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    for c in range(3):
        expected = (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(
            x[:, c, : t.resized_h, : t.resized_w], torch.tensor(expected), atol=1e-5
        )
    assert torch.all(x[..., :, t.resized_w :] == 0)
    rgb = np.random.default_rng(0).random((1, 40, 20, 3)).astype(np.float32)
    y = to_model_input(rgb, t)
    assert y.shape == (1, 3, 64, 64)
    with pytest.raises(SGPInputError):
        to_model_input(np.zeros((2, 40, 20, 4)), t)


# ---------------------------------------------------------------------------------------------
# Intensity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(CT_PRESETS))
def test_ct_presets_map_window_ends(preset):
    center, width = CT_PRESETS[preset]
    vol = np.array(
        [center - width / 2, center, center + width / 2, -3000, 3000], np.float32
    ).reshape(1, 1, 5)
    out = normalize_intensity(vol, *intensity_range(vol, preset))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0.0, 0.5, 1.0, 0.0, 1.0], atol=1e-6)


def test_auto_mode_choices():
    assert intensity_range(np.zeros((2, 4, 4), np.uint8) + 7, "auto") == (0.0, 255.0)
    rgb = np.random.default_rng(0).integers(0, 4000, (1, 4, 4, 3)).astype(np.uint16)
    assert intensity_range(rgb, "auto") == (0.0, 255.0)
    ct = np.random.default_rng(0).integers(-1024, 1500, (3, 8, 8)).astype(np.int16)
    assert intensity_range(ct, "auto") == (40 - 200, 40 + 200)
    mr = np.random.default_rng(0).gamma(2.0, 100.0, (3, 8, 8))
    assert intensity_range(mr, "auto") == pytest.approx(tuple(np.percentile(mr, [0.5, 99.5])))
    assert intensity_range(mr, "none") == (mr.min(), mr.max())
    with pytest.raises(SGPInputError, match="ct_lung"):
        intensity_range(mr, "ct_liver")


def test_percentile_mapping_is_per_volume():
    rng = np.random.default_rng(1)
    vol = np.stack([rng.normal(100, 10, (32, 32)), rng.normal(300, 10, (32, 32))]).astype(
        np.float32
    )
    lo, hi = intensity_range(vol, "percentile")
    assert (lo, hi) == pytest.approx(tuple(np.percentile(vol, [0.5, 99.5])))
    out = normalize_intensity(vol, lo, hi)
    assert out.min() >= 0 and out.max() <= 1
    # the brighter slice keeps its relative brightness (a per-slice mapping would equalise them)
    assert out[1].mean() > out[0].mean() + 0.5


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def test_validate_volume_accepts_scalar_and_rgb():
    validate_volume(np.zeros((3, 32, 32), np.int16))
    validate_volume(np.zeros((3, 32, 32, 3), np.uint8))
    validate_volume(np.zeros((3, 32, 16)), axis=0)


def test_validate_volume_errors_say_the_problem():
    with pytest.raises(SGPInputError, match=r"4D input \(shape \(2, 8, 32, 32\)\).*time point"):
        validate_volume(np.zeros((2, 8, 32, 32)))
    with pytest.raises(SGPInputError, match="alpha"):
        validate_volume(np.zeros((8, 32, 32, 4)))
    with pytest.raises(SGPInputError, match="not supported"):
        validate_volume(np.zeros((1, 2, 8, 32, 32)))
    with pytest.raises(SGPInputError, match="3D"):
        validate_volume(np.zeros((32, 32)))
    vol = np.zeros((3, 32, 32), np.float32)
    vol[0, 0, :2] = np.nan
    vol[1, 1, 1] = np.inf
    with pytest.raises(SGPInputError, match=r"2 NaN and 1 infinite.*fill"):
        validate_volume(vol)
    with pytest.raises(SGPInputError, match=r"12 x 32.*at least 16 x 16"):
        validate_volume(np.zeros((3, 12, 32)))
    # slicing along axis 1: in-plane is (K, I) = (3, 32)
    with pytest.raises(SGPInputError, match=r"axis j \(coronal\)"):
        validate_volume(np.zeros((3, 32, 32)), axis=1)
    with pytest.raises(SGPInputError, match="empty"):
        validate_volume(np.zeros((0, 32, 32)))


# ---------------------------------------------------------------------------------------------
# Reading real data
# ---------------------------------------------------------------------------------------------


def _names_json(path) -> dict[int, str]:
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def test_read_ct_abdomen(sgp_data):
    case = sgp_data / "ct_abdomen_small"
    img, geom = sgp_io.read_image(case / "image.nii.gz")
    assert img.shape == (30, 101, 122) and img.dtype == np.int16
    assert geom.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert geom.direction == pytest.approx((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    labels, lgeom, names = sgp_io.read_labels(
        case / "labels.nii.gz", geom, reference_shape=img.shape
    )
    assert labels.shape == img.shape and np.issubdtype(labels.dtype, np.integer)
    assert names == _names_json(case / "labels.json")
    assert set(np.unique(labels).tolist()) - {0} == set(names)
    assert lgeom.origin == pytest.approx(geom.origin)


def test_read_mri_nrrd(sgp_data):
    case = sgp_data / "mri_brain_tumor"
    img, geom = sgp_io.read_image(case / "image.nrrd")
    assert img.shape == (25, 256, 256)
    assert geom.spacing == pytest.approx((0.78125, 0.78125, 6.5))
    labels, _, names = sgp_io.read_labels(case / "labels.nrrd", geom, reference_shape=img.shape)
    assert names == {1: "tumor"}
    assert int((labels == 1).reshape(25, -1).any(axis=1).sum()) == 7


def test_read_2d_png(sgp_data):
    img, geom = sgp_io.read_image(sgp_data / "wbc" / "images" / "001.png")
    assert img.shape == (1, 300, 300, 3) and img.dtype == np.uint8
    assert geom.spacing[2] == 1.0 and geom.direction == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    mask, _, names = sgp_io.read_labels(
        sgp_data / "wbc" / "masks" / "001.png", geom, reference_shape=img.shape
    )
    assert mask.shape == (1, 300, 300)
    assert names == {1: "cytoplasm", 2: "nucleus"}


def test_read_labels_mismatching_reference(sgp_data):
    img, geom = sgp_io.read_image(sgp_data / "mri_brain_tumor" / "image.nrrd")
    with pytest.raises(SGPInputError, match=r"does not match the image.*Resample"):
        sgp_io.read_labels(
            sgp_data / "ct_abdomen_small" / "labels.nii.gz", geom, reference_shape=img.shape
        )


def test_read_labels_geometry_mismatch_same_size(tmp_path):
    geom = _rotated_geometry()
    lab = np.zeros((4, 20, 24), np.uint8)
    shifted = Geometry(
        origin=(geom.origin[0] + 0.5, *geom.origin[1:]),
        spacing=geom.spacing,
        direction=geom.direction,
    )
    sitk.WriteImage(sgp_io.sitk_from_array(lab, shifted), str(tmp_path / "lab.nrrd"))
    with pytest.raises(SGPInputError, match="origin"):
        sgp_io.read_labels(tmp_path / "lab.nrrd", geom, reference_shape=lab.shape)
    # within tolerance passes
    sitk.WriteImage(sgp_io.sitk_from_array(lab, geom), str(tmp_path / "ok.nrrd"))
    sgp_io.read_labels(tmp_path / "ok.nrrd", geom, reference_shape=lab.shape)


def test_read_image_errors(tmp_path):
    with pytest.raises(SGPInputError, match="nothere.nrrd"):
        sgp_io.read_image(tmp_path / "nothere.nrrd")
    vols = [sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32)) for _ in range(2)]
    sitk.WriteImage(sitk.JoinSeries(vols), str(tmp_path / "ts.nrrd"))
    with pytest.raises(SGPInputError, match="4D"):
        sgp_io.read_image(tmp_path / "ts.nrrd")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def test_write_segmentation_round_trip(tmp_path):
    geom = _rotated_geometry()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (6, 20, 24)).astype(np.uint8)
    labels[labels == 2] = 5  # non-consecutive value
    names = {1: "liver", 5: "spleen", 7: "absent organ"}
    out = sgp_io.write_segmentation(
        tmp_path / "out.seg.nrrd", labels, geom, names, colors={1: (255, 0, 0)}
    )
    assert out.exists() and [p.name for p in tmp_path.iterdir()] == ["out.seg.nrrd"]

    seg = slicerio.read_segmentation(str(out))
    assert np.array_equal(seg["voxels"], labels.transpose(2, 1, 0))
    got = {s["labelValue"]: s for s in seg["segments"]}
    assert {v: s["name"] for v, s in got.items()} == names
    assert all(s["layer"] == 0 for s in seg["segments"])
    assert got[1]["color"] == pytest.approx([1.0, 0.0, 0.0])
    expected = np.eye(4)
    expected[:3, :3] = geom.direction_matrix() * np.asarray(geom.spacing)
    expected[:3, 3] = geom.origin
    np.testing.assert_allclose(seg["ijkToLPS"], expected, atol=1e-9)

    back, bgeom, bnames = sgp_io.read_labels(out, geom, reference_shape=labels.shape)
    assert np.array_equal(back, labels) and bnames == names
    assert bgeom.spacing == pytest.approx(geom.spacing)
    assert bgeom.direction == pytest.approx(geom.direction)
    assert bgeom.origin == pytest.approx(geom.origin)


def test_read_overlapping_seg_nrrd_layers(tmp_path):
    geom = _rotated_geometry()
    seg = slicerio.create_segmentation((8, 6, 4), sgp_io.ijk_to_lps(geom))
    a = np.zeros((8, 6, 4), bool)
    a[1:5] = True
    b = np.zeros((8, 6, 4), bool)
    b[3:7] = True  # overlaps a -> second layer
    slicerio.add_segment(seg, a, {"name": "outer"})
    slicerio.add_segment(seg, b, {"name": "inner"})
    assert seg["voxels"].ndim == 4
    slicerio.write_segmentation(str(tmp_path / "ov.seg.nrrd"), seg)
    labels, bgeom, names = sgp_io.read_labels(tmp_path / "ov.seg.nrrd")
    assert names == {1: "outer", 2: "inner"}
    assert labels.shape == (4, 6, 8)
    assert np.array_equal(labels == 2, b.transpose(2, 1, 0))  # later segment wins overlaps
    assert np.array_equal(labels == 1, (a & ~b).transpose(2, 1, 0))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    geom = Geometry()
    labels = np.zeros((2, 16, 16), np.uint8)
    labels[0, 2:5, 2:5] = 1

    def broken(filename, segmentation, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"NRRD0004\npartial")
        raise OSError("disk full")

    monkeypatch.setattr(slicerio, "write_segmentation", broken)
    with pytest.raises(OSError, match="disk full"):
        sgp_io.write_segmentation(tmp_path / "a.seg.nrrd", labels, geom, {1: "x"})
    assert list(tmp_path.iterdir()) == []
    # an existing file is left as it was
    (tmp_path / "b.seg.nrrd").write_bytes(b"old")
    with pytest.raises(OSError):
        sgp_io.write_segmentation(tmp_path / "b.seg.nrrd", labels, geom, {1: "x"})
    assert [p.name for p in tmp_path.iterdir()] == ["b.seg.nrrd"]
    assert (tmp_path / "b.seg.nrrd").read_bytes() == b"old"


def test_write_volume_and_scores(tmp_path):
    geom = _rotated_geometry()
    prob = np.random.default_rng(0).random((3, 16, 18)).astype(np.float32)
    for name in ("p.nrrd", "p.nii.gz"):
        sgp_io.write_volume(tmp_path / name, prob, geom)
        back, bgeom = sgp_io.read_image(tmp_path / name)
        np.testing.assert_array_equal(back, prob)
        assert bgeom.spacing == pytest.approx(geom.spacing, abs=1e-5)
        assert bgeom.direction == pytest.approx(geom.direction, abs=1e-5)
    dt = np.dtype([("slice", "i4"), ("confidence", "f4"), ("source", "U8")])
    scores = {1: np.array([(0, 0.5, "user"), (1, 0.25, "pred")], dt)}
    sgp_io.write_score_table(tmp_path / "s.csv", scores, {1: "liver"})
    rows = list(csv.reader((tmp_path / "s.csv").open()))
    assert rows[0] == ["label", "structure", "slice", "confidence", "source"]
    assert rows[1] == ["1", "liver", "0", "0.5", "user"] and len(rows) == 3


# ---------------------------------------------------------------------------------------------
# Support banks
# ---------------------------------------------------------------------------------------------


def test_support_bank_ct_lesions(sgp_data):
    folder = sgp_data / "ct_lesions"
    bank = sgp_io.load_support_sets(folder, limit=2)
    assert list(bank) == [1]
    items = bank[1]
    assert all(isinstance(i, SupportItem) for i in items)
    full = [i for i in items if i.mask.any()]
    empty = [i for i in items if not i.mask.any()]
    assert len(full) == 14  # one lesion on 7 slices in each of the two cases
    assert 0 < len(empty) <= len(full)
    for item in items:
        assert item.image.shape == (512, 512) and item.image.dtype == np.float32
        assert item.mask.shape == (512, 512) and item.mask.dtype == np.bool_
        assert 0.0 <= item.image.min() and item.image.max() <= 1.0
    # uint8 data: one fixed mapping (v / 255), identical to the file's intensities
    case = sorted(p for p in folder.iterdir() if p.is_dir())[0]
    img, _ = sgp_io.read_image(case / "image.nrrd")
    k = int(items[0].source.rsplit(" ", 1)[1])
    np.testing.assert_allclose(items[0].image, img[k] / 255.0, atol=1e-6)
    with pytest.raises(SGPInputError, match=r"\[5\].*not present"):
        sgp_io.load_support_sets(folder, structures=[5], limit=1)
    # by name, along another axis
    side = sgp_io.load_support_sets(folder, structures=["lesion"], axis=1, limit=1)
    assert list(side) == [1] and side[1][0].image.shape == (16, 512)


def test_support_bank_wbc(sgp_data):
    bank = sgp_io.load_support_sets(sgp_data / "wbc", limit=4)
    assert sorted(bank) == [1, 2]
    for value in (1, 2):
        assert len(bank[value]) >= 1
        for item in bank[value]:
            assert item.image.shape == (300, 300, 3) and item.mask.shape == (300, 300)
            assert item.mask.dtype == np.bool_
    nuclei = sgp_io.load_support_sets(sgp_data / "wbc", structures=["nucleus"], limit=3)
    assert list(nuclei) == [2]
    assert sgp_io.support_bank_names(sgp_data / "wbc") == {1: "cytoplasm", 2: "nucleus"}
    with pytest.raises(SGPInputError, match="not present"):
        sgp_io.load_support_sets(sgp_data / "wbc", structures=[3], limit=2)


# ---------------------------------------------------------------------------------------------
# Messages: plain numbers, the axis as the user names it
# ---------------------------------------------------------------------------------------------


def _mismatch_message(tmp_path, label_geom: Geometry, image_geom: Geometry, shape=(4, 20, 24)):
    lab = np.zeros((4, 20, 24), np.uint8)
    sitk.WriteImage(sgp_io.sitk_from_array(lab, label_geom), str(tmp_path / "lab.nrrd"))
    with pytest.raises(SGPInputError) as info:
        sgp_io.read_labels(tmp_path / "lab.nrrd", image_geom, reference_shape=shape)
    return str(info.value)


def test_geometry_mismatch_messages_print_plain_numbers(tmp_path):
    geom = _rotated_geometry()
    moved = Geometry(origin=(-12.0, 33.25, 101.0), spacing=geom.spacing, direction=geom.direction)
    finer = Geometry(origin=geom.origin, spacing=(0.5, 1.3, 2.5), direction=geom.direction)
    turned = Geometry(origin=geom.origin, spacing=geom.spacing)
    cases = {
        "origin": (moved, "origin (-12, 33.25, 101) vs image (-12.5, 33.25, 101)"),
        "spacing": (finer, "spacing (0.5, 1.3, 2.5) vs image (0.7, 1.3, 2.5)"),
        "direction": (turned, "direction (1, 0, 0, 0, 1, 0, 0, 0, 1) vs image"),
    }
    for what, (label_geom, expected) in cases.items():
        message = _mismatch_message(tmp_path, label_geom, geom)
        assert "np." not in message and "float64" not in message, message
        assert expected in message, (what, message)
        assert "size (4, 20, 24)" in message
    size_message = _mismatch_message(tmp_path, geom, geom, shape=(np.int64(5), 20, 24))
    assert "size (4, 20, 24) vs image (5, 20, 24) (K, J, I)" in size_message
    assert "np." not in size_message


def test_axis_messages_name_the_axis_as_the_user_does(tmp_path):
    with pytest.raises(SGPInputError, match=r"Slices along axis k \(axial\) are 32 x 8"):
        validate_volume(np.zeros((3, 32, 8)), axis=0)
    with pytest.raises(SGPInputError, match=r"axis i \(sagittal\) are 3 x 32"):
        validate_volume(np.zeros((3, 32, 32)), axis=2)
    with pytest.raises(SGPInputError) as info:
        reorient(np.zeros((4, 4, 4)), np.int64(3))
    message = str(info.value)
    assert "k (axial)" in message and "got 3." in message and "np." not in message
    with pytest.raises(SGPInputError) as info:
        LetterboxTransform(np.int64(0), 4, 8)
    assert "got 0." in str(info.value)
    # support items say where they came from the same way
    case = tmp_path / "bank" / "case1"
    _write_case(case, {1: "organ"}, depth=16)
    bank = sgp_io.load_support_sets(tmp_path / "bank", axis=1)
    assert all("axis j (coronal) slice" in item.source for item in bank[1])


# ---------------------------------------------------------------------------------------------
# Label names and colours: labels.json, ITK-SNAP .label / .txt, .seg.nrrd
# ---------------------------------------------------------------------------------------------

ITKSNAP_LABELS = """\
################################################
# ITK-SnAP Label Description File
# File format:
# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL
################################################
    0     0    0    0        0  0  0    "Clear Label"
    1   255    0    0        1  1  1    "left kidney"
    3     0  128  255      0.5  1  0    "Aorta"
"""


def _write_case(folder, names=None, values=(1,), *, labels_name="labels.nrrd", geom=None, depth=4):
    """A small labeled case: image.nrrd + a label map with each value on a few slices."""
    folder.mkdir(parents=True, exist_ok=True)
    geom = geom or Geometry(spacing=(1.0, 1.0, 2.0))
    rng = np.random.default_rng(len(values))
    image = rng.normal(100, 20, (depth, 20, 20)).astype(np.float32)
    labels = np.zeros((depth, 20, 20), np.uint8)
    for n, v in enumerate(values):
        labels[1:3, 2 + 5 * n : 5 + 5 * n, 4:9] = v
    sitk.WriteImage(sgp_io.sitk_from_array(image, geom), str(folder / "image.nrrd"))
    if labels_name.endswith(".seg.nrrd"):
        sgp_io.write_segmentation(folder / labels_name, labels, geom, names or {})
    else:
        sitk.WriteImage(sgp_io.sitk_from_array(labels, geom), str(folder / labels_name))
        if names is not None:
            (folder / "labels.json").write_text(json.dumps({str(v): n for v, n in names.items()}))
    return labels, geom


def test_itksnap_label_file_gives_names_and_colours_in_the_written_seg_nrrd(tmp_path):
    case = tmp_path / "case"
    labels, geom = _write_case(case, None, values=(1, 3))
    (case / "labels.label").write_text(ITKSNAP_LABELS)
    _, _, names = sgp_io.read_labels(case / "labels.nrrd", geom, reference_shape=labels.shape)
    assert names == {1: "left kidney", 3: "Aorta"}
    colors = sgp_io.read_label_colors(case / "labels.nrrd")
    assert colors == {1: (1.0, 0.0, 0.0), 3: pytest.approx((0.0, 128 / 255, 1.0))}

    out = sgp_io.write_segmentation(tmp_path / "out.seg.nrrd", labels, geom, names, colors)
    seg = slicerio.read_segmentation(str(out))
    got = {s["labelValue"]: s for s in seg["segments"]}
    assert {v: s["name"] for v, s in got.items()} == {1: "left kidney", 3: "Aorta"}
    assert got[1]["color"] == pytest.approx([1.0, 0.0, 0.0], abs=1e-5)
    assert got[3]["color"] == pytest.approx([0.0, 128 / 255, 1.0], abs=1e-5)
    assert not got[1]["colorAutoGenerated"]
    # and a .seg.nrrd's own colours are read back
    info = sgp_io.read_label_info(out)
    assert info.names == names and info.colors[3] == pytest.approx((0.0, 128 / 255, 1.0), abs=1e-5)


def test_label_description_files_are_found_like_labels_json(tmp_path):
    case = tmp_path / "case"
    _write_case(case, None, values=(1, 3), labels_name="mask.nii.gz")
    lab = case / "mask.nii.gz"
    # an ITK-SNAP .txt beside the label map counts; other text does not
    (case / "labels.txt").write_text("these are my notes\n")
    assert sgp_io.read_label_names(lab) == {}
    (case / "mask.txt").write_text(ITKSNAP_LABELS)
    assert sgp_io.read_label_names(lab) == {1: "left kidney", 3: "Aorta"}
    assert sgp_io.read_label_names(case / "mask.txt") == {1: "left kidney", 3: "Aorta"}
    # labels.json comes first, and may carry colours itself
    (case / "mask.json").write_text(
        json.dumps([{"value": 1, "name": "liver", "color": "#00ff00"}, {"value": 3, "name": "x"}])
    )
    info = sgp_io.read_label_info(lab)
    assert info.names == {1: "liver", 3: "x"} and info.colors == {1: (0.0, 1.0, 0.0)}
    assert info.source == case / "mask.json"
    # any single *.label one folder up (images/ + masks/ layouts)
    masks = tmp_path / "set" / "masks"
    masks.mkdir(parents=True)
    (tmp_path / "set" / "organs.label").write_text(ITKSNAP_LABELS)
    assert sgp_io.read_label_names(masks / "001.png") == {1: "left kidney", 3: "Aorta"}


def test_bad_label_description_files_say_what_is_wrong(tmp_path):
    bad = tmp_path / "labels.label"
    bad.write_text(ITKSNAP_LABELS + "    4   12  13\n")
    with pytest.raises(SGPInputError, match=r"Line 9 of .*labels.label.*ITK-SNAP"):
        sgp_io.read_label_names(bad)
    bad.write_text('    1   300    0    0        1  1  1    "too red"\n')
    with pytest.raises(SGPInputError, match="0-255"):
        sgp_io.read_label_names(bad)
    bad.unlink()
    (tmp_path / "a.label").write_text(ITKSNAP_LABELS)
    (tmp_path / "b.label").write_text(ITKSNAP_LABELS)
    with pytest.raises(SGPInputError, match=r"several ITK-SNAP label files.*labels.label"):
        sgp_io.read_label_names(tmp_path / "labels.nrrd")
    # one folder up, unrelated .label files are not a reason to fail
    assert sgp_io.read_label_names(tmp_path / "case" / "labels.nrrd") == {}
    (tmp_path / "c.json").write_text(json.dumps({"1": {"name": "x", "color": [1, 2]}}))
    with pytest.raises(SGPInputError, match="3 components"):
        sgp_io.read_label_names(tmp_path / "c.json")


# ---------------------------------------------------------------------------------------------
# Support bank names, for every layout load_support_sets accepts
# ---------------------------------------------------------------------------------------------


def test_support_bank_names_per_case_labels_json(tmp_path):
    bank = tmp_path / "bank"
    _write_case(bank / "a", {1: "liver"}, values=(1,))
    _write_case(bank / "b", {2: "spleen"}, values=(2,))
    # every case's names, not only the first case's
    assert sgp_io.support_bank_names(bank) == {1: "liver", 2: "spleen"}
    assert list(sgp_io.load_support_sets(bank, structures=["spleen"])) == [2]


def test_support_bank_names_bank_level_file_wins(tmp_path):
    bank = tmp_path / "bank"
    _write_case(bank / "a", {1: "liver"}, values=(1, 2))
    (bank / "labels.json").write_text(json.dumps({"1": "hepar"}))
    assert sgp_io.support_bank_names(bank) == {1: "hepar"}
    (bank / "labels.json").unlink()
    (bank / "labels.label").write_text(ITKSNAP_LABELS)
    info = sgp_io.support_bank_info(bank)
    assert info.names == {1: "left kidney", 3: "Aorta"}
    assert info.colors[1] == (1.0, 0.0, 0.0)


def test_support_bank_names_from_seg_nrrd_cases(tmp_path):
    bank = tmp_path / "bank"
    _write_case(bank / "a", {1: "tumor", 2: "edema"}, values=(1, 2), labels_name="labels.seg.nrrd")
    _write_case(bank / "b", {4: "cyst"}, values=(4,), labels_name="labels.seg.nrrd")
    assert sgp_io.support_bank_names(bank) == {1: "tumor", 2: "edema", 4: "cyst"}
    assert sorted(sgp_io.load_support_sets(bank, structures=["edema", "cyst"])) == [2, 4]
    # a single case folder is a bank too
    assert sgp_io.support_bank_names(bank / "b") == {4: "cyst"}


def test_support_bank_names_from_label_files(tmp_path):
    bank = tmp_path / "bank"
    _write_case(bank / "a", None, values=(1, 3))
    (bank / "a" / "labels.label").write_text(ITKSNAP_LABELS)
    assert sgp_io.support_bank_names(bank) == {1: "left kidney", 3: "Aorta"}
    assert list(sgp_io.load_support_sets(bank, structures=["aorta"])) == [3]


def test_support_bank_names_image_mask_pairs(tmp_path):
    bank = tmp_path / "bank"
    (bank / "images").mkdir(parents=True)
    (bank / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name in ("001", "002"):
        image = rng.integers(0, 255, (24, 24)).astype(np.uint8)
        mask = np.zeros((24, 24), np.uint8)
        mask[4:10, 5:12] = 1
        mask[14:20, 5:12] = 3
        sitk.WriteImage(sitk.GetImageFromArray(image), str(bank / "images" / f"{name}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(bank / "masks" / f"{name}.png"))
    assert sgp_io.support_bank_names(bank) == {}
    (bank / "masks" / "labels.label").write_text(ITKSNAP_LABELS)
    assert sgp_io.support_bank_names(bank) == {1: "left kidney", 3: "Aorta"}
    assert list(sgp_io.load_support_sets(bank, structures=["Left Kidney"])) == [1]
