"""The ``sgp`` command: segment volumes from a few labeled slices, manage weights.

    sgp segment IMAGE --labels LABELS --out OUT.seg.nrrd [options]
    sgp weights list | fetch NAME | verify [NAME|PATH]

Exit codes: 0 success, 2 bad input (nothing written), 1 any other failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from SlicerSGP import __version__
from SlicerSGP.errors import SGPError, SGPInputError

AXIS_NAMES = {"k": 0, "axial": 0, "j": 1, "coronal": 1, "i": 2, "sagittal": 2,
              "0": 0, "1": 1, "2": 2}


def parse_axis(text: str | int) -> int:
    """'k'/'axial', 'j'/'coronal', 'i'/'sagittal' (or 0/1/2) -> array axis of (K, J, I)."""
    axis = AXIS_NAMES.get(str(text).lower())
    if axis is None:
        raise SGPInputError(f"Unknown --axis {text!r}: use k/axial, j/coronal or i/sagittal.")
    return axis


def build_parser() -> argparse.ArgumentParser:
    from SlicerSGP.evaluation.bench import add_bench_subparser
    from SlicerSGP.evaluation.evaluate import add_eval_subparser
    from SlicerSGP.training.train import add_train_subparser
    from SlicerSGP.weights import add_weights_subparser

    parser = argparse.ArgumentParser(
        prog="sgp",
        description="Few-shot segmentation with SAM2 and support-set guided prompting.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment_parser(sub)
    add_weights_subparser(sub)
    add_bench_subparser(sub)
    add_train_subparser(sub)
    add_eval_subparser(sub)
    return parser


def _add_segment_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment a volume from labeled slices or a support bank",
        description="Segment every slice of IMAGE from the slices labeled in LABELS (and/or a "
                    "support bank of other labeled cases); write a .seg.nrrd Slicer opens.",
    )
    p.add_argument("image", type=Path, help="volume (NIfTI, NRRD, MHA) or 2D image (PNG, ...)")
    p.add_argument("--labels", type=Path,
                   help="label map on the image grid (NIfTI/NRRD/.seg.nrrd) holding the drawn slices")
    p.add_argument("--out", type=Path, required=True, help="output segmentation (.seg.nrrd)")
    p.add_argument("--label", dest="label_values", type=int, action="append",
                   help="label value to segment (repeatable; default: every value drawn)")
    p.add_argument("--support-slices", type=_int_list,
                   help="comma-separated slice indices (along --axis) to use as support; "
                        "an empty mask there means 'absent here'")
    p.add_argument("--support-bank", type=Path,
                   help="folder of other labeled cases (image.* + labels.*) or images/ + masks/")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny",
                   help="SAM2.1 size (tiny, small, base_plus, large) or an SGP checkpoint "
                        "(.safetensors from `sgp train`); default tiny")
    g.add_argument("--weights", default=None,
                   help="'random' (seeded, for tests), a registry name, or a .pt file; default: "
                        "the cached pretrained checkpoint (`sgp weights fetch NAME`)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--image-size", type=int, default=None,
                   help="model input size, multiple of 64 in 256..1024 (default 1024)")
    g.add_argument("--dtype", default="auto",
                   help="auto (bf16 autocast on CUDA, float32 on CPU), float32 or bfloat16 "
                        "(on CPUs with AMX/AVX512-BF16 about twice as fast as float32)")
    g.add_argument("--feature-dtype", default="auto",
                   help="cached slice features: auto (bf16, half the memory) or float32 (exact)")
    g.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    m = p.add_argument_group("method")
    m.add_argument("--axis", default="k", help="slicing axis: k/axial, j/coronal, i/sagittal "
                   "(of the image grid; default k)")
    m.add_argument("--top-k", type=int, default=4, help="support items per slice (default 4)")
    m.add_argument("--memory-size", type=int, default=None,
                   help="3D memory bank size (default: = --top-k)")
    m.add_argument("--memory-policy", choices=("least_similar", "fifo"), default="least_similar")
    m.add_argument("--no-pmg", action="store_true", help="ablation: no pseudo-mask generation")
    m.add_argument("--no-pma", action="store_true", help="ablation: no pseudo-mask attention")
    m.add_argument("--no-3d-memory", action="store_true", help="ablation: no volumetric memory")
    m.add_argument("--one-direction", action="store_true",
                   help="propagate once (SAM2 style) instead of from both sides")
    m.add_argument("--intensity", default="auto",
                   help="auto, percentile, none, ct_abdomen, ct_lung, ct_bone, ct_brain, "
                        "ct_soft_tissue")
    m.add_argument("--threshold", type=float, default=0.5)
    m.add_argument("--batch-size", type=int, default=None,
                   help="slices per encoder batch (default 1 on CPU, 8 on CUDA)")
    o = p.add_argument_group("extra outputs")
    o.add_argument("--pseudo-masks", type=Path, help="write the PMG pseudo-masks (.seg.nrrd)")
    o.add_argument("--probabilities", type=Path,
                   help="folder for per-structure probability maps (.nrrd)")
    o.add_argument("--scores", type=Path, help="per-slice confidence table (.csv)")
    o.add_argument("--overlay", type=Path,
                   help="PNG montage: labeled slices (green), least confident and evenly spaced "
                        "slices with pseudo-mask (blue) and final (red) contours")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_segment)


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated slice indices like 3,10,17, got {text!r}") from None


def _check_output(path: Path, suffix: str, what: str) -> None:
    if not str(path).endswith(suffix):
        raise SGPInputError(f"{what} {path} must end with {suffix}.")
    parent = path.resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise SGPInputError(f"Cannot write {what} {path}: folder {parent} is not writable.")


def cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from SlicerSGP.data import io
    from SlicerSGP.method.segmenter import Segmenter, label_map_from_probabilities
    from SlicerSGP.types import SegmentOptions

    axis = parse_axis(args.axis)
    _check_output(args.out, ".seg.nrrd", "--out")
    if args.pseudo_masks:
        _check_output(args.pseudo_masks, ".seg.nrrd", "--pseudo-masks")
    if args.scores:
        _check_output(args.scores, ".csv", "--scores")
    if args.overlay:
        _check_output(args.overlay, ".png", "--overlay")
    if args.labels is None and args.support_bank is None:
        raise SGPInputError("Give the labeled slices with --labels LABELS (or other cases with "
                            "--support-bank DIR).")

    volume, geometry = io.read_image(args.image)
    labels, names = None, {}
    if args.labels is not None:
        labels, _, names = io.read_labels(args.labels, geometry, reference_shape=volume.shape[:3])
    bank = None
    if args.support_bank is not None:
        bank = io.load_support_sets(args.support_bank, structures=args.label_values, axis=axis,
                                    intensity=args.intensity)
        names = {**io.support_bank_names(args.support_bank), **names}
    structures = None
    if args.label_values:
        structures = {v: names.get(v, f"Segment_{v}") for v in args.label_values}
    elif labels is not None:
        import numpy as np

        present = sorted(set(np.unique(labels).tolist()) - {0})
        structures = {v: names.get(v, f"Segment_{v}") for v in present} or None

    opts = SegmentOptions(
        axis=axis, top_k=args.top_k, memory_size=args.memory_size,
        memory_policy=args.memory_policy, use_pmg=not args.no_pmg, use_pma=not args.no_pma,
        use_3d_memory=not args.no_3d_memory, bidirectional=not args.one_direction,
        intensity=args.intensity, threshold=args.threshold, encode_batch_size=args.batch_size,
        keep_pseudo_masks=args.pseudo_masks is not None or args.overlay is not None,
    )
    t0 = time.perf_counter()
    segmenter = Segmenter(args.model, weights=args.weights, device=args.device,
                          image_size=args.image_size, seed=args.seed, dtype=args.dtype,
                          feature_dtype=args.feature_dtype)
    load_s = time.perf_counter() - t0

    bars: dict[str, tqdm] = {}

    def progress(stage: str, frac: float) -> None:
        if args.quiet:
            return
        key = stage.split()[0]
        bar = bars.get(key)
        if bar is None:
            bar = bars[key] = tqdm(total=100, desc=stage, unit="%", leave=False,
                                   bar_format="{desc:<22} {percentage:3.0f}%|{bar}| {elapsed}")
        bar.set_description_str(stage)
        bar.n = int(round(100 * frac))
        bar.refresh()

    try:
        result = segmenter.segment(volume, labels, structures, opts,
                                   support_slices=args.support_slices, support_bank=bank,
                                   geometry=geometry, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()

    io.write_segmentation(args.out, result.labels, geometry, result.structures)
    written = [str(args.out)]
    if args.pseudo_masks:
        pseudo = label_map_from_probabilities(result.pseudo_masks, opts.threshold,
                                              result.labels.shape)
        io.write_segmentation(args.pseudo_masks, pseudo, geometry,
                              {v: f"{n} (pseudo-mask)" for v, n in result.structures.items()})
        written.append(str(args.pseudo_masks))
    if args.probabilities:
        for v, prob in result.probabilities.items():
            path = args.probabilities / f"{_safe(result.structures[v])}_probability.nrrd"
            io.write_volume(path, prob, geometry)
            written.append(str(path))
    if args.scores:
        io.write_score_table(args.scores, result.slice_scores, result.structures)
        written.append(str(args.scores))
    if args.overlay:
        write_overlay(args.overlay, volume, labels, result, opts)
        written.append(str(args.overlay))

    n = result.stats.get("slices", 0)
    total = result.timings.get("total", 0.0)
    print(f"segmented {', '.join(result.structures.values())} on {n} slices "
          f"(support slices {result.labeled_slices or 'none: support bank only'}) in "
          f"{total:.1f} s ({total / max(n, 1):.2f} s/slice; model load {load_s:.1f} s) "
          f"on {segmenter.device}")
    for v, table in result.slice_scores.items():
        predicted = table[table["source"] != "labeled"]
        if len(predicted):
            worst = predicted[predicted["confidence"].argsort()[:3]]["slice"].tolist()
            print(f"  {result.structures[v]}: mean confidence "
                  f"{float(predicted['confidence'].mean()):.3f}; least confident slices {worst}")
    print("wrote " + ", ".join(written))
    return 0


def write_overlay(path: Path, volume, labels, result, opts, max_tiles: int = 12) -> Path:
    """A montage per run: for each structure, its labeled slices (drawn mask in green), then the
    least confident predicted slices and evenly spaced others with the pseudo-mask (blue) and
    final mask (red) contours: where to look first."""
    import numpy as np

    from SlicerSGP.data import preprocess
    from SlicerSGP.evaluation.evaluate import montage_tile, write_montage

    vol = preprocess.reorient(volume, opts.axis)
    slices01 = preprocess.normalize_intensity(vol, *preprocess.intensity_range(vol, opts.intensity))
    lab = preprocess.reorient(labels, opts.axis) if labels is not None else None
    final = preprocess.reorient(result.labels, opts.axis)
    tiles = []
    per_structure = max(3, max_tiles // max(1, len(result.structures)))
    for v in result.structures:
        pseudo = result.pseudo_masks.get(v)
        pseudo = preprocess.reorient(pseudo, opts.axis) if pseudo is not None else None
        table = result.slice_scores[v]
        predicted = table[table["source"] != "labeled"]
        worst = predicted[np.argsort(predicted["confidence"])]["slice"].tolist()
        chosen = list(result.labeled_slices[:2]) + worst[:per_structure // 2]
        rest = [k for k in predicted["slice"].tolist() if k not in chosen]
        chosen += preprocess.evenly_spaced(rest, per_structure - len(chosen))
        for k in chosen[:per_structure]:
            drawn = (lab[k] == v) if lab is not None and k in result.labeled_slices else None
            tiles.append(montage_tile(
                slices01[k], drawn,
                pseudo[k] >= opts.threshold if pseudo is not None and drawn is None else None,
                final[k] == v if drawn is None else None))
    return write_montage(tiles, path, columns=min(6, len(tiles)))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "structure"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SGPInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SGPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
