"""``sgp bench``: our engine against SAM2's own video predictor on the same volume and weights."""

from __future__ import annotations

import argparse

import torch

from SlicerSGP.cli.common import segmenter_from_args
from SlicerSGP.evaluation import bench


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="compare with SAM2's video predictor (time, memory)",
                       description=bench.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--weights", default="random")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA), float32, bfloat16")
    p.add_argument("--feature-dtype", default="auto", help="feature cache: auto (bf16) or float32")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    p.add_argument("--slices", type=int, default=30)
    p.add_argument("--size", type=int, default=512, help="in-plane size of the volume")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    p.add_argument("--skip-sam2", action="store_true", help="run (b) only")
    p.add_argument("--repeat", type=int, default=1,
                   help="alternate (a) and (b) this many times and keep each side's fastest run "
                        "(noisy machines)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak bf16 TFLOP/s, to print the fraction of the compute bound")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    seg = segmenter_from_args(args)
    bench.prepare(seg, args.compile)
    ms, n, support = bench.run_bench(seg, slices=args.slices, size=args.size,
                                     compile_encoder=args.compile, skip_sam2=args.skip_sam2,
                                     repeat=args.repeat)
    note = bench.run_note(seg, args.model, args.size, n, support, args.compile)
    if len(ms) == 2:
        print(bench.report(ms, n, seg.device, note))
    else:
        print(bench.single_report(ms[0], n, note))
    if args.peak_tflops:
        print(bench.flops_report(seg, ms[-1], n, args.peak_tflops))
    return 0
