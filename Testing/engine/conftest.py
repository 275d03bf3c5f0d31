"""Fixtures the engine suites share."""

from __future__ import annotations

import pytest
from synthetic import make_objects_visible

from SlicerSGP.method.segmenter import Segmenter


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    """SAM2.1 tiny with seeded random weights at 256 px in float32, its object score lifted so
    that slices get masks (one per test module; a module may define its own instead)."""
    seg = Segmenter("tiny", weights="random", device="cpu", image_size=256, seed=0,
                    dtype="float32")
    make_objects_visible(seg.model.sam)
    return seg
