"""``sgp eval``: Dice, IoU and HD95 per structure and case, from prediction files or by running
a model the way ``sgp segment`` does."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from SlicerSGP.cli.common import (
    OutputPlan,
    Progress,
    add_model_options,
    cancel_on_sigterm,
    parse_axis,
    segmenter_from_args,
)
from SlicerSGP.cli.shards import join_shards, run_share
from SlicerSGP.data import io, preprocess
from SlicerSGP.data.datasets import load_dataset, parse_split
from SlicerSGP.errors import SGPInputError
from SlicerSGP.evaluation.baselines import BASELINES
from SlicerSGP.evaluation.evaluate import (
    array_spacing,
    bank_from_cases,
    baseline_case,
    find_prediction,
    middle_slice,
    predict_case,
)
from SlicerSGP.evaluation.metrics import Row, evaluate_labels, summarize
from SlicerSGP.evaluation.reports import montage_tile, write_csv, write_json, write_montage
from SlicerSGP.types import PRIOR_HELP, PRIOR_MODES, SegmentOptions


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="Dice, IoU and HD95 per structure and case (from predictions or by running a model)",
        description="Score segmentations of the labeled cases in DATA (same layouts as `sgp "
                    "train`): either prediction files (--pred) or the model run now (--model). "
                    "Outputs are all-or-nothing: checked before anything runs, written under "
                    "temporary names, renamed into place only when every case was scored. "
                    "Under `torchrun --nproc_per_node N` each process scores every N-th case "
                    "(its own GPU, the model loaded once per process) and the first process "
                    "writes the tables for all.",
    )
    p.add_argument("data", type=Path, help="dataset folder with the ground truth")
    p.add_argument("--cases", default=None, help="index ranges of cases to score (e.g. 40:100)")
    p.add_argument("--label", dest="structures", type=int, action="append",
                   help="label value to score (repeatable; default every value in the truth)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pred", type=Path, help="folder of predictions named <case>.seg.nrrd ...")
    src.add_argument("--model", help="SAM2.1 size or an SGP checkpoint (.safetensors) to run")
    src.add_argument("--baseline", choices=BASELINES,
                     help="score what clinicians use today on the same --support-slices: "
                          "'interpolation' (Segment Editor's Fill between slices) or "
                          "'nearest' (copy the nearest drawn slice)")
    g = p.add_argument_group("running the model")
    add_model_options(g, with_model=False)
    g.add_argument("--bank", type=Path, help="support bank folder (other labeled cases)")
    g.add_argument("--bank-cases", default=None,
                   help="use these cases of DATA (index ranges, e.g. 0:40) as the support bank")
    g.add_argument("--support-slices", type=int, default=0,
                   help="give the model N ground-truth slices of each case as support (they are "
                        "left out of the metrics)")
    g.add_argument("--top-k", type=int, default=4)
    g.add_argument("--memory-policy", choices=("least_similar", "fifo"), default="least_similar")
    g.add_argument("--no-pmg", action="store_true")
    g.add_argument("--no-pma", action="store_true")
    g.add_argument("--no-3d-memory", action="store_true")
    g.add_argument("--axis", default="k")
    g.add_argument("--intensity", default="auto")
    g.add_argument("--interpolation-prior", choices=PRIOR_MODES,
                   default=SegmentOptions.interpolation_prior,
                   help=f"{PRIOR_HELP} (with --support-slices)")
    g.add_argument("--write-pred", type=Path, help="also write each prediction as "
                   "<folder>/<case>.seg.nrrd")
    o = p.add_argument_group("outputs")
    o.add_argument("--csv", type=Path, help="per case and structure rows (.csv)")
    o.add_argument("--json", type=Path, help="summary + rows (.json)")
    o.add_argument("--montage", type=Path, help="PNG montage: truth green, pseudo-mask blue, "
                   "final red, on the slice with the largest true area")
    o.add_argument("--montage-cases", type=int, default=24)
    o.add_argument("--quiet", action="store_true",
                   help="no progress output (a bar on a terminal, a line per tenth otherwise)")
    p.set_defaults(func=cmd_eval)
    return p


def _plan(args: argparse.Namespace) -> OutputPlan:
    plan = OutputPlan()
    for option, path, suffix in (("--csv", args.csv, ".csv"), ("--json", args.json, ".json"),
                                 ("--montage", args.montage, ".png")):
        if path is not None:
            plan.file(path, option, (suffix,))
    if args.write_pred is not None:
        if args.model is None:
            raise SGPInputError("--write-pred writes the predictions of --model; with --pred "
                                "they are files already.")
        plan.folder(args.write_pred, "--write-pred")
    return plan


def _support(args, all_cases: list, idx: list[int], values: list[int], axis: int):
    """The support bank the model runs with (None for --support-slices)."""
    if args.bank is not None:
        return io.load_support_sets(args.bank, structures=values, axis=axis,
                                    intensity=args.intensity)
    if args.bank_cases is not None:
        b_idx, _ = parse_split(args.bank_cases, len(all_cases))
        overlap = sorted(set(b_idx) & set(idx))
        if overlap:
            raise SGPInputError(f"--bank-cases and --cases overlap ({overlap[:5]}...): a case "
                                "must not be its own support.")
        return bank_from_cases([all_cases[i] for i in b_idx], values)
    if not args.support_slices:
        raise SGPInputError("Running a model needs support: --bank DIR, --bank-cases RANGES "
                            "or --support-slices N.")
    return None


def cmd_eval(args: argparse.Namespace) -> int:
    axis = parse_axis(args.axis)
    shard = join_shards()  # under torchrun: this process's share of the cases
    try:
        args.device = shard.device(args.device)
        with _plan(args) as plan:
            all_cases = load_dataset(args.data, axis=axis, intensity=args.intensity,
                                     keep_raw=args.model is not None)
            idx, _ = parse_split(args.cases, len(all_cases))
            cases = [all_cases[i] for i in idx]
            if not cases:
                raise SGPInputError("No case selected for evaluation.")
            values = [int(v) for v in args.structures] if args.structures else \
                sorted({int(v) for c in cases for v in c.values()})
            if not values:
                raise SGPInputError("The ground truth holds no structure; give --label.")
            mine = shard.mine(len(cases))
            if args.write_pred is not None:
                for i in mine:
                    plan.file(args.write_pred / f"{cases[i].name}.seg.nrrd",
                              f"--write-pred {cases[i].name}")
            segmenter = bank = opts = None
            if args.model is not None:
                bank = _support(args, all_cases, idx, values, axis)
                segmenter = segmenter_from_args(args) if mine else None
                opts = SegmentOptions(top_k=args.top_k, memory_policy=args.memory_policy,
                                      use_pmg=not args.no_pmg, use_pma=not args.no_pma,
                                      use_3d_memory=not args.no_3d_memory,
                                      intensity=args.intensity,
                                      interpolation_prior=args.interpolation_prior)
            t_start = time.perf_counter()
            shares = run_share(shard, lambda: _score(args, plan, cases, mine, values,
                                                     segmenter, bank, opts))
            scored = sorted((c for share in shares for c in share), key=lambda c: c[0])
            rows = [r for _, case_rows, _ in scored for r in case_rows]
            tiles = [t for _, _, t in scored if t is not None]
            elapsed = time.perf_counter() - t_start
            if shard.main:  # the first process writes the tables for all
                if args.csv:
                    write_csv(rows, plan.temp(args.csv))
                if args.json:
                    write_json(rows, plan.temp(args.json),
                               {"seconds": elapsed, "processes": shard.world,
                                "source": args.model or (f"baseline {args.baseline}"
                                                         if args.baseline else str(args.pred))})
                if args.montage:
                    write_montage(tiles, plan.temp(args.montage))
            written = plan.commit()
    finally:
        shard.close()
    if shard.main:
        _report(rows, len(cases), elapsed, written)
    return 0


def _score(args, plan: OutputPlan, cases: list, mine: list[int], values: list[int], segmenter,
           bank, opts) -> list[tuple[int, list[Row], np.ndarray | None]]:
    """This process's cases (``mine``: indices into ``cases``): (index, rows, montage tile)."""
    scored = []
    counter = Progress(args.quiet).counter("eval", len(mine), unit="cases")
    try:
        with cancel_on_sigterm() as cancel:
            for i in mine:
                rows, tile = _score_case(args, plan, cases[i], values, segmenter, bank, opts,
                                         cancel, want_tile=i < args.montage_cases)
                scored.append((i, rows, tile))
                if counter is not None:
                    counter.update(1)
    finally:
        if counter is not None:
            counter.close()
    return scored


