"""`sgp bench --rerun`: the first run on a volume against the re-run after one correction.

A synthetic CT (default 512 x 512 x 200) with a smooth blob through most slices, drawn on five
slices spread over it. (1) The first run: the Segmenter's caches empty, encoding included.
(2) The re-run after one correction, as the Segment Editor effect makes one: the user fixed a
slice between two drawn ones with clicks, so it becomes a drawn slice (its mask here: the
truth), and propagation is redone. Both run in one process, one after the other, on the same
loaded model; printed are both wall times, their ratio, the slice predictions each made, the
CPU (or GPU) and torch's threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from SlicerSGP.evaluation.bench import prepare, synthetic_ct, warm_up
from SlicerSGP.host import processor_name
from SlicerSGP.types import SegmentationResult, SegmentOptions

TARGET = 0.20
"""The issue's target: a re-run after one correction costs at most 20 % of the first run."""


@dataclass
class Run:
    name: str
    wall: float
    encoded: int
    predicted: int
    reused: int
    timings: dict[str, float] = field(default_factory=dict)


def drawn_slices(lab: np.ndarray, count: int = 5) -> list[int]:
    """``count`` slices spread evenly over the structure's extent (each holds some of it)."""
    present = np.flatnonzero(lab.reshape(lab.shape[0], -1).any(axis=1))
    lo, hi = int(present[0]), int(present[-1])
    return sorted({lo + round((hi - lo) * (i + 0.5) / count) for i in range(count)})


def correction_slice(drawn: list[int]) -> int:
    """The corrected slice: the middle of the widest gap between two drawn slices."""
    a, b = max(zip(drawn, drawn[1:], strict=False), key=lambda ab: (ab[1] - ab[0], -ab[0]))
    return (a + b) // 2


def with_drawn(lab: np.ndarray, slices: list[int]) -> np.ndarray:
    out = np.zeros_like(lab)
    out[slices] = lab[slices]
    return out


def timed_run(seg, name: str, vol: np.ndarray, drawn: np.ndarray,
              opts: SegmentOptions) -> tuple[Run, SegmentationResult]:
    before = seg.encode_count
    t = time.perf_counter()
    result = seg.segment(vol, drawn, {1: "blob"}, opts)
    if seg.device.type == "cuda":
        torch.cuda.synchronize(seg.device)
    wall = time.perf_counter() - t
    return Run(name, wall, seg.encode_count - before, result.stats["slices_predicted"],
               result.stats["slices_reused"], dict(result.timings)), result


def run_rerun_bench(seg, *, slices: int = 200, size: int = 512, count: int = 5,
                    opts: SegmentOptions | None = None) -> tuple[Run, Run, list[int], int]:
    """The first run and the re-run after one new drawn slice; returns both, the first run's
    drawn slices and the corrected slice."""
    opts = opts or SegmentOptions(intensity="percentile", keep_pseudo_masks=False)
    vol, lab = synthetic_ct(slices, size)
    drawn = drawn_slices(lab, count)
    added = correction_slice(drawn)
    warm_up(seg, vol, lab)
    first, _ = timed_run(seg, "first run (encoding included)", vol, with_drawn(lab, drawn), opts)
    again, _ = timed_run(seg, "re-run after one correction", vol,
                         with_drawn(lab, sorted([*drawn, added])), opts)
    return first, again, drawn, added


def rerun_report(seg, model: str, first: Run, again: Run, drawn: list[int], added: int,
                 size: int, n: int, opts: SegmentOptions) -> str:
    dev = str(seg.device)
    if seg.device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(seg.device)})"
    a, b = max(k for k in drawn if k < added), min(k for k in drawn if k > added)
    lines = [
        f"volume {size}x{size}x{n}, drawn slices {drawn}; correction: slice {added} (between "
        f"{a} and {b}) becomes a drawn slice",
        f"SAM2.1 {model} @ {seg.image_size}px, device {dev}, CPU {processor_name()}, torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}, autocast "
        f"{seg.autocast_dtype}, feature cache {seg.feature_dtype}; K {opts.top_k}, support "
        f"from {'the drawn slices bounding each interval' if opts.local_support else 'all drawn slices'}",
        ""]
    for r in (first, again):
        stages = ", ".join(f"{k} {r.timings.get(k, 0.0):.2f}"
                           for k in ("encode", "propagate", "assemble"))
        lines.append(f"{r.name:32}{r.wall:9.2f} s   {r.encoded:4d} slices encoded, "
                     f"{r.predicted:4d} slice predictions made, {r.reused:4d} reused   "
                     f"({stages} s)")
    ratio = again.wall / first.wall
    lines += ["", f"ratio re-run / first run: {ratio:.3f} (target <= {TARGET:.2f}: "
                  f"{'met' if ratio <= TARGET else 'NOT met'}); slice predictions re-made: "
                  f"{again.predicted} of the first run's {first.predicted} "
                  f"({again.predicted / max(first.predicted, 1):.1%})"]
    return "\n".join(lines)


def main_rerun(seg, model: str, slices: int, size: int, count: int,
               local_support: bool = False) -> str:
    """What ``sgp bench --rerun`` prints."""
    prepare(seg)
    opts = SegmentOptions(intensity="percentile", keep_pseudo_masks=False,
                          local_support=local_support)
    first, again, drawn, added = run_rerun_bench(seg, slices=slices, size=size, count=count,
                                                 opts=opts)
    return rerun_report(seg, model, first, again, drawn, added, size, slices, opts)
