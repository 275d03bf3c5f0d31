"""``sgp segment``: one volume (an image file or a DICOM series folder) from a few labeled slices
and/or a support bank -> .seg.nrrd, or a DICOM Segmentation (.dcm) for a DICOM series."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from SlicerSGP.cli.common import (
    OutputPlan,
    Progress,
    add_feature_cache_options,
    add_model_options,
    cancel_on_sigterm,
    int_list,
    parse_axis,
    segmenter_from_args,
)
from SlicerSGP.cli.prompt_args import (
    add_prompt_options,
    exclude_from_args,
    names_from_args,
    prompts_from_args,
)
from SlicerSGP.cli.serve import read_token
from SlicerSGP.data import io, preprocess
from SlicerSGP.data.dicom import DicomSeries
from SlicerSGP.data.label_names import names_and_colors
from SlicerSGP.data.prompt_checks import check_prompts
from SlicerSGP.data.readers import read_image_source
from SlicerSGP.errors import SGPInputError
from SlicerSGP.evaluation.reports import montage_tile, write_montage
from SlicerSGP.service.client import connect_engine
from SlicerSGP.types import PRIOR_HELP, PRIOR_MODES, SegmentOptions, axis_label


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "segment",
        help="segment a volume from labeled slices or a support bank",
        description="Segment every slice of IMAGE from the slices labeled in LABELS (and/or a "
                    "support bank of other labeled cases); write a .seg.nrrd Slicer opens, or "
                    "for a DICOM series a DICOM Segmentation (.dcm) that references it. "
                    "Outputs are all-or-nothing: every output path is checked before the model "
                    "loads, files are written under temporary names and renamed into place "
                    "only when the whole run succeeded.",
    )
    p.add_argument("image", type=Path, help="volume (NIfTI, NRRD, MHA), 2D image (PNG, ...) or "
                   "a folder of DICOM files (one series, or --series UID)")
    add_case_options(p)
    p.add_argument("--out", type=Path, required=True,
                   help="output segmentation: .seg.nrrd, or .dcm for a DICOM Segmentation "
                        "object referencing the DICOM series IMAGE (segment names and colours)")
    add_run_options(p)
    o = p.add_argument_group("extra outputs")
    o.add_argument("--pseudo-masks", type=Path, help="write the PMG pseudo-masks (.seg.nrrd)")
    o.add_argument("--probabilities", type=Path,
                   help="folder for per-structure probability maps (NAME_probability.nrrd)")
    o.add_argument("--scores", type=Path, help="per-slice confidence table (.csv)")
    o.add_argument("--overlay", type=Path,
                   help="PNG montage: labeled slices (green), least confident and evenly spaced "
                        "slices with pseudo-mask (blue) and final (red) contours")
    o.add_argument("--quiet", action="store_true",
                   help="no progress output (a bar on a terminal, stage lines otherwise)")
    p.set_defaults(func=cmd_segment)
    return p


def add_case_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """What differs from one case to the next (besides the image): `sgp segment-batch` takes
    each of these as a column of its case list. No defaults here (None when not given), so
    that a case list's row sets exactly the options it names."""
    p.add_argument("--series", metavar="UID",
                   help="the Series Instance UID to segment, when the DICOM folder IMAGE holds "
                        "several series (they are listed when it is left out)")
    p.add_argument("--labels", type=Path,
                   help="label map on the image grid (NIfTI/NRRD/.seg.nrrd) holding the drawn slices")
    p.add_argument("--label", dest="label_values", type=int, action="append",
                   help="label value to segment (repeatable; default: every value drawn, or "
                        "every value of the support bank)")
    p.add_argument("--support-slices", type=int_list,
                   help="comma-separated slice indices (along --axis) to use as support; "
                        "an empty mask there means 'absent here'")
    p.add_argument("--complete-slices", type=int_list,
                   help="comma-separated slice indices (along --axis) on which every structure "
                        "present is drawn: there an undrawn structure is taken as absent "
                        "(elsewhere a slice is support only for the structures drawn on it)")
    p.add_argument("--support-bank", type=Path,
                   help="folder of other labeled cases (image.* + labels.*), images/ + masks/, "
                        "or the name of a saved support set (sgp support list)")
    p.add_argument("--slice-limits", action="append", metavar="V:FIRST:LAST",
                   help="structure V lies within slices FIRST..LAST along --axis (repeatable)")
    p.add_argument("--label-names", type=Path, metavar="FILE",
                   help="names and colours of the label values: labels.json or an ITK-SNAP "
                        ".label/.txt file (default: the description file found beside LABELS)")
    add_prompt_options(p)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """How every case runs: the model, an engine service, the method's settings."""
    g = p.add_argument_group("model")
    # No default for --model: with --server, only the options given are checked against the
    # server's model; a local run uses tiny.
    add_model_options(g, model_default=None)
    add_feature_cache_options(g)
    s = p.add_argument_group("engine service")
    s.add_argument("--server", metavar="URL",
                   help="run on an `sgp serve` engine at URL instead of loading the model here")
    s.add_argument("--token-file", type=Path, help="file holding the server's access token")
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
    m.add_argument("--multi-view", action="store_true",
                   help="also propagate along the other two axes and average (about 3x the time)")
    m.add_argument("--stop-after-absent", type=int, default=3, metavar="N",
                   help="past the outermost drawn slice, end a structure after N slices where it "
                        "is confidently absent (0: propagate to the volume's edges; default 3)")
    m.add_argument("--min-continuity", type=float, default=0.5, metavar="DICE",
                   help="past the outermost drawn slice, a mask overlapping the last kept one by "
                        "less (Dice), or outgrowing it towards an end the drawn slices narrow "
                        "to, has left the structure: not written, counts as absent (0: off; "
                        "default 0.5)")
    m.add_argument("--no-reverse-quality", action="store_true",
                   help="skip the reverse-propagation quality score (RevSAM2) of each slice")
    m.add_argument("--no-quality-fusion", action="store_true",
                   help="fuse the two sides by distance only, not by quality too")
    m.add_argument("--interpolation-prior", choices=PRIOR_MODES,
                   default=SegmentOptions.interpolation_prior,
                   help=f"{PRIOR_HELP} (default {SegmentOptions.interpolation_prior})")
    m.add_argument("--intensity", default="auto",
                   help="auto, percentile, none, ct_abdomen, ct_lung, ct_bone, ct_brain, "
                        "ct_soft_tissue")
    m.add_argument("--threshold", type=float, default=0.5)
    m.add_argument("--batch-size", type=int, default=None,
                   help="slices per encoder batch (default 1 on CPU, 8 on CUDA)")


