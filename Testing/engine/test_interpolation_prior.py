"""The interpolation prior: Fill between slices between two drawn slices, as PMA's prompt and in
the fusion of the two sides; off changes nothing; one interpolation per drawing, re-used.

The rules are checked on a synthetic volume with a real (random-weight) SAM2 and a prior that
disagrees with what the sides segment: with low reverse-propagation quality the slice follows
the interpolation, with high quality the sides. ITK itself runs in the tests of the worker and
of re-use (one child process per test process).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import synthetic_volume

from engine.test_presence_and_extent import scripted_masks
from SlicerSGP.errors import SGPInputError
from SlicerSGP.method import prior as prior_rules
from SlicerSGP.method.interpolation import shared_worker
from SlicerSGP.method.pma import pseudo_mask_box
from SlicerSGP.method.propagation import Propagator
from SlicerSGP.method.rerun import SliceResult
from SlicerSGP.method.segmenter import Segmenter
from SlicerSGP.service.protocol import options_from_json, options_to_json
from SlicerSGP.training.episodes import episode_prior, prior_ends
from SlicerSGP.types import PRIOR_MODES, SegmentOptions

N, H, W = 4, 48, 64
DRAWN = [0, 3]
BETWEEN = [1, 2]


@pytest.fixture(scope="module")
def case():
    vol, lab = synthetic_volume(N, H, W)
    drawn = np.zeros_like(lab)
    drawn[DRAWN] = lab[DRAWN]
    assert all(drawn[k].any() for k in DRAWN)
    return vol, lab, drawn


@pytest.fixture(scope="module")
def off_run(segmenter, case):
    """The run without the prior (each side's quality 0.9); it never asks for one."""
    def boom(*a, **k):
        raise AssertionError("the interpolation ran with the prior off")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segmenter.priors, "prior", boom)
        result = run(segmenter, case, "off", 0.9, patch)
    assert "interpolation" not in result.timings
    assert all((result.labels[j] == 1).any() for j in BETWEEN)  # the sides segment something
    return result


def far_prior(lab: np.ndarray) -> dict[int, np.ndarray]:
    """A prior that disagrees with the structure: a block in the corner it never reaches."""
    block = np.zeros((H, W), bool)
    block[:10, :10] = True
    assert not (lab[:, :10, :10] > 0).any()
    return {j: block.copy() for j in BETWEEN}


def run(seg: Segmenter, case, mode: str, quality: float, monkeypatch, prior=None):
    """A full run with every side's quality fixed and, if given, the prior replaced."""
    vol, lab, drawn = case
    seg.clear_cache()
    monkeypatch.setattr(Propagator, "reverse_dice", lambda self, *a, **k: quality)
    if prior is not None:
        monkeypatch.setattr(seg.priors, "prior", lambda *a, **k: prior)
    opts = SegmentOptions(intensity="percentile", interpolation_prior=mode, reuse_results=False)
    return seg.segment(vol, drawn, {1: "blob"}, opts)


def test_rule_itself():
    assert prior_rules.prior_trust(0.9) == pytest.approx(0.8)
    assert prior_rules.prior_trust(1.0) == 1.0
    assert prior_rules.prior_trust(0.75) == pytest.approx(0.5)  # where a side starts to decide
    assert prior_rules.prior_trust(0.5) == 0.0 and prior_rules.prior_trust(0.1) == 0.0
    assert prior_rules.prior_trust(float("nan")) == 0.0  # unscored: no claim
    prob = np.zeros((4, 4), np.float32)
    prob[:2] = 1.0
    prior = np.zeros((4, 4), bool)
    prior[2:] = True

    def side(quality: float) -> SliceResult:
        return SliceResult(None, 0.9, 0.9, prob, torch.zeros(1, 1, 1, 1), 1.0, quality)

    low = prior_rules.blend(side(0.6), prior)
    assert np.array_equal(low.prob >= 0.5, prior) and low.prob is not prob  # a copy
    assert np.array_equal(prior_rules.blend(side(0.9), prior).prob >= 0.5, prob >= 0.5)


