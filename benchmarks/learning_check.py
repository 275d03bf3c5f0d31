"""Learning check: does a model trained from random follow its support set?

Trains the small SAM2-SGP (``--model cpu-mini``, 256 px, every weight trainable, ``sgp train``'s
code) from random weights on the first ``--train`` images of ``../shared/data/wbc`` with
episodes whose target only the support defines: nucleus (label 2) and whole cell (1+2) on the
same images, paired (one step asks the same image for both, each with its own support), plus
a share of empty-answer episodes (support with empty masks). Cytoplasm
(label 1 alone) is never a training target. Then, on the held-out images, through the engine's
``Segmenter`` loaded from the saved checkpoint (what ``sgp segment --support-bank`` does), with
support banks made from the training images' masks of one kind:

* matching support: nucleus, whole cell, and cytoplasm (defined only by its support);
* swapped support: what nucleus support gives scored against the cytoplasm truth, what
  cytoplasm support gives scored against the nucleus truth (and whole cell vs nucleus);
* empty support (every mask empty): the predicted area against the matching-support area;

beside two baselines tuned on the training images only, per kind: Otsu (best of 5 grey-level
rules) and nearest-support copy (the mask of the most similar training image, raw-pixel cosine).
The first ``--cli-images`` held-out images are also run through ``sgp segment --support-bank``
(a subprocess per image, banks written as images/ + masks/ folders) and must agree with the API.

    python benchmarks/learning_check.py                 # about 30 min on a 2-core CPU
    python benchmarks/learning_check.py --steps 60 --test 6 --cli-images 1   # a smoke run

Times are wall-clock on whatever else the machine runs at the same time: treat them as rough.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("SGP_DATA", ROOT.parent / "shared" / "data")) / "wbc"
NUCLEUS = 2


# --------------------------------------------------------------------------- baselines

def grey(img01: np.ndarray) -> np.ndarray:
    return img01.mean(axis=-1) if img01.ndim == 3 else img01


def _hist(g: np.ndarray) -> np.ndarray:
    return np.bincount(np.clip((g * 255).round().astype(int), 0, 255).ravel(), minlength=256)


def otsu_thresholds(g: np.ndarray, classes: int) -> list[float]:
    """Otsu (2 classes) or 3-class multi-Otsu thresholds on [0, 1] grey values (exhaustive)."""
    p = _hist(g).astype(float)
    p /= p.sum()
    levels = np.arange(256, dtype=float)
    w = np.cumsum(p)
    mu = np.cumsum(p * levels)
    mt = mu[-1]
    if classes == 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            between = (mt * w - mu) ** 2 / (w * (1 - w))
        t = int(np.nanargmax(between))
        return [(t + 0.5) / 255]
    # three classes [0..a], (a..b], (b..255]: maximise sum of w_k * mu_k^2
    best, arg = -1.0, (0, 0)
    for a in range(0, 254):
        w0, m0 = w[a], mu[a]
        b = np.arange(a + 1, 255)
        w1, m1 = w[b] - w0, mu[b] - m0
        w2, m2 = 1 - w[b], mt - mu[b]
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(w0 > 0, m0 ** 2 / w0, 0) + np.where(w1 > 0, m1 ** 2 / w1, 0) + \
                np.where(w2 > 0, m2 ** 2 / w2, 0)
        i = int(np.nanargmax(s))
        if s[i] > best:
            best, arg = float(s[i]), (a, int(b[i]))
    return [(arg[0] + 0.5) / 255, (arg[1] + 0.5) / 255]


OTSU_RULES = ("otsu2-dark", "otsu2-bright", "otsu3-darkest", "otsu3-middle", "otsu3-brightest")


def otsu_mask(img01: np.ndarray, rule: str) -> np.ndarray:
    g = grey(img01)
    if rule.startswith("otsu2"):
        (t,) = otsu_thresholds(g, 2)
        return g <= t if rule.endswith("dark") else g > t
    a, b = otsu_thresholds(g, 3)
    return {"otsu3-darkest": g <= a, "otsu3-middle": (g > a) & (g <= b),
            "otsu3-brightest": g > b}[rule]


def small_pixels(img01: np.ndarray, size: int = 64) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(img01, dtype=np.float32))
    t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="area")
    v = t.flatten().numpy()
    return v / (np.linalg.norm(v) + 1e-12)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    ys = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1)
    xs = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1)
    return mask[ys.astype(int)][:, xs.astype(int)]


# --------------------------------------------------------------------------- support kinds

KINDS = {"nucleus": (2,), "whole cell": (1, 2), "cytoplasm": (1,)}
TRAIN_TARGETS = ["2", "1+2"]
"""Cytoplasm is never asked for in training: its figures come from its support alone."""


def truth(case, kind: str) -> np.ndarray:
    return np.isin(case.labels[0], KINDS[kind])


def kind_bank(cases: list, kind: str | None) -> dict:
    """A one-structure support bank (value 1) from the training images; ``None``: empty masks."""
    from SlicerSGP.types import SupportItem

    return {1: [SupportItem(image=c.slices01[0],
                            mask=truth(c, kind) if kind else np.zeros(c.labels.shape[1:], bool),
                            source=c.name) for c in cases]}


def write_bank_folder(cases: list, kind: str, folder: Path) -> Path:
    """The same bank as a folder ``sgp segment --support-bank`` reads: images/ + masks/."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for c in cases:
        Image.open(c.ref.image).save(folder / "images" / f"{c.name}.png")
        Image.fromarray(truth(c, kind).astype(np.uint8)).save(folder / "masks" / f"{c.name}.png")
    (folder / "labels.json").write_text(json.dumps({"1": kind}))
    return folder


