"""SAM2's modules with the engine's fast paths compute exactly what they compute without them:
cached position encodings (per size, dtype and autocast state, refreshed when the weights
change) and the memory encoder's contiguous linear input. Bit for bit, in float32 and under
bf16 autocast, alternating (a stale cache entry would show)."""

from __future__ import annotations

import copy

import pytest
import torch

from SlicerSGP.build_model import build_model
from SlicerSGP.method import fast_paths
from SlicerSGP.method.runtime import Runtime


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    plain = build_model("tiny", weights="random", image_size=256, seed=0).eval()
    fast = copy.deepcopy(plain)
    fast_paths.install(fast.sam)
    fast_paths.install(fast.sam)  # twice is once
    return plain.sam, fast.sam


def precisions():
    return [torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False)]


def encode(sam, images: torch.Tensor) -> list[torch.Tensor]:
    out = sam.forward_image(images)
    return [*out["backbone_fpn"], *out["vision_pos_enc"]]


def encode_memory(sam, feats: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    g = int(round(feats.shape[0] ** 0.5))
    mem, pos = sam._encode_new_memory(current_vision_feats=[feats], feat_sizes=[(g, g)],
                                      pred_masks_high_res=mask,
                                      object_score_logits=torch.ones(1, 1),
                                      is_mask_from_pts=False)
    return [mem, *pos]


def assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
def test_image_and_memory_encoders_are_bit_identical(models, grad_off):
    plain, fast = models
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 256, 256, generator=gen)
    feats = torch.randn(256, 1, 256, generator=gen)
    mask = torch.randn(1, 1, 256, 256, generator=gen) * 4
    for _ in range(2):
        for precision in precisions():
            with grad_off(), precision:
                assert_equal(encode(plain, images), encode(fast, images))
                assert_equal(encode(plain, images[:1]), encode(fast, images[:1]))
                assert_equal(encode_memory(plain, feats, mask), encode_memory(fast, feats, mask))


def test_cached_position_embedding_follows_new_weights(models):
    plain, fast = models
    plain, fast = copy.deepcopy(plain), copy.deepcopy(fast)
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = encode(fast, images)
        for sam in (plain, fast):
            sam.image_encoder.trunk.pos_embed.add_(0.5)
        after = encode(fast, images)
        assert not torch.equal(before[-1 - 3], after[-1 - 3])  # the top level moved
        assert_equal(encode(plain, images), after)


def test_training_gets_gradients_through_the_position_embedding(models):
    _, fast = models
    fast = copy.deepcopy(fast)
    pos_embed = fast.image_encoder.trunk.pos_embed
    pos_embed.requires_grad_(True)
    with torch.no_grad():  # fills the cache
        encode(fast, torch.rand(1, 3, 256, 256))
    fast.forward_image(torch.rand(1, 3, 256, 256))["vision_features"].sum().backward()
    assert pos_embed.grad is not None and bool(pos_embed.grad.abs().sum() > 0)


def test_weights_are_cast_once_per_autocast_region():
    """Segmentation runs under ``no_grad`` when autocasting: autocast then reuses each weight's
    bf16 copy for the whole region (inside ``inference_mode`` it casts again on every call)."""
    model = build_model("tiny", weights="random", image_size=256, seed=0).eval()
    rt = Runtime(model, torch.device("cpu"), "bfloat16")
    layer = torch.nn.Linear(64, 64)
    x = torch.randn(4, 64)
    with torch.profiler.profile(record_shapes=True) as prof:
        with rt.mode(False), rt.autocast():
            first = layer(x)
            for _ in range(3):
                assert torch.equal(layer(x), first)
    casts = sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                if e.key == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] == [64, 64])
    assert casts == 1
    assert Runtime(model, torch.device("cpu"), "float32").mode(False).__class__ is \
        torch.inference_mode
