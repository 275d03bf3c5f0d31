"""sgp train / sgp eval: loss terms, checkpoint round trip through sgp segment, exact resume,
metrics against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SlicerSGP import cli
from SlicerSGP.data import io
from SlicerSGP.evaluation.metrics import dice, evaluate_labels, hd95, iou
from SlicerSGP.evaluation.reports import montage_tile, write_montage
from SlicerSGP.training.config import TrainConfig, state_path
from SlicerSGP.training.losses import (
    LossWeights,
    bce_loss,
    bernoulli_kl,
    dice_loss,
    object_loss,
    sgp_loss,
)
from SlicerSGP.training.trainer import Trainer, train
from SlicerSGP.types import SegmentOptions

# --------------------------------------------------------------------------- loss terms


def _disk(n: int = 32, r: float = 8.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return (((yy - n / 2) ** 2 + (xx - n / 2) ** 2) < r * r).float()[None, None]


def _logits(mask: torch.Tensor, scale: float = 6.0) -> torch.Tensor:
    return (mask * 2 - 1) * scale


def test_dice_and_bce_fall_as_the_prediction_approaches_the_target():
    y = _disk()
    right, wrong = _logits(y), _logits(1 - y)
    half = _logits(_disk(r=5.0))  # a smaller disk inside the target
    for loss in (dice_loss, bce_loss):
        a, b, c = (float(loss(x, y)) for x in (right, half, wrong))
        assert a < b < c, loss.__name__
    assert float(dice_loss(_logits(y, 30.0), y)) < 1e-6
    assert float(dice_loss(wrong, y)) > 0.99
    # empty target, empty prediction: nothing to find, nothing found -> (almost) no loss
    empty = torch.zeros_like(y)
    assert float(dice_loss(_logits(empty, 30.0), empty)) < 1e-6
    assert float(bce_loss(_logits(empty, 30.0), empty)) < 1e-6


def test_gradient_step_lowers_each_term():
    y = _disk()
    x = torch.zeros_like(y, requires_grad=True)
    for loss in (dice_loss, bce_loss):
        x.grad = None
        before = loss(x, y)
        before.backward()
        with torch.no_grad():
            after = loss(x - 5.0 * x.grad / x.grad.abs().max(), y)
        assert float(after) < float(before.detach()), loss.__name__


def test_valid_mask_leaves_padding_out():
    y = _disk()
    x = _logits(y).clone()
    valid = torch.ones_like(y)
    valid[..., 24:, :] = 0
    x[..., 24:, :] = 10.0  # nonsense in the padding only
    assert float(bce_loss(x, y, valid)) == pytest.approx(float(bce_loss(_logits(y), y, valid)))
    assert float(bce_loss(x, y)) > float(bce_loss(x, y, valid))


def test_kl_is_zero_on_agreement_and_only_moves_the_pseudo_mask():
    y = _disk()
    final = _logits(y, 3.0).requires_grad_(True)
    same = final.detach().clone().requires_grad_(True)
    assert float(bernoulli_kl(same, final).detach()) < 1e-6
    near = _logits(_disk(r=7.0), 3.0).requires_grad_(True)
    far = _logits(1 - y, 3.0).requires_grad_(True)
    k_near, k_far = bernoulli_kl(near, final), bernoulli_kl(far, final)
    assert 0 < float(k_near.detach()) < float(k_far.detach())
    k_far.backward()
    assert final.grad is None, "the final prediction is the (detached) target"
    assert far.grad is not None and float(far.grad.abs().sum()) > 0
    with torch.no_grad():
        stepped = far - 50.0 * far.grad / far.grad.abs().max()
    assert float(bernoulli_kl(stepped, final)) < float(k_far)
    # the gradient is sigmoid(pseudo) - sigmoid(final) per pixel (mean over pixels)
    expected = (torch.sigmoid(far.detach()) - torch.sigmoid(final.detach())) / y.numel()
    assert torch.allclose(far.grad, expected, atol=1e-7)


def test_kl_takes_quarter_resolution_pseudo_masks_and_sam2_no_object_value():
    y = _disk(64)
    final = _logits(y, 4.0)
    low = torch.nn.functional.interpolate(final, size=(16, 16), mode="bilinear",
                                          align_corners=False)
    assert float(bernoulli_kl(low, final)) < float(bernoulli_kl(-low, final))
    silent = torch.full((1, 1, 16, 16), -1024.0)  # SAM2's "no object" pseudo-mask
    assert math.isfinite(float(bernoulli_kl(silent, final)))


def test_object_loss_and_weighted_total():
    y = _disk()
    present, absent = torch.tensor([[4.0]]), torch.tensor([[-4.0]])
    assert float(object_loss([present], y)) < float(object_loss([absent], y))
    empty = torch.zeros_like(y)
    assert float(object_loss([absent], empty)) < float(object_loss([present], empty))
    final, pseudo = _logits(_disk(r=7.0)), _logits(_disk(r=6.0))
    w = LossWeights(dice=2.0, ce=3.0, kl=0.5, obj=0.25)
    parts = sgp_loss(final, pseudo, y, weights=w, object_logits=[present])
    expected = (2 * parts["dice"] + 3 * parts["bce"] + 0.5 * parts["kl"] + 0.25 * parts["obj"])
    assert float(parts["loss"]) == pytest.approx(float(expected), rel=1e-6)
    no_kl = sgp_loss(final, None, y, weights=w)
    assert float(no_kl["kl"]) == 0.0 and float(no_kl["obj"]) == 0.0


# --------------------------------------------------------------------------- data


def _write_png(path: Path, arr: np.ndarray, rgb: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=rgb), str(path))


@pytest.fixture(scope="module")
def tiny_2d(tmp_path_factory) -> Path:
    """Six 64x64 RGB images, a bright disk (label 1) on noise, at different places/sizes."""
    root = tmp_path_factory.mktemp("tiny2d")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for i in range(6):
        cy, cx, r = 20 + 4 * i, 40 - 3 * i, 8 + i
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img = rng.integers(20, 90, (64, 64, 3)).astype(np.uint8)
        img[disk] = (200, 120, 180)
        _write_png(root / "images" / f"{i:03d}.png", img, rgb=True)
        _write_png(root / "masks" / f"{i:03d}.png", disk.astype(np.uint8))
    (root / "labels.json").write_text(json.dumps({"1": "blob"}))
    return root


@pytest.fixture(scope="module")
def tiny_3d(tmp_path_factory) -> Path:
    """Two small labeled volumes with a drifting blob: NRRD labels, and a Slicer .seg.nrrd."""
    root = tmp_path_factory.mktemp("tiny3d")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:40, :48]
    for c in range(2):
        vol = rng.normal(100, 10, (6, 40, 48)).astype(np.float32)
        lab = np.zeros((6, 40, 48), np.uint8)
        for k in range(1, 5):
            blob = (yy - 20 - c) ** 2 + (xx - 16 - 3 * k) ** 2 < 36
            vol[k][blob] += 80
            lab[k][blob] = 1
        case = root / f"case{c}"
        case.mkdir()
        img = sitk.GetImageFromArray(vol)
        img.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(img, str(case / "image.nrrd"))
        if c == 0:
            lab_img = sitk.GetImageFromArray(lab)
            lab_img.CopyInformation(img)
            sitk.WriteImage(lab_img, str(case / "labels.nrrd"))
        else:
            io.write_segmentation(case / "labels.seg.nrrd", lab, io.geometry_from_sitk(img),
                                  {1: "blob"})
    return root


def test_datasets_read_volumes_seg_nrrd_and_2d_pairs(tiny_3d, tiny_2d):
    from SlicerSGP.data.datasets import load_dataset

    vols = load_dataset(tiny_3d)
    assert [c.name for c in vols] == ["case0", "case1"]
    assert vols[1].ref.labels.name == "labels.seg.nrrd"
    assert vols[0].slices01.shape == (6, 40, 48) and vols[0].slices_with(1) == [1, 2, 3, 4]
    pairs = load_dataset(tiny_2d)
    assert len(pairs) == 6 and pairs[0].slices01.shape == (1, 64, 64, 3)
    assert pairs[0].names == {1: "blob"}


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model="cpu-mini", weights="random", image_size=256,
                lora_rank=2, steps=4, lr=1e-3, warmup=2, seed=3, device="cpu", save_every=0,
                refresh_every=2, top_k=2)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("lora_only", [False, True], ids=["full-state", "lora+pma"])
def test_checkpoint_from_train_loads_in_sgp_segment_with_the_same_outputs(
        tiny_2d, tmp_path, capsys, lora_only):
    from SlicerSGP.method.segmenter import Segmenter
    from SlicerSGP.types import SegmentOptions

    out = tmp_path / "ck.safetensors"
    trainer = train(_cfg(tiny_2d, out, steps=2, cases="0:5", train_all=not lora_only),
                    progress=False)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["full_state"] is (not lora_only)
    assert meta["config"]["mode"] == "trained" and meta["training"]["steps"] == 2

    query = tiny_2d / "images" / "005.png"
    bank_dir = tmp_path / "bank"
    for sub in ("images", "masks"):
        (bank_dir / sub).mkdir(parents=True)
        for i in range(5):
            (bank_dir / sub / f"{i:03d}.png").write_bytes((tiny_2d / sub / f"{i:03d}.png").read_bytes())
    seg_path, prob_dir = tmp_path / "pred.seg.nrrd", tmp_path / "prob"
    rc = cli.main(["segment", str(query), "--support-bank", str(bank_dir), "--label", "1",
                   "--model", str(out), "--device", "cpu", "--out", str(seg_path),
                   "--probabilities", str(prob_dir), "--quiet"])
    assert rc == 0, capsys.readouterr().err

    image, geometry = io.read_image(query)
    bank = io.load_support_sets(bank_dir, structures=[1])
    ref = Segmenter(trainer.model, device="cpu").segment(image, None, {1: "blob"},
                                                         SegmentOptions(), support_bank=bank)
    labels, _, _ = io.read_labels(seg_path)
    np.testing.assert_array_equal(labels, ref.labels)
    prob, _ = io.read_image(next(prob_dir.glob("*.nrrd")))
    np.testing.assert_allclose(prob, ref.probabilities[1], atol=1e-6)
    # and the checkpoint holds what the model holds
    loaded = Segmenter(str(out), device="cpu").model.state_dict()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_resume_continues_exactly(tiny_2d, tmp_path):
    straight = train(_cfg(tiny_2d, tmp_path / "a.safetensors", steps=4), progress=False)
    first = train(_cfg(tiny_2d, tmp_path / "b.safetensors", steps=4), progress=False,
                  stop_after=2)
    assert first.step == 2 and state_path(tmp_path / "b.safetensors").is_file()
    resumed = train(_cfg(tiny_2d, tmp_path / "b.safetensors", steps=4), progress=False,
                    resume=True)
    assert resumed.step == 4
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    changed = 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    init = Trainer(_cfg(tiny_2d, tmp_path / "c.safetensors")).model.state_dict()
    changed = sum(not torch.equal(init[k], a[k]) for k in a)
    assert changed > 100, "training changed (almost) nothing"


def test_resume_refuses_other_settings(tiny_2d, tmp_path):
    from SlicerSGP.errors import SGPInputError

    train(_cfg(tiny_2d, tmp_path / "r.safetensors", steps=2), progress=False, stop_after=1)
    with pytest.raises(SGPInputError, match="top_k"):
        train(_cfg(tiny_2d, tmp_path / "r.safetensors", steps=2, top_k=3), progress=False,
              resume=True)


@pytest.mark.parametrize("own_support", [0.0, 1.0], ids=["other-cases", "own-slice"])
def test_volumes_train_as_slice_sequences_with_3d_memory(tiny_3d, tmp_path, own_support):
    t = Trainer(_cfg(tiny_3d, tmp_path / "v.safetensors", seq_len=3, top_k=2, memory_size=3,
                     own_support=own_support))
    seen = []
    real_step = t.seg.predictor.step

    def spy(feats, j, image, support, bank, *a, **kw):
        seen.append((j, len(support), len(bank), [m.slice_index for m in support]))
        return real_step(feats, j, image, support, bank, *a, **kw)

    t.seg.predictor.step = spy
    rec = t.train_step()
    assert rec["own_support"] is bool(own_support)
    assert np.isfinite(rec["loss"]) and rec["kl"] >= 0
    # Three slices of one volume per episode; with its own labeled slice, that slice starts
    # the sweep as support (it has a slice index, other cases' items do not) and is not predicted.
    assert len(seen) == (2 if own_support else 3)
    assert [b for _, _, b, _ in seen] == list(range(len(seen))), \
        "each slice sees the memories of those before"
    assert all(s == 2 for _, s, _, _ in seen)
    own_in_support = any(i is not None for _, _, _, idx in seen for i in idx)
    assert own_in_support is bool(own_support)
    # a support pool larger than K: the engine picks K per slice, with autograd on
    t._preselect = lambda query, pool: pool
    seen.clear()
    rec = t.train_step()
    assert np.isfinite(rec["loss"])
    assert len(seen) == (2 if own_support else 3) and all(s == 2 for _, s, _, _ in seen)


def test_prior_episodes_draw_both_ends_and_prompt_pma_between(tiny_3d, tmp_path):
    """With --prior-share 1 every own-slice episode has both ends drawn (support, not
    predicted) and, where both show the target, PMA gets their interpolation in between."""
    t = Trainer(_cfg(tiny_3d, tmp_path / "p.safetensors", seq_len=4, own_support=1.0,
                     prior_share=1.0, absent_share=0.0))
    seen = []
    real_step = t.seg.predictor.step

    def spy(feats, j, image, support, bank, *a, prior=None, **kw):
        seen.append((j, prior, sorted(m.slice_index for m in support
                                      if m.slice_index is not None)))
        return real_step(feats, j, image, support, bank, *a, prior=prior, **kw)

    t.seg.predictor.step = spy
    prompted = 0
    for _ in range(4):
        seen.clear()
        rec = t.train_step()
        assert np.isfinite(rec["loss"]) and rec["own_support"]
        # The two inner slices of four are predicted: both ends are drawn, support only.
        assert sorted(j for j, _, _ in seen) == [1, 2]
        assert all(set(own) <= {0, 3} for _, _, own in seen)
        priors = [p for _, p, _ in seen]
        if priors[0] is not None:
            prompted += 1
            assert all(p is not None and p.shape == (1, 1, 256, 256) for p in priors)
    assert prompted and t.interpolator.calls >= prompted


@pytest.mark.parametrize("switch", ["use_pmg", "use_pma", "use_3d_memory"])
def test_ablation_switches_act_in_training(tiny_3d, tmp_path, switch):
    t = Trainer(_cfg(tiny_3d, tmp_path / "ab.safetensors", seq_len=3, **{switch: False}))
    before = {k: v.clone() for k, v in t.model.state_dict().items() if k.startswith("pma.")}
    seen = []
    real_step = t.seg.predictor.step

    def spy(feats, j, image, support, bank, *a, **kw):
        out = real_step(feats, j, image, support, bank, *a, **kw)
        seen.append((len(bank), out))
        return out

    t.seg.predictor.step = spy
    rec = t.train_step()
    assert seen, "the spy saw no slice: the checks below would be vacuous"
    if switch == "use_pma":
        after = t.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "PMA off: PMA untouched"
        assert rec["kl"] == 0.0
    if switch == "use_pmg":
        assert rec["kl"] == 0.0
        assert all(float(o.pseudo_low.max()) <= -20 for _, o in seen)
    if switch == "use_3d_memory":
        assert all(b == 0 for b, _ in seen)
    assert t.opts.__dict__[switch] is False


def test_training_and_inference_use_the_same_bank_size(tiny_3d, tmp_path):
    """The bank holds K memories in both (the paper's rule), not 1 as training once did."""
    t = Trainer(_cfg(tiny_3d, tmp_path / "bank.safetensors", seq_len=5, top_k=2,
                     own_support=0.0))
    banks: list[int] = []
    real_step = t.seg.predictor.step

    def spy(feats, j, image, support, bank, *a, **kw):
        if kw.get("encode_memory", True):
            banks.append(len(bank))
        return real_step(feats, j, image, support, bank, *a, **kw)

    t.seg.predictor.step = spy
    t.train_step()
    training = list(banks)
    assert training == [0, 1, 2, 2, 2]
    banks.clear()
    case = t.cases[0]
    drawn = np.zeros_like(case.labels)
    k = case.slices_with(t.values[0])[0]
    drawn[k] = case.labels[k]
    t.seg.segment(case.slices01, drawn, {t.values[0]: "x"},
                  SegmentOptions(top_k=2, stop_after_absent=0))
    assert banks[:3] == [0, 1, 2] and max(banks) == 2  # grows to K = 2, as in training


def test_sgp_train_command(tiny_2d, tmp_path, capsys):
    out = tmp_path / "cmd.safetensors"
    rc = cli.main(["train", str(tiny_2d), "--out", str(out), "--model", "cpu-mini", "--weights",
                   "random", "--image-size", "256", "--lora-rank", "2", "--steps", "2",
                   "--top-k", "2", "--quiet", "--device", "cpu", "--loss-pseudo", "0.5"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "step 2/2" in text and "all weights" in text
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["training"]["config"]["loss_pseudo"] == 0.5 and meta["support_prior"] == 2
    assert out.is_file() and out.with_suffix(".json").is_file() and state_path(out).is_file()
    rc = cli.main(["train", str(tiny_2d), "--out", str(out), "--model", "cpu-mini", "--weights",
                   "random", "--image-size", "256", "--lora-rank", "2", "--steps", "3",
                   "--top-k", "2", "--quiet", "--device", "cpu", "--resume",
                   "--loss-pseudo", "0.5"])
    assert rc == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["training"]["steps"] == 3


def test_train_rejects_absent_label(tiny_2d, tmp_path, capsys):
    rc = cli.main(["train", str(tiny_2d), "--out", str(tmp_path / "x.safetensors"), "--model",
                   "cpu-mini", "--weights", "random", "--image-size", "256", "--label", "7",
                   "--steps", "1", "--quiet"])
    assert rc == 2
    assert "appear in no training case" in capsys.readouterr().err


# --------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values():
    gt = np.zeros((1, 6, 6), bool)
    gt[0, 1:3, 1:4] = True          # 6 voxels
    pred = np.zeros_like(gt)
    pred[0, 1:3, 2:4] = True        # 4 voxels, all inside gt
    assert dice(pred, gt) == pytest.approx(2 * 4 / 10)
    assert iou(pred, gt) == pytest.approx(4 / 6)
    # every surface voxel of pred is in gt (distance 0); gt's column x=1 is 1 voxel from pred;
    # with x spacing 0.5 that is 0.5; 95th percentile of gt->pred distances [0,0,0,0,.5,.5]
    d = np.array([0, 0, 0, 0, 0.5, 0.5])
    assert hd95(pred, gt, (1.0, 1.0, 0.5)) == pytest.approx(float(np.percentile(d, 95)))


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0)) -> float:
    """Independent 2D HD95: boundary pixels by explicit 4-neighbour test, all-pairs distances."""
    def boundary(m):
        p = np.pad(m, 1)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        return np.argwhere(m & ~inner) * np.asarray(spacing)

    pa, pb = boundary(a), boundary(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_hd95_agrees_with_a_brute_force_computation():
    yy, xx = np.mgrid[:30, :40]
    a = (yy - 14) ** 2 + (xx - 18) ** 2 < 64
    b = ((yy - 16) / 7.0) ** 2 + ((xx - 22) / 10.0) ** 2 < 1
    for spacing in ((1.0, 1.0), (0.7, 1.3)):
        assert hd95(a[None], b[None], (1.0, *spacing)) == pytest.approx(
            _brute_hd95(a, b, spacing), rel=1e-9)


def test_hd95_in_physical_units_between_single_voxels():
    a = np.zeros((3, 5, 5), bool)
    b = np.zeros_like(a)
    a[0, 2, 1] = True
    b[2, 2, 4] = True  # 2 slices and 3 columns apart
    assert hd95(a, b, (2.5, 1.0, 0.8)) == pytest.approx(math.hypot(2 * 2.5, 3 * 0.8))
    assert hd95(a, b) == pytest.approx(math.hypot(2, 3))


def test_empty_masks_are_handled_explicitly():
    empty = np.zeros((2, 4, 4), bool)
    some = empty.copy()
    some[1, 1, 1] = True
    assert (dice(empty, empty), iou(empty, empty), hd95(empty, empty)) == (1.0, 1.0, 0.0)
    for p, g in ((empty, some), (some, empty)):
        assert dice(p, g) == 0.0 and iou(p, g) == 0.0
        assert math.isinf(hd95(p, g))


def test_evaluate_labels_per_structure_and_excluded_slices():
    gt = np.zeros((3, 4, 4), np.uint8)
    gt[:, 0:2, 0:2] = 1
    gt[:, 2:4, 2:4] = 2
    pred = gt.copy()
    pred[0] = 0               # slice 0 missed entirely
    pred[2, 2:4, 2:4] = 0     # structure 2 missed on slice 2
    rows = evaluate_labels(pred, gt, [1, 2], (2.0, 1.0, 1.0), case="c", names={1: "a"})
    by = {r.value: r for r in rows}
    assert by[1].dice == pytest.approx(2 * 8 / 20) and by[1].structure == "a"
    assert by[2].dice == pytest.approx(2 * 4 / 16) and by[2].structure == "label_2"
    assert by[1].gt_volume == pytest.approx(12 * 2.0)
    kept = evaluate_labels(pred, gt, [1], exclude_slices=[0])
    assert kept[0].dice == 1.0 and kept[0].slices_scored == 2


def test_sgp_eval_from_prediction_files(tiny_2d, tmp_path, capsys):
    pred_dir = tmp_path / "pred"
    for i in range(6):
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_2d / "masks" / f"{i:03d}.png")))
        if i == 1:
            lab = np.zeros_like(lab)  # a missed case: Dice 0, HD95 inf
        if i == 2:
            lab = np.roll(lab, 2, axis=1)  # shifted by two pixels
        _write_png(pred_dir / f"{i:03d}.png", lab.astype(np.uint8))
    csv_path, json_path, png = tmp_path / "m.csv", tmp_path / "m.json", tmp_path / "m.png"
    rc = cli.main(["eval", str(tiny_2d), "--pred", str(pred_dir), "--csv", str(csv_path),
                   "--json", str(json_path), "--montage", str(png), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("case,value,structure,dice,iou,hd95")
    rows = {ln.split(",")[0]: ln.split(",") for ln in lines[1:]}
    assert float(rows["000"][3]) == 1.0 and float(rows["000"][5]) == 0.0
    assert float(rows["001"][3]) == 0.0 and rows["001"][5] == "inf"
    gt2 = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_2d / "masks" / "002.png"))) > 0
    assert float(rows["002"][5]) == pytest.approx(_brute_hd95(np.roll(gt2, 2, axis=1), gt2),
                                                   rel=1e-5)
    assert 1.0 < float(rows["002"][5]) <= 2.0
    doc = json.loads(json_path.read_text())
    assert doc["summary"]["1"]["hd95_infinite"] == 1
    assert [c["hd95"] for c in doc["cases"] if c["case"] == "001"] == [None]
    assert sitk.ReadImage(str(png)).GetNumberOfComponentsPerPixel() == 3


