"""Episodic training where the support defines the target: targets (values and unions),
held-out targets, empty-answer episodes, and what the trainer feeds the network for each."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from SlicerSGP.data.targets import build_support_bank, parse_target, target_mask, target_name
from SlicerSGP.errors import SGPInputError
from SlicerSGP.training.episodes import (
    apply_view,
    augment,
    draw_episode,
    draw_view,
    resolve_targets,
)


@dataclass
class _Case:
    """The parts of ``datasets.Case`` episodes read."""

    labels: np.ndarray
    slices01: np.ndarray = field(init=False)
    name: str = "c"

    def __post_init__(self):
        self.slices01 = np.linspace(0, 1, self.labels.size, dtype=np.float32).reshape(
            self.labels.shape)

    @property
    def num_slices(self) -> int:
        return self.labels.shape[0]

    def values(self) -> list[int]:
        return sorted(int(v) for v in np.unique(self.labels) if v)


@dataclass
class _Cfg:
    targets: list[str] | None = None
    structures: list[int] | None = None
    hold_out: list[str] | None = None


def _cell(n_slices: int = 1, shift: int = 0) -> _Case:
    """Cytoplasm (1) around a nucleus (2) on every slice."""
    lab = np.zeros((n_slices, 16, 16), np.uint8)
    lab[:, 3 + shift:13 + shift, 3:13] = 1
    lab[:, 6 + shift:10 + shift, 6:10] = 2
    return _Case(lab)


def test_targets_parse_and_name():
    assert parse_target("2") == (2,) and parse_target("2+1") == (1, 2)
    assert parse_target(" 1 + 2 ") == (1, 2) and target_name((1, 2)) == "1+2"
    assert target_name(3) == "3"
    for bad in ("nucleus", "1+", "0", "-1"):
        with pytest.raises(SGPInputError, match="1\\+2|positive"):
            parse_target(bad)


def test_target_mask_is_the_union_of_its_values():
    lab = _cell().labels
    assert target_mask(lab, 2).sum() == 16
    assert target_mask(lab, (1, 2)).sum() == 100
    assert np.array_equal(target_mask(lab, (1,)), lab == 1)


def test_resolve_targets_defaults_unions_and_hold_out():
    cases = [_cell(), _cell(shift=1)]
    assert resolve_targets(_Cfg(), cases) == ([1, 2], [1, 2])
    assert resolve_targets(_Cfg(structures=[2]), cases) == ([2], [2])
    assert resolve_targets(_Cfg(targets=["2", "1+2"]), cases) == ([1, 2], [2, (1, 2)])
    assert resolve_targets(_Cfg(hold_out=["1"]), cases) == ([2], [2])
    with pytest.raises(SGPInputError, match=r"Label value\(s\) \[3\]"):
        resolve_targets(_Cfg(targets=["3"]), cases)
    with pytest.raises(SGPInputError, match="both trained"):
        resolve_targets(_Cfg(targets=["2"], hold_out=["2"]), cases)
    with pytest.raises(SGPInputError, match="every structure is held out"):
        resolve_targets(_Cfg(hold_out=["1", "2"]), cases)


def test_bank_items_show_their_target():
    cases = [_cell(), _cell(shift=1), _Case(np.zeros((1, 16, 16), np.uint8))]
    bank = build_support_bank(cases, [2, (1, 2)])
    # 2D: the two images with the target, plus as many without it (evenly spaced): one here
    assert [b.case for b in bank[(1, 2)]] == [0, 1, 2]
    assert all(b.value == (1, 2) for b in bank[(1, 2)])


def test_one_image_asked_for_two_targets_gets_two_answers():
    cases = [_cell(), _cell(shift=1)]
    bank = build_support_bank(cases, [2, (1, 2)])
    answers = {}
    for seed in range(40):
        ep = draw_episode(cases, bank, [(0, 2), (0, (1, 2))], 1, False,
                          np.random.default_rng(seed))
        answers[target_name(ep.value)] = int(ep.masks.sum())
        assert {b.case for b in ep.pool} == {1}  # support from the other case
    assert answers == {"2": 16, "1+2": 100}


def test_absent_episodes_in_volumes_take_a_run_without_the_target():
    lab = np.zeros((12, 16, 16), np.uint8)
    lab[2:5, 4:8, 4:8] = 1
    cases = [_Case(lab.copy()), _Case(lab.copy())]
    bank = build_support_bank(cases, [1])
    kinds = set()
    for seed in range(30):
        ep = draw_episode(cases, bank, [(0, 1)], 3, False, np.random.default_rng(seed),
                          absent_share=0.5)
        assert not ep.empty_support  # absent slices exist: the support still shows the target
        assert ep.pool and all(b.case == 1 for b in ep.pool)
        if ep.absent:
            # centred on an absent slice: at least one slice of the run has an empty answer
            assert (ep.masks.reshape(3, -1).sum(1) == 0).any()
        kinds.add(ep.absent)
    assert kinds == {True, False}


def test_where_the_target_is_everywhere_absent_episodes_empty_the_support_and_answer():
    cases = [_cell(), _cell(shift=1)]
    bank = build_support_bank(cases, [2])
    seen = set()
    for seed in range(30):
        ep = draw_episode(cases, bank, [(0, 2)], 1, False, np.random.default_rng(seed),
                          absent_share=0.5)
        assert ep.empty_support == ep.absent
        assert (ep.masks.sum() == 0) == ep.empty_support
        seen.add(ep.empty_support)
    assert seen == {True, False}
    never = [draw_episode(cases, bank, [(0, 2)], 1, False, np.random.default_rng(s)).absent
             for s in range(20)]
    assert not any(never)  # absent_share 0 (the default of draw_episode): none


# --------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def cells_2d(tmp_path_factory):
    """Six 64x64 RGB 'cells': a pink cytoplasm (1) around a dark nucleus (2), placed apart."""
    import json

    import SimpleITK as sitk

    root = tmp_path_factory.mktemp("cells")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for i in range(6):
        cy, cx = 24 + 3 * i, 40 - 3 * i
        cell = (yy - cy) ** 2 + (xx - cx) ** 2 < 15 ** 2
        nucleus = (yy - cy) ** 2 + (xx - cx) ** 2 < 7 ** 2
        img = rng.integers(200, 240, (64, 64, 3)).astype(np.uint8)
        img[cell] = (210, 150, 190)
        img[nucleus] = (90, 40, 120)
        lab = np.where(nucleus, 2, np.where(cell, 1, 0)).astype(np.uint8)
        for sub, arr, rgb in (("images", img, True), ("masks", lab, False)):
            (root / sub).mkdir(exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=rgb),
                            str(root / sub / f"{i:03d}.png"))
    (root / "labels.json").write_text(json.dumps({"1": "cytoplasm", "2": "nucleus"}))
    return root


def test_trainer_feeds_each_episode_the_support_of_its_target(cells_2d, tmp_path):
    """The support masks the network receives are the episode's target (a union for 1+2) on
    the other images, or all empty in an empty-support episode, whose answer is empty too."""
    from SlicerSGP.training.config import TrainConfig
    from SlicerSGP.training.trainer import Trainer

    cfg = TrainConfig(data=str(cells_2d), out=str(tmp_path / "m.safetensors"), model="cpu-mini",
                      weights="random", image_size=256, lora_rank=2, steps=16, lr=1e-3,
                      warmup=2, seed=5, device="cpu", save_every=0, refresh_every=4, top_k=2,
                      targets=["2", "1+2"], absent_share=0.4)
    t = Trainer(cfg, log=lambda *a: None)
    assert t.targets == [2, (1, 2)]
    fed: list[float] = []
    real = t.seg.support_memory

    def spy(feats, i, mask_model, *args, **kw):
        fed.append(float(mask_model.sum()))
        return real(feats, i, mask_model, *args, **kw)

    t.seg.support_memory = spy
    # model-space areas (256 px letterbox of 64 px: x16) of each image's nucleus / whole cell
    area = {"2": [], "1+2": []}
    for c in t.cases:
        area["2"].append(16 * float((c.labels == 2).sum()))
        area["1+2"].append(16 * float((c.labels > 0).sum()))
    seen: set[str] = set()
    while len(seen) < 4 and t.step < 16:
        fed.clear()
        rec = t.train_step()
        assert fed, "no support memory built"
        key = "empty" if rec["empty_support"] else rec["target"]
        seen.add(key)
        if rec["empty_support"]:
            assert max(fed) == 0.0
            assert rec["paired_with"] is None
            continue
        # A paired step asks the same query for the other target too, with its own support:
        # the first half of the memories shows the episode's target, the second the partner's.
        asked = [rec["target"]]
        if rec["paired_with"] is not None:
            assert rec["paired_with"] != rec["target"]
            asked.append(rec["paired_with"])
            seen.add("paired")
        half = len(fed) // len(asked)
        assert half * len(asked) == len(fed)
        for n, target in enumerate(asked):
            lo, hi = min(area[target]), max(area[target])
            part = fed[n * half:(n + 1) * half]
            assert all(0.9 * lo <= a <= 1.1 * hi for a in part), (target, fed)
    assert {"2", "1+2", "empty", "paired"} <= seen


def test_volume_episodes_carry_their_view_for_the_support_and_2d_ones_do_not():
    lab = np.zeros((6, 16, 20), np.uint8)
    lab[:, 2:6, 3:9] = 1
    vol = [_Case(lab.copy()), _Case(lab.copy())]
    bank = build_support_bank(vol, [1])
    views = set()
    for seed in range(12):
        ep = draw_episode(vol, bank, [(0, 1)], 3, True, np.random.default_rng(seed))
        assert ep.support_view is not None
        views.add(ep.support_view)
        # the view is the one the query run was given
        img, masks = apply_view(ep.support_view, vol[0].slices01[ep.window],
                                lab[ep.window] == 1)
        assert np.array_equal(img, ep.images) and np.array_equal(masks, ep.masks)
    assert len(views) > 2
    flat = [_cell(), _cell(shift=1)]
    ep = draw_episode(flat, build_support_bank(flat, [2]), [(0, 2)], 1, True,
                      np.random.default_rng(0))
    assert ep.support_view is None  # 2D image sets keep upright support


def test_augment_is_the_drawn_view_applied():
    img = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    for seed in range(8):
        a = augment(img, img > 30, np.random.default_rng(seed))
        view = draw_view(np.random.default_rng(seed))
        b = apply_view(view, img, img > 30)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert apply_view((False, False, True), img)[0].shape == (2, 7, 5)


def test_trainer_gives_volume_support_the_query_runs_view(tmp_path):
    """A structure in one corner of every slice: whatever flip or rotation the query run got,
    the support masks the network receives sit in the same corner as the query's answer."""
    from SlicerSGP.training.config import TrainConfig
    from SlicerSGP.training.trainer import Trainer

    lab = np.zeros((6, 32, 32), np.uint8)
    lab[:, 3:11, 4:12] = 1
    cfg = TrainConfig(data="unused", out=str(tmp_path / "m.safetensors"), model="cpu-mini",
                      weights="random", image_size=256, lora_rank=2, steps=6, lr=1e-3,
                      warmup=2, seed=3, device="cpu", save_every=0, refresh_every=4, top_k=2,
                      seq_len=2, absent_share=0.0, own_support=0.0)
    t = Trainer(cfg, cases=[_Case(lab)], log=lambda *a: None)

    def centre(mask) -> np.ndarray:
        m = np.asarray(mask, dtype=np.float64).reshape(mask.shape[-2:])
        rr, cc = np.nonzero(m > 0.5)
        return np.array([rr.mean(), cc.mean()])

    answers, fed = [], []
    real_answer, real_memory = t._answer, t.seg.support_memory

    def spy_answer(run, question, rng):
        answers.append((run.episode.support_view, centre(question.masks[0].detach().numpy())))
        return real_answer(run, question, rng)

    def spy_memory(feats, i, mask_model, *args, **kw):
        fed.append(centre(mask_model.detach().numpy()))
        return real_memory(feats, i, mask_model, *args, **kw)

    t._answer, t.seg.support_memory = spy_answer, spy_memory
    views = set()
    for _ in range(4):
        answers.clear()
        fed.clear()
        t.train_step()
        (view, where), = answers
        views.add(view)
        assert fed and all(np.abs(f - where).max() < 8 for f in fed), (view, where, fed)
    assert len(views) > 1
