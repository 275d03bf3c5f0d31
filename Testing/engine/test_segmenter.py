"""Engine behaviour beyond the oracles: support banks, seeds, cancel, structures, modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from synthetic import make_objects_visible, synthetic_volume

from SlicerSGP import Cancelled, SGPInputError, SupportItem
from SlicerSGP.build_model import build_model, load_sgp_checkpoint, save_sgp_checkpoint
from SlicerSGP.errors import SGPWeightsError
from SlicerSGP.method.model import ModelConfig
from SlicerSGP.method.pma import SupportPointer, SupportPrior, support_cue
from SlicerSGP.method.segmenter import Segmenter
from SlicerSGP.types import SegmentOptions

SIZE = 256


def other_case(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Another case's slices scaled to [0, 1] (what a support item holds), and its labels."""
    other, other_lab = synthetic_volume(n=n, seed=5)
    lo, hi = float(other.min()), float(other.max())
    return (other - lo) / (hi - lo), other_lab


@pytest.fixture(scope="module")
def segmenter():
    seg = Segmenter("tiny", weights="random", device="cpu", image_size=SIZE, seed=0)
    make_objects_visible(seg.model.sam)
    return seg


def test_external_support_only_starts_at_the_most_confident_slice(segmenter):
    vol, lab = synthetic_volume(n=6)
    other, other_lab = other_case(4)
    bank = {1: [SupportItem(other[k], other_lab[k] == 1, f"case2/{k}") for k in range(4)]}
    res = segmenter.segment(vol, None, {1: "blob"}, SegmentOptions(), support_bank=bank)
    table = res.slice_scores[1]
    sources = table["source"].tolist()
    assert sources.count("seed") == 1
    seed = sources.index("seed")
    assert all(s == "backward" for s in sources[:seed])
    assert all(s == "forward" for s in sources[seed + 1:])
    assert res.labeled_slices == []

    # Another query with the same bank: only the new volume's slices are encoded.
    before = segmenter.encode_count
    segmenter.segment(vol[::-1].copy(), None, {1: "blob"}, SegmentOptions(), support_bank=bank)
    assert segmenter.encode_count - before == vol.shape[0]


def test_several_structures_share_one_encoding(segmenter):
    vol, lab = synthetic_volume(n=6)
    drawn = np.zeros_like(lab)
    drawn[1] = lab[1]
    drawn[1, :4, :4] = 2
    drawn[4] = lab[4]
    segmenter.clear_cache()
    before = segmenter.encode_count
    res = segmenter.segment(vol, drawn, {1: "blob", 2: "corner"}, SegmentOptions())
    assert segmenter.encode_count - before == vol.shape[0]
    assert set(res.probabilities) == {1, 2}
    # Slice 1 holds both structures: exactly as drawn. On slice 4 the drawn blob comes back
    # exactly; the other structure may be predicted around it (it was not drawn there).
    assert np.array_equal(res.labels[1], drawn[1])
    blob = drawn[4] == 1
    assert np.array_equal(res.labels[4][blob], drawn[4][blob])
    # Slice 4 is drawn for "blob" only: it says nothing about "corner" (support semantics)...
    assert res.labeled_by_structure == {1: [1, 4], 2: [1]}
    assert res.slice_scores[2]["source"][4] != "labeled"
    # ...unless marked complete: then it teaches absence and stays empty.
    res = segmenter.segment(vol, drawn, {1: "blob", 2: "corner"},
                            SegmentOptions(complete_slices=[1, 4]))
    assert res.labeled_by_structure == {1: [1, 4], 2: [1, 4]}
    assert not (res.labels[4] == 2).any()


def test_cancel_changes_nothing_and_raises(segmenter):
    vol, lab = synthetic_volume(n=6)
    drawn = np.zeros_like(lab)
    drawn[2] = lab[2]
    original = drawn.copy()
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    segmenter.clear_cache()
    with pytest.raises(Cancelled):
        segmenter.segment(vol, drawn, {1: "blob"}, SegmentOptions(), cancel=cancel)
    assert np.array_equal(drawn, original)


def test_progress_reports_each_stage_in_order(segmenter):
    vol, lab = synthetic_volume(n=5)
    drawn = np.zeros_like(lab)
    drawn[2] = lab[2]
    seen: list[tuple[str, float]] = []
    segmenter.clear_cache()
    segmenter.segment(vol, drawn, {1: "blob"}, SegmentOptions(),
                      progress=lambda stage, f: seen.append((stage, f)))
    stages = [s.split()[0] for s, _ in seen]
    assert stages.index("encode") < stages.index("propagate") < stages.index("write")
    assert all(0.0 <= f <= 1.0 for _, f in seen)
    assert max(f for s, f in seen if s.startswith("propagate")) == pytest.approx(1.0)


