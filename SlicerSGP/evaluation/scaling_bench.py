"""`sgp bench --scaling`: the engine's cost as the volume grows around the same structure.

Synthetic CTs of 512 x 512 x {100, 200, 400} slices (``--size``, ``--depths``), each holding the
same structure over 40 slices in its middle, drawn on 3 of them (near both ends and in the
middle). Random weights never see the structure end, so the sweeps are bounded to its extent
with slice limits (``SegmentOptions.slice_limits``), as ``--slice-limits`` or the effect's
*Only slices* range bound them; a pretrained model stops at the structure's end by itself.
Per depth, with every cache empty: slices encoded, wall time (volume already in memory, model
loaded), peak host memory above the start and the peak of slice features on the device.
Expected: slices encoded = the extent (plus batch alignment on a GPU) at every depth, and wall
time nearly flat in depth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from SlicerSGP.evaluation.bench import PeakRSS, prepare, run_note, warm_up
from SlicerSGP.types import SegmentOptions

EXTENT = 40
"""Slices the structure spans, at every depth."""
DEPTHS = (100, 200, 400)
WALL_RATIO_TARGET = 1.3
"""Wall time at the deepest volume over the shallowest: at most this."""


@dataclass
class Row:
    depth: int
    encoded: int
    predicted: int
    wall: float
    peak_host: int
    peak_device_features: int


def structure_volume(depth: int, size: int, extent: int = EXTENT,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A CT-like volume (HU) of ``depth`` slices with an ellipsoid over ``extent`` slices in
    its middle; returns volume, labels and the structure's (first, last) slice."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(40.0, 25.0, (depth, size, size)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size] / size
    vol[:, ((yy - 0.5) / 0.45) ** 2 + ((xx - 0.5) / 0.4) ** 2 > 1] = -1000.0
    lab = np.zeros((depth, size, size), np.uint8)
    first = (depth - extent) // 2
    for k in range(first, first + extent):
        z = (k - first - (extent - 1) / 2) / (extent / 2)
        r = max(0.05, 1 - z * z) ** 0.5
        organ = ((yy - 0.45) / (0.15 * r)) ** 2 + ((xx - 0.55) / (0.12 * r)) ** 2 < 1
        vol[k][organ] += 80.0
        lab[k][organ] = 1
    return vol, lab, (first, first + extent - 1)


def measure(seg, depth: int, size: int) -> Row:
    vol, lab, (first, last) = structure_volume(depth, size)
    drawn = np.zeros_like(lab)
    for k in (first + 1, (first + last) // 2, last - 1):
        drawn[k] = lab[k]
    opts = SegmentOptions(intensity="percentile", slice_limits={1: [first, last]})
    seg.clear_cache()
    with PeakRSS() as rss:
        t = time.perf_counter()
        result = seg.segment(vol, drawn, {1: "structure"}, opts)
        wall = time.perf_counter() - t
    return Row(depth, result.stats["slices_encoded_this_run"],
               result.stats.get("slices_predicted", 0), wall, rss.above_base,
               result.stats.get("feature_device_peak_bytes", 0))


def main_scaling(seg, model: str, size: int, depths: tuple[int, ...] = DEPTHS) -> str:
    prepare(seg)
    vol, lab, _ = structure_volume(8, size, extent=4)
    warm_up(seg, vol, lab)
    rows = [measure(seg, d, size) for d in depths]
    batch = 8 if seg.device.type == "cuda" else 1
    lines = [run_note(seg, model, size, max(depths), [], False),
             f"structure: {EXTENT} slices in the middle, drawn on 3; sweeps bounded to it with "
             "slice limits (random weights never end a structure by themselves)", "",
             f"{'slices':>8}{'encoded':>9}{'predicted':>11}{'wall s':>9}{'host MiB':>10}"
             f"{'features on device MiB':>24}"]
    for r in rows:
        lines.append(f"{r.depth:8d}{r.encoded:9d}{r.predicted:11d}{r.wall:9.2f}"
                     f"{r.peak_host / 2**20:10.1f}{r.peak_device_features / 2**20:24.1f}")
    ratio = rows[-1].wall / rows[0].wall
    bound = EXTENT + 2 * batch
    model_bytes = sum(p.numel() * p.element_size() for p in seg.model.parameters())
    peak = max(r.peak_device_features for r in rows)
    budget = seg.encoder.device_budget_mb
    lines += ["", f"device memory: model {model_bytes / 2**20:.0f} MiB + slice features at most "
                  f"{peak / 2**20:.0f} MiB = {(model_bytes + peak) / 2**20:.0f} MiB "
                  f"(features on {seg.encoder.features_on}"
                  + (f", device budget {budget:g} MiB" if budget is not None else "")
                  + (", simulated on the CPU: the device is the host" if seg.device.type == "cpu"
                     else "") + ")"]
    lines += ["", f"encoded at most the extent plus twice the encoder's batch ({bound}): "
                  f"{'yes' if all(r.encoded <= bound for r in rows) else 'NO'}",
              f"wall {rows[-1].depth} / {rows[0].depth} slices: {ratio:.2f} "
              f"(target at most {WALL_RATIO_TARGET})"]
    if seg.device.type == "cuda":
        lines.append(f"device {torch.cuda.get_device_name(seg.device)}")
    return "\n".join(lines)
