"""Slices from prompts (boxes, clicks) and other structures as "not here", in the engine: what
reaches SAM2's prompt encoder, mask decoder and memory encoder (hooked), and the result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import make_objects_visible

from SlicerSGP import SGPInputError
from SlicerSGP.data import preprocess
from SlicerSGP.method.segmenter import Segmenter
from SlicerSGP.types import SegmentOptions, SlicePrompt

SIZE = 256
FAST = dict(reverse_quality=False, stop_after_absent=0)


class Seen(Exception):
    """Raised from a hook once it has what the test needs: the run stops there."""


@pytest.fixture(scope="module")
def segmenter():
    seg = Segmenter("tiny", weights="random", device="cpu", image_size=SIZE, seed=0)
    make_objects_visible(seg.model.sam)
    return seg


def model_coord(v: float, original: int, longest: int) -> float:
    """Where SAM2 must be told voxel index ``v`` is: its centre ``(v + 0.5)`` scaled by the
    letterbox (the longest side fills SIZE), less the 0.5 SAM2's prompt encoder adds back."""
    resized = round(original * SIZE / longest)
    return (v + 0.5) * resized / original - 0.5


def first_prompt(segmenter, volume, prompt, axis):
    """The (coords, labels) the first prompt-encoder call of a run receives (the run stops)."""
    seen = {}

    def hook(module, args, kwargs):
        coords, labels = kwargs["points"]
        seen["coords"], seen["labels"] = coords.detach().clone(), labels.detach().clone()
        raise Seen

    handle = segmenter.model.sam.sam_prompt_encoder.register_forward_pre_hook(hook,
                                                                             with_kwargs=True)
    try:
        with pytest.raises(Seen):
            segmenter.segment(volume, None, {1: "x"}, SegmentOptions(axis=axis, **FAST),
                              prompts=[prompt])
    finally:
        handle.remove()
    return seen["coords"][0].cpu().numpy(), seen["labels"][0].cpu().tolist()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_box_and_clicks_reach_the_prompt_encoder_at_the_right_model_pixels(segmenter, axis):
    """A non-square slice along each axis (letterboxed: padded below or right): the box
    corners come first with labels 2/3, then the clicks 1/0, each at its voxel's centre in
    model pixels, where the slice's image puts that voxel."""
    shape = (20, 24, 40)
    vol = np.zeros(shape, np.float32)
    n, h, w = np.moveaxis(vol, axis, 0).shape
    k, box, click, off = n // 2, (3.0, 2.0, w - 6.0, h - 4.0), (w - 9.0, 5.0), (4.0, h - 6.0)
    # One bright voxel under the positive click: its image in model space is centred on it.
    np.moveaxis(vol, axis, 0)[k, int(click[1]), int(click[0])] = 1000.0
    prompt = SlicePrompt(1, k, box, [(*click, True), (*off, False)])
    coords, labels = first_prompt(segmenter, vol, prompt, axis)

    assert labels == [2, 3, 1, 0]
    longest = max(h, w)
    want = [(model_coord(x, w, longest), model_coord(y, h, longest))
            for x, y in [box[:2], box[2:], click, off]]
    np.testing.assert_allclose(coords, want, atol=1e-4)

    # Independently of the formula: where the slice's voxel lands in the model's input image.
    sl = np.moveaxis(vol, axis, 0)[k:k + 1] / 1000.0
    image = preprocess.to_model_input(sl, preprocess.LetterboxTransform(h, w, SIZE))[0, 0]
    bump = (image - image[-1, -1]).clamp(min=0).numpy()  # the padding corner is background
    rows, cols = np.mgrid[:SIZE, :SIZE]
    centre = ((cols * bump).sum() / bump.sum(), (rows * bump).sum() / bump.sum())
    # SAM2 puts a prompt at coordinate + 0.5 (pixel centre), the bump's centre at index + 0.5.
    np.testing.assert_allclose(coords[2], centre, atol=0.25)