def test_sgp_eval_runs_the_model(tiny_2d, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    train(_cfg(tiny_2d, out, steps=1, cases="0:4"), progress=False)
    rc = cli.main(["eval", str(tiny_2d), "--cases", "4:6", "--model", str(out),
                   "--bank-cases", "0:4", "--device", "cpu", "--json", str(tmp_path / "r.json"),
                   "--montage", str(tmp_path / "r.png"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [c["case"] for c in doc["cases"]] == ["004", "005"]
    assert "blob" in capsys.readouterr().out
    rc = cli.main(["eval", str(tiny_2d), "--cases", "3:5", "--model", str(out),
                   "--bank-cases", "0:4", "--quiet"])
    assert rc == 2, "a case must not be its own support"


def test_montage_tile_draws_the_three_contours(tmp_path):
    img = np.full((40, 60), 0.5, np.float32)
    gt = np.zeros((40, 60), bool)
    gt[10:30, 10:30] = True
    final = np.zeros_like(gt)
    final[12:32, 25:45] = True
    pseudo = np.zeros_like(gt)
    pseudo[5:15, 40:55] = True
    tile = montage_tile(img, gt, pseudo, final, tile=120)
    assert tile.shape == (120, 120, 3)
    colours = {tuple(c) for c in tile.reshape(-1, 3)}
    assert {(0, 255, 0), (255, 40, 40), (0, 170, 255)} <= colours
    assert (tile[80:] == 0).all(), "letterboxed: the bottom is padding"
    path = write_montage([tile, tile, tile], tmp_path / "m.png", columns=2)
    assert sitk.ReadImage(str(path)).GetSize() == (242, 242)


class _RunsOnUnpickle:
    """An object whose unpickling would run code: a resume state must never do that."""

    def __reduce__(self):
        return (print, ("unpickled: arbitrary code ran",))


def test_resume_state_loads_without_arbitrary_unpickling(tiny_2d, tmp_path, capsys):
    from SlicerSGP.errors import SGPInputError

    out = tmp_path / "s.safetensors"
    train(_cfg(tiny_2d, out, steps=2), progress=False, stop_after=1)
    sp = state_path(out)
    state = torch.load(sp, weights_only=True)  # what sgp train writes loads safely
    assert state["step"] == 1
    state["history"].append(_RunsOnUnpickle())
    torch.save(state, sp)
    with pytest.raises(SGPInputError, match="Delete it and start afresh"):
        train(_cfg(tiny_2d, out, steps=2), progress=False, resume=True)
    assert "arbitrary code ran" not in capsys.readouterr().out


def test_a_cut_off_resume_state_is_refused_with_what_to_do(tmp_path):
    from SlicerSGP.errors import SGPInputError
    from SlicerSGP.training.checkpoints import read_state

    whole = tmp_path / "whole.state.pt"
    torch.save({"step": 3, "model": {"w": torch.ones(64, 64)}}, whole)
    assert read_state(whole)["step"] == 3
    cut = tmp_path / "cut.state.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(SGPInputError, match="damaged or incomplete.*intact copy.*without --resume"):
        read_state(cut)
    (tmp_path / "empty.state.pt").write_bytes(b"")
    with pytest.raises(SGPInputError, match="damaged or incomplete"):
        read_state(tmp_path / "empty.state.pt")


def test_pseudo_mask_term_supervises_the_pseudo_mask_only_when_weighted():
    y = _disk()
    final = _logits(_disk(r=7.0))
    good = _logits(_disk(r=7.0)).requires_grad_(True)
    bad = _logits(torch.zeros_like(y)).requires_grad_(True)
    off = sgp_loss(final, None, y, pmg_logits=good)
    assert float(off["pseudo"]) == 0.0 and float(off["loss"]) == pytest.approx(
        float(off["dice"] + off["bce"]))
    w = LossWeights(pseudo=0.5)
    near, far = sgp_loss(final, None, y, weights=w, pmg_logits=good), \
        sgp_loss(final, None, y, weights=w, pmg_logits=bad)
    assert float(near["pseudo"]) < float(far["pseudo"])
    assert float(far["loss"]) == pytest.approx(
        float(far["dice"] + far["bce"] + 0.5 * far["pseudo"]), rel=1e-6)
    far["loss"].backward()
    assert bad.grad is not None and float(bad.grad.abs().sum()) > 0
    # quarter-resolution logits, as PMG gives them, are compared at the target's size
    low = torch.nn.functional.avg_pool2d(good.detach(), 4)
    assert float(sgp_loss(final, None, y, weights=w, pmg_logits=low)["pseudo"]) < \
        float(far["pseudo"])
