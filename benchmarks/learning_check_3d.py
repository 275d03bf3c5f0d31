"""3D learning check: propagation from 3 drawn slices, beside Fill between
slices, on structures the model never saw in training.

Trains the small SAM2-SGP (``--model cpu-mini``, 256 px, from random weights, ``sgp train``'s
code) on some organs of ``../shared/data/ct_abdomen_small``, then, for each of the other organs
(and the tumour of ``mri_brain_tumor``, another modality), draws it on 3 slices (near both ends
of its extent and the middle: the slices at 10 %, 50 % and 90 % of it), propagates through the
engine's ``Segmenter`` loaded from the saved checkpoint, and scores the whole volume's Dice.
Beside it, on the very same drawn slices: Segment Editor's Fill between slices (ITK
morphological contour interpolation) and copying the nearest drawn slice. Variants: the 3D bank
of K vs 1 memory, the hysteresis stop on vs off, quality-weighted fusion on vs off, and the
interpolation prior between drawn slices (``--interpolation-prior prompt``, ``fuse``,
``both``; training gives a share of its episodes the prior, ``--prior-share``).

    python benchmarks/learning_check_3d.py --seen --threads 2   # ~85 min on two cores
    python benchmarks/learning_check_3d.py --steps 40            # a smoke run
    python benchmarks/learning_check_3d.py --out ck.safetensors   # keep the checkpoint
    python benchmarks/learning_check_3d.py --checkpoint ck.safetensors  # the table again
    python benchmarks/learning_check_3d.py --checkpoint ck.safetensors --only spleen --json a.json
    python benchmarks/learning_check_3d.py --merge a.json b.json  # rows of several processes
    python benchmarks/learning_check_3d.py --checkpoint ck.safetensors --drawn-at 0.4,0.5,0.6

A tiny model trained for an hour or so on one CT volume: the figures say whether the pieces
work together and how they compare on the same drawn slices, not what a full-size model would
do. 2000 steps by default: a 1000-step run ends with its loss still high (Dice term 0.29,
0.18 after 2000 steps) and adds nothing to Fill between slices on unseen structures
(docs/training-and-evaluation.md#the-interpolation-prior).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from SlicerSGP.host import processor_name

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SGP_DATA", ROOT.parent / "shared" / "data"))
TRAIN_ORGANS = [5, 2, 20, 86, 87, 31, 32, 14, 11, 18, 19]
"""liver, right kidney, colon, autochthons, L1, T12, lower lung lobes, small bowel, duodenum:
the structures training sees. Structures under about 50 voxels a slice (aorta, IVC, spinal
cord, ribs, adrenals) are left out: at 3 mm they span less than one cell of cpu-mini's 16 x 16
feature grid."""
TEST_ORGANS = [1, 3, 6, 7, 4, 30, 64]
"""spleen, left kidney, stomach, pancreas, gallbladder, L2, portal/splenic vein: never trained."""
SEEN_ORGANS = [5, 2, 20]
"""liver, right kidney, colon: trained on this very volume (``--seen``)."""
OFF = {"interpolation_prior": "off"}
VARIANTS = {
    "SGP": OFF,
    "bank 1": {**OFF, "memory_size": 1},
    "no stop": {**OFF, "stop_after_absent": 0},
    "no quality": {**OFF, "quality_fusion": False},
    "prior prompt": {"interpolation_prior": "prompt"},
    "prior fuse": {"interpolation_prior": "fuse"},
    "prior both": {"interpolation_prior": "both"},
    "fuse no continuity": {"interpolation_prior": "fuse", "min_continuity": 0},
}
LABELS = {"SGP": "SGP", "bank 1": "bank of 1", "no stop": "no stop",
          "no quality": "no quality fusion", "prior prompt": "prior: prompt",
          "prior fuse": "prior: fuse", "prior both": "prior: both",
          "fuse no continuity": "fuse, min_continuity 0",
          "interpolation": "Fill between slices", "nearest": "nearest copy"}


DRAWN_AT = (0.1, 0.5, 0.9)
"""Where the structure is drawn, as fractions of its extent: near both ends and the middle."""


def drawn_slices(truth: np.ndarray, at: tuple[float, ...] = DRAWN_AT) -> list[int]:
    """The slices at the fractions ``at`` of the structure's extent along K (distinct)."""
    present = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))
    picks = [present[int(round(q * (len(present) - 1)))] for q in at]
    return sorted({int(k) for k in picks})


def report_every(n: int):
    """A training callback printing the mean loss terms of the last ``n`` steps (a log that
    shows whether the run learns, where a terminal bar would leave nothing in a file)."""

    def show(trainer, rec) -> None:
        if rec["step"] % n == 0:
            recent = trainer.history[-n:]
            print(f"  step {rec['step']}: " + ", ".join(
                f"{k} {np.mean([r[k] for r in recent]):.3f}"
                for k in ("loss", "dice", "bce", "obj", "pseudo")), flush=True)

    return show