def test_bad_options_are_named(segmenter):
    vol, lab = synthetic_volume(n=4)
    with pytest.raises(SGPInputError, match="memory_size"):
        segmenter.segment(vol, lab, None, SegmentOptions(memory_size=50))
    with pytest.raises(SGPInputError, match="memory policy"):
        segmenter.segment(vol, lab, None, SegmentOptions(memory_policy="lru"))
    with pytest.raises(SGPInputError, match="outside the volume"):
        segmenter.segment(vol, lab, None, SegmentOptions(), support_slices=[9])
    with pytest.raises(SGPInputError, match="shape"):
        segmenter.segment(vol, lab[:, :10], None, SegmentOptions())


def test_ablation_switches_change_the_result(segmenter):
    vol, lab = synthetic_volume(n=6)
    drawn = np.zeros_like(lab)
    drawn[1] = lab[1]
    # Random weights: masks past the drawn slice need not overlap it (no continuity stop).
    full = segmenter.segment(vol, drawn, {1: "b"},
                             SegmentOptions(min_continuity=0)).probabilities[1]
    for switch in ("use_pma", "use_3d_memory", "use_pmg"):
        other = segmenter.segment(vol, drawn, {1: "b"}, SegmentOptions(
            min_continuity=0, **{switch: False})).probabilities[1]
        assert np.abs(other - full).max() > 1e-4, f"{switch}=False changed nothing"


