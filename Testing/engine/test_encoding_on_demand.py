"""Slices are encoded when propagation first needs them, never one no sweep reaches.

A slice's features do not depend on when it is encoded (slices go through the encoder in fixed,
aligned batches), so results are bit-identical to encoding the whole volume first; a later run
on the same volume encodes only the slices no earlier run needed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import make_objects_visible, synthetic_volume

from engine.test_rerun import SIZE, assert_identical, new_segmenter
from SlicerSGP.data import preprocess
from SlicerSGP.errors import SGPInputError
from SlicerSGP.method.segmenter import Segmenter
from SlicerSGP.types import SegmentOptions

N = 16
DRAWN = 7


@pytest.fixture(scope="module")
def case():
    vol, lab = synthetic_volume(n=N, h=64, w=80, seed=2)
    drawn = np.zeros_like(lab)
    drawn[DRAWN] = lab[DRAWN]
    return vol, drawn


def options(batch: int, **kw) -> SegmentOptions:
    return SegmentOptions(intensity="percentile", stop_after_absent=0, encode_batch_size=batch,
                          **kw)


def model_input(vol: np.ndarray):
    slices01 = preprocess.normalize_intensity(
        vol, *preprocess.intensity_range(vol, "percentile"))
    return slices01, preprocess.LetterboxTransform(vol.shape[1], vol.shape[2], SIZE)


def test_features_do_not_depend_on_the_order_slices_are_asked_for(case):
    vol, _ = case
    seg = new_segmenter()
    slices01, tf = model_input(vol)
    everything = seg.encoder.encode_images(
        lambda a, b: preprocess.to_model_input(slices01[a:b], tf), 3, count=N)
    lazy = seg.encoder.volume(slices01, tf, 3)
    order = np.random.default_rng(0).permutation(N)
    for i in order[:5]:  # scattered first, as sweeps and support memories ask
        assert torch.equal(lazy.top_of(int(i)), everything.top_of(int(i)))
    for i in order:
        assert torch.equal(lazy.top_of(int(i)), everything.top_of(int(i)))
        for a, b in zip(lazy.high_res(int(i)), everything.high_res(int(i)), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(lazy.pooled_of(int(i)), everything.pooled_of(int(i)))
    assert torch.equal(lazy.pos, everything.pos)


@pytest.mark.parametrize("batch", [1, 4])
def test_results_equal_encoding_the_whole_volume_first(case, batch):
    vol, drawn = case
    opts = options(batch)
    on_demand = new_segmenter()
    first = on_demand.segment(vol, drawn, {1: "blob"}, opts)
    everything = new_segmenter()
    slices01, tf = model_input(vol)
    everything.encoder.encode_volume(slices01, tf, batch, lambda *a: None, lambda: False)
    assert everything.encode_count == N
    second = everything.segment(vol, drawn, {1: "blob"}, opts)
    assert second.stats["slices_encoded_this_run"] == 0
    assert_identical(first, second)


def test_slices_no_sweep_reaches_are_never_encoded_and_later_runs_add_only_new_ones(case):
    vol, drawn = case
    seg = new_segmenter()
    narrow = seg.segment(vol, drawn, {1: "blob"}, options(1, slice_limits={1: [5, 9]}))
    feats = seg.encoder.volume(*model_input(vol), 1)
    assert feats.encoded_slices() == list(range(5, 10))
    assert narrow.stats["slices_encoded_this_run"] == 5
    wider = seg.segment(vol, drawn, {1: "blob"}, options(1, slice_limits={1: [3, 11]}))
    assert wider.stats["slices_encoded_this_run"] == 4  # 3, 4, 10 and 11 only
    assert feats.encoded_slices() == list(range(3, 12))
    # Aligned batches: a batch holding a reached slice is encoded whole, nothing beyond it.
    seg = new_segmenter()
    result = seg.segment(vol, drawn, {1: "blob"}, options(4, slice_limits={1: [6, 9]}))
    assert result.stats["slices_encoded_this_run"] == 8  # batches 4..7 and 8..11
    assert seg.encoder.volume(*model_input(vol), 4).encoded_slices() == list(range(4, 12))


def test_a_click_correction_encodes_only_its_slice(case):
    vol, _ = case
    seg = new_segmenter()
    mask, _ = seg.refine_slice(vol, 5, [(30.0, 40.0)], [1], None,
                               SegmentOptions(intensity="percentile"))
    assert mask.shape == vol.shape[1:] and seg.encode_count == 1


def test_features_kept_on_the_host_give_the_same_result_within_a_batch_of_device_memory(case):
    vol, drawn = case
    opts = options(2)
    on_device = new_segmenter()
    a = on_device.segment(vol, drawn, {1: "blob"}, opts)
    on_host = Segmenter("tiny", weights="random", device="cpu", image_size=SIZE, seed=0,
                        dtype="float32", features_on="host")
    make_objects_visible(on_host.model.sam)
    b = on_host.segment(vol, drawn, {1: "blob"}, opts)
    assert np.array_equal(a.probabilities[1], b.probabilities[1])
    feats_a = on_device.encoder.volume(*model_input(vol), 2)
    feats_b = on_host.encoder.volume(*model_input(vol), 2)
    assert feats_a.on_host is False and feats_b.on_host is True
    per_slice = feats_a.nbytes() // len(feats_a.encoded_slices())
    assert a.stats["feature_device_peak_bytes"] == feats_a.nbytes()
    assert 0 < b.stats["feature_device_peak_bytes"] <= 2 * per_slice  # one batch of 2 slices


def test_auto_placement_follows_the_device_budget(case):
    vol, drawn = case
    for budget_mb, expect_host in ((0.5, True), (4096, False)):
        seg = Segmenter("tiny", weights="random", device="cpu", image_size=SIZE, seed=0,
                        dtype="float32", device_budget_mb=budget_mb)
        seg.segment(vol, drawn, {1: "blob"}, options(1, slice_limits={1: [6, 8]}))
        assert seg.encoder.volume(*model_input(vol), 1).on_host is expect_host, budget_mb
    with pytest.raises(SGPInputError, match="placement"):
        Segmenter("tiny", weights="random", device="cpu", image_size=SIZE, features_on="gpu")


def test_scaling_bench_encodes_the_structure_not_the_volume():
    from SlicerSGP.evaluation import scaling_bench

    seg = Segmenter("tiny", weights="random", device="cpu", image_size=SIZE, seed=0)
    text = scaling_bench.main_scaling(seg, "tiny", 48, (40, 60))
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("40 ", "60 "))]
    assert [int(r[1]) for r in rows] == [scaling_bench.EXTENT] * 2, text
    assert "extent plus twice the encoder's batch (42): yes" in text