def _score_case(args, plan: OutputPlan, case, values: list[int], segmenter, bank, opts,
                cancel, *, want_tile: bool) -> tuple[list[Row], np.ndarray | None]:
    spacing = array_spacing(case.geometry, case.axis if case.num_slices > 1 else 0)
    pseudo: dict[int, np.ndarray] = {}
    exclude: list[int] = []
    seconds = 0.0
    if segmenter is not None or args.baseline:
        pred = baseline_case(args.baseline, case, values, args.support_slices) \
            if args.baseline else \
            predict_case(segmenter, case, values, opts, bank=bank,
                         support_slices=args.support_slices, cancel=cancel)
        labels, pseudo, exclude, seconds = (pred.labels, pred.pseudo, pred.support_slices,
                                            pred.seconds)
        if args.write_pred and segmenter is not None:
            io.write_segmentation(plan.temp(args.write_pred / f"{case.name}.seg.nrrd"),
                                  preprocess.restore_orientation(labels, case.axis),
                                  case.geometry,
                                  {v: case.names.get(v, f"label_{v}") for v in values})
    else:
        raw, _, _ = io.read_labels(find_prediction(args.pred, case.name))
        labels = raw if raw.shape[0] == 1 and case.num_slices == 1 else \
            preprocess.reorient(raw, case.axis)
    rows = evaluate_labels(labels, case.labels, values, spacing, case=case.name,
                           names=case.names, exclude_slices=exclude)
    for r in rows:
        r.seconds = seconds
    tile = None
    if args.montage and want_tile:
        v = values[0]
        k = middle_slice(case.labels == v, exclude)
        ps = pseudo.get(v)
        tile = montage_tile(case.slices01[k], case.labels[k] == v,
                            ps[k] >= 0.5 if ps is not None else None, labels[k] == v)
    return rows, tile


def _report(rows: list[Row], n_cases: int, elapsed: float, written: list[Path]) -> None:
    print(f"scored {n_cases} case(s) in {elapsed:.1f} s")
    print(f"{'structure':<20} {'cases':>5} {'Dice mean':>9} {'median':>7} {'IoU':>6} "
          f"{'HD95 mean':>9} {'inf':>4}")
    for s in summarize(rows).values():
        h = f"{s['hd95_mean']:.2f}" if s["hd95_mean"] is not None else "-"
        print(f"{s['structure'][:20]:<20} {s['cases']:>5} {s['dice_mean']:>9.4f} "
              f"{s['dice_median']:>7.4f} {s['iou_mean']:>6.4f} {h:>9} {s['hd95_infinite']:>4}")
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
