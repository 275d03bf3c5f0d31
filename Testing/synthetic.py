"""Small synthetic volumes and random-weight fixes shared by the engine tests."""

from __future__ import annotations

import numpy as np
import torch


def synthetic_volume(n: int = 10, h: int = 96, w: int = 128, seed: int = 0):
    """A drifting bright ellipse in noise; labels on every slice (callers pick the labeled ones)."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(100.0, 15.0, (n, h, w)).astype(np.float32)
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros((n, h, w), np.uint8)
    for k in range(n):
        cy, cx = h / 2 + 3 * np.sin(k / 3), w / 2 + 2 * k - n
        blob = ((yy - cy) / (h / 5)) ** 2 + ((xx - cx) / (w / 6)) ** 2 < 1
        vol[k][blob] += 90
        lab[k][blob] = 1
    return vol, lab


def make_objects_visible(sam: torch.nn.Module) -> None:
    """Random SAM2 weights often score "no object" everywhere, which would make every mask a
    constant -1024 and the comparison empty. Push the object-score head positive (in the
    shared state dict, so both sides get it)."""
    head = sam.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    with torch.no_grad():
        last.bias.fill_(8.0)