def test_trained_mode_runs_and_its_checkpoint_reloads_identically(tmp_path):
    # alpha 4 (not the default 16): the reload must take it from the checkpoint's metadata.
    model = build_model("tiny", weights="random", image_size=SIZE, seed=1, mode="trained",
                        lora_rank=4, lora_alpha=4.0)
    assert model.pma is not None
    with torch.no_grad():  # make the adapters and PMA non-trivial, as training would
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("pma.decoder.head"):
                p.add_(0.01 * torch.randn_like(p))
    path = save_sgp_checkpoint(model, tmp_path / "adapters", base={"weights": "random", "seed": 1})
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()

    vol, lab = synthetic_volume(n=4)
    drawn = np.zeros_like(lab)
    drawn[1] = lab[1]
    a = Segmenter(model, device="cpu").segment(vol, drawn, {1: "b"}, SegmentOptions())
    reloaded = load_sgp_checkpoint(path)
    assert isinstance(reloaded.config, ModelConfig) and reloaded.config.lora_rank == 4
    assert reloaded.config.lora_alpha == 4.0
    b = Segmenter(reloaded, device="cpu").segment(vol, drawn, {1: "b"}, SegmentOptions())
    assert np.allclose(a.probabilities[1], b.probabilities[1], atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_cpu_closely():
    vol, lab = synthetic_volume(n=5)
    drawn = np.zeros_like(lab)
    drawn[2] = lab[2]
    results = []
    for device in ("cpu", "cuda"):
        seg = Segmenter("tiny", weights="random", device=device, image_size=SIZE, seed=0)
        make_objects_visible(seg.model.sam)
        results.append(seg.segment(vol, drawn, {1: "b"}, SegmentOptions()).probabilities[1])
    assert np.mean(np.abs(results[0] - results[1])) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("size", ["small", "base_plus", "large"])
def test_every_sam2_size_segments(size):
    vol, lab = synthetic_volume(n=3, h=48, w=48)
    drawn = np.zeros_like(lab)
    drawn[1] = lab[1]
    seg = Segmenter(size, weights="random", device="cpu", image_size=SIZE)
    res = seg.segment(vol, drawn, {1: "b"}, SegmentOptions())
    assert res.labels.shape == vol.shape and res.stats["slices_encoded"] == 3
    assert np.array_equal(res.labels[1], drawn[1])


def test_a_sam2_checkpoint_file_loads_and_gives_the_same_model(tmp_path):
    """The pretrained path: a .pt file in SAM2's format ({"model": state_dict}) is loaded
    strictly (weights_only) into a freshly built model."""
    source = build_model("tiny", weights="random", image_size=SIZE, seed=11)
    ckpt = tmp_path / "my_sam2.pt"
    torch.save({"model": source.sam.state_dict()}, ckpt)
    loaded = build_model("tiny", weights=str(ckpt), image_size=SIZE, seed=99)
    for (name, a), (_, b) in zip(source.sam.state_dict().items(),
                                 loaded.sam.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = build_model("tiny", weights="random", image_size=SIZE, seed=99)
    assert not torch.equal(other.sam.no_mem_embed, loaded.sam.no_mem_embed)


def test_support_from_other_cases_gives_its_object_pointers(segmenter):
    """Each support item from another case enters memory attention with its object pointer
    (distance 0), as SAM2's conditioning frames do: the pointer is the content token a trained
    model reads to tell which structure its support shows. A single 2D image included."""
    sam = segmenter.model.sam
    tokens_per_pointer = sam.hidden_dim // sam.mem_dim
    other, other_lab = other_case(3)
    bank = {1: [SupportItem(other[k], other_lab[k] == 1, f"case2/{k}") for k in range(3)]}
    seen: list[int] = []
    original = sam.memory_attention.forward

    def spy(*args, **kwargs):
        seen.append(int(kwargs.get("num_obj_ptr_tokens", 0)))
        return original(*args, **kwargs)

    sam.memory_attention.forward = spy
    try:
        image, _ = synthetic_volume(n=1, seed=9)
        segmenter.segment(image, None, {1: "blob"}, SegmentOptions(top_k=3), support_bank=bank)
    finally:
        del sam.memory_attention.forward
    assert seen, "memory attention never ran"
    assert seen[0] == 3 * tokens_per_pointer


def _hide_objects(sam) -> None:
    """The decoder scores "no object" everywhere (what random weights often do)."""
    head = sam.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    with torch.no_grad():
        last.bias.fill_(-8.0)


@pytest.mark.parametrize("mode", ["training_free", "trained"])
def test_in_trained_models_the_support_mask_alone_decides_its_pointer(mode):
    """SAM2 lets its decoder's object score replace a mask-prompted frame's pointer by the
    no-object pointer. Pretrained (training-free) models keep that rule exactly; in trained
    models the support's mask alone decides, so a closed decoder gate cannot cut the pointers
    that tell structures apart (and gradients reach them)."""
    seg = Segmenter("tiny", weights="random", device="cpu", image_size=SIZE, seed=0)
    if mode == "trained":
        seg = Segmenter(build_model("tiny", weights="random", image_size=SIZE, mode="trained"),
                        device="cpu")
    sam = seg.model.sam
    _hide_objects(sam)
    other, other_lab = other_case(2)
    image = other[0]
    drawn, empty = other_lab[0] == 1, np.zeros_like(other_lab[0], bool)
    memories = seg.support.external([SupportItem(image, drawn, "drawn"),
                                     SupportItem(image, empty, "empty")], lambda: False)
    no_object = sam.no_obj_ptr.expand_as(memories[0].obj_ptr)
    assert torch.equal(memories[1].obj_ptr, no_object)  # an empty mask: "no object" either way
    if mode == "training_free":
        assert torch.equal(memories[0].obj_ptr, no_object)  # SAM2's own rule
    else:
        assert (memories[0].obj_ptr - no_object).abs().max() > 1e-3


def test_support_pointer_starts_as_sam2_and_carries_what_the_mask_covers():
    """The trained model's support pointer adds the masked-average features through a
    projection that starts at zero: untrained, pointers equal SAM2's; once it is non-zero,
    two masks on one image give different pointers, and an empty mask still "no object"."""
    seg = Segmenter(build_model("tiny", weights="random", image_size=SIZE, mode="trained"),
                    device="cpu")
    make_objects_visible(seg.model.sam)
    other, other_lab = other_case(2)
    image = other[0]
    blob = other_lab[0] == 1
    rest = ~blob
    items = [SupportItem(image, blob, "blob"), SupportItem(image, rest, "rest"),
             SupportItem(image, np.zeros_like(blob), "empty")]

    def pointers():
        seg.support.clear()
        return [m.obj_ptr for m in seg.support.external(items, lambda: False)]

    sam = seg.model.sam
    untrained = pointers()
    seg.model.support_pointer = None  # SAM2's pointer with the mask deciding presence
    plain = pointers()
    assert all(torch.equal(a, b) for a, b in zip(untrained, plain, strict=True))
    seg.model.support_pointer = SupportPointer(sam.hidden_dim)
    with torch.no_grad():
        seg.model.support_pointer.proj.weight.copy_(torch.eye(sam.hidden_dim))
    moved = pointers()
    assert (moved[0] - plain[0]).abs().max() > 1e-3
    assert (moved[0] - moved[1]).abs().max() > (plain[0] - plain[1]).abs().max() + 1e-3
    assert torch.equal(moved[2], sam.no_obj_ptr.expand_as(moved[2]))


def test_support_prior_starts_as_sam2_and_follows_the_support_masks():
    """The trained model's support prior adds similarity maps to the support's masked features
    through a projection that starts at zero: untrained, the segmentation is exactly that of a
    model without it; once it is non-zero, the output moves."""
    seg = Segmenter(build_model("tiny", weights="random", image_size=SIZE, mode="trained"),
                    device="cpu")
    make_objects_visible(seg.model.sam)
    vol, _ = synthetic_volume(n=4)
    other, other_lab = other_case(3)
    bank = {1: [SupportItem(other[k], other_lab[k] == 1, f"case2/{k}") for k in range(3)]}

    def probabilities():
        seg.support.clear()
        res = seg.segment(vol, None, {1: "blob"}, SegmentOptions(), support_bank=bank)
        return res.probabilities[1]

    untrained = probabilities()
    prior = seg.model.support_prior
    seg.model.support_prior = None
    assert np.array_equal(untrained, probabilities())
    seg.model.support_prior = prior
    with torch.no_grad():
        prior.proj.weight.normal_(0, 1.0)
    assert np.abs(probabilities() - untrained).max() > 1e-3


def test_support_prior_maps_mark_where_the_query_looks_like_the_mask():
    """Queried with the support image itself, the foreground maps are high under the mask and
    low outside, the background maps the reverse; swapping the mask swaps them; an empty mask
    gives no foreground cue at all."""
    torch.manual_seed(0)
    g, c = 8, 16
    top = torch.zeros(g, g, dtype=torch.bool)
    top[: g // 2] = True
    # Two kinds of tissue: the top half of the grid and the bottom half, each with its own look.
    looks = torch.randn(2, c)
    features = (looks[(~top).long()].permute(2, 0, 1) + 0.5 * torch.randn(c, g, g))[None]
    mask = torch.zeros(1, 1, 4 * g, 4 * g)
    mask[..., : 2 * g, :] = 1.0  # the top half
    prior = SupportPrior(c)

    def maps(m):
        return prior.maps(features, [support_cue(features, m)])[0]

    drawn, swapped, empty = maps(mask), maps(1 - mask), maps(torch.zeros_like(mask))
    for ch in (0, 2):  # prototype, nearest cell: foreground
        assert drawn[ch][top].mean() > drawn[ch][~top].mean() + 0.2
        assert swapped[ch][~top].mean() > swapped[ch][top].mean() + 0.2
    for ch in (1, 3):  # background
        assert drawn[ch][~top].mean() > drawn[ch][top].mean() + 0.2
    assert torch.allclose(drawn[2][top], torch.ones(g * g // 2))  # each cell its own nearest
    assert float(drawn[4].min()) == 1.0
    assert float(empty[0].abs().max()) == 0.0 and float(empty[2].abs().max()) == 0.0
    assert float(empty[4].abs().max()) == 0.0


@pytest.mark.parametrize("prefix", ["support_pointer.", "support_prior."])
def test_a_checkpoint_written_before_the_support_paths_still_loads(tmp_path, prefix):
    model = build_model("tiny", weights="random", image_size=SIZE, mode="trained", lora_rank=2)
    path = save_sgp_checkpoint(model, tmp_path / "old.safetensors", base={"weights": "random"})
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith(prefix)}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(state, str(path), metadata=meta)
    loaded = load_sgp_checkpoint(path)
    module = getattr(loaded, prefix.rstrip("."))
    assert float(module.proj.weight.abs().sum()) == 0.0


def test_a_checkpoint_of_an_earlier_support_prior_is_refused_with_what_to_do(tmp_path):
    """Maps computed another way make a trained projection wrong: refused, never run."""
    model = build_model("tiny", weights="random", image_size=SIZE, mode="trained", lora_rank=2)
    torch.nn.init.normal_(model.support_prior.proj.weight, std=0.1)  # a trained prior
    path = save_sgp_checkpoint(model, tmp_path / "m.safetensors", base={"weights": "random"})
    assert json.loads(path.with_suffix(".json").read_text())["support_prior"] == \
        SupportPrior.VERSION
    load_sgp_checkpoint(path)  # this version's own checkpoint loads
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["sgp"])
    del meta["support_prior"]  # as written before the marker: version 1
    save_file(state, str(path), metadata={"sgp": json.dumps(meta)})
    with pytest.raises(SGPWeightsError, match="version 1 of the support prior.*Retrain"):
        load_sgp_checkpoint(path)
    # without a trained prior (all zero: never used) the version does not matter
    state = {k: (torch.zeros_like(v) if k.startswith("support_prior.") else v)
             for k, v in state.items()}
    save_file(state, str(path), metadata={"sgp": json.dumps(meta)})
    load_sgp_checkpoint(path)