def print_tables(rows: list[dict], columns: list[str], steps: int):
    """The two Markdown tables (whole volume; undrawn slices) and their never-trained means."""
    header = ["structure (slices, drawn)", *[LABELS[c] for c in columns]]
    print()
    print(f"Dice over the whole volume, drawn on the slices listed; cpu-mini trained from "
          f"random for {steps} steps on {len(TRAIN_ORGANS)} other organs of the same CT")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print(f"| {row['structure']} ({row['slices']}, {row['drawn']}) | "
              + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    unseen = [r for r in rows if not r["structure"].endswith("(trained)")]
    means = {c: float(np.mean([r[c] for r in unseen])) for c in columns}
    print("| **mean (never trained)** | " + " | ".join(f"**{means[c]:.3f}**" for c in columns) + " |")
    print()
    print(f"The same, Dice on the slices nobody drew, and how many of them {LABELS[columns[0]]} "
          "segmented at all (of those that show the structure)")
    print("| structure | " + " | ".join(LABELS[c] for c in columns)
          + f" | {LABELS[columns[0]]}: slices predicted |")
    print("|" + "---|" * (len(columns) + 2))
    for row in rows:
        print(f"| {row['structure']} | " + " | ".join(f"{row['undrawn'][c]:.3f}" for c in columns)
              + f" | {row['reached']} of {row['to_reach']} |")
    means_undrawn = {c: float(np.mean([r["undrawn"][c] for r in unseen])) for c in columns}
    print("| **mean (never trained)** | " + " | ".join(f"**{means_undrawn[c]:.3f}**"
                                                     for c in columns) + " | |")
    return means, means_undrawn


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from SlicerSGP.build_model import read_sgp_metadata
    from SlicerSGP.data import datasets, io
    from SlicerSGP.evaluation.baselines import run_baseline
    from SlicerSGP.evaluation.metrics import dice
    from SlicerSGP.method.interpolation import shared_worker
    from SlicerSGP.method.segmenter import Segmenter
    from SlicerSGP.training.config import TrainConfig
    from SlicerSGP.training.trainer import train
    from SlicerSGP.types import SegmentOptions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=5e-4,
                   help="as the 2D check: from random weights sgp train's 1e-4 (a fine-tuning "
                        "rate) had the Dice loss still at 0.74 after 2000 steps")
    p.add_argument("--loss-pseudo", type=float, default=1.0,
                   help="weight of the Dice + BCE on PMG's pseudo-mask (sgp train --loss-pseudo)")
    p.add_argument("--prior-share", type=float, default=0.5,
                   help="share of the episodes with a drawn first slice whose last slice is "
                        "drawn too, PMA prompted by their interpolation (sgp train --prior-share)")
    p.add_argument("--out", type=Path, default=None,
                   help="write the trained checkpoint here (default: a temporary folder), to "
                        "print the table again later with --checkpoint")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated SGP variants to score (default all: "
                        + ", ".join(VARIANTS) + ")")
    p.add_argument("--only", default=None,
                   help="comma-separated structure names to score (default all)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="print the tables from these --json files (rows of several runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="evaluate this checkpoint (from an earlier run) instead of training one")
    p.add_argument("--drawn-at", default=",".join(map(str, DRAWN_AT)), metavar="FRACTIONS",
                   help="where each structure is drawn, as fractions of its extent (default "
                        "0.1,0.5,0.9; 0.4,0.5,0.6 draws only its middle, leaving most of it to "
                        "propagation past the drawn range)")
    p.add_argument("--seen", action="store_true",
                   help="also score three trained organs (liver, right kidney, aorta) of the same "
                        "volume: memorised, so they show the machinery (bank, stop, fusion), "
                        "not generalisation")
    args = p.parse_args(argv)
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    drawn_at = tuple(float(q) for q in args.drawn_at.split(","))
    if not drawn_at or not all(0.0 <= q <= 1.0 for q in drawn_at):
        p.error(f"--drawn-at takes fractions of the extent in [0, 1]; got {args.drawn_at!r}")
    if args.merge:
        saved = [json.loads(f.read_text()) for f in args.merge]
        rows = [r for d in saved for r in d["rows"]]
        columns = [c for c in (*VARIANTS, "interpolation", "nearest") if c in rows[0]]
        print_tables(rows, columns, saved[0]["steps"])
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    ct = DATA / "ct_abdomen_small"
    cases = datasets.load_dataset(ct, axis=0)
    out = Path(tempfile.mkdtemp(prefix="sgp-lc3d-"))
    cfg = TrainConfig(data=str(ct), out=str(args.out or out / "ct_mini.safetensors"),
                      model="cpu-mini", prior_share=args.prior_share,
                      weights="random", image_size=256, lora_rank=4, steps=args.steps, lr=args.lr,
                      structures=TRAIN_ORGANS, seed=args.seed, device="cpu", dtype="float32",
                      loss_pseudo=args.loss_pseudo,
                      save_every=0, refresh_every=50)
    if args.checkpoint:
        cfg.out = str(args.checkpoint)
        # The tables name the training steps: the checkpoint's own, not this run's --steps.
        training = read_sgp_metadata(args.checkpoint).get("training") or {}
        args.steps = int(training.get("steps", args.steps))
        print(f"evaluating {args.checkpoint} on {processor_name()}", flush=True)
    else:
        print(f"training cpu-mini from random for {args.steps} steps on {len(TRAIN_ORGANS)} "
              f"organs (episodes with {cfg.absent_share:.0%} empty answers) on {processor_name()}, "
              f"{torch.get_num_threads()} threads", flush=True)
        train(cfg, cases=cases, progress=report_every(50))
        print(f"checkpoint: {cfg.out}", flush=True)
    t_train = time.perf_counter() - t0

    seg = Segmenter(cfg.out, device="cpu", dtype="float32")
    image, geometry = io.read_image(ct / "image.nii.gz")
    labels, _, names = io.read_labels(ct / "labels.nii.gz", geometry,
                                      reference_shape=image.shape[:3])
    mri = DATA / "mri_brain_tumor"
    mri_image, mri_geometry = io.read_image(mri / "image.nrrd")
    mri_labels, _, _ = io.read_labels(mri / "labels.nrrd", mri_geometry,
                                      reference_shape=mri_image.shape[:3])
    targets = [(names.get(v, str(v)), image, labels, v) for v in TEST_ORGANS]
    targets.append(("brain tumour (MRI)", mri_image, mri_labels, 1))
    if args.seen:
        targets += [(f"{names.get(v, str(v))} (trained)", image, labels, v) for v in SEEN_ORGANS]
    if args.only:
        targets = [t for t in targets if t[0] in args.only.split(",")]

    rows = []
    te = time.perf_counter()
    for name, vol, lab, value in targets:
        t_row = time.perf_counter()
        truth = lab == value
        slices = drawn_slices(truth, drawn_at)
        drawn = np.where(np.isin(np.arange(lab.shape[0]), slices)[:, None, None] & truth,
                         value, 0).astype(np.int32)
        row = {"structure": name, "drawn": slices, "slices": int(truth.any(axis=(1, 2)).sum())}
        # The drawn slices are copied through by every method: Dice on the others alone says
        # what propagation added.
        undrawn = ~np.isin(np.arange(lab.shape[0]), slices)
        row["undrawn"] = {}
        for variant, extra in variants.items():
            res = seg.segment(vol, drawn, {value: name}, SegmentOptions(**extra))
            pred = res.labels == value
            row[variant] = dice(pred, truth)
            row["undrawn"][variant] = dice(pred[undrawn], truth[undrawn])
            if variant == next(iter(variants)):  # the first variant scored
                row["reached"] = int(pred[undrawn].any(axis=(1, 2)).sum())
                row["to_reach"] = int(truth[undrawn].any(axis=(1, 2)).sum())
        for baseline in ("interpolation", "nearest"):
            # ITK's interpolation in the engine's kept child process: the same filter as
            # run_baseline's one-off process, without loading ITK again per structure.
            pred = (shared_worker().interpolate(drawn.astype(np.uint16)) if
                    baseline == "interpolation" else run_baseline(baseline, lab,
                                                                  {value: slices})) == value
            row[baseline] = dice(pred, truth)
            row["undrawn"][baseline] = dice(pred[undrawn], truth[undrawn])
        row["seconds"] = time.perf_counter() - t_row
        rows.append(row)
        print(f"  {name:<28} " + " ".join(f"{k} {row[k]:.3f}" for k in
                                          (*variants, "interpolation", "nearest"))
              + f" ({row['seconds']:.0f} s)", flush=True)
    t_eval = time.perf_counter() - te

    columns = [*variants, "interpolation", "nearest"]
    means, means_undrawn = print_tables(rows, columns, args.steps)
    print(f"time: train {t_train:.0f} s, propagation + baselines {t_eval:.0f} s on {processor_name()} "
          f"({torch.get_num_threads()} threads; wall clock, shared machine: rough)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "lr": args.lr, "rows": rows,
                                         "mean": means, "mean_undrawn": means_undrawn,
                                         "seconds": {"train": t_train, "eval": t_eval}},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