def test_out_of_slice_inverted_or_empty_prompts_are_refused_before_encoding(segmenter):
    vol = np.zeros((6, 24, 40), np.float32)
    before = segmenter.encode_count
    cases = [
        (SlicePrompt(1, 2, (3, 2, 45, 10)), "reaches outside the 40 x 24 slice"),
        (SlicePrompt(1, 2, (30, 2, 10, 10)), "inverted"),
        (SlicePrompt(1, 6, (3, 2, 5, 5)), "slice 6 is outside the volume"),
        (SlicePrompt(1, 2, points=[(50, 3, True)]), "click (50, 3) lies outside"),
        (SlicePrompt(1, 2), "empty: give a box"),
        (SlicePrompt(1, 2, mask=np.zeros((3, 3), bool)), "current mask is (3, 3)"),
        (SlicePrompt(0, 2, (3, 2, 5, 5)), "0 is background"),
    ]
    for prompt, message in cases:
        with pytest.raises(SGPInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            segmenter.segment(vol, None, None, SegmentOptions(**FAST), prompts=[prompt])
    with pytest.raises(SGPInputError, match="second prompt for the same structure"):
        segmenter.segment(vol, None, None, SegmentOptions(**FAST),
                          prompts=[SlicePrompt(1, 2, (3, 2, 5, 5)),
                                   SlicePrompt(1, 2, points=[(4, 4, True)])])
    lab = np.zeros(vol.shape, np.uint8)
    lab[:, :4, :4] = 2
    with pytest.raises(SGPInputError, match="both to be segmented and 'not here'"):
        segmenter.segment(vol, lab, {1: "a", 2: "b"}, SegmentOptions(exclude=[2], **FAST),
                          prompts=[SlicePrompt(1, 2, (3, 2, 5, 5))])
    with pytest.raises(SGPInputError, match=r"\[3\] are to be 'not here'"):
        segmenter.segment(vol, lab, None, SegmentOptions(exclude=[3], **FAST),
                          prompts=[SlicePrompt(1, 2, (3, 2, 5, 5))])
    assert segmenter.encode_count == before


def fixed_decoder(sam, masks_of, ious_of, calls):
    """A forward hook on SAM2's mask decoder replacing its masks and predicted IoUs (the
    decoder's own selection of 3 masks or 1 has run); records multimask_output per call."""
    def hook(module, args, kwargs, out):
        masks, ious, tokens, obj = out
        calls.append(bool(kwargs["multimask_output"]))
        return masks_of(masks), ious_of(ious), tokens, obj
    return sam.sam_mask_decoder.register_forward_hook(hook, with_kwargs=True)


def thirds(masks: torch.Tensor) -> torch.Tensor:
    """Mask m of M: logits +10 on the m-th third of the columns, -10 elsewhere."""
    out = torch.full_like(masks, -10.0)
    m, width = masks.shape[1], masks.shape[-1]
    for i in range(m):
        out[:, i, :, i * width // 3:(i + 1) * width // 3] = 10.0
    return out


@pytest.mark.parametrize("best", [0, 1, 2])
def test_a_lone_box_or_click_takes_the_mask_of_highest_predicted_iou(segmenter, best):
    """SAM2's multimask output for a lone box and a lone click, the mask whose predicted IoU is
    highest chosen (forced here); a box with a click asks for one mask."""
    vol = np.zeros((4, 32, 48), np.float32)
    calls: list[bool] = []
    ious = torch.full((1, 3), 0.1)
    ious[0, best] = 0.9

    def force(i: torch.Tensor) -> torch.Tensor:
        return ious.to(i) if i.shape[-1] == 3 else i

    feats_of = segmenter.encoder.volume
    sl = preprocess.normalize_intensity(vol, 0.0, 1.0)
    transform = preprocess.LetterboxTransform(32, 48, SIZE)
    feats = feats_of(sl, transform, 1)
    handle = fixed_decoder(segmenter.model.sam, thirds, force, calls)
    try:
        lone_box, iou = segmenter.predictor.from_prompts(
            feats, 1, transform, np.array([[2, 2], [40, 28]]), [2, 3], None, True)
        lone_click, _ = segmenter.predictor.from_prompts(
            feats, 1, transform, np.array([[20, 10]]), [1], None, True)
    finally:
        handle.remove()
    assert calls == [True, True]
    # The chosen third, in the slice: the model's 256 columns cover the 48 slice columns.
    assert np.array_equal(lone_box, thirds_slice(best, 32, 48))
    cols = np.flatnonzero(lone_box.any(axis=0))
    assert best * 16 - 1 <= cols.min() and cols.max() <= (best + 1) * 16
    assert np.array_equal(lone_box, lone_click)
    assert iou == pytest.approx(0.9, abs=0.01)  # bf16 autocast on a CPU with AMX

    # Through segment: the prompted slice is the chosen mask, marked "prompted".
    calls.clear()
    handle = fixed_decoder(segmenter.model.sam, thirds, force, calls)
    try:
        res = segmenter.segment(vol, None, {1: "x"}, SegmentOptions(**FAST),
                                prompts=[SlicePrompt(1, 1, (2, 2, 40, 28))])
        first_of_second = len(calls)
        with_click = segmenter.segment(
            vol, None, {1: "x"}, SegmentOptions(**FAST),
            prompts=[SlicePrompt(1, 1, (2, 2, 40, 28), [(20, 10, True)])])
    finally:
        handle.remove()
    assert calls[0] is True and calls[first_of_second] is False
    assert np.array_equal(res.labels[1] == 1, lone_box)
    assert res.slice_scores[1]["source"].tolist() == ["backward", "prompted", "forward",
                                                      "forward"]
    assert res.prompted_by_structure == {1: [1]} and res.labeled_by_structure == {1: [1]}
    assert res.slice_scores[1]["predicted_iou"][1] == pytest.approx(0.9, abs=0.01)
    # A box with a click: one mask (SAM2's first output), not the multimask choice.
    assert np.array_equal(with_click.labels[1] == 1, thirds_slice(0, 32, 48))


def thirds_slice(i: int, h: int, w: int) -> np.ndarray:
    """The i-th third of the model's columns, as slice voxels (the decoder is 64 x 64 here)."""
    transform = preprocess.LetterboxTransform(h, w, SIZE)
    low = thirds(torch.zeros(1, 3, SIZE // 4, SIZE // 4))[:, i:i + 1]
    return (torch.sigmoid(transform.logits_to_image(low))[0, 0] >= 0.5).numpy()


def touching_case(n: int = 4, h: int = 40, w: int = 56):
    """Structure 1 (drawn on slice 1 only) and structure 2 (given on every slice) side by side,
    touching along a column."""
    rng = np.random.default_rng(3)
    vol = rng.normal(100.0, 10.0, (n, h, w)).astype(np.float32)
    lab = np.zeros((n, h, w), np.uint8)
    lab[:, 8:32, 30:50] = 2
    lab[1, 8:32, 10:30] = 1
    vol[lab > 0] += 80
    return vol, lab


def leak_everywhere(masks: torch.Tensor) -> torch.Tensor:
    return torch.full_like(masks, 10.0)


def memory_masks(segmenter, vol, lab, opts, prompts=None):
    """Every mask SAM2's memory encoder receives (as probabilities), with a decoder that
    leaks everywhere, and the result."""
    sam = segmenter.model.sam
    got: list[torch.Tensor] = []

    def take(module, args, kwargs):
        masks = args[1] if len(args) > 1 else kwargs["masks"]
        got.append(((masks.float() - sam.sigmoid_bias_for_mem_enc)
                    / sam.sigmoid_scale_for_mem_enc).detach().clone())

    calls: list[bool] = []
    h1 = fixed_decoder(sam, leak_everywhere, lambda i: i, calls)
    h2 = sam.memory_encoder.register_forward_pre_hook(take, with_kwargs=True)
    try:
        res = segmenter.segment(vol, lab, {1: "left"}, opts, prompts=prompts)
    finally:
        h1.remove()
        h2.remove()
    return got, res


def in_model(region: np.ndarray) -> np.ndarray:
    """The model pixels whose centre lies in a voxel of ``region`` (h x w slice)."""
    h, w = region.shape
    t = preprocess.LetterboxTransform(h, w, SIZE)
    out = np.zeros((SIZE, SIZE), bool)
    rows = np.minimum(((np.arange(t.resized_h) + 0.5) * h / t.resized_h).astype(int), h - 1)
    cols = np.minimum(((np.arange(t.resized_w) + 0.5) * w / t.resized_w).astype(int), w - 1)
    out[:t.resized_h, :t.resized_w] = region[np.ix_(rows, cols)]
    return out


def test_not_here_keeps_the_other_structure_out_of_every_memory_and_the_output(segmenter):
    vol, lab = touching_case()
    other = in_model(lab[0] == 2)
    # Without: the leak reaches the memory bank and the output.
    got, res = memory_masks(segmenter, vol, lab, SegmentOptions(**FAST))
    assert any(float(m[0, 0][torch.from_numpy(other)].max()) > 0.5 for m in got)
    assert ((res.labels == 1) & (lab == 2)).any()

    got, res = memory_masks(segmenter, vol, lab, SegmentOptions(exclude=[2], **FAST))
    assert len(got) >= vol.shape[0]  # the drawn slice's memory and each predicted slice's
    for m in got:
        assert float(m[0, 0][torch.from_numpy(other)].max()) < 0.5
    # The rest of each predicted slice still leaks (the model says "everywhere"): only the
    # other structure is cleared.
    assert all(float(m[0, 0][:4, :4].min()) > 0.5 for m in got[1:])
    assert not ((res.labels == 1) & (lab == 2)).any()
    assert set(np.unique(res.labels)) == {0, 1}  # the excluded structure is not returned
    assert res.structures == {1: "left"}
    assert (res.labels[1] == (lab[1] == 1)).all()  # the drawn slice as drawn


def test_not_here_gives_a_negative_click_on_a_prompted_slice(segmenter):
    vol, lab = touching_case()
    lab[1][lab[1] == 1] = 0  # structure 1 only from a box spanning both
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("points", [t.detach().clone() for t in kwargs["points"]])

    sam = segmenter.model.sam
    handle = sam.sam_prompt_encoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        got, res = memory_masks(segmenter, vol, lab, SegmentOptions(exclude=[2], **FAST),
                                prompts=[SlicePrompt(1, 1, (10, 8, 45, 31))])
    finally:
        handle.remove()
    coords, labels = seen["points"]
    assert labels[0].tolist() == [2, 3, 0]
    # The negative click sits inside structure 2 (inside the box): its deepest voxel.
    t = preprocess.LetterboxTransform(*lab.shape[1:], SIZE)
    x = (float(coords[0, 2, 0]) + 0.5) * t.width / t.resized_w - 0.5
    y = (float(coords[0, 2, 1]) + 0.5) * t.height / t.resized_h - 0.5
    assert lab[1, round(y), round(x)] == 2
    assert 8 + 5 <= y <= 31 - 5 and 30 + 5 <= x <= 45 - 5  # deep inside, not on an edge
    # The prompted slice (the decoder leaks everywhere) holds none of structure 2.
    assert res.slice_scores[1]["source"][1] == "prompted"
    assert (res.labels[1] == 1).any() and not ((res.labels == 1) & (lab == 2)).any()
    for m in got:
        assert float(m[0, 0][torch.from_numpy(in_model(lab[0] == 2))].max()) < 0.5
