"""Oracles: checks that say whether a piece of the method does what the paper and SAM2 say,
without pretrained weights. Each raises AssertionError with a reason when it fails, so
test_oracles.py runs them on the code and test_oracle_mutants.py proves that each one fails on
code broken on purpose (a mutant).
"""

from __future__ import annotations

import numpy as np
import torch
from synthetic import make_objects_visible, synthetic_volume

from SlicerSGP.build_model import build_model
from SlicerSGP.data import preprocess
from SlicerSGP.method.propagation import fusion_weight, quality_factor
from SlicerSGP.method.segmenter import Segmenter
from SlicerSGP.method.slice_predictor import NO_OBJECT_LOGIT
from SlicerSGP.method.support import select_top_k
from SlicerSGP.types import SegmentOptions

IMAGE_SIZE = 256
TPOS_SCALE = 30.0
"""Temporal encodings are scaled up in the oracle model so that a wrong temporal index moves
the logits by far more than float32 noise (at SAM2's own scale an off-by-one moves them by
only ~5e-5)."""


def oracle_segmenter(scale_temporal: bool = True) -> Segmenter:
    """Tiny SAM2 with seeded random weights, exact float32, objects made visible."""
    torch.manual_seed(0)
    seg = Segmenter("tiny", weights="random", device="cpu", image_size=IMAGE_SIZE, seed=0,
                    dtype="float32", feature_dtype="float32")
    sam = seg.model.sam
    make_objects_visible(sam)
    if scale_temporal:
        with torch.no_grad():
            sam.maskmem_tpos_enc.mul_(TPOS_SCALE)
            sam.obj_ptr_tpos_proj.weight.mul_(TPOS_SCALE)
    return seg


def model_inputs(vol: np.ndarray, lab: np.ndarray, labeled: list[int]):
    n, h, w = vol.shape
    slices01 = preprocess.normalize_intensity(vol, *preprocess.intensity_range(vol, "percentile"))
    tf = preprocess.LetterboxTransform(h, w, IMAGE_SIZE)
    images = preprocess.to_model_input(slices01, tf)
    masks = {k: tf.mask_to_model(torch.from_numpy(lab[k][None, None].astype(np.float32)))
             for k in labeled}
    return images, masks, tf


def video_predictor_logits(seg: Segmenter, images: torch.Tensor, cond: dict[int, torch.Tensor],
                           start: int, reverse: bool, monkeypatch) -> dict[int, torch.Tensor]:
    """Run the sam2 package's own SAM2VideoPredictor on ``images`` with mask prompts ``cond``.

    Its frame loader is replaced by one that returns our model-ready tensor, so both sides see
    the same pixels; nothing else of the predictor is touched.
    """
    import sam2.sam2_video_predictor as vp
    from sam2.build_sam import build_sam2_video_predictor

    grid = IMAGE_SIZE // 16
    predictor = build_sam2_video_predictor(
        "configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu",
        hydra_overrides_extra=[
            f"++model.image_size={IMAGE_SIZE}",
            f"++model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
            f"++model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]",
        ],
    )
    predictor.load_state_dict(seg.model.sam.state_dict())
    monkeypatch.setattr(vp, "load_video_frames",
                        lambda **kw: (images.clone(), IMAGE_SIZE, IMAGE_SIZE))
    state = predictor.init_state(video_path="(in memory)")
    for k in sorted(cond):
        predictor.add_new_mask(state, frame_idx=k, obj_id=1, mask=cond[k][0, 0] > 0.5)
    for _ in predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
        pass
    outs = state["output_dict_per_obj"][0]["non_cond_frame_outputs"]
    return {k: v["pred_masks"].float() for k, v in outs.items()}


def check_video_predictor(seg: Segmenter, reverse: bool, monkeypatch,
                          tol: float = 1e-6) -> float:
    """Training-free PMG with SAM2's FIFO memory equals SAM2's video predictor, per slice."""
    vol, lab = synthetic_volume()
    labeled = [2, 6]
    images, masks, _ = model_inputs(vol, lab, labeled)
    start = labeled[-1] if reverse else labeled[0]
    expected = video_predictor_logits(seg, images, masks, start, reverse, monkeypatch)
    feats = seg.encode_images(images, batch_size=4)
    support = [seg.support_memory(feats, k, masks[k], k) for k in labeled]
    # Without the interpolation prior (whatever the default): this is SAM2's own path.
    opts = SegmentOptions(memory_policy="fifo", memory_size=seg.model.sam.num_maskmem - 1,
                          use_pma=False, top_k=4, interpolation_prior="off")
    order = list(range(start, -1, -1)) if reverse else list(range(start, vol.shape[0]))
    ours = {j: out.pseudo_low for j, out in
            seg.run_sweep(feats, order, reverse, set(labeled), support, opts) if out is not None}
    assert sorted(ours) == sorted(expected) and len(ours) >= 5
    spread = max(float(v.std()) for v in expected.values())
    assert spread > 1e-2, "the predictor's masks are constant: the comparison would be vacuous"
    worst = max((ours[j] - expected[j]).abs().max().item() for j in ours)
    assert worst < tol, f"max |logit difference| with SAM2's video predictor {worst:.2e}"
    return worst


