"""``sgp bench``: our engine against SAM2's own video predictor on the same volume and weights;
``sgp bench --rerun``: a re-run after one correction against the first run."""

from __future__ import annotations

import argparse

import torch

from SlicerSGP.cli.common import segmenter_from_args
from SlicerSGP.errors import SGPInputError
from SlicerSGP.evaluation import bench, rerun_bench, scaling_bench


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="compare with SAM2's video predictor (time, memory); "
                       "--rerun: re-run after a correction vs the first run",
                       description=f"{bench.__doc__}\n{rerun_bench.__doc__}\n"
                                   f"{scaling_bench.__doc__}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--weights", default="random")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA), float32, bfloat16")
    p.add_argument("--feature-dtype", default="auto", help="feature cache: auto (bf16) or float32")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    p.add_argument("--slices", type=int, default=None,
                   help="slices of the synthetic volume (default 30; 200 with --rerun)")
    p.add_argument("--size", type=int, default=512, help="in-plane size of the volume")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    p.add_argument("--skip-sam2", action="store_true", help="run (b) only")
    p.add_argument("--floor", action="store_true",
                   help="also run (c): the engine with SAM2's propagation alone (no PMA, no "
                        "quality score, no interpolation prior), the least (b) could cost")
    p.add_argument("--repeat", type=int, default=1,
                   help="alternate (a) and (b) this many times and keep each side's fastest run "
                        "(noisy machines)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--rerun", action="store_true",
                   help="time the first run (encoding included) and the re-run after one "
                        "correction (a new drawn slice) instead of comparing with SAM2")
    p.add_argument("--drawn", type=int, default=5, help="drawn slices of the first run (--rerun)")
    p.add_argument("--local-support", action="store_true",
                   help="--rerun with each slice's support picked among the drawn slices "
                        "bounding its interval (SegmentOptions.local_support)")
    p.add_argument("--scaling", action="store_true",
                   help="time the same 40-slice structure in volumes of --depths slices: "
                        "slices encoded, wall time, peak memory per depth")
    p.add_argument("--depths", default="100,200,400",
                   help="volume depths for --scaling (comma-separated slice counts)")
    p.add_argument("--features-on", default="auto", choices=("auto", "device", "host"),
                   help="where slice features are kept (see sgp segment --help)")
    p.add_argument("--device-budget-mb", type=float, default=None,
                   help="device memory slice features may take (on CPU: simulated)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak bf16 TFLOP/s, to print the fraction of the compute bound")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rerun and args.drawn < 2:
        raise SGPInputError(f"--drawn {args.drawn}: the re-run bench needs at least 2 drawn "
                            "slices (the correction goes between two of them).")
    try:
        depths = tuple(int(d) for d in args.depths.split(","))
    except ValueError:
        raise SGPInputError(f"--depths {args.depths!r}: give slice counts such as "
                            "100,200,400.") from None
    if args.scaling and (not depths or min(depths) < scaling_bench.EXTENT):
        raise SGPInputError(f"--depths {args.depths}: each volume needs at least "
                            f"{scaling_bench.EXTENT} slices (the structure's extent).")
    seg = segmenter_from_args(args)
    if args.scaling:
        print(scaling_bench.main_scaling(seg, args.model, args.size, depths))
        return 0
    if args.rerun:
        print(rerun_bench.main_rerun(seg, args.model, args.slices or 200, args.size, args.drawn,
                                     args.local_support))
        return 0
    bench.prepare(seg, args.compile)
    ms, n, support = bench.run_bench(seg, slices=args.slices or 30, size=args.size,
                                     compile_encoder=args.compile, skip_sam2=args.skip_sam2,
                                     repeat=args.repeat, floor=args.floor)
    note = bench.run_note(seg, args.model, args.size, n, support, args.compile)
    if not args.skip_sam2:
        print(bench.report(ms, n, seg.device, note))
    else:
        print("\n".join(bench.single_report(m, n, note) for m in ms))
    if args.peak_tflops:
        print(bench.flops_report(seg, ms[-1], n, args.peak_tflops))
    return 0