def test_fusion_low_quality_follows_the_interpolation(segmenter, case, off_run, monkeypatch):
    prior = far_prior(case[1])
    fused = run(segmenter, case, "fuse", 0.1, monkeypatch, prior)
    for j in BETWEEN:
        assert np.array_equal(fused.labels[j] == 1, prior[j]), j
    for k in DRAWN:  # drawn slices as drawn
        assert np.array_equal(fused.labels[k], case[2][k])


def test_fusion_high_quality_follows_the_sides(segmenter, case, off_run, monkeypatch):
    off = off_run
    # The most disagreeing prior there is: the complement of what the sides segment.
    prior = {j: off.probabilities[1][j] < 0.5 for j in BETWEEN}
    fused = run(segmenter, case, "fuse", 0.95, monkeypatch, prior)
    for j in BETWEEN:
        p_off = off.probabilities[1][j]
        # Quality 0.95: each side keeps 2 * 0.95 - 1 = 0.9 of its own.
        blended = 0.9 * p_off + 0.1 * prior[j]
        differ = (fused.labels[j] == 1) != (blended >= 0.5)
        assert not differ[np.abs(blended - 0.5) > 1e-5].any(), j  # rounding at 0.5 aside
        # ... which is the sides' mask, against the prior, wherever they are at all sure.
        sure = np.abs(p_off - 0.5) > 0.06
        assert sure.any()
        assert np.array_equal((fused.labels[j] == 1)[sure], (off.labels[j] == 1)[sure])


def test_fusion_middling_quality_leaves_the_slice_to_the_interpolation(segmenter, case,
                                                                      monkeypatch):
    """Sides sure of the structure (their masks scripted: the true ones) against a prior in a
    corner the structure never reaches. Quality 0.7 (a side re-predicting the drawing at Dice
    0.7 was still no match for Fill between slices in the 3D learning check): each side keeps
    0.4 of its own and the interpolation decides. Quality 0.9: 0.8, and the sides decide."""
    vol, lab, _ = case
    prior = far_prior(lab)
    scripted_masks(segmenter, monkeypatch, lab, set())
    sides = run(segmenter, case, "off", 0.9, monkeypatch).probabilities[1]
    for quality, trust in ((0.7, 0.4), (0.9, 0.8)):
        fused = run(segmenter, case, "fuse", quality, monkeypatch, prior)
        for j in BETWEEN:
            blended = trust * sides[j] + (1 - trust) * prior[j]
            assert np.array_equal(fused.labels[j] == 1, blended >= 0.5), (quality, j)
    middling = run(segmenter, case, "fuse", 0.7, monkeypatch, prior)
    for j in BETWEEN:
        assert np.array_equal(middling.labels[j] == 1, prior[j]), j
        sure = fused.labels[j] == 1  # quality 0.9
        truth = lab[j] == 1
        assert 2 * (sure & truth).sum() / (sure.sum() + truth.sum()) > 0.9, j


def test_prompt_gives_pma_the_interpolation(segmenter, case, monkeypatch):
    """Training-free PMA is SAM2's decoder prompted with the prior's box and mask (clamped),
    between the drawn slices only; off prompts it with the pseudo-mask as before."""
    prior = far_prior(case[1])
    sam = segmenter.model.sam
    seen: list[dict] = []
    original = sam._forward_sam_heads

    def spy(*args, **kwargs):
        # PMA's call (PMG has no prompt; a support memory's mask comes without points)
        if kwargs.get("mask_inputs") is not None and "point_inputs" in kwargs:
            seen.append({"points": kwargs["point_inputs"], "mask": kwargs["mask_inputs"]})
        return original(*args, **kwargs)

    monkeypatch.setattr(sam, "_forward_sam_heads", spy)
    run(segmenter, case, "prompt", 0.5, monkeypatch, prior)
    transform_prior = prior_rules.model_prompt(prior[1], _transform(segmenter))
    want_box = pseudo_mask_box(transform_prior, 0.5)
    want_mask = prior_rules.dense_prompt(transform_prior, seen[0]["mask"].shape[-2:])
    prompted = [s for s in seen if torch.equal(s["mask"], want_mask.clamp(-32, 32))]
    # Every slice between is reached from both sides, each time prompted by the prior.
    assert len(prompted) == 2 * len(BETWEEN) == len(seen)
    for s in prompted:
        assert torch.equal(s["points"]["point_coords"].view(1, 4).cpu(), want_box.view(1, 4))