def cli_labels(ckpt: Path, image: Path, bank: Path, out: Path, threads: int) -> np.ndarray:
    """``sgp segment`` on one image with a support bank; the written label map, read back."""
    import slicerio

    cmd = [sys.executable, "-m", "SlicerSGP.cli", "segment", str(image), "--model", str(ckpt),
           "--support-bank", str(bank), "--label", "1", "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"sgp segment failed ({done.returncode}): {done.stderr[-2000:]}")
    seg = slicerio.read_segmentation(str(out))
    value = int(seg["segments"][0]["labelValue"])
    # slicerio keeps NRRD axis order (I, J[, K]); the engine's arrays are (K, J, I)
    return np.squeeze(np.asarray(seg["voxels"]) == value).T


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--train", type=int, default=40, help="first N images train")
    ap.add_argument("--test", type=int, default=60, help="the next M images are held out")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--absent-share", type=float, default=0.2)
    ap.add_argument("--own-image-support", type=float, default=0.0,
                    help="share of episodes whose support also holds the query image, "
                         "flipped or rotated (sgp train --own-image-support)")
    ap.add_argument("--targets", default=",".join(TRAIN_TARGETS),
                    help="training targets, comma-separated ('2' with --absent-share 0: "
                         "nucleus episodes only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cli-images", type=int, default=5,
                    help="held-out images also run through `sgp segment --support-bank`")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="evaluate this checkpoint instead of training one")
    ap.add_argument("--out", type=Path, default=None, help="folder for checkpoint + results")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)

    from SlicerSGP.data.datasets import load_dataset
    from SlicerSGP.evaluation.evaluate import predict_case
    from SlicerSGP.evaluation.metrics import dice
    from SlicerSGP.method.segmenter import Segmenter
    from SlicerSGP.training.config import TrainConfig
    from SlicerSGP.training.trainer import train
    from SlicerSGP.types import SegmentOptions

    if not args.data.is_dir():
        print(f"skip: data folder {args.data} not found (set SGP_DATA)")
        return 0
    torch.set_num_threads(args.threads)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    t_all = time.perf_counter()
    cases = load_dataset(args.data, keep_raw=True)
    train_cases = cases[: args.train]
    test_cases = cases[args.train: args.train + args.test]
    print(f"wbc: {len(train_cases)} training images ({train_cases[0].name}..{train_cases[-1].name}),"
          f" {len(test_cases)} held out ({test_cases[0].name}..{test_cases[-1].name}); training "
          f"targets {targets}; torch threads {torch.get_num_threads()}")

    # ---- baselines per kind (rules chosen on the training images)
    tb = time.perf_counter()
    baselines: dict[str, dict[str, list[float]]] = {}
    train_vecs = np.stack([small_pixels(c.slices01[0]) for c in train_cases])
    nearest = [int(np.argmax(train_vecs @ small_pixels(c.slices01[0]))) for c in test_cases]
    rules = {}
    for kind in KINDS:
        scores = {r: float(np.mean([dice(otsu_mask(c.slices01[0], r), truth(c, kind))
                                    for c in train_cases])) for r in OTSU_RULES}
        rules[kind] = max(scores, key=scores.get)
        baselines[kind] = {
            "otsu": [dice(otsu_mask(c.slices01[0], rules[kind]), truth(c, kind))
                     for c in test_cases],
            "nearest": [dice(resize_mask(truth(train_cases[j], kind), truth(c, kind).shape),
                             truth(c, kind)) for c, j in zip(test_cases, nearest, strict=True)],
        }
    t_baselines = time.perf_counter() - tb

    # ---- train from random weights (or take a given checkpoint)
    out = args.out or Path(tempfile.mkdtemp(prefix="sgp_learning_check_"))
    out.mkdir(parents=True, exist_ok=True)
    t_train, history = 0.0, []
    if args.checkpoint:
        ckpt = args.checkpoint
    else:
        cfg = TrainConfig(data=str(args.data), out=str(out / "wbc_support.safetensors"),
                          model="cpu-mini", weights="random", image_size=256, lora_rank=4,
                          steps=args.steps, lr=args.lr, targets=targets,
                          absent_share=args.absent_share, cases=f"0:{args.train}",
                          own_image_support=args.own_image_support,
                          seed=args.seed, device=args.device, save_every=0, refresh_every=50)
        tt = time.perf_counter()
        trainer = train(cfg, cases=train_cases, progress=True)
        t_train = time.perf_counter() - tt
        history = trainer.history
        ckpt = Path(cfg.out)

    # ---- held-out evaluation through the engine, model loaded from the checkpoint file
    te = time.perf_counter()
    seg = Segmenter(str(ckpt), device=args.device)
    opts = SegmentOptions()
    predicted: dict[str, list[np.ndarray]] = {}
    for kind in [*KINDS, "empty"]:
        bank = kind_bank(train_cases, None if kind == "empty" else kind)
        predicted[kind] = [predict_case(seg, c, [1], opts, bank=bank).labels[0] == 1
                           for c in test_cases]
    t_eval = time.perf_counter() - te

    model = {kind: [dice(p, truth(c, kind)) for p, c in zip(predicted[kind], test_cases,
                                                             strict=True)] for kind in KINDS}
    swaps = {
        "nucleus support vs cytoplasm truth": ("nucleus", "cytoplasm"),
        "cytoplasm support vs nucleus truth": ("cytoplasm", "nucleus"),
        "whole-cell support vs nucleus truth": ("whole cell", "nucleus"),
        "nucleus support vs whole-cell truth": ("nucleus", "whole cell"),
    }
    swap = {name: [dice(p, truth(c, t)) for p, c in zip(predicted[s], test_cases, strict=True)]
            for name, (s, t) in swaps.items()}
    area = {k: float(sum(int(p.sum()) for p in predicted[k])) for k in [*KINDS, "empty"]}
    empty_ratio = {k: area["empty"] / max(1.0, area[k]) for k in ("nucleus", "whole cell")}

    # ---- the same checkpoint through `sgp segment --support-bank` (the path users run)
    tc = time.perf_counter()
    cli: dict[str, list[float]] = {}
    cli_equal = True
    for kind in KINDS if args.cli_images else []:
        folder = write_bank_folder(train_cases, kind, out / "banks" / kind.replace(" ", "_"))
        cli[kind] = []
        for i, c in enumerate(test_cases[: args.cli_images]):
            labels = cli_labels(ckpt, c.ref.image, folder, out / f"cli_{i}.seg.nrrd", args.threads)
            cli[kind].append(dice(labels, truth(c, kind)))
            cli_equal &= bool(np.array_equal(labels, predicted[kind][i]))
    t_cli = time.perf_counter() - tc
    t_total = time.perf_counter() - t_all

    def mean(x):
        return float(np.mean(x)) if len(x) else float("nan")

    def median(x):
        return float(np.median(x)) if len(x) else float("nan")

    print()
    print(f"held-out Dice on {len(test_cases)} wbc images (trained on {len(train_cases)}"
          + (f", {args.steps} steps" if not args.checkpoint else f", checkpoint {ckpt}") + ")")
    print(f"{'support -> scored against':<44} {'SGP mean':>9} {'median':>7} "
          f"{'Otsu':>6} {'nearest':>8}")
    for kind in KINDS:
        note = "" if "+".join(map(str, KINDS[kind])) in targets else " (never trained)"
        print(f"{(kind + ' -> ' + kind + note):<44} {mean(model[kind]):9.3f} "
              f"{median(model[kind]):7.3f} {mean(baselines[kind]['otsu']):6.3f} "
              f"{mean(baselines[kind]['nearest']):8.3f}")
    for name, vals in swap.items():
        print(f"{name:<44} {mean(vals):9.3f} {median(vals):7.3f}")
    for k, r in empty_ratio.items():
        print(f"empty support: predicted area / {k} support area = {100 * r:.2f} %")
    if cli:
        print(f"sgp segment --support-bank on {args.cli_images} images: "
              + ", ".join(f"{k} {mean(v):.3f}" for k, v in cli.items())
              + f"; identical to the API: {'yes' if cli_equal else 'NO'}")
    print("Otsu rules chosen on train: " + ", ".join(f"{k}: {r}" for k, r in rules.items()))
    steps = max(1, len(history))
    print(f"time: train {t_train:.0f} s ({t_train / steps:.2f} s/step), held-out eval "
          f"{t_eval:.0f} s ({t_eval / (4 * len(test_cases)):.2f} s/run), CLI {t_cli:.0f} s, "
          f"baselines {t_baselines:.0f} s, total {t_total:.0f} s on {args.device} "
          f"({torch.get_num_threads()} threads; wall clock, shared machine: rough)")
    print(f"checkpoint: {ckpt}")
    result = {
        "train_images": [c.name for c in train_cases], "test_images": [c.name for c in test_cases],
        "steps": len(history), "lr": args.lr, "seed": args.seed, "targets": targets,
        "absent_share": args.absent_share, "own_image_support": args.own_image_support,
        "dice": {k: {"mean": mean(v), "median": median(v)} for k, v in model.items()},
        "baselines": {k: {b: mean(v) for b, v in d.items()} for k, d in baselines.items()},
        "swap": {k: mean(v) for k, v in swap.items()},
        "empty_area_ratio": empty_ratio, "cli_dice": {k: mean(v) for k, v in cli.items()},
        "cli_identical": cli_equal,
        "per_image": {"model": model, "swap": swap},
        "seconds": {"train": t_train, "eval": t_eval, "cli": t_cli, "baselines": t_baselines,
                    "total": t_total},
        "checkpoint": str(ckpt),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
