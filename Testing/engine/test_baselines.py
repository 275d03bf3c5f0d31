"""The comparison clinicians care about: Segment Editor's Fill between slices (ITK morphological
contour interpolation) and nearest-slice copy, on the same drawn slices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from SlicerSGP import SGPInputError
from SlicerSGP.data import io
from SlicerSGP.evaluation.baselines import fill_between_slices, nearest_slice_copy, run_baseline
from SlicerSGP.evaluation.metrics import dice

pytest.importorskip("itk", reason="itk-morphologicalcontourinterpolation is a test extra")


def growing_square(n: int = 12) -> np.ndarray:
    lab = np.zeros((n, 32, 40), np.uint8)
    for k in range(2, 10):
        half = 3 + k
        lab[k, 16 - half // 2:16 + half // 2, 8:8 + half] = 1
    return lab


def test_fill_between_slices_interpolates_only_between_drawn_slices():
    lab = growing_square()
    filled = fill_between_slices(lab, {1: [2, 9]})
    areas = (filled == 1).reshape(len(lab), -1).sum(axis=1)
    assert np.array_equal(filled[2], lab[2]) and np.array_equal(filled[9], lab[9])
    assert (areas[3:9] > 0).all() and areas[0] == areas[1] == areas[10] == areas[11] == 0
    assert areas[2] <= areas[5] <= areas[9]  # grows between the two drawn sizes


def test_fill_between_slices_along_another_axis_and_several_structures():
    lab = growing_square()
    lab[:, 2:5, 30:35] = 2  # a bar through every slice
    moved = np.ascontiguousarray(np.moveaxis(lab, 0, 1))  # slices are now along axis 1
    filled = fill_between_slices(moved, {1: [2, 9], 2: [0, 11]}, axis=1)
    assert filled.shape == moved.shape
    back = np.moveaxis(filled, 1, 0)
    assert ((back == 2).reshape(12, -1).sum(axis=1) == 15).all()
    assert (back[4] == 1).any() and not (back[0] == 1).any()


def test_nearest_slice_copy():
    lab = growing_square()
    copy = nearest_slice_copy(lab, {1: [2, 9]})
    assert np.array_equal(copy[0], lab[2]) and np.array_equal(copy[5], lab[2])
    assert np.array_equal(copy[6], lab[9]) and np.array_equal(copy[11], lab[9])
    with pytest.raises(SGPInputError, match="Unknown baseline"):
        run_baseline("magic", lab, {1: [2]})


@pytest.mark.slow
def test_fill_between_slices_on_the_brain_tumour(sgp_data):
    case = sgp_data / "mri_brain_tumor"
    vol, geometry = io.read_image(case / "image.nrrd")
    lab, _, _ = io.read_labels(case / "labels.nrrd", geometry, reference_shape=vol.shape[:3])
    present = np.flatnonzero(lab.reshape(lab.shape[0], -1).any(axis=1))
    drawn = {1: [int(present[0]), int(present[len(present) // 2]), int(present[-1])]}
    interpolated = dice(run_baseline("interpolation", lab, drawn) == 1, lab == 1)
    copied = dice(run_baseline("nearest", lab, drawn) == 1, lab == 1)
    # Measured: 0.691 and 0.301; interpolation is the stronger baseline on this case.
    assert interpolated > 0.6 and interpolated > copied + 0.2


@pytest.mark.slow
def test_sgp_eval_baseline_scores_the_same_slices_as_the_model(sgp_data, tmp_path, capsys):
    from SlicerSGP import cli

    out = tmp_path / "interp.json"
    rc = cli.main(["eval", str(sgp_data / "mri_brain_tumor"), "--baseline", "interpolation",
                   "--support-slices", "3", "--json", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["source"] == "baseline interpolation"
    assert 0.3 < report["cases"][0]["dice"] < 1.0  # drawn slices are left out of the score
    rc = cli.main(["eval", str(sgp_data / "mri_brain_tumor"), "--baseline", "interpolation",
                   "--quiet"])
    assert rc == 2 and "--support-slices" in capsys.readouterr().err