def _transform(seg: Segmenter):
    from SlicerSGP.data.preprocess import LetterboxTransform

    return LetterboxTransform(H, W, seg.image_size)


def test_interpolation_runs_once_per_drawing_and_is_timed(segmenter, case):
    """Real ITK: the prior between the drawn slices, re-used while they are unchanged."""
    vol, lab, drawn = case
    segmenter.clear_cache()
    opts = SegmentOptions(intensity="percentile", interpolation_prior="fuse")
    worker = segmenter.priors.worker
    before = worker.calls
    first = segmenter.segment(vol, drawn, {1: "blob"}, opts)
    assert worker.calls == before + 1 and first.timings["interpolation"] > 0
    again = segmenter.segment(vol, drawn, {1: "blob"}, opts)
    assert worker.calls == before + 1 and "interpolation" not in again.timings
    assert np.array_equal(again.labels, first.labels)
    redrawn = drawn.copy()
    redrawn[3] = 0
    redrawn[3, 20:30, 20:40] = 1
    segmenter.segment(vol, redrawn, {1: "blob"}, opts)
    assert worker.calls == before + 2


def test_prior_is_fill_between_slices_between_drawn_slices_only():
    square = np.zeros((32, 32), bool)
    square[8:16, 8:16] = True
    big = np.zeros((32, 32), bool)
    big[6:22, 6:22] = True
    masks = {1: square, 5: big, 8: np.zeros((32, 32), bool), 10: square}
    prior = prior_rules.interpolate_prior(masks, 12, shared_worker())
    # Between 1 and 5 only: slice 8 is drawn empty, so nothing is filled across it.
    assert sorted(prior) == [2, 3, 4]
    areas = [int(prior[j].sum()) for j in (2, 3, 4)]
    assert square.sum() <= areas[0] <= areas[1] <= areas[2] <= big.sum()


def test_episode_prior_for_training():
    rng = np.random.default_rng(0)
    assert prior_ends([0, 1, 2, 3], True, 0.0, rng) == []
    assert prior_ends([0, 1], True, 1.0, rng) == []
    assert prior_ends([3, 2, 1, 0], True, 1.0, rng) == [3, 0]
    answer = np.zeros((4, 32, 32), bool)
    answer[0, 8:16, 8:16] = True
    answer[3, 10:20, 10:20] = True
    prior_of = episode_prior(shared_worker(), answer, [3, 0], 64)
    assert prior_of(0) is None and prior_of(3) is None
    assert prior_of(1).shape == (1, 1, 64, 64) and float(prior_of(1).sum()) > 0
    answer[3] = False
    assert episode_prior(shared_worker(), answer, [3, 0], 64) is None


def test_option_checked_and_carried_by_the_service_request(segmenter, case):
    vol, _, drawn = case
    with pytest.raises(SGPInputError, match="interpolation_prior"):
        segmenter.segment(vol, drawn, {1: "blob"}, SegmentOptions(interpolation_prior="always"))
    for mode in PRIOR_MODES:
        opts = options_from_json(options_to_json(SegmentOptions(interpolation_prior=mode)))
        assert opts.interpolation_prior == mode


def test_cli_option(tmp_path, capsys):
    from SlicerSGP.cli import main

    with pytest.raises(SystemExit):
        main(["segment", "x.nrrd", "--interpolation-prior", "sometimes"])
    assert "--interpolation-prior" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "data", "--model", "tiny", "--interpolation-prior", "sometimes"])
    assert "invalid choice" in capsys.readouterr().err


def test_slicer_choices_match_the_engine():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "SGPSegment" / "SGPSegmentLib" / "constants.py"
    spec = importlib.util.spec_from_file_location("sgp_constants_for_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop("sgp_constants_for_test", None)
    spec.loader.exec_module(module)
    assert tuple(module.INTERPOLATION_PRIORS) == PRIOR_MODES
    assert module.DEFAULT_INTERPOLATION_PRIOR == SegmentOptions.interpolation_prior
