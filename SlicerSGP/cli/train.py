"""``sgp train``: train LoRA adapters + PMA (or a whole small model) on labeled cases."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from SlicerSGP.cli.common import OutputPlan, Progress, cancel_on_sigterm, parse_axis
from SlicerSGP.data.targets import target_name
from SlicerSGP.errors import SGPInputError
from SlicerSGP.method.model import describe
from SlicerSGP.training.config import TrainConfig, checkpoint_path, state_path
from SlicerSGP.training.distributed import init_distributed
from SlicerSGP.training.trainer import Trainer, train


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train LoRA adapters + PMA (or a whole small model) on labeled cases",
        description="Train SAM2-SGP on a folder of labeled cases (sub-folders with image.* + "
                    "labels.*: NIfTI, NRRD, .seg.nrrd) or 2D pairs (images/ + masks/). Writes "
                    "an SGP checkpoint (.safetensors + .json) that `sgp segment --model` and "
                    "the Slicer module load, and NAME.state.pt to resume from. The checkpoint and its "
                    ".json are all-or-nothing: checked before training starts, written under "
                    "temporary names and renamed into place only when the run succeeded. "
                    "NAME.state.pt is a working file: saved every --save-every steps, on SIGTERM "
                    "and at the end, and kept after a failure so that --resume can continue.",
    )
    p.add_argument("data", type=Path, help="dataset folder")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--cases", default=None,
                   help="which cases train, as index ranges of the sorted case list "
                        "(e.g. 0:60 or 0:40,50:60); default all")
    p.add_argument("--label", dest="structures", type=int, action="append",
                   help="label value to train on (repeatable; default every value)")
    p.add_argument("--target", dest="targets", action="append", default=None,
                   help="what an episode may ask for: a label value or a union such as 1+2 "
                        "(repeatable; default each --label alone). One image asked for different "
                        "targets teaches the network to read its support")
    p.add_argument("--hold-out", dest="hold_out", action="append", default=None,
                   help="a label value or union never asked for in training (repeatable), to "
                        "test a structure defined only by its support")
    p.add_argument("--own-image-support", type=float, default=0.0,
                   help="fraction of 2D episodes whose support also holds the query image, "
                        "flipped or rotated, with its answer")
    p.add_argument("--absent-share", type=float, default=0.2,
                   help="fraction of episodes whose answer is empty: a run where the target is "
                        "absent, or (where it is everywhere) support with empty masks")
    p.add_argument("--paired-targets", action=argparse.BooleanOptionalAction, default=True,
                   help="with several --target: each step also asks the same query for another "
                        "target it shows, with that target's support (default on)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny",
                   help="SAM2.1 size (tiny, small, base_plus, large) or 'cpu-mini' (a CPU-sized "
                        "preset built on tiny; use with --image-size 256)")
    g.add_argument("--weights", default=None,
                   help="'random' (train from scratch), a registry name or a .pt file; default "
                        "the cached pretrained checkpoint")
    g.add_argument("--image-size", type=int, default=1024)
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0,
                   help="LoRA scaling numerator (scale = alpha / rank); stored in the checkpoint")
    ta = g.add_mutually_exclusive_group()
    ta.add_argument("--train-all", dest="train_all", action="store_true", default=None,
                    help="train every weight (default with --weights random)")
    ta.add_argument("--lora-only", dest="train_all", action="store_false",
                    help="train only LoRA + PMA (default with pretrained weights)")
    g.add_argument("--train-pmg", action="store_true",
                   help="also train PMG (memory attention, memory encoder, SAM2's mask decoder) "
                        "so the KL term teaches it to agree with PMA; stored in the checkpoint")
    g.add_argument("--sam2-override", dest="sam2_overrides", action="append", default=[],
                   help="extra hydra override for the SAM2 config (repeatable)")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto",
                   help="auto (bf16 autocast on CUDA, float32 on CPU), float32, bfloat16")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=2000, help="episodes (optimizer steps)")
    o.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 1e-4; 5e-4 with --weights random)")
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--warmup", type=int, default=50)
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--no-augment", dest="augment", action="store_false")
    o.add_argument("--loss-dice", type=float, default=1.0)
    o.add_argument("--loss-ce", type=float, default=1.0)
    o.add_argument("--loss-kl", type=float, default=1.0)
    o.add_argument("--loss-obj", type=float, default=1.0,
                   help="weight of SAM2's object-score loss (auxiliary, not in eq. 9; 0 = off)")
    o.add_argument("--loss-pseudo", type=float, default=0.0,
                   help="weight of a Dice + BCE on PMG's pseudo-mask (not in eq. 9, whose PMG is "
                        "pretrained; for a PMG trained from random weights; 0 = off)")
    m = p.add_argument_group("method")
    m.add_argument("--seq-len", type=int, default=4, help="slices per volume episode")
    m.add_argument("--prior-share", type=float, default=0.0,
                   help="fraction of the episodes with a drawn first slice whose last slice is "
                        "drawn too, PMA prompted between them by their interpolation (Fill "
                        "between slices; needs ITK), so the checkpoint learns to use "
                        "--interpolation-prior prompt (default 0)")
    m.add_argument("--own-support", type=float, default=0.5,
                   help="fraction of volume episodes that start from one of the volume's own "
                        "labeled slices as support, as at inference (default 0.5)")
    m.add_argument("--top-k", type=int, default=4)
    m.add_argument("--memory-size", type=int, default=None)
    m.add_argument("--memory-policy", choices=("least_similar", "fifo"), default="least_similar")
    m.add_argument("--no-pmg", action="store_true", help="ablation: no pseudo-mask generation")
    m.add_argument("--no-pma", action="store_true", help="ablation: no pseudo-mask attention")
    m.add_argument("--no-3d-memory", action="store_true", help="ablation: no volumetric memory")
    m.add_argument("--axis", default="k")
    m.add_argument("--intensity", default="auto")
    r = p.add_argument_group("run")
    r.add_argument("--resume", action="store_true", help="continue from OUT's .state.pt")
    r.add_argument("--save-every", type=int, default=200,
                   help="steps between saves of the resume state NAME.state.pt (a working "
                        "file, kept after a crash; the checkpoint is written only at the end)")
    r.add_argument("--refresh-every", type=int, default=50,
                   help="steps between refreshes of the support pool's embeddings")
    r.add_argument("--quiet", action="store_true",
                   help="no progress output (a bar on a terminal, a line per tenth otherwise)")
    p.set_defaults(func=cmd_train)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    axis = parse_axis(args.axis)
    if args.steps < 1:
        raise SGPInputError("--steps must be at least 1.")
    if not 0.0 <= args.prior_share <= 1.0:
        raise SGPInputError("--prior-share is a fraction: give a value between 0 and 1.")
    if not 0.0 <= args.own_support <= 1.0:
        raise SGPInputError("--own-support is a fraction: give a value between 0 and 1.")
    if not 0.0 <= args.own_image_support <= 1.0:
        raise SGPInputError("--own-image-support is a fraction: give a value between 0 and 1.")
    if not 0.0 <= args.absent_share < 1.0:
        raise SGPInputError("--absent-share is a fraction: give a value in [0, 1).")
    random_start = str(args.weights).lower() == "random"
    lr = args.lr if args.lr is not None else (5e-4 if random_start else 1e-4)
    return TrainConfig(
        data=str(args.data), out=str(checkpoint_path(args.out)), model=args.model,
        weights=args.weights, image_size=args.image_size, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        train_all=args.train_all, train_pmg=args.train_pmg,
        sam2_overrides=list(args.sam2_overrides), steps=args.steps, lr=lr,
        weight_decay=args.weight_decay, warmup=args.warmup, grad_clip=args.grad_clip,
        seq_len=args.seq_len, own_support=args.own_support, prior_share=args.prior_share, top_k=args.top_k, memory_size=args.memory_size,
        memory_policy=args.memory_policy, use_pmg=not args.no_pmg, use_pma=not args.no_pma,
        use_3d_memory=not args.no_3d_memory, loss_dice=args.loss_dice, loss_ce=args.loss_ce,
        loss_kl=args.loss_kl, loss_obj=args.loss_obj,
        loss_pseudo=args.loss_pseudo, structures=args.structures,
        targets=args.targets, hold_out=args.hold_out,
        own_image_support=args.own_image_support, absent_share=args.absent_share,
        paired_targets=args.paired_targets, axis=axis, intensity=args.intensity,
        cases=args.cases, augment=args.augment, refresh_every=args.refresh_every,
        save_every=args.save_every, seed=args.seed, device=args.device, dtype=args.dtype,
        threads=args.threads,
    )


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = checkpoint_path(cfg.out)
    # Under torchrun every rank checks the outputs; only rank 0 names temporaries and writes.
    d = init_distributed(cfg.device)
    with OutputPlan() as plan:
        plan.file(out, "--out", (".safetensors",))
        plan.file(out.with_suffix(".json"), "the checkpoint's metadata (--out with .json)")
        plan.file(state_path(out), "the resume state (--out with .state.pt)")
        if d.main and out.exists() and not args.resume and state_path(out).exists():
            print(f"note: {out} exists; starting afresh (use --resume to continue it)")
        reporter = Progress(args.quiet)
        counter = None

        def show(trainer: Trainer, rec: dict) -> None:
            nonlocal counter
            if counter is None:
                counter = reporter.counter("train", cfg.steps, initial=rec["step"] - 1,
                                           unit="steps")
            if counter is None:
                return
            recent = trainer.history[-20:]
            counter.set_postfix(**{k: f"{np.mean([r[k] for r in recent]):.3f}"
                                   for k in ("loss", "dice", "kl")})
            counter.update(1)

        # The checkpoint goes to a temporary name; its .json follows it (with_suffix).
        temp = None
        if d.main:
            temp = plan.temp(out)
            plan.temp(out.with_suffix(".json"))
        try:
            with cancel_on_sigterm() as cancel:
                trainer = train(cfg, resume=args.resume, progress=show, checkpoint=temp,
                                cancel=cancel)
        finally:
            if counter is not None:
                counter.close()
        if not d.main:
            return 0  # rank 0 reports and writes
        plan.commit()
    recent = trainer.history[-50:]

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in recent])) if recent else float("nan")

    print(f"trained {describe(trainer.model)} on {len(trainer.cases)} case(s), "
          f"targets {[target_name(t) for t in trainer.targets]}, to step {trainer.step}/{cfg.steps} "
          f"in {trainer.elapsed:.1f} s on {trainer.device}"
          f"{f' x {d.world} processes' if d.world > 1 else ''} "
          f"({'all weights' if cfg.trains_all() else 'LoRA + PMA'}); last-50 loss "
          f"{mean('loss'):.4f} (dice {mean('dice'):.4f}, bce {mean('bce'):.4f}, "
          f"kl {mean('kl'):.4f})")
    print(f"wrote {out}, {out.with_suffix('.json')}, {state_path(out)}")
    return 0
