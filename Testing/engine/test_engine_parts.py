"""The engine's parts behind the Segmenter facade: label types, fully labeled volumes, the
precision rule, the volume cache, click refinement and the description a service reports."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from synthetic import synthetic_volume

from SlicerSGP import SGPInputError, host
from SlicerSGP.method import runtime
from SlicerSGP.method.assembly import label_dtype, label_map_from_probabilities
from SlicerSGP.method.segmenter import Segmenter
from SlicerSGP.types import SegmentOptions

SIZE = 256


@pytest.mark.parametrize("value, dtype", [(1, np.uint8), (255, np.uint8), (256, np.uint16),
                                          (65535, np.uint16), (65536, np.uint32),
                                          (70000, np.uint32), (2**32, np.int64)])
def test_label_map_type_holds_every_value(value, dtype):
    assert label_dtype([7, value]) == np.dtype(dtype)
    prob = {value: np.full((2, 3, 3), 0.9, np.float32), 7: np.full((2, 3, 3), 0.2, np.float32)}
    out = label_map_from_probabilities(prob, 0.5, (2, 3, 3))
    assert out.dtype == np.dtype(dtype) and int(out.max()) == value
    single = label_map_from_probabilities({value: prob[value]}, 0.5, (2, 3, 3))
    assert (single == value).all()


def test_large_label_value_through_the_engine(segmenter):
    vol, lab = synthetic_volume(n=5)
    drawn = np.zeros(lab.shape, np.int32)
    drawn[0] = lab[0].astype(np.int32) * 70000
    drawn[4] = lab[4].astype(np.int32) * 70000
    res = segmenter.segment(vol, drawn, {70000: "big"}, SegmentOptions())
    assert res.labels.dtype == np.uint32
    assert np.array_equal(res.labels[0], drawn[0]) and np.array_equal(res.labels[4], drawn[4])


def test_fully_labeled_volume_returns_at_once_with_a_note(segmenter):
    vol, lab = synthetic_volume(n=4)
    before = segmenter.encode_count
    res = segmenter.segment(vol, lab, {1: "blob"}, SegmentOptions())
    assert segmenter.encode_count == before  # nothing encoded
    assert np.array_equal(res.labels, lab)
    assert res.notes and "Every one of the 4 slices is labeled" in res.notes[0]
    assert (res.slice_scores[1]["source"] == "labeled").all()
    # With one slice unlabeled, the run predicts it and leaves no such note.
    partial = lab.copy()
    partial[2] = 0
    res2 = segmenter.segment(vol, partial, {1: "blob"}, SegmentOptions())
    assert not res2.notes and res2.slice_scores[1]["source"][2] != "labeled"


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert runtime.autocast_dtype(cpu, "auto") == expected
    assert runtime.autocast_dtype(cpu, "float32") is None
    assert runtime.autocast_dtype(cpu, "bfloat16") == torch.bfloat16
    with pytest.raises(SGPInputError, match="Unknown dtype"):
        runtime.autocast_dtype(cpu, "half")


def test_native_bf16_detection_reads_cpu_flags(monkeypatch, tmp_path):
    runtime.cpu_has_native_bf16.cache_clear()
    try:
        for flags, expected in (("fpu avx2 avx512f", False), ("fpu avx2 amx_bf16", True),
                                ("fpu avx512_bf16", True)):
            info = tmp_path / "cpuinfo"
            info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
            monkeypatch.setattr(host, "Path", lambda _p, _info=info: _info)
            monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
            runtime.cpu_has_native_bf16.cache_clear()
            assert runtime.cpu_has_native_bf16() is expected, flags
    finally:
        runtime.cpu_has_native_bf16.cache_clear()


def test_volume_cache_keeps_recent_volumes_within_its_budget():
    seg = Segmenter("tiny", weights="random", device="cpu", image_size=SIZE, seed=0,
                    dtype="float32")
    a, lab_a = synthetic_volume(n=4, seed=1)
    b, lab_b = synthetic_volume(n=4, seed=2)
    drawn_a = np.zeros_like(lab_a)
    drawn_a[0] = lab_a[0]
    drawn_b = np.zeros_like(lab_b)
    drawn_b[0] = lab_b[0]
    seg.segment(a, drawn_a, {1: "x"})
    per_volume = seg.encoder.cached_bytes()
    seg.segment(b, drawn_b, {1: "x"})
    assert seg.encoder.cached_volumes() == 2
    count = seg.encode_count
    seg.segment(a, drawn_a, {1: "x"})  # back to the first volume: no encoding
    assert seg.encode_count == count
    # A budget for one volume keeps only the most recent one.
    seg.encoder.cache_bytes = per_volume
    seg.segment(b, drawn_b, {1: "x"})
    assert seg.encoder.cached_volumes() == 1
    seg.segment(a, drawn_a, {1: "x"})
    assert seg.encode_count == count + 4


def test_click_refinement_uses_clicks_and_mask(segmenter, monkeypatch):
    vol, lab = synthetic_volume(n=4)  # 96 x 128 slices, letterboxed to 256: scale 2
    k = 1
    ys, xs = np.nonzero(lab[k])
    inside = (int(ys.mean()), int(xs.mean()))
    seen = []
    encoder = segmenter.model.sam.sam_prompt_encoder
    original = encoder.forward

    def spy(points, boxes, masks):
        seen.append((points[0].clone(), points[1].clone(), masks))
        return original(points, boxes, masks)

    monkeypatch.setattr(encoder, "forward", spy)
    pos, iou = segmenter.refine_slice(vol, k, [inside], [1], None)
    neg, _ = segmenter.refine_slice(vol, k, [inside], [0], None)
    assert pos.shape == lab[k].shape and pos.dtype == bool and np.isfinite(iou)
    # The click reaches SAM2 at the voxel centre in model space, (x, y), less the half pixel
    # SAM2's prompt encoder adds to every coordinate, with its label.
    coords, labels, masks = seen[0]
    expected = [(inside[1] + 0.5) * 2.0 - 0.5, (inside[0] + 0.5) * 2.0 - 0.5]
    assert torch.allclose(coords[0, 0], torch.tensor(expected)) and labels.tolist() == [[1]]
    assert seen[1][1].tolist() == [[0]] and masks is None
    assert not np.array_equal(pos, neg)  # the label of a click matters
    # The current mask is the dense prompt: present, and it changes the answer.
    with_mask, _ = segmenter.refine_slice(vol, k, [inside], [1], lab[k].astype(bool))
    assert seen[-1][2] is not None
    assert not np.array_equal(with_mask, pos)


def test_click_refinement_rejects_bad_clicks(segmenter):
    vol, lab = synthetic_volume(n=4)
    with pytest.raises(SGPInputError, match="outside the volume"):
        segmenter.refine_slice(vol, 9, [(1, 1)], [1], None)
    with pytest.raises(SGPInputError, match="one label"):
        segmenter.refine_slice(vol, 1, [(1, 1)], [1, 0], None)
    with pytest.raises(SGPInputError, match="outside the"):
        segmenter.refine_slice(vol, 1, [(500, 1)], [1], None)
    with pytest.raises(SGPInputError, match="mask of that slice"):
        segmenter.refine_slice(vol, 1, [(1, 1)], [1], np.zeros((3, 3), bool))


def test_describe_names_what_is_loaded(segmenter):
    d = segmenter.describe()
    assert d["model"] == "tiny" and d["image_size"] == SIZE and d["device"] == "cpu"
    assert d["weights"] == "random" and d["seed"] == 0 and d["autocast"] == "float32"


# ------------------------------------------------------------------------------ devices


def test_auto_device_is_cuda_then_apple_mps_then_cpu(monkeypatch):
    from SlicerSGP.errors import SGPDeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "mps_available", lambda: False)
    assert runtime.resolve_device("auto").type == "cpu"
    with pytest.raises(SGPDeviceError, match="Apple"):
        runtime.resolve_device("mps")
    monkeypatch.setattr(runtime, "mps_available", lambda: True)
    assert runtime.resolve_device("auto").type == "mps"
    assert runtime.resolve_device("MPS").type == "mps"
    assert runtime.autocast_dtype(torch.device("mps"), "auto") is None  # unmeasured: float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.resolve_device("auto").type == "cuda"


def test_the_mps_cpu_fallback_is_asked_for_before_torch_is_imported():
    """PyTorch reads PYTORCH_ENABLE_MPS_FALLBACK when it is imported: the command (and the
    engine service, which runs through it) must set it first on macOS."""
    probe = (
        "import os, sys\n"
        "sys.platform = 'darwin'\n"
        "class Stop:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            print('AT_TORCH', os.environ.get('PYTORCH_ENABLE_MPS_FALLBACK'))\n"
        "            raise SystemExit(0)\n"
        "sys.meta_path.insert(0, Stop())\n"
        "import SlicerSGP.cli\n"
        "print('TORCH_NEVER_IMPORTED')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ENABLE_MPS_FALLBACK"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, timeout=120)
    assert "AT_TORCH 1" in out.stdout, out.stdout + out.stderr
