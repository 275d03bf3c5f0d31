"""Propagation restarts at every drawn slice; re-runs reuse, exactly, what did not change.

Every re-run below is compared bit for bit with a full run of a Segmenter that has no cache,
and the slices it re-predicts are compared with the ones an independent reading of the rule
says must change: the sweeps beside a new or redrawn slice, and the slices whose top-K
support now picks something else (computed here from the pooled embeddings).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from synthetic import make_objects_visible, synthetic_volume

from SlicerSGP.data import io, preprocess
from SlicerSGP.errors import Cancelled
from SlicerSGP.evaluation.bench import synthetic_ct
from SlicerSGP.method.encoding import EncodedSlices
from SlicerSGP.method.propagation import plan_sweeps
from SlicerSGP.method.segmenter import Segmenter
from SlicerSGP.method.support import Memory, select_top_k
from SlicerSGP.types import SegmentationResult, SegmentOptions, SupportItem

SIZE = 256
OPTS = SegmentOptions(intensity="percentile", stop_after_absent=0)


def new_segmenter() -> Segmenter:
    seg = Segmenter("tiny", weights="random", device="cpu", image_size=SIZE, seed=0,
                    dtype="float32")
    make_objects_visible(seg.model.sam)
    return seg


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return new_segmenter()


@pytest.fixture(scope="module")
def reference() -> Segmenter:
    """The same model, used with no cache at all: every run below is a full run."""
    return new_segmenter()


def full_run(seg: Segmenter, *args, **kwargs) -> SegmentationResult:
    seg.clear_cache()
    return seg.segment(*args, **kwargs)


def assert_identical(a: SegmentationResult, b: SegmentationResult) -> None:
    assert np.array_equal(a.labels, b.labels)
    for name in ("probabilities", "pseudo_masks", "slice_scores"):
        da, db = getattr(a, name), getattr(b, name)
        assert list(da) == list(db), name
        for k in da:
            x, y = da[k], db[k]
            assert x.dtype == y.dtype and x.shape == y.shape, (name, k)
            # Bit for bit, field by field (NaN, where a slice could not be scored, equals NaN).
            for f in x.dtype.names or (None,):
                np.testing.assert_array_equal(x[f] if f else x, y[f] if f else y,
                                              err_msg=f"{name}[{k}] {f or ''}")


def drawn_on(lab: np.ndarray, slices: list[int], value: int = 1) -> np.ndarray:
    out = np.zeros_like(lab)
    for k in slices:
        out[k][lab[k] == value] = value
    return out


def spy_predictions(seg: Segmenter, monkeypatch) -> list[tuple[int, bool]]:
    """(slice, reverse) of every slice the propagation predicts (not the quality probes)."""
    seen: list[tuple[int, bool]] = []
    original = seg.predictor.step

    def step(feats, j, image, support, bank, ptr_history, reverse, *args, **kwargs):
        if kwargs.get("encode_memory", True):
            seen.append((j, reverse))
        return original(feats, j, image, support, bank, ptr_history, reverse, *args, **kwargs)

    monkeypatch.setattr(seg.predictor, "step", step)
    return seen


# --------------------------------------------------------------------------- independent rule

def interval_sweeps(drawn: list[int], n: int) -> dict[tuple[int, bool], list[int]]:
    """(start, reverse) -> the slices it predicts: from each drawn slice to the next one (or
    the volume's end) in each direction (no stop: ``stop_after_absent=0``)."""
    bounds = [-1, *drawn, n]
    sweeps = {}
    for i, a in enumerate(drawn):
        sweeps[(a, False)] = list(range(a + 1, bounds[i + 2]))
        sweeps[(a, True)] = list(range(a - 1, bounds[i], -1))
    return sweeps


def expected_predictions(pooled: torch.Tensor, old: list[int], new: list[int],
                         redrawn: set[int], n: int, k: int,
                         local: bool = False) -> Counter:
    """The (slice, reverse) predictions a re-run from drawn slices ``old`` to ``new`` must
    make: a sweep from a new or redrawn slice entirely; any other from the first slice whose
    top-K support differs (a redrawn slice is a different item) or that it did not visit."""

    def picks(drawn: list[int], version: str, start: int, reverse: bool, j: int) -> tuple:
        pool = drawn
        if local:  # the drawn slices bounding the sweep's range
            i = drawn.index(start)
            pool = [a for a in (drawn[i - 1] if i else None, start) if a is not None] if reverse \
                else [a for a in (start, drawn[i + 1] if i + 1 < len(drawn) else None)
                      if a is not None]
        stand_ins = [Memory(None, None, pooled[a], a) for a in pool]
        chosen = select_top_k(pooled_only(pooled), j, stand_ins, k)
        return tuple((m.slice_index, version if m.slice_index in redrawn else "") for m in chosen)

    before, after = interval_sweeps(old, n), interval_sweeps(new, n)
    expected: Counter = Counter()
    for (start, reverse), order in after.items():
        previous = before.get((start, reverse)) if start not in redrawn else None
        p = 0
        while previous is not None and p < min(len(order), len(previous)) \
                and order[p] == previous[p] \
                and picks(new, "new", start, reverse, order[p]) == \
                picks(old, "old", start, reverse, order[p]):
            p += 1
        expected.update((j, reverse) for j in order[p:])
    return expected


def pooled_only(pooled: torch.Tensor) -> EncodedSlices:
    """Encoded features holding only the pooled embeddings (all ``select_top_k`` reads)."""
    empty = pooled.new_zeros((len(pooled), 0, 0, 0))
    return EncodedSlices(s0=empty, s1=empty, top=empty, pos=empty[:1], pooled=pooled)


def pooled_embeddings(seg: Segmenter, vol: np.ndarray) -> torch.Tensor:
    slices01 = preprocess.normalize_intensity(vol, *preprocess.intensity_range(vol, "percentile"))
    tf = preprocess.LetterboxTransform(vol.shape[1], vol.shape[2], SIZE)
    return seg.encoder.encode_volume(slices01, tf, 1, lambda *a: None, lambda: False).pooled


# --------------------------------------------------------------------------- restarts

def test_sweeps_restart_at_every_drawn_slice(segmenter, monkeypatch):
    plan = plan_sweeps([3, 8, 14], 20, (0, 19), True)
    assert [(s.start, s.reverse, s.order) for s in plan] == [
        (3, False, [3, 4, 5, 6, 7]), (8, False, [8, 9, 10, 11, 12, 13]),
        (14, False, [14, 15, 16, 17, 18, 19]), (14, True, [14, 13, 12, 11, 10, 9]),
        (8, True, [8, 7, 6, 5, 4]), (3, True, [3, 2, 1, 0])]
    limited = plan_sweeps([3, 8], 20, (5, 10), True)
    assert [s.order for s in limited] == [[3, 5, 6, 7], [8, 9, 10], [8, 7, 6, 5]]
    single = plan_sweeps([6], 10, (0, 9), True)  # one drawn slice: as before, both ways
    assert [s.order for s in single] == [list(range(6, 10)), list(range(6, -1, -1))]

    # Through the engine: the first slice after each drawn slice starts with an empty bank.
    vol, lab = synthetic_volume(n=12, h=64, w=64)
    banks: dict[tuple[int, bool], list[int]] = {}
    original = segmenter.predictor.step

    def step(feats, j, image, support, bank, ptr_history, reverse, *args, **kwargs):
        if kwargs.get("encode_memory", True):
            banks[(j, reverse)] = sorted(m.slice_index for m in bank)
        return original(feats, j, image, support, bank, ptr_history, reverse, *args, **kwargs)

    monkeypatch.setattr(segmenter.predictor, "step", step)
    segmenter.segment(vol, drawn_on(lab, [2, 6, 9]), {1: "blob"},
                      SegmentOptions(stop_after_absent=0, reuse_results=False))
    for j, reverse in ((3, False), (7, False), (10, False), (8, True), (5, True), (1, True)):
        assert banks[(j, reverse)] == [], f"slice {j} did not start a fresh bank"
    assert banks[(8, False)] == [7] and banks[(4, True)] == [5]  # within a sweep it grows


# --------------------------------------------------------------------------- exactness

def test_reruns_equal_full_runs_bit_for_bit(segmenter, reference, monkeypatch):
    """A 32 x 512 x 512 CT-like volume: add a drawn slice, redraw one, take one away; each
    re-run equals a full run with no cache and re-predicts exactly what the rule says. (K = 2:
    with K at least the number of drawn slices every slice picks them all, and any change of
    a drawn slice changes every slice's support.)"""
    vol, lab = synthetic_ct(32, 512, seed=1)
    opts = SegmentOptions(intensity="percentile", stop_after_absent=0, top_k=2)
    segmenter.clear_cache()
    steps = [[5, 11, 18, 25], [5, 11, 15, 18, 25], [5, 11, 15, 18, 25], [5, 15, 18, 25]]
    pooled = pooled_embeddings(segmenter, vol)
    last = None
    for i, drawn in enumerate(steps):
        labels = drawn_on(lab, drawn)
        if i >= 2:  # the user redraws slice 18: a bite taken out of it
            labels[18, 250:270, :] = 0
        redrawn = {18} if i == 2 else set()
        seen = spy_predictions(segmenter, monkeypatch)
        res = segmenter.segment(vol, labels, {1: "blob"}, opts)
        monkeypatch.undo()
        assert_identical(res, full_run(reference, vol, labels, {1: "blob"}, opts))
        if last is not None:
            expected = expected_predictions(pooled, last, drawn, redrawn, 32, opts.top_k)
            assert Counter(seen) == expected, f"step {i}: re-predicted the wrong slices"
            total = sum(len(o) for o in interval_sweeps(drawn, 32).values())
            assert res.slices_predicted[1] == len(seen)
            assert res.slices_reused[1] == total - len(seen) > 0, f"step {i}: nothing reused"
            assert "Re-run:" in res.notes[-1]
        last = drawn


def test_local_support_repredicts_the_two_intervals_only(segmenter, reference, monkeypatch):
    vol, lab = synthetic_ct(32, 512, seed=2)
    opts = SegmentOptions(intensity="percentile", stop_after_absent=0, local_support=True)
    segmenter.clear_cache()
    first = segmenter.segment(vol, drawn_on(lab, [5, 11, 18, 25]), {1: "blob"}, opts)
    seen = spy_predictions(segmenter, monkeypatch)
    labels = drawn_on(lab, [5, 11, 14, 18, 25])
    res = segmenter.segment(vol, labels, {1: "blob"}, opts)
    # Slice 14 splits (11, 18): its two intervals are predicted from both sides, nothing else.
    assert Counter(seen) == Counter([(j, r) for j in (12, 13, 15, 16, 17)
                                     for r in (False, True)])
    pooled = pooled_embeddings(segmenter, vol)
    assert Counter(seen) == expected_predictions(pooled, [5, 11, 18, 25], [5, 11, 14, 18, 25],
                                                 set(), 32, opts.top_k, local=True)
    assert res.slices_predicted == {1: 10}
    assert res.slices_reused == {1: first.slices_predicted[1] - 12}  # (11, 18) had 6 x 2
    assert_identical(res, full_run(reference, vol, labels, {1: "blob"}, opts))


@pytest.mark.slow
def test_real_ct_rerun_is_exact_and_leaves_other_structures_alone(segmenter, reference,
                                                                  sgp_data):
    case = sgp_data / "ct_abdomen_small"
    vol, geometry = io.read_image(case / "image.nii.gz")
    labels, _, _ = io.read_labels(case / "labels.nii.gz", geometry, reference_shape=vol.shape[:3])
    organs = {5: "liver", 1: "spleen"}
    drawn = np.zeros_like(labels)
    for k in (4, 15, 26):
        for v in organs:
            drawn[k][labels[k] == v] = v
    opts = SegmentOptions()  # the defaults: K = 4, the hysteresis stop, quality fusion
    segmenter.clear_cache()
    first = segmenter.segment(vol, drawn, organs, opts)
    drawn[20][labels[20] == 5] = 5  # a corrected liver slice becomes a drawn one
    again = segmenter.segment(vol, drawn, organs, opts)
    assert_identical(again, full_run(reference, vol, drawn, organs, opts))
    assert again.slices_predicted[1] == 0 and again.slices_reused[1] == first.slices_predicted[1]
    assert again.slices_predicted[5] > 0
    assert again.stats["slices_encoded_this_run"] == 0


def test_seed_run_with_only_a_support_bank_is_reused_whole(segmenter, reference, monkeypatch):
    vol, lab = synthetic_volume(n=10, h=64, w=64, seed=5)
    other, other_lab = synthetic_volume(n=10, h=64, w=64, seed=6)
    window = preprocess.intensity_range(other, "auto")
    bank = {1: [SupportItem(preprocess.normalize_intensity(other[k], *window), other_lab[k] == 1)
                for k in (3, 6)]}
    opts = SegmentOptions(stop_after_absent=0)
    segmenter.clear_cache()
    first = segmenter.segment(vol, None, {1: "blob"}, opts, support_bank=bank)
    assert first.slices_predicted[1] > 0
    chosen = []
    original = segmenter.propagator.choose_seed
    monkeypatch.setattr(segmenter.propagator, "choose_seed",
                        lambda *a, **k: chosen.append(1) or original(*a, **k))
    again = segmenter.segment(vol, None, {1: "blob"}, opts, support_bank=bank)
    assert not chosen, "the start slice was searched for again"
    assert again.slices_predicted == {1: 0}
    assert again.slices_reused == first.slices_predicted
    assert_identical(again, full_run(reference, vol, None, {1: "blob"}, opts, support_bank=bank))


# --------------------------------------------------------------------------- what is kept

def test_cancelled_rerun_keeps_the_last_completed_one(segmenter, reference):
    vol, lab = synthetic_volume(n=14, h=64, w=64, seed=7)
    a, c = drawn_on(lab, [2, 7, 12]), drawn_on(lab, [2, 5, 7, 12])
    opts = SegmentOptions(intensity="percentile", stop_after_absent=0, local_support=True)
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 8  # well into propagation

    segmenter.clear_cache()
    segmenter.segment(vol, a, {1: "blob"}, opts)
    with pytest.raises(Cancelled):
        segmenter.segment(vol, c, {1: "blob"}, opts, cancel=cancel)
    after_cancel = segmenter.segment(vol, c, {1: "blob"}, opts)
    segmenter.clear_cache()
    segmenter.segment(vol, a, {1: "blob"}, opts)
    direct = segmenter.segment(vol, c, {1: "blob"}, opts)
    # Compared with the completed run of ``a``, slice 5 redoes (2, 7) only: 3, 4 and 6 both ways.
    assert (direct.slices_predicted, direct.slices_reused) == ({1: 6}, {1: 11})
    assert after_cancel.slices_reused == direct.slices_reused
    assert after_cancel.slices_predicted == direct.slices_predicted
    assert_identical(after_cancel, full_run(reference, vol, c, {1: "blob"}, opts))


def test_what_is_kept_is_bounded_and_option_bound(segmenter):
    vol, lab = synthetic_volume(n=10, h=64, w=64, seed=8)
    both = drawn_on(lab, [2, 7])
    both[[2, 7], 2:10, 50:60] = 2  # a second structure, away from the first
    segmenter.clear_cache()
    segmenter.segment(vol, both, {1: "a", 2: "b"}, OPTS)
    assert len(segmenter.reruns) == 2 and segmenter.reruns.nbytes() > 0
    # Options a slice depends on: nothing reused; options acting at fusion only: all reused.
    other_k = segmenter.segment(vol, both, {1: "a"}, SegmentOptions(intensity="percentile",
                                                                    stop_after_absent=0, top_k=2))
    assert other_k.slices_reused == {1: 0}
    segmenter.segment(vol, both, {1: "a"}, OPTS)
    no_fusion = segmenter.segment(vol, both, {1: "a"},
                                  SegmentOptions(intensity="percentile", stop_after_absent=0,
                                                 quality_fusion=False))
    assert no_fusion.slices_predicted == {1: 0}
    off = segmenter.segment(vol, both, {1: "a"}, SegmentOptions(intensity="percentile",
                                                                stop_after_absent=0,
                                                                reuse_results=False))
    assert off.slices_reused == {1: 0} and "Re-run:" not in " ".join(off.notes)
    # The budget is what the features leave of cache_mb: with none left over, only the most
    # recent structure is kept.
    budget = segmenter.encoder.cache_bytes
    segmenter.encoder.cache_bytes = segmenter.encoder.cached_bytes() + \
        segmenter.reruns.nbytes() // 2
    try:
        segmenter.segment(vol, both, {2: "b"}, OPTS)
        assert len(segmenter.reruns) == 1
        assert segmenter.segment(vol, both, {1: "a"}, OPTS).slices_reused == {1: 0}
    finally:
        segmenter.encoder.cache_bytes = budget
    # Features that leave the volume cache take their results with them.
    segmenter.encoder.clear()
    segmenter.segment(vol, both, {1: "a"}, OPTS)  # (re-encodes: new features)
    assert len(segmenter.reruns) == 1
    segmenter.clear_cache()
    assert len(segmenter.reruns) == 0


# --------------------------------------------------------------------------- through sgp serve

def test_rerun_through_sgp_serve_counts_what_it_reused(tmp_path):
    from service.test_service import MODEL_ARGS, start_server

    from SlicerSGP.service.client import connect_engine

    token = "t0k3n-" + "r" * 26
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    proc, url = start_server([*MODEL_ARGS, "--token-file", str(token_file)],
                             tmp_path / "stderr.log")
    try:
        client = connect_engine(url, token)
        vol, lab = synthetic_volume(n=16, h=64, w=64, seed=9)
        opts = SegmentOptions(stop_after_absent=0, local_support=True)
        first = client.segment(vol, drawn_on(lab, [2, 8, 13]), {1: "blob"}, opts)
        again = client.segment(vol, drawn_on(lab, [2, 5, 8, 13]), {1: "blob"}, opts)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    # The server kept one Segmenter. First run: 5 + 4 + 2 slices forward from 2, 8 and 13, as
    # many backward from 13, 8 and 2. The re-run redid the two intervals beside slice 5 (3, 4
    # and 6, 7, both ways) and took the other 12 predictions from the first run.
    assert (first.slices_predicted, first.slices_reused) == ({1: 22}, {1: 0})
    assert (again.slices_predicted, again.slices_reused) == ({1: 8}, {1: 12})
    assert any("Re-run: 8 slice predictions recomputed, 12 reused" in n for n in again.notes)
    assert again.stats["slices_encoded_this_run"] == 0


# --------------------------------------------------------------------------- sgp bench --rerun

def test_bench_rerun_prints_both_runs_and_the_ratio():
    out = subprocess.run(
        [sys.executable, "-m", "SlicerSGP.cli", "bench", "--rerun", "--slices", "24", "--size",
         "64", "--image-size", "256", "--device", "cpu", "--threads", "1", "--local-support"],
        capture_output=True, text=True, timeout=600, check=True).stdout
    drawn = [int(k) for k in re.search(r"drawn slices \[([\d, ]+)\]", out)[1].split(", ")]
    added, a, b = (int(v) for v in re.search(r"slice (\d+) \(between (\d+) and (\d+)\)",
                                              out).groups())
    assert len(drawn) == 5 and a < added < b and [a, b] == [k for k in drawn if a <= k <= b]
    runs = re.findall(r"(\d+) slices encoded, +(\d+) slice predictions made, +(\d+) reused", out)
    (enc1, pred1, reused1), (enc2, pred2, reused2) = [tuple(map(int, r)) for r in runs]
    # Slices past where a sweep stopped are never encoded; a re-run encodes nothing.
    assert 0 < enc1 <= 24 and (reused1, enc2) == (0, 0)
    # Local support: the two intervals beside the corrected slice, from both sides.
    assert pred2 == 2 * (b - a - 2) and pred2 + reused2 == pred1 - 2
    ratio = float(re.search(r"ratio re-run / first run: ([\d.]+)", out)[1])
    assert 0 < ratio < 1
    assert "threads 1" in out and "CPU " in out


# --------------------------------------------------------------------------- sgp bench --floor

def test_bench_floor_runs_propagation_only_beside_the_predictor_and_the_engine():
    """(c) does SAM2's propagation through the engine and nothing of the method's own: no PMA
    decode, no quality score; the same encodes as (b)."""
    out = subprocess.run(
        [sys.executable, "-m", "SlicerSGP.cli", "bench", "--slices", "8", "--size", "64",
         "--image-size", "256", "--device", "cpu", "--threads", "1", "--floor"],
        capture_output=True, text=True, timeout=600, check=True).stdout
    calls = dict(re.findall(r"^(\([abc]\)) [^:]+: calls (.+)$", out, re.M))
    counts = {k: dict((name, int(n)) for name, n in re.findall(r"(\w+) (\d+)", v))
              for k, v in calls.items()}
    b, c = counts["(b)"], counts["(c)"]
    assert c["encode"] == b["encode"] and c["memory_attention"] < b["memory_attention"]
    # (b) adds PMA's decode and the quality score's memory attention and decode to each step.
    assert c["decode"] < b["decode"] and c["memory_attention"] < b["memory_attention"]
    assert re.search(r"ratio \(b\)/\(a\): wall [\d.]+", out)
    assert re.search(r"ratio \(c\)/\(a\): wall [\d.]+ \(the floor", out)
