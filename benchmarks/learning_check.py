"""Learning check (DESIGN.md oracle 5): does training from a random start learn anything?

Trains the small SAM2-SGP (``--model cpu-mini``, 256 px, every weight trainable, ``sgp train``'s
code) from random weights on the first ``--train`` images of ``../shared/data/wbc``, then
segments the held-out images with the engine's ``Segmenter`` loaded from the saved checkpoint
(exactly what ``sgp segment --model CKPT --support-bank ...`` does), the support bank being the
training images. Reports the held-out nucleus Dice beside two trivial baselines, both tuned on
the training images only:

* Otsu: a grey-level threshold per image (grey = mean of R, G, B). Candidates: 2-class Otsu,
  keep the dark or the bright side; 3-class Otsu, keep the darkest, middle or brightest class.
  The candidate with the best mean Dice on the *training* images is applied to the test images.
* Nearest-support copy: copy the mask of the most similar training image. Similarity is the
  cosine of raw pixels (RGB in [0, 1], images resized to 64 x 64). The same with the trained
  model's pooled embeddings (the engine's similarity) is printed too.

    python benchmarks/learning_check.py                 # ~10 min on 2 CPU cores
    python benchmarks/learning_check.py --steps 60 --test 10   # a smoke run
    python benchmarks/learning_check.py --no-pma               # paper Table 5 style ablation

Times are wall-clock on whatever else the machine runs at the same time: treat them as rough.
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


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--train", type=int, default=40, help="first N images train")
    ap.add_argument("--test", type=int, default=60, help="the next M images are held out")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="folder for checkpoint + results")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--no-pmg", action="store_true", help="ablation (train and test)")
    ap.add_argument("--no-pma", action="store_true", help="ablation (train and test)")
    ap.add_argument("--no-3d-memory", action="store_true",
                    help="ablation (no effect on 2D images; kept for symmetry)")
    args = ap.parse_args(argv)

    from SlicerSGP.data.datasets import load_dataset
    from SlicerSGP.evaluation.evaluate import bank_from_cases, predict_case
    from SlicerSGP.evaluation.metrics import dice, hd95
    from SlicerSGP.method.segmenter import Segmenter
    from SlicerSGP.training.config import TrainConfig
    from SlicerSGP.training.trainer import train
    from SlicerSGP.types import SegmentOptions

    if not args.data.is_dir():
        print(f"skip: data folder {args.data} not found (set SGP_DATA)")
        return 0
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    cases = load_dataset(args.data, keep_raw=True)
    train_cases = cases[: args.train]
    test_cases = cases[args.train: args.train + args.test]
    print(f"wbc: {len(train_cases)} training images ({train_cases[0].name}..{train_cases[-1].name}),"
          f" {len(test_cases)} held out ({test_cases[0].name}..{test_cases[-1].name}); "
          f"structure {NUCLEUS} (nucleus); torch threads {torch.get_num_threads()}")

    def gt(c):
        return c.labels[0] == NUCLEUS

    # ---- baselines (rules chosen on the training images)
    tb = time.perf_counter()
    train_scores = {r: float(np.mean([dice(otsu_mask(c.slices01[0], r), gt(c))
                                      for c in train_cases])) for r in OTSU_RULES}
    rule = max(train_scores, key=train_scores.get)
    otsu_test = [dice(otsu_mask(c.slices01[0], rule), gt(c)) for c in test_cases]
    otsu_hd = [hd95(otsu_mask(c.slices01[0], rule), gt(c)) for c in test_cases]
    train_vecs = np.stack([small_pixels(c.slices01[0]) for c in train_cases])
    nn_test = []
    for c in test_cases:
        j = int(np.argmax(train_vecs @ small_pixels(c.slices01[0])))
        nn_test.append(dice(resize_mask(gt(train_cases[j]), gt(c).shape), gt(c)))
    t_baselines = time.perf_counter() - tb

    # ---- train from random weights
    out = args.out or Path(tempfile.mkdtemp(prefix="sgp_learning_check_"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(data=str(args.data), out=str(out / "wbc_small.safetensors"), model="cpu-mini",
                      weights="random", image_size=256, lora_rank=4, steps=args.steps,
                      lr=args.lr, structures=[NUCLEUS], cases=f"0:{args.train}",
                      seed=args.seed, device=args.device, save_every=0,
                      refresh_every=50, use_pmg=not args.no_pmg, use_pma=not args.no_pma,
                      use_3d_memory=not args.no_3d_memory)
    tt = time.perf_counter()
    trainer = train(cfg, cases=train_cases, progress=True)
    t_train = time.perf_counter() - tt
    ckpt = Path(cfg.out)

    # ---- held-out evaluation through the engine, model loaded from the checkpoint file
    te = time.perf_counter()
    seg = Segmenter(str(ckpt), device=args.device)
    bank = bank_from_cases(train_cases, [NUCLEUS])
    opts = SegmentOptions(keep_pseudo_masks=True, use_pmg=not args.no_pmg,
                          use_pma=not args.no_pma, use_3d_memory=not args.no_3d_memory)
    model_dice, pseudo_dice, model_hd = [], [], []
    for c in test_cases:
        pred = predict_case(seg, c, [NUCLEUS], opts, bank=bank)
        model_dice.append(dice(pred.labels[0] == NUCLEUS, gt(c)))
        pseudo_dice.append(dice(pred.pseudo[NUCLEUS][0] >= 0.5, gt(c)))
        model_hd.append(hd95(pred.labels[0] == NUCLEUS, gt(c)))
    t_eval = time.perf_counter() - te

    # nearest-support copy by the trained model's pooled embeddings (the engine's similarity)
    from SlicerSGP.data import preprocess

    def pooled(c):
        tf = preprocess.LetterboxTransform(*c.slices01.shape[1:3], seg.image_size)
        return seg.encode_images(preprocess.to_model_input(c.slices01, tf), 1).pooled[0]

    tr_pooled = torch.stack([pooled(c) for c in train_cases])
    nn_emb = []
    for c in test_cases:
        j = int(torch.argmax(tr_pooled @ pooled(c)))
        nn_emb.append(dice(gt(train_cases[j]), gt(c)))
    t_total = time.perf_counter() - t_all

    def stats(x):
        return float(np.mean(x)), float(np.median(x)), float(np.std(x))

    ablation = ", ".join(n for n, off in (("no PMG", args.no_pmg), ("no PMA", args.no_pma),
                                           ("no 3DM", args.no_3d_memory)) if off)
    rows = [
        ("SAM2-SGP cpu-mini, trained from random (final)" + (f" [{ablation}]" if ablation else ""),
         model_dice),
        ("  its PMG pseudo-mask alone", pseudo_dice),
        (f"Otsu baseline ({rule}, chosen on train)", otsu_test),
        ("Nearest-support copy (raw-pixel cosine)", nn_test),
        ("Nearest-support copy (trained pooled embedding)", nn_emb),
    ]
    print()
    print(f"held-out nucleus Dice on {len(test_cases)} wbc images (trained on {len(train_cases)}, "
          f"{args.steps} steps)")
    print(f"{'method':<50} {'mean':>6} {'median':>7} {'std':>6}")
    for name, vals in rows:
        m, med, sd = stats(vals)
        print(f"{name:<50} {m:6.3f} {med:7.3f} {sd:6.3f}")
    for name, hs in (("model", model_hd), ("Otsu", otsu_hd)):
        finite = [h for h in hs if np.isfinite(h)]
        print(f"{name} HD95 (pixels): mean {np.mean(finite):.1f}, median {np.median(finite):.1f}"
              f" over {len(finite)} images" + (f", {len(hs) - len(finite)} empty predictions"
                                               if len(finite) < len(hs) else ""))
    print("Otsu rules on train (mean Dice): "
          + ", ".join(f"{r} {s:.3f}" for r, s in train_scores.items()))
    print(f"time: train {t_train:.0f} s ({t_train / max(1, args.steps):.2f} s/step), held-out "
          f"eval {t_eval:.0f} s ({t_eval / len(test_cases):.1f} s/image), baselines "
          f"{t_baselines:.0f} s, total {t_total:.0f} s on {args.device} "
          f"({torch.get_num_threads()} threads; wall clock, shared machine: rough)")
    print(f"checkpoint: {ckpt}")
    result = {
        "train_images": [c.name for c in train_cases], "test_images": [c.name for c in test_cases],
        "steps": args.steps, "lr": args.lr, "seed": args.seed,
        "dice": {name.strip(): stats(vals)[0] for name, vals in rows},
        "hd95_median": {"model": float(np.median(model_hd)), "otsu": float(np.median(otsu_hd))},
        "per_image": {"model": model_dice, "pseudo": pseudo_dice, "otsu": otsu_test,
                      "nn_pixels": nn_test, "nn_embedding": nn_emb},
        "otsu_rule": rule, "otsu_train_scores": train_scores,
        "seconds": {"train": t_train, "eval": t_eval, "baselines": t_baselines,
                    "total": t_total},
        "final_train_loss": float(np.mean([r["loss"] for r in trainer.history[-50:]])),
        "checkpoint": str(ckpt),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
