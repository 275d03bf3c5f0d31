"""The README's picture: one structure of the shared CT drawn on 3 slices, propagated by SGP
and filled by Fill between slices, each beside the reference labels (the data's labels are
TotalSegmentator's output, see the data README).

Uses the checkpoint of the 3D learning check (``benchmarks/learning_check_3d.py`` prints its
path: cpu-mini trained from random weights on other organs of the same CT), the same drawn
slices as that check (10 %, 50 % and 90 % of the structure's extent) and the engine's own
montage tiles (``SlicerSGP.evaluation.reports.montage_tile``: reference green, result red).

    python benchmarks/learning_check_3d.py --threads 1          # prints "checkpoint: PATH"
    python benchmarks/screenshot.py --checkpoint PATH --out Resources/Screenshots/NAME.png

Prints the Dice of both methods on the slices nobody drew (what the caption must quote).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SGP_DATA", ROOT.parent / "shared" / "data"))


def crop_box(masks: list[np.ndarray], shape: tuple[int, int], margin: int = 8):
    """A square (y0, y1, x0, x1) around every mask's voxels, ``margin`` voxels wider."""
    ys, xs = np.nonzero(np.any(np.stack([m.any(axis=0) for m in masks]), axis=0))
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    half = max(ys.max() - ys.min(), xs.max() - xs.min()) / 2 + margin
    half = int(min(np.ceil(half), min(shape) / 2))
    y0 = int(np.clip(round(cy - half), 0, shape[0] - 2 * half))
    x0 = int(np.clip(round(cx - half), 0, shape[1] - 2 * half))
    return y0, y0 + 2 * half, x0, x0 + 2 * half


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from learning_check_3d import drawn_slices
    from PIL import Image, ImageDraw, ImageFont

    from SlicerSGP.data import io, preprocess
    from SlicerSGP.evaluation.baselines import run_baseline
    from SlicerSGP.evaluation.metrics import dice
    from SlicerSGP.evaluation.reports import montage_tile
    from SlicerSGP.method.segmenter import Segmenter
    from SlicerSGP.types import SegmentOptions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="SGP checkpoint; without it only Fill between slices is shown")
    p.add_argument("--label", type=int, default=3, help="label value (default 3: kidney_left, "
                                                         "never a training target)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tile", type=int, default=150)
    args = p.parse_args(argv)

    ct = DATA / "ct_abdomen_small"
    image, geometry = io.read_image(ct / "image.nii.gz")
    labels, _, names = io.read_labels(ct / "labels.nii.gz", geometry,
                                      reference_shape=image.shape[:3])
    value, name = args.label, names.get(args.label, str(args.label))
    truth = labels == value
    drawn_at = drawn_slices(truth)
    drawn = np.where(np.isin(np.arange(labels.shape[0]), drawn_at)[:, None, None] & truth,
                     value, 0).astype(np.int32)

    results = {}
    if args.checkpoint:
        seg = Segmenter(str(args.checkpoint), device="cpu", dtype="float32")
        results["SGP"] = seg.segment(image, drawn, {value: name}, SegmentOptions()).labels == value
    results["Fill between slices"] = run_baseline("interpolation", labels,
                                                  {value: drawn_at}) == value
    undrawn = ~np.isin(np.arange(labels.shape[0]), drawn_at)
    scores = {k: dice(m[undrawn], truth[undrawn]) for k, m in results.items()}

    # Drawn slices, the middle of each interval between them, the structure's first and last
    # slice and one beyond each end (where a propagation should stop).
    present = np.flatnonzero(truth.any(axis=(1, 2)))
    first, last = int(present[0]), int(present[-1])
    shown = set(drawn_at) | {first, last}
    shown |= {(a + b) // 2 for a, b in zip(drawn_at[:-1], drawn_at[1:], strict=True)}
    shown |= {k for k in (first - 1, last + 1) if 0 <= k < labels.shape[0]}
    shown = sorted(shown)

    # Display: the abdomen window; rows anterior up, patient's right on the left (radiological),
    # whatever the file's direction.
    lo_hu, hi_hu = preprocess.intensity_range(image, "ct_abdomen")
    view = preprocess.normalize_intensity(image, lo_hu, hi_hu)
    direction = geometry.direction_matrix()  # columns: the i, j, k axes in LPS
    flips = []
    if direction[1, 1] < 0:  # numpy rows run toward anterior: turn upside down
        flips.append(1)
    if direction[0, 0] < 0:  # numpy columns run toward the right: mirror
        flips.append(2)

    def oriented(a):
        for ax in flips:
            a = np.flip(a, axis=ax)
        return a

    view, truth_v = oriented(view), oriented(truth)
    shown_results = {k: oriented(m) for k, m in results.items()}
    y0, y1, x0, x1 = crop_box([truth_v[shown], *(m[shown] for m in shown_results.values())],
                              truth_v.shape[1:])

    def tile(k, mask):
        c = (slice(y0, y1), slice(x0, x1))
        is_drawn = k in drawn_at
        return montage_tile(view[k][c], truth_v[k][c], None,
                            None if is_drawn else mask[k][c], tile=args.tile)

    rows = [(label, [tile(k, m) for k in shown]) for label, m in shown_results.items()]

    t, gap, left, top, head = args.tile, 3, 170, 24, 48
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=13)
    width = left + len(shown) * (t + gap)
    height = head + top + len(rows) * (t + gap)
    canvas = Image.new("RGB", (width, height), (30, 30, 30))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), f"{name} on abdominal CT ({geometry.spacing[2]:g} mm slices), drawn on 3 slices "
                      f"{drawn_at}: result (red) vs reference labels (green), cropped",
              fill=(235, 235, 235), font=font)
    second = ("SGP: cpu-mini (5.5M parameters) trained here from random weights on other organs "
              "of this CT; not pretrained SAM2" if args.checkpoint else
              "Fill between slices: Segment Editor's interpolation, the baseline sgp eval "
              "compares SGP with (no SGP model here)")
    draw.text((8, 25), second, fill=(200, 200, 200), font=small)
    for j, k in enumerate(shown):
        draw.text((left + j * (t + gap) + 4, head + 4),
                  f"slice {k}" + (" drawn" if k in drawn_at else ""),
                  fill=(120, 230, 120) if k in drawn_at else (220, 220, 220), font=small)
    for i, (label, tiles) in enumerate(rows):
        y = head + top + i * (t + gap)
        draw.text((8, y + t // 2 - 18), label, fill=(235, 235, 235), font=font)
        draw.text((8, y + t // 2 + 2), f"Dice {scores[label]:.2f} on the", fill=(200, 200, 200),
                  font=small)
        draw.text((8, y + t // 2 + 18), "undrawn slices", fill=(200, 200, 200), font=small)
        for j, arr in enumerate(tiles):
            canvas.paste(Image.fromarray(arr), (left + j * (t + gap), y))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out, optimize=True)
    print(f"{name}: drawn {drawn_at}, shown {shown}; Dice on undrawn slices: "
          + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
          + f"; wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
