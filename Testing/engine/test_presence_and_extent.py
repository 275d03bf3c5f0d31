"""Per-structure support, presence and extent (hysteresis stop, slice limits), the
bank sized to K, on synthetic volumes with scripted presence and on real multi-structure CT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic import synthetic_volume

from SlicerSGP import SGPInputError, SGPWeightsError
from SlicerSGP.build_model import (
    build_model,
    load_sgp_checkpoint,
    read_sgp_metadata,
    save_sgp_checkpoint,
)
from SlicerSGP.data import io
from SlicerSGP.data.intensity import ct_window_for, intensity_range
from SlicerSGP.data.preprocess import LetterboxTransform
from SlicerSGP.method import extent
from SlicerSGP.method.extent import presence_run
from SlicerSGP.method.pma import pseudo_mask_box
from SlicerSGP.method.segmenter import Segmenter
from SlicerSGP.types import SegmentOptions

SIZE = 256


def scripted_presence(seg: Segmenter, monkeypatch, presence: dict[int, float]) -> list[int]:
    """Run the real slice predictor but report the given presence per slice; returns the
    slices predicted, in order. (Runs that script presence pass ``reuse_results=False``: a
    re-run would otherwise reuse the last run's slices, with the presence scripted then.)"""
    seen: list[int] = []
    original = seg.predictor.step

    def step(feats, j, *args, **kwargs):
        out = original(feats, j, *args, **kwargs)
        if kwargs.get("encode_memory", True):  # a slice being predicted (not a quality probe)
            seen.append(j)
            out.object_score = presence.get(j, 0.9)
        return out

    monkeypatch.setattr(seg.predictor, "step", step)
    return seen


def drawn_on(lab: np.ndarray, slices: list[int]) -> np.ndarray:
    drawn = np.zeros_like(lab)
    for k in slices:
        drawn[k] = lab[k]
    return drawn


def test_hysteresis_levels():
    assert presence_run(0, 0.1, 0.2) == 1
    assert presence_run(2, 0.3, 0.2) == 2  # between the levels: unchanged
    assert presence_run(2, 0.6, 0.2) == 0


def test_sweep_stops_after_a_run_of_absent_slices(segmenter, monkeypatch):
    vol, lab = synthetic_volume(n=16, h=64, w=64)
    # Forward past slice 5: absent at 8 and 9, in between at 10 (no reset), absent at 11: the
    # third absent slice ends the structure; 12..15 are never predicted.
    seen = scripted_presence(segmenter, monkeypatch, {8: 0.1, 9: 0.1, 10: 0.3, 11: 0.1})
    # The random model's masks need not overlap the drawn one: the presence rule alone here.
    fresh = SegmentOptions(reuse_results=False, min_continuity=0)
    res = segmenter.segment(vol, drawn_on(lab, [5]), {1: "blob"}, fresh)
    forward = [j for j in seen if j > 5]
    assert forward == [6, 7, 8, 9, 10, 11]
    sources = res.slice_scores[1]["source"]
    assert all(s == "absent" for s in sources[12:])
    assert not res.probabilities[1][12:].any() and not (res.labels[12:] == 1).any()
    # A presence over 0.5 resets the count: with slice 10 present the sweep goes on.
    seen = scripted_presence(segmenter, monkeypatch, {8: 0.1, 9: 0.1, 10: 0.9, 11: 0.1})
    segmenter.segment(vol, drawn_on(lab, [5]), {1: "blob"}, fresh)
    assert [j for j in seen if j > 5] == list(range(6, 16))
    # 0 disables the stop: both sweeps reach the volume's edges.
    seen = scripted_presence(segmenter, monkeypatch, dict.fromkeys(range(16), 0.0))
    segmenter.segment(vol, drawn_on(lab, [5]), {1: "blob"},
                      SegmentOptions(stop_after_absent=0, reuse_results=False))
    assert sorted(set(seen)) == [k for k in range(16) if k != 5]


def scripted_masks(seg: Segmenter, monkeypatch, lab: np.ndarray, off: set[int]) -> list[int]:
    """Run the real slice predictor but make each predicted slice's final mask the true one
    (present), or on the slices in ``off`` the true one moved half a slice over (another
    structure); returns the slices predicted, in order."""
    seen: list[int] = []
    original = seg.predictor.step
    transform = LetterboxTransform(lab.shape[1], lab.shape[2], SIZE)

    def step(feats, j, *args, **kwargs):
        out = original(feats, j, *args, **kwargs)
        if kwargs.get("encode_memory", True):
            seen.append(j)
            mask = np.roll(lab[j], lab.shape[2] // 2, axis=1) if j in off else lab[j]
            model = transform.mask_to_model(torch.from_numpy(mask[None, None].astype(np.float32)))
            out.final_high = (model * 2 - 1) * 10.0
            out.object_score = 0.9
        return out

    monkeypatch.setattr(seg.predictor, "step", step)
    return seen


def test_sweep_stops_where_the_masks_leave_the_structure(segmenter, monkeypatch):
    vol, lab = synthetic_volume(n=16, h=64, w=64)
    fresh = SegmentOptions(reuse_results=False)
    # Past slice 5 the masks jump off the blob at 9, 10 and 11 (present all the while): three
    # breaks in continuity end the sweep; none of them is written.
    seen = scripted_masks(segmenter, monkeypatch, lab, {9, 10, 11})
    res = segmenter.segment(vol, drawn_on(lab, [5]), {1: "blob"}, fresh)
    assert [j for j in seen if j > 5] == [6, 7, 8, 9, 10, 11]
    written = (res.labels == 1).any(axis=(1, 2))
    assert written[:9].all() and not written[9:].any()
    # One slice off the structure is dropped and the sweep goes on from the last kept mask.
    seen = scripted_masks(segmenter, monkeypatch, lab, {9})
    res = segmenter.segment(vol, drawn_on(lab, [5]), {1: "blob"}, fresh)
    written = (res.labels == 1).any(axis=(1, 2))
    assert [j for j in seen if j > 5] == list(range(6, 16))
    assert not written[9] and written[10:].all()
    # 0 turns the rule off: the moved masks are written.
    seen = scripted_masks(segmenter, monkeypatch, lab, {9, 10, 11})
    res = segmenter.segment(vol, drawn_on(lab, [5]), {1: "blob"},
                            SegmentOptions(reuse_results=False, min_continuity=0))
    assert (res.labels[9:12] == 1).any(axis=(1, 2)).all()
    with pytest.raises(SGPInputError, match="min_continuity is a Dice in"):
        segmenter.segment(vol, drawn_on(lab, [5]), {1: "blob"}, SegmentOptions(min_continuity=2))


def discs(radii: list[int], h: int = 64, w: int = 64) -> np.ndarray:
    """Labels: on slice k a centred disc of radius radii[k] (0: none)."""
    yy, xx = np.mgrid[:h, :w]
    r2 = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
    return np.stack([(r2 < r * r) & (r > 0) for r in radii]).astype(np.uint8)


def test_past_a_tapering_end_a_growing_mask_has_left_the_structure(segmenter, monkeypatch):
    vol, _ = synthetic_volume(n=12, h=64, w=64)
    fresh = SegmentOptions(reuse_results=False)
    # Drawn at 3 (radius 14) and 6 (radius 10): the structure narrows towards the high end.
    # Past 6 the masks grow while overlapping (Dice with the last kept >= 0.5): each outgrows
    # it, so 7, 8 and 9 break the taper, are not written and end the sweep.
    lab = discs([0, 0, 0, 14, 13, 12, 10, 12, 14, 15, 15, 15])
    assert extent.tapers({3: lab[3], 6: lab[6]}, reverse=False)
    seen = scripted_masks(segmenter, monkeypatch, lab, set())
    res = segmenter.segment(vol, drawn_on(lab, [3, 6]), {1: "disc"}, fresh)
    written = (res.labels == 1).any(axis=(1, 2))
    assert [j for j in seen if j > 6] == [7, 8, 9] and not written[7:].any()
    # Widening towards that end, growth is the structure going on.
    lab = discs([0, 0, 0, 8, 9, 10, 12, 13, 14, 15, 15, 15])
    assert not extent.tapers({3: lab[3], 6: lab[6]}, reverse=False)
    scripted_masks(segmenter, monkeypatch, lab, set())
    res = segmenter.segment(vol, drawn_on(lab, [3, 6]), {1: "disc"}, fresh)
    assert (res.labels[7:] == 1).any(axis=(1, 2)).all()
    # Towards slice 0 the first drawn slice (8) is the smaller: that end tapers.
    assert extent.tapers({3: lab[3], 6: lab[6]}, reverse=True)
    assert not extent.tapers({3: lab[3]}, reverse=True)  # one drawn slice shows no trend


def test_no_stop_between_labeled_slices(segmenter, monkeypatch):
    vol, lab = synthetic_volume(n=16, h=64, w=64)
    seen = scripted_presence(segmenter, monkeypatch, dict.fromkeys(range(16), 0.0))
    res = segmenter.segment(vol, drawn_on(lab, [2, 9]), {1: "blob"}, SegmentOptions())
    between = set(range(3, 9))
    assert between <= set(seen)  # every slice between the drawn ones, from both sides
    assert all(s == "fused" for s in res.slice_scores[1]["source"][3:9])
    # Past the outermost drawn slices a sweep stops after three absent slices (10, 11, 12).
    assert set(seen) - between == {0, 1, 10, 11, 12}


def test_slice_limits_bound_a_structure(segmenter, monkeypatch):
    vol, lab = synthetic_volume(n=12, h=64, w=64)
    seen = scripted_presence(segmenter, monkeypatch, {})
    res = segmenter.segment(vol, drawn_on(lab, [5]), {1: "blob"},
                            SegmentOptions(slice_limits={1: [3, 8]}, stop_after_absent=0))
    assert sorted(set(seen)) == [3, 4, 6, 7, 8]
    assert not res.probabilities[1][:3].any() and not res.probabilities[1][9:].any()
    assert list(res.slice_scores[1]["source"][9:]) == ["absent"] * 3
    # JSON-style string keys (the service) work too; bad limits are refused.
    seen.clear()
    segmenter.segment(vol, drawn_on(lab, [5]), {1: "blob"},
                      SegmentOptions(slice_limits={"1": [4, 6]}, stop_after_absent=0,
                                     reuse_results=False))
    assert sorted(set(seen)) == [4, 6]
    with pytest.raises(SGPInputError, match="first <= last"):
        segmenter.segment(vol, drawn_on(lab, [5]), {1: "blob"},
                          SegmentOptions(slice_limits={1: [8, 3]}))


def test_bank_holds_k_memories_even_with_one_labeled_slice(segmenter, monkeypatch):
    vol, lab = synthetic_volume(n=8, h=64, w=64)
    sizes: list[int] = []
    original = segmenter.predictor.step

    def step(feats, j, image, support, bank, *args, **kwargs):
        if kwargs.get("encode_memory", True):
            sizes.append(len(bank))
        return original(feats, j, image, support, bank, *args, **kwargs)

    monkeypatch.setattr(segmenter.predictor, "step", step)
    segmenter.segment(vol, drawn_on(lab, [0]), {1: "blob"},
                      SegmentOptions(top_k=4, stop_after_absent=0))
    assert sizes == [0, 1, 2, 3, 4, 4, 4]  # K = 4, not the single support item
    sizes.clear()
    segmenter.segment(vol, drawn_on(lab, [0]), {1: "blob"},
                      SegmentOptions(top_k=16, stop_after_absent=0))
    assert sizes == [0, 1, 2, 3, 4, 5, 6]  # K up to 16 is accepted with a bank to match
    with pytest.raises(SGPInputError, match="top_k 17"):
        segmenter.segment(vol, drawn_on(lab, [0]), {1: "blob"}, SegmentOptions(top_k=17))


@pytest.mark.slow
def test_structures_drawn_on_different_slices_are_not_erased(segmenter, sgp_data):
    """Real CT with several organs, each drawn on its own three slices: no organ is forced
    empty on a slice drawn only for another organ, unless that slice is marked complete."""
    case = sgp_data / "ct_abdomen_small"
    vol, geometry = io.read_image(case / "image.nii.gz")
    labels, _, _ = io.read_labels(case / "labels.nii.gz", geometry,
                                  reference_shape=vol.shape[:3])
    organs = {5: "liver", 1: "spleen", 2: "kidney_right"}
    drawn = np.zeros_like(labels)
    drawn_slices = {}
    for i, v in enumerate(organs):
        present = np.flatnonzero((labels == v).reshape(labels.shape[0], -1).any(axis=1))
        picks = [int(present[len(present) * q // 4]) + i for q in (1, 2, 3)]
        picks = [k for k in picks if k in present]
        drawn_slices[v] = picks
        for k in picks:
            drawn[k][labels[k] == v] = v
    res = segmenter.segment(vol, drawn, organs, SegmentOptions(stop_after_absent=0))
    erased = 0
    for v in organs:
        assert res.labeled_by_structure[v] == sorted(drawn_slices[v])
        others = {k for u, ks in drawn_slices.items() if u != v for k in ks} - set(drawn_slices[v])
        for k in others:
            assert res.slice_scores[v]["source"][k] in ("forward", "backward", "fused")
        erased += sum((labels[k] == v).any() for k in others)
    assert erased > 0, "no organ is present on another organ's drawn slice: nothing was tested"
    # Marked complete, those slices teach absence: organs not drawn there stay empty there.
    union = sorted({k for ks in drawn_slices.values() for k in ks})
    res = segmenter.segment(vol, drawn, organs,
                            SegmentOptions(stop_after_absent=0, complete_slices=union))
    for v in organs:
        for k in union:
            assert np.array_equal(res.labels[k] == v, drawn[k] == v)


def test_untrained_pma_starts_exactly_from_sam2():
    """Zero values in the mask attention and a zero last layer in stage 2: a new trained-mode
    model's PMA is SAM2's decoder (box prompt) upsampled, bit for bit."""
    net = build_model("tiny", weights="random", image_size=SIZE, seed=0, mode="trained")
    feats = torch.randn(1, 256, SIZE // 16, SIZE // 16, generator=torch.Generator().manual_seed(1))
    pseudo = torch.zeros(1, 1, SIZE // 4, SIZE // 4)
    pseudo[..., 10:30, 12:40] = 1.0
    with torch.no_grad():
        assert torch.equal(net.pma.mask_attention(feats, pseudo), feats)


def test_box_comes_from_the_largest_components_with_a_margin():
    prob = torch.zeros(1, 1, 100, 100)
    prob[..., 20:60, 30:50] = 1.0  # the structure
    prob[..., 90:92, 90:92] = 1.0  # a stray blob far away
    box = pseudo_mask_box(prob).tolist()[0]
    assert box == pytest.approx([29.0, 18.0, 51.0, 62.0])  # 5 % of 20 -> 1 px, of 40 -> 2 px
    prob[..., 20:50, 60:80] = 1.0  # a second lobe, 3/4 of the first: part of the structure
    box = pseudo_mask_box(prob).tolist()[0]
    assert box == pytest.approx([27.5, 18.0, 82.5, 62.0])  # 5 % of 50 -> 2.5 px
    assert pseudo_mask_box(torch.zeros(1, 1, 8, 8)) is None
    edge = torch.zeros(1, 1, 10, 10)
    edge[..., 0:10, 0:3] = 1.0
    assert pseudo_mask_box(edge).tolist()[0] == pytest.approx([0.0, 0.0, 4.0, 10.0])


def test_checkpoint_missing_tensors_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    net = build_model("tiny", weights="random", image_size=SIZE, seed=0, mode="trained",
                      lora_rank=2)
    path = save_sgp_checkpoint(net, tmp_path / "full", base={"weights": "random", "seed": 0})
    assert load_sgp_checkpoint(path).config.mode == "trained"
    state = load_file(str(path))
    header = {"sgp": json.dumps(read_sgp_metadata(path))}
    dropped = next(k for k in state if k.startswith("pma.decoder"))
    del state[dropped]
    save_file(state, str(path), metadata=header)
    with pytest.raises(SGPWeightsError, match="lacks 1 tensors"):
        load_sgp_checkpoint(path)


def test_reverse_propagation_quality_is_scored_and_fused(segmenter):
    vol, lab = synthetic_volume(n=8, h=64, w=64)
    res = segmenter.segment(vol, drawn_on(lab, [1, 6]), {1: "blob"},
                            SegmentOptions(stop_after_absent=0))
    table = res.slice_scores[1]
    predicted = table[table["source"] != "labeled"]
    scored = predicted[np.isfinite(predicted["quality"])]
    assert len(scored) >= 4, "reverse propagation scored almost no slice"
    assert ((scored["quality"] >= 0) & (scored["quality"] <= 1)).all()
    expected = scored["predicted_iou"] * scored["object_score"] * scored["quality"]
    assert np.allclose(scored["confidence"], expected, atol=1e-6)
    assert (table[table["source"] == "labeled"]["quality"] == 1).all()
    assert res.timings.get("stage:quality", 0) > 0  # its cost is measured
    off = segmenter.segment(vol, drawn_on(lab, [1, 6]), {1: "blob"},
                            SegmentOptions(stop_after_absent=0, reverse_quality=False))
    assert np.isnan(off.slice_scores[1]["quality"][2:6]).all()
    assert "stage:quality" not in off.timings


def test_reverse_dice_compares_with_the_drawing(segmenter):
    vol, lab = synthetic_volume(n=6, h=64, w=64)
    from SlicerSGP.data import preprocess

    n, h, w = vol.shape
    slices01 = preprocess.normalize_intensity(vol, *preprocess.intensity_range(vol, "auto"))
    tf = preprocess.LetterboxTransform(h, w, SIZE)
    feats = segmenter.encoder.encode_volume(slices01, tf, 1, lambda *a: None, lambda: False)
    masks = {1: lab[1] == 1}
    support = segmenter.support.from_slices(feats, tf, masks)
    opts = SegmentOptions()
    outs = {j: out for j, out in segmenter.run_sweep(feats, [1, 2, 3], False, {1}, support, opts)
            if out is not None}
    out = outs[2]
    assert bool((out.final_high > 0).any())
    right = segmenter.propagator.reverse_dice(feats, 2, out, 1, masks[1], tf, opts)
    wrong = segmenter.propagator.reverse_dice(feats, 2, out, 1, ~masks[1], tf, opts)
    assert 0 <= right <= 1 and 0 <= wrong <= 1 and right != wrong
    empty = type(out)(out.pseudo_low, torch.full_like(out.final_high, -1024.0), None, 0.0, 0.0)
    assert np.isnan(segmenter.propagator.reverse_dice(feats, 2, empty, 1, masks[1], tf, opts))


def test_ct_auto_window_follows_the_drawn_structure(sgp_data):
    case = sgp_data / "ct_abdomen_small"
    vol, geometry = io.read_image(case / "image.nii.gz")
    labels, _, _ = io.read_labels(case / "labels.nii.gz", geometry, reference_shape=vol.shape[:3])
    names = io.read_label_names(case / "labels.nii.gz")
    value = {name: v for v, name in names.items()}
    window = {name: ct_window_for(vol[labels == value[name]])
              for name in ("liver", "vertebrae_L1", "lung_lower_lobe_right")}
    assert window["vertebrae_L1"] == "ct_bone"
    assert window["lung_lower_lobe_right"] == "ct_lung"
    # Liver (unenhanced here, about 40-80 HU): the narrowest window that holds its range.
    liver = vol[labels == value["liver"]]
    lo, hi = intensity_range(vol, window["liver"])
    p5, p95 = np.percentile(liver, (5, 95))
    assert lo <= p5 and p95 <= hi and hi - lo < 400
    assert ct_window_for(None) == "ct_abdomen"  # nothing drawn: the abdomen window
    lo, hi = intensity_range(vol, "auto", drawn=vol[labels == value["vertebrae_L1"]])
    assert (lo, hi) == (-500.0, 1300.0)


def test_multi_view_fusion_averages_three_axes(segmenter):
    vol, lab = synthetic_volume(n=20, h=48, w=48)
    drawn = drawn_on(lab, [3, 10, 16])
    # Random weights: masks past the drawn slices need not overlap them (no continuity stop).
    single = segmenter.segment(vol, drawn, {1: "blob"}, SegmentOptions(min_continuity=0))
    before = segmenter.encode_count
    fused = segmenter.segment(vol, drawn, {1: "blob"}, SegmentOptions(multi_view=True,
                                                                    min_continuity=0))
    # The other two views encode their own slices: 48 + 48 more (the K view is cached).
    assert segmenter.encode_count - before == 48 + 48
    assert fused.notes and "Multi-view" in fused.notes[-1] and fused.timings["multi_view"] > 0
    assert not np.array_equal(fused.probabilities[1], single.probabilities[1])
    for k in (3, 10, 16):  # drawn slices stay exactly as drawn
        assert np.array_equal(fused.labels[k], drawn[k])
    assert fused.probabilities[1].min() >= 0 and fused.probabilities[1].max() <= 1