def probability_name(structure: str) -> str:
    """File name of one structure's probability map inside the --probabilities folder."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in structure) or "structure"
    return f"{safe}_probability.nrrd"


def plan_outputs(args: argparse.Namespace) -> OutputPlan:
    """Check every output path before anything is read or loaded."""
    plan = OutputPlan()
    plan.file(args.out, "--out", (".seg.nrrd", ".dcm"))
    if is_dicom_seg(args.out) and not Path(args.image).is_dir():
        raise SGPInputError(
            f"--out {args.out} asks for a DICOM Segmentation, which references the DICOM images "
            f"it segments, but IMAGE {args.image} is not a DICOM series folder. Give the folder "
            "of the DICOM series as IMAGE, or write --out NAME.seg.nrrd.")
    if args.pseudo_masks:
        plan.file(args.pseudo_masks, "--pseudo-masks", (".seg.nrrd",))
    if args.scores:
        plan.file(args.scores, "--scores", (".csv",))
    if args.overlay:
        plan.file(args.overlay, "--overlay", (".png",))
    if args.probabilities:
        plan.folder(args.probabilities, "--probabilities")
    return plan


def _structures(args, labels: np.ndarray | None, bank: dict | None, names: dict[int, str],
                prompted: set[int], exclude: list[int] | None) -> dict[int, str] | None:
    """Which structures to segment, named by --name or the labels' / bank's names files."""
    if args.label_values:
        values = [int(v) for v in args.label_values]
    elif labels is not None or prompted:
        drawn = {int(v) for v in np.unique(labels)} if labels is not None else set()
        values = sorted((drawn - {0} - set(exclude or [])) | prompted)
    elif bank:
        values = sorted(int(v) for v in bank)
    else:
        values = []
    return {v: names.get(v, f"Segment_{v}") for v in values} or None


def _expected_model(args: argparse.Namespace) -> dict:
    """What the server must have loaded: the model options the user gave (the device is the
    server's business; the seed matters only for random weights)."""
    spec = {"model": args.model, "weights": args.weights, "image_size": args.image_size,
            "dtype": args.dtype, "feature_dtype": args.feature_dtype}
    if str(args.weights).lower() == "random":
        spec["seed"] = args.seed
    return {k: v for k, v in spec.items() if v is not None and v != "auto"}


def engine_from_args(args: argparse.Namespace):
    """The Segmenter, or a client of an `sgp serve` engine with the same ``segment``."""
    if not args.server:
        if args.token_file:
            raise SGPInputError("--token-file goes with --server URL.")
        return segmenter_from_args(args)
    if args.feature_cache is not None or args.feature_cache_mb is not None:
        raise SGPInputError("--feature-cache is for a run on this computer; a server keeps "
                            "its own (sgp serve --feature-cache DIR). Leave it out with "
                            "--server.")
    token = read_token(args.token_file, allow_shared=True) if args.token_file else None
    return connect_engine(args.server, token, _expected_model(args))


def cmd_segment(args: argparse.Namespace) -> int:
    loaded: dict[str, float] = {}

    def engine_for():
        t0 = time.perf_counter()
        engine = engine_from_args(args)
        loaded["seconds"] = time.perf_counter() - t0
        return engine

    with plan_outputs(args) as plan:
        result, engine = segment_case(args, plan, engine_for)
        written = plan.commit()
    _report(result, parse_axis(args.axis), loaded["seconds"], engine, written)
    return 0


def segment_case(args: argparse.Namespace, plan: OutputPlan, engine_for: Callable[[], Any]):
    """One case as ``sgp segment`` runs it: read the inputs, then get the engine from
    ``engine_for()`` (loaded after every input was read and checked), segment, and write each
    output of ``plan`` under its temporary name. The caller commits. Returns (result, engine)."""
    axis = parse_axis(args.axis)
    prompts, exclude = prompts_from_args(args), exclude_from_args(args)
    if args.labels is None and args.support_bank is None and not prompts:
        raise SGPInputError("Give the labeled slices with --labels LABELS, a box or clicks on "
                            "a slice with --box / --point (or other cases with --support-bank "
                            "DIR).")
    volume, geometry, source = read_image_source(args.image, args.series)
    labels, names = None, {}
    if args.labels is not None:
        labels, _, names = io.read_labels(args.labels, geometry,
                                          reference_shape=volume.shape[:3])
    bank = None
    if args.support_bank is not None:
        bank = io.load_support_sets(args.support_bank, structures=args.label_values,
                                    axis=axis, intensity=args.intensity)
        names = {**io.support_bank_names(args.support_bank), **names}
    colors = None
    if args.label_names is not None:
        names, colors = names_and_colors(args.label_names, names)
    spatial = volume.shape[:3]  # the prompts' slices, checked before the model loads
    check_prompts(prompts, (spatial[axis], *(spatial[a] for a in range(3) if a != axis)),
                  axis, exclude)
    names = {**names, **names_from_args(args)}
    structures = _structures(args, labels, bank, names, {p.value for p in prompts}, exclude)
    if args.probabilities and structures:
        for name in structures.values():
            plan.file(args.probabilities / probability_name(name),
                      f"--probabilities file for {name!r}")
    opts = SegmentOptions(
        axis=axis, top_k=args.top_k, memory_size=args.memory_size,
        memory_policy=args.memory_policy, use_pmg=not args.no_pmg, use_pma=not args.no_pma,
        use_3d_memory=not args.no_3d_memory, bidirectional=not args.one_direction,
        intensity=args.intensity, threshold=args.threshold,
        encode_batch_size=args.batch_size,
        keep_pseudo_masks=args.pseudo_masks is not None or args.overlay is not None,
        complete_slices=args.complete_slices, multi_view=args.multi_view,
        stop_after_absent=args.stop_after_absent, slice_limits=_slice_limits(args),
        min_continuity=args.min_continuity,
        reverse_quality=not args.no_reverse_quality,
        quality_fusion=not args.no_quality_fusion, exclude=exclude,
        interpolation_prior=args.interpolation_prior,
    )
    engine = engine_for()
    progress = Progress(args.quiet)
    try:
        with cancel_on_sigterm() as cancel:
            result = engine.segment(volume, labels, structures, opts,
                                    support_slices=args.support_slices, support_bank=bank,
                                    prompts=prompts or None, geometry=geometry,
                                    progress=progress.stage, cancel=cancel)
    finally:
        progress.close()
    _write_outputs(plan, args, volume, labels, geometry, result, opts, colors, source)
    return result, engine


def is_dicom_seg(path: Path) -> bool:
    return path.name.lower().endswith(".dcm")


def _write_outputs(plan: OutputPlan, args, volume, labels, geometry, result, opts,
                   colors: dict | None = None, source: DicomSeries | None = None) -> None:
    from SlicerSGP.method.segmenter import label_map_from_probabilities

    if is_dicom_seg(args.out):
        from SlicerSGP.data.dicom_seg import write_dicom_seg  # highdicom: only when asked

        assert source is not None  # plan_outputs refused a .dcm for another input
        write_dicom_seg(plan.temp(args.out), result.labels, source, result.structures)
    else:
        io.write_segmentation(plan.temp(args.out), result.labels, geometry,
                              result.structures, colors)
    if args.pseudo_masks:
        pseudo = label_map_from_probabilities(result.pseudo_masks, opts.threshold,
                                              result.labels.shape)
        io.write_segmentation(plan.temp(args.pseudo_masks), pseudo, geometry,
                              {v: f"{n} (pseudo-mask)" for v, n in result.structures.items()})
    if args.probabilities:
        for v, prob in result.probabilities.items():
            path = args.probabilities / probability_name(result.structures[v])
            if not plan.claimed(path):
                plan.file(path, f"--probabilities file for {result.structures[v]!r}")
            io.write_volume(plan.temp(path), prob, geometry)
    if args.scores:
        io.write_score_table(plan.temp(args.scores), result.slice_scores, result.structures)
    if args.overlay:
        write_overlay(plan.temp(args.overlay), volume, labels, result, opts)


STAGES = ("encode", "interpolation", "propagate", "multi_view", "assemble")
"""The timings printed after a run, in the order they happen."""


def _report(result, axis: int, load_s: float, engine, written: list[Path]) -> None:
    n = int(result.stats.get("slices", 0))
    total = float(result.timings.get("total", 0.0))
    support = [int(k) for k in result.labeled_slices] or "none: support bank only"
    device = getattr(engine, "device", None) or "the engine service"
    print(f"segmented {', '.join(result.structures.values())} on {n} slices along "
          f"{axis_label(axis)} (support slices {support}) in {total:.1f} s "
          f"({total / max(n, 1):.2f} s/slice; model load {load_s:.1f} s) on {device}")
    stages = [f"{k} {result.timings[k]:.1f} s" for k in STAGES if k in result.timings]
    if stages:
        print("time: " + ", ".join(stages))
    for note in getattr(result, "notes", None) or []:
        print(f"note: {note}")
    disk = getattr(engine, "feature_cache", None)
    if disk is not None:
        print(f"slice features: {result.stats.get('slices_encoded_this_run', 0)} slices "
              f"encoded, {result.stats.get('slices_loaded_from_disk', 0)} loaded from "
              f"{disk.folder}")
    for v, table in result.slice_scores.items():
        predicted = table[~np.isin(table["source"], ("labeled", "prompted"))]
        prompted = (getattr(result, "prompted_by_structure", None) or {}).get(v)
        if prompted:
            print(f"  {result.structures[v]}: slices {prompted} made from prompts, "
                  f"{int((predicted['source'] != 'absent').sum())} slices propagated")
        if len(predicted):
            worst = [int(k) for k in predicted[predicted["confidence"].argsort()[:3]]["slice"]]
            print(f"  {result.structures[v]}: mean confidence "
                  f"{float(predicted['confidence'].mean()):.3f}; least confident slices {worst}")
    print("wrote " + ", ".join(str(p) for p in written))


def write_overlay(path: Path, volume, labels, result, opts, max_tiles: int = 12) -> Path:
    """A montage per run: for each structure, its labeled slices (drawn mask in green), then the
    least confident predicted slices and evenly spaced others with the pseudo-mask (blue) and
    final mask (red) contours: where to look first."""
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
        predicted = table[~np.isin(table["source"], ("labeled", "prompted"))]
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


def _slice_limits(args: argparse.Namespace) -> dict[int, list[int]] | None:
    limits: dict[int, list[int]] = {}
    for text in args.slice_limits or []:
        try:
            value, first, last = (int(t) for t in text.split(":"))
        except ValueError:
            raise SGPInputError(f"--slice-limits {text!r}: give VALUE:FIRST:LAST, e.g. 1:10:40."
                                ) from None
        limits[value] = [first, last]
    return limits or None