def check_top_k(seg: Segmenter) -> None:
    """Each slice gets the K support items most similar to it (cosine of pooled embeddings),
    ties to the nearer slice, in pool order."""
    vol, lab = synthetic_volume(n=8, seed=3)
    images, masks, _ = model_inputs(vol, lab, list(range(8)))
    feats = seg.encode_images(images, batch_size=4)
    pool = [seg.support_memory(feats, k, masks[k], k) for k in (0, 2, 4, 6)]
    pool += [seg.support_memory(feats, k, masks[k], None) for k in (1, 7)]
    pooled = feats.pooled.double().numpy()
    for j in range(8):
        sims = np.array([float(pooled[j] @ m.pooled.double().numpy()) for m in pool])
        for k in range(1, len(pool) + 1):
            chosen = select_top_k(feats, j, pool, k)
            idx = [next(i for i, m in enumerate(pool) if m is c) for c in chosen]
            assert len(idx) == k and idx == sorted(idx), f"slice {j}, K={k}: order {idx}"
            rest = [i for i in range(len(pool)) if i not in idx]
            if rest:
                assert sims[idx].min() >= sims[rest].max() - 1e-6, (
                    f"slice {j}, K={k}: a less similar item was chosen over a more similar one")


def alternating_volume(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Even slices a bright disc, odd slices stripes: the most similar memories are two slices
    away, the most recent one slice away, so least-similar and FIFO banks differ."""
    vol, lab = synthetic_volume(n=n, seed=4)
    stripes = (np.arange(vol.shape[2]) // 6 % 2 * 120.0).astype(np.float32)
    for k in range(1, n, 2):
        vol[k] = 60.0 + stripes[None, :] + np.random.default_rng(k).normal(0, 5, vol.shape[1:])
        lab[k] = 0
    return vol, lab


def record_banks(seg: Segmenter, monkeypatch) -> list[tuple[int, list[int]]]:
    """Spy on the slice predictor: (slice, slice indices in its bank) per predicted slice."""
    calls: list[tuple[int, list[int]]] = []
    original = seg.predictor.step

    def spy(feats, j, image, support, bank, *args, **kwargs):
        if kwargs.get("encode_memory", True):  # a slice being predicted (not a quality probe)
            calls.append((j, [m.slice_index for m in bank]))
        return original(feats, j, image, support, bank, *args, **kwargs)

    monkeypatch.setattr(seg.predictor, "step", spy)
    return calls


def check_least_similar_eviction(seg: Segmenter, monkeypatch, size: int = 2) -> int:
    """With the bank full, the memory dropped is the one least similar to the slice being
    predicted: the bank kept is the ``size`` most similar of the bank before plus the newest."""
    vol, lab = alternating_volume()
    drawn = np.zeros_like(lab)
    drawn[0] = lab[0]
    calls = record_banks(seg, monkeypatch)
    seg.segment(vol, drawn, {1: "disc"}, SegmentOptions(memory_size=size, use_pma=False,
                                                        stop_after_absent=0))
    forward = [(j, bank) for j, bank in calls if j > 0]
    # The run's features are cached: read its pooled embeddings back.
    slices01 = preprocess.normalize_intensity(vol, *preprocess.intensity_range(vol, "auto"))
    tf = preprocess.LetterboxTransform(vol.shape[1], vol.shape[2], IMAGE_SIZE)
    encoded = seg.encoder.encode_volume(slices01, tf, 1, lambda *a: None, lambda: False)
    feats = encoded.pooled.double().numpy()
    differs = 0
    previous: list[int] = []
    for j, bank in forward:
        candidates = sorted(set(previous) | ({j - 1} if j - 1 > 0 else set()))
        assert set(bank) <= set(candidates), f"slice {j}: bank {bank} from {candidates}"
        assert len(bank) == min(size, len(candidates)), f"slice {j}: bank {bank}"
        dropped = [c for c in candidates if c not in bank]
        if dropped:
            kept_min = min(feats[j] @ feats[c] for c in bank)
            assert kept_min >= max(feats[j] @ feats[c] for c in dropped) - 1e-6, (
                f"slice {j}: kept {bank} but dropped the more similar {dropped}")
            nearest = sorted(candidates, key=lambda c: j - c)[:size]
            differs += sorted(nearest) != sorted(bank)
        previous = bank
    assert differs, "FIFO and least-similar banks never differed: the check would be vacuous"
    return differs


def check_fusion_weights(seg: Segmenter) -> None:
    """Between two labeled slices a and b the result is the two sweeps' probabilities weighted
    1/(j-a) and 1/(b-j) (linear interpolation between the two sides), each times its
    reverse-propagation quality factor when quality fusion is on. Every sweep starts at its own
    labeled slice with an empty bank (propagation restarts at each drawn slice), so past b the
    result is the sweep from b alone, not one carried on from a."""
    vol, lab = synthetic_volume(n=9, seed=6)
    labeled = [1, 7]
    drawn = np.zeros_like(lab)
    for k in labeled:
        drawn[k] = lab[k]
    n, h, w = vol.shape
    slices01 = preprocess.normalize_intensity(vol, *preprocess.intensity_range(vol, "auto"))
    tf = preprocess.LetterboxTransform(h, w, IMAGE_SIZE)
    masks = {k: drawn[k] == 1 for k in labeled}
    for quality_fusion in (False, True):
        opts = SegmentOptions(stop_after_absent=0, quality_fusion=quality_fusion,
                              interpolation_prior="off")  # the rule without the prior
        res = seg.segment(vol, drawn, {1: "blob"}, opts)
        feats = seg.encoder.encode_volume(slices01, tf, 1, lambda *a: None, lambda: False)
        support = seg.support.from_slices(feats, tf, masks)
        per_side, factor = {}, {}
        for reverse, order in ((False, list(range(1, 7))), (False, [7, 8]),
                               (True, list(range(7, 1, -1))), (True, [1, 0])):
            for j, out in seg.run_sweep(feats, order, reverse, set(labeled), support, opts):
                if out is None:
                    continue
                per_side[(j, reverse)] = torch.sigmoid(tf.logits_to_image(out.final_high))[0, 0]
                anchor = order[0]
                q = seg.propagator.reverse_dice(feats, j, out, anchor, masks[anchor], tf, opts)
                factor[(j, reverse)] = quality_factor(q) if quality_fusion else 1.0
        for j in range(2, 7):
            wf = factor[(j, False)] / (j - 1)
            wb = factor[(j, True)] / (7 - j)
            expected = (wf * per_side[(j, False)] + wb * per_side[(j, True)]) / (wf + wb)
            diff = float(np.abs(res.probabilities[1][j] - expected.numpy()).max())
            assert diff < 1e-5, f"slice {j}: fused probability off by {diff:.2e}"
        assert np.allclose(res.probabilities[1][0], per_side[(0, True)].numpy(), atol=1e-5)
        assert np.allclose(res.probabilities[1][8], per_side[(8, False)].numpy(), atol=1e-5)
    # The distance rule itself, from both sides of a slice.
    assert fusion_weight(3, labeled, False, n) == 0.5 and fusion_weight(3, labeled, True, n) == 0.25


def _object_bias(decoder: torch.nn.Module, value: float) -> None:
    head = decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    with torch.no_grad():
        last.bias.fill_(value)


def trained_model_that_disagrees(pmg_present: bool) -> Segmenter:
    """Random trained-mode model whose PMG (SAM2's decoder) and PMA decoder disagree on every
    slice about whether the structure is there: the gating has to settle it."""
    net = build_model("tiny", weights="random", image_size=IMAGE_SIZE, seed=0, mode="trained",
                      lora_rank=2)
    _object_bias(net.sam.sam_mask_decoder, 8.0 if pmg_present else -8.0)
    _object_bias(net.pma.decoder.stage1, -8.0 if pmg_present else 8.0)
    return Segmenter(net, device="cpu", dtype="float32", feature_dtype="float32")


def check_gating(monkeypatch) -> int:
    """Where the combined presence (PMG and PMA) says absent, the final mask is SAM2's
    no-object mask and the pointer stored in the bank is SAM2's no-object pointer, whichever
    of the two said absent."""
    vol, lab = synthetic_volume(n=6, seed=8)
    drawn = np.zeros_like(lab)
    drawn[0] = lab[0]
    checked = 0
    for pmg_present in (False, True):
        seg = trained_model_that_disagrees(pmg_present)
        outputs = []
        original = seg.predictor.step

        def spy(*args, _original=original, _outputs=outputs, **kwargs):
            out = _original(*args, **kwargs)
            if kwargs.get("encode_memory", True):  # a slice being predicted
                _outputs.append(out)
            return out

        monkeypatch.setattr(seg.predictor, "step", spy)
        seg.segment(vol, drawn, {1: "blob"}, SegmentOptions(stop_after_absent=0))
        no_obj_ptr = seg.model.sam.no_obj_ptr
        for out in outputs:
            pmg, pma = float(out.pmg_object_logits), float(out.final_object_logits)
            if min(pmg, pma) < 0 < max(pmg, pma):
                checked += 1
                assert out.object_score < 0.5, "presence must be absent when one side says so"
                assert bool((out.final_high == NO_OBJECT_LOGIT).all()), (
                    "the final mask survived where the structure was found absent")
                assert out.memory is not None
                assert torch.allclose(out.memory.obj_ptr, no_obj_ptr.expand_as(out.memory.obj_ptr)), (
                    "the bank's pointer does not say 'no object' where the mask does")
    assert checked, "PMG and PMA never disagreed: the check would be vacuous"
    return checked
