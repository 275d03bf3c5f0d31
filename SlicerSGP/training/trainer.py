"""Training SAM2-SGP (LoRA on the image encoder + PMA/decoder) on labeled cases.

One training step is one *episode*, built the way ``sgp segment`` runs:

1. pick a training case and a structure; for a volume, a run of ``--seq-len`` consecutive slices
   (around a slice that shows the structure) in a random direction; a 2D image is a one-slice
   volume;
2. encode the query slices (with autograd, flips/rot90 augmentation if on); the support pool is
   the support bank drawn from the *other* training cases (slices with the structure plus as
   many evenly spaced slices without it, as ``io.load_support_sets`` builds a bank); the K most
   similar items per query slice are picked by cosine similarity of pooled embeddings (cached
   for the pool, refreshed every ``--refresh-every`` steps; the engine then re-picks per slice
   with fresh embeddings), encoded with autograd and turned into memories by SAM2's memory
   encoder (``Segmenter.support_memory``);
3. ``Segmenter.run_sweep(grad=True)`` runs PMG -> PMA slice by slice with the 3D memory, exactly
   the inference code path, so the ablation switches (``--no-pmg``, ``--no-pma``,
   ``--no-3d-memory``) act in training as they do in ``sgp segment``;
4. the loss is paper eq. (9) (``SlicerSGP.training.losses``) per predicted slice, averaged over the run.

From pretrained SAM2 weights only the LoRA adapters and the PMA are trained (the base is
frozen, the checkpoint stores only those tensors). From a random start (``--weights random``)
there is no base to keep, so the whole network trains and the checkpoint stores every tensor
(``--train-all`` forces either way).

Reproducible and resumable: every step draws its episode, augmentation and dropout from RNGs
seeded by ``(seed, step, rank)``, so a run resumed from its ``.state.pt`` (model, optimizer,
schedule, pooled-embedding cache) continues exactly as an uninterrupted one. bf16 autocast on
CUDA (``--dtype``). Several processes (``torchrun --nproc_per_node N -m SlicerSGP.cli train ...``,
one GPU each, or CPU processes): the model runs inside ``DistributedDataParallel``
(``training/distributed.py``), each rank draws its own episode per step (seed ``(seed, step,
rank)``) and applies the mean gradient over the ranks' episodes; rank 0 alone writes the
checkpoint and the resume state, which holds nothing about the number of processes, so a run
resumes with another number.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from SlicerSGP import build_model as builder
from SlicerSGP.data.datasets import load_dataset, parse_split
from SlicerSGP.data.targets import BankItem, build_support_bank, target_mask, target_name
from SlicerSGP.errors import Cancelled, SGPInputError
from SlicerSGP.method.interpolation import shared_worker
from SlicerSGP.method.segmenter import Segmenter
from SlicerSGP.training.checkpoint_metadata import training_metadata
from SlicerSGP.training.checkpoints import read_state, restore_state, trainer_state, write_state
from SlicerSGP.training.config import TrainConfig, checkpoint_path, state_path
from SlicerSGP.training.distributed import (
    Dist,
    any_rank,
    init_distributed,
    leave_distributed,
    wrap_for_gradients,
)
from SlicerSGP.training.episodes import (
    Question,
    Run,
    apply_view,
    augment,
    draw_episode,
    episode_prior,
    prior_ends,
    resolve_targets,
    step_seed,
    to_model,
)
from SlicerSGP.training.losses import LOSS_TERMS, LossWeights, sgp_loss
from SlicerSGP.training.support_pool import pooled_embeddings, preselect
from SlicerSGP.types import CancelCheck, SegmentOptions

__all__ = ["Dist", "StepCallback", "Trainer", "train"]


class Trainer:
    """Holds the model, the data and the optimizer; :meth:`train_step` runs one episode."""

    def __init__(self, cfg: TrainConfig, cases: list | None = None, model=None,
                 dist: Dist | None = None, log=print):
        self.cfg = cfg
        self.dist = dist or Dist()
        self.log = log
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        if cases is None:
            all_cases = load_dataset(cfg.data, axis=cfg.axis, intensity=cfg.intensity)
            idx, _ = parse_split(cfg.cases, len(all_cases))
            cases = [all_cases[i] for i in idx]
        if not cases:
            raise SGPInputError(f"No training cases in {cfg.data} (cases {cfg.cases!r}).")
        self.cases = cases
        self.values, self.targets = resolve_targets(cfg, cases)
        self.bank = build_support_bank(cases, self.targets)
        # episodes: (case, target) pairs where the target is present
        self.episodes = [(ci, t) for ci, c in enumerate(cases) for t in self.targets
                         if target_mask(c.labels, t).any()]
        if cfg.lora_rank <= 0:
            raise SGPInputError("--lora-rank must be at least 1 for a trained SGP model.")

        size, overrides = cfg.resolved_model()
        if model is None:
            torch.manual_seed(cfg.seed)
            model = builder.build_model(size, weights=cfg.weights, image_size=cfg.image_size,
                                        seed=cfg.seed, mode="trained", lora_rank=cfg.lora_rank,
                                        lora_alpha=cfg.lora_alpha, sam2_overrides=overrides,
                                        train_pmg=cfg.train_pmg)
        self.model = model
        if cfg.trains_all():
            for p in model.parameters():
                p.requires_grad = True
        else:
            model.freeze_base()
        device = cfg.device
        if self.dist.world > 1 and torch.cuda.is_available() and device != "cpu":
            device = f"cuda:{self.dist.local_rank}"
        # 'auto' trains in bf16 on CUDA only: the CPU path was validated in float32, and bf16
        # on CPUs without native support is many times slower.
        dtype = cfg.dtype
        if dtype == "auto" and not str(device).startswith("cuda") and \
                not (device == "auto" and torch.cuda.is_available()):
            dtype = "float32"
        self.seg = Segmenter(model, device=device, dtype=dtype)
        self.device = self.seg.device
        # Several processes: DDP (it starts every rank from rank 0's weights); one: None.
        self.ddp = wrap_for_gradients(model, self.dist, self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.opts = SegmentOptions(top_k=cfg.top_k, memory_size=cfg.memory_size,
                                   memory_policy=cfg.memory_policy, use_pmg=cfg.use_pmg,
                                   use_pma=cfg.use_pma, use_3d_memory=cfg.use_3d_memory)
        self.weights = LossWeights(cfg.loss_dice, cfg.loss_ce, cfg.loss_kl, cfg.loss_obj,
                                   cfg.loss_pseudo)
        self.step = 0
        self.pool_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.history: list[dict[str, float]] = []
        self.interpolator = shared_worker()  # ITK starts with the first prior episode

    # ------------------------------------------------------------------ helpers

    def _lr_factor(self, step: int) -> float:
        warm = max(1, self.cfg.warmup)
        if step < warm:
            return (step + 1) / warm
        span = max(1, self.cfg.steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / span))) * 0.95 + 0.05

    def refresh_pool_cache(self) -> None:
        """Pooled embeddings of every support-bank slice (no autograd, current weights)."""
        self.pool_cache = pooled_embeddings(self.seg, self.cases, self.bank)

    def _preselect(self, query_pooled: torch.Tensor, pool: list[BankItem]) -> list[BankItem]:
        """Union over query slices of the top-K pool items (cached pooled embeddings)."""
        return preselect(self.pool_cache, query_pooled, pool, self.cfg.top_k)

    def _own_image_memory(self, img: np.ndarray, lab: np.ndarray, rng: np.random.Generator):
        """The query image under another flip/rotation, with its answer, as one support item:
        a match the network can find by appearance alone, which teaches it early to carry the
        support's mask over to where the query looks the same (2D runs; ``own_image_support``)."""
        o_img, o_lab = augment(img, lab, rng)
        o_images, o_masks, _ = to_model(o_img, o_lab, self.seg.image_size)
        o_feats = self.seg.encode_images(o_images.to(self.device), 1, grad=True)
        return self.seg.support_memory(o_feats, 0, o_masks[0:1], None, grad=True)

    # ------------------------------------------------------------------ one step

    def prepare_step(self) -> None:
        """Refresh the support pool's pooled embeddings when due (before the step's episode)."""
        every = self.cfg.refresh_every
        if not self.pool_cache or (every and self.step % every == 0):
            self.refresh_pool_cache()

    def episode_loss(self, step: int, rank: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of the episode drawn for ``(seed, step, rank)`` and what it was."""
        cfg = self.cfg
        seed = step_seed(cfg.seed, step, rank)
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.model.train()
        ep = draw_episode(self.cases, self.bank, self.episodes, cfg.seq_len, cfg.augment, rng,
                          absent_share=cfg.absent_share,
                          paired=cfg.paired_targets and len(self.targets) > 1)
        size = self.seg.image_size
        q_images, q_masks, valid = to_model(ep.images, ep.masks, size)
        q_images, q_masks, valid = (t.to(self.device) for t in (q_images, q_masks, valid))
        feats = self.seg.encode_images(q_images, len(ep.window), grad=True)
        order = list(range(len(ep.window)))
        if ep.reverse:
            order = order[::-1]
        # As at inference, a slice the user labeled in this volume may start the sweep and be
        # support itself (the other episodes use other cases only).
        own = len(order) > 1 and not ep.empty_support and rng.random() < cfg.own_support
        run = Run(ep, feats, q_images, order, own, valid,
                  prior_ends(order, own, cfg.prior_share, rng))
        questions = [Question(ep.value, ep.masks, q_masks, ep.pool)]
        if ep.partner is not None:
            # The same features asked for another target: one backward over both answers.
            _, p_masks, _ = to_model(ep.images, ep.partner.masks, size)
            questions.append(Question(ep.partner.value, ep.partner.masks,
                                       p_masks.to(self.device), ep.partner.pool))
        losses, terms = [], dict.fromkeys(LOSS_TERMS, 0.0)
        for question in questions:
            loss, parts = self._answer(run, question, rng)
            losses.append(loss)
            for name in terms:
                terms[name] += parts[name] / len(questions)
        loss = torch.stack(losses).mean()
        rec = {"loss": float(loss.detach()), **terms, "case": ep.case,
               "target": target_name(ep.value), "absent": ep.absent,
               "empty_support": ep.empty_support, "own_support": own,
               "paired_with": None if ep.partner is None else target_name(ep.partner.value)}
        return loss, rec

    def apply_gradients(self, loss: torch.Tensor) -> None:
        """Backward (averaged over the ranks by DDP when several train), clip, one optimizer
        and schedule step."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1

    def train_step(self) -> dict[str, float]:
        """One step: this rank's episode (through DDP when several processes train)."""
        self.prepare_step()

        def compute() -> tuple[torch.Tensor, dict[str, Any]]:
            return self.episode_loss(self.step, self.dist.rank)

        loss, rec = self.ddp(compute) if self.ddp is not None else compute()
        self.apply_gradients(loss)
        rec = {"step": self.step, **rec, "lr": float(self.opt.param_groups[0]["lr"])}
        self.history.append(rec)
        return rec

    def _answer(self, run: Run, question: Question, rng: np.random.Generator):
        """Support of the question's target from its pool, the sweep over the run, its loss."""
        ep, feats, order, value, q_masks = (run.episode, run.feats, run.order, question.value,
                                            question.masks)
        cfg = self.cfg
        size = self.seg.image_size
        memories = []
        by_shape: dict[tuple, list[BankItem]] = {}
        for b in self._preselect(feats.pooled, question.pool):
            by_shape.setdefault(self.cases[b.case].slices01.shape[1:3], []).append(b)
        for items in by_shape.values():
            s_img = np.stack([self.cases[b.case].slices01[b.slice] for b in items])
            s_lab = np.stack([target_mask(self.cases[b.case].labels[b.slice], value)
                              for b in items])
            if ep.empty_support:
                s_lab = np.zeros_like(s_lab)
            if ep.support_view is not None:
                s_img, s_lab = apply_view(ep.support_view, s_img, s_lab)
            s_images, s_masks, _ = to_model(s_img, s_lab, size)
            s_feats = self.seg.encode_images(s_images.to(self.device), len(items), grad=True)
            for i in range(len(items)):
                memories.append(self.seg.support_memory(s_feats, i, s_masks[i:i + 1], None,
                                                        grad=True))
        if len(order) == 1 and cfg.own_image_support and not ep.empty_support and \
                rng.random() < cfg.own_image_support:
            memories.append(self._own_image_memory(ep.images, question.answer, rng))
        labeled = (run.ends or [order[0]]) if run.own else []
        own = [self.seg.support_memory(feats, a, q_masks[a:a + 1], a, grad=True) for a in labeled]
        memories, labeled = own + memories, set(labeled)
        use_kl = cfg.use_pmg and cfg.use_pma and self.model.pma is not None
        losses, terms = [], dict.fromkeys(LOSS_TERMS, 0.0)
        predicted = len(order) - len(labeled)
        prior_of = episode_prior(self.interpolator, question.answer, run.ends, size)
        for j, out in self.seg.propagator.run_sweep(feats, order, ep.reverse, labeled, memories,
                                                    self.opts, lambda j: run.images[j:j + 1],
                                                    grad=True, prior_of=prior_of):
            if out is None:
                continue  # the labeled slice: support, not a prediction
            obj = []
            if cfg.use_pmg and out.pmg_object_logits is not None:
                obj.append(out.pmg_object_logits)
            if cfg.use_pma and out.final_object_logits is not None:
                obj.append(out.final_object_logits)
            parts = sgp_loss(out.final_high, out.pseudo_low if use_kl else None,
                             q_masks[j:j + 1], run.valid, self.weights, obj,
                             out.pseudo_low if cfg.use_pmg else None)
            losses.append(parts["loss"])
            for name in terms:
                terms[name] += float(parts[name]) / predicted
        return torch.stack(losses).mean(), terms

    # ------------------------------------------------------------------ saving
    # (the SGP checkpoint is the builder's; the resume state lives in training/checkpoints.py)

    def state(self) -> dict[str, Any]:
        return trainer_state(self)

    def load_state(self, state: dict[str, Any]) -> None:
        restore_state(self, state)

    def save(self, final: bool = False, checkpoint: Path | None = None) -> Path | None:
        """Write the SGP checkpoint (to ``checkpoint``, default ``checkpoint_path(cfg.out)``)
        and the resume state (rank 0 only)."""
        if not self.dist.main:
            return None
        path = checkpoint or checkpoint_path(self.cfg.out)
        base, extra = training_metadata(self, final)
        path = builder.save_sgp_checkpoint(self.model, path, base=base, extra=extra,
                                           full_state=self.cfg.trains_all())
        self.save_state()
        return path

    def save_state(self) -> Path | None:
        """Write only the resume state ``NAME.state.pt`` (rank 0 only)."""
        return write_state(self, state_path(self.cfg.out)) if self.dist.main else None


StepCallback = Callable[["Trainer", dict[str, Any]], None]
"""Called as ``progress(trainer, record)`` after each step (rank 0 only)."""


def _tqdm_progress(cfg: TrainConfig, initial: int):
    """The default step bar: only when stderr is a terminal (no escape codes in logs)."""
    if not sys.stderr.isatty():
        return None, None
    bar = tqdm(total=cfg.steps, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def show(trainer: Trainer, rec: dict[str, Any]) -> None:
        bar.update(1)
        recent = trainer.history[-20:]
        bar.set_postfix(loss=f"{np.mean([r['loss'] for r in recent]):.3f}",
                        dice=f"{np.mean([r['dice'] for r in recent]):.3f}",
                        kl=f"{np.mean([r['kl'] for r in recent]):.3f}")

    return show, bar


def train(cfg: TrainConfig, *, cases: list | None = None, resume: bool = False,
          progress: bool | StepCallback = True, stop_after: int | None = None, log=print,
          checkpoint: Path | None = None, cancel: CancelCheck | None = None) -> Trainer:
    """Train to ``cfg.steps`` (or ``stop_after`` steps in this call); returns the trainer.

    ``resume``: continue from ``<out>.state.pt`` if it exists. ``progress``: True for a bar on
    a terminal, False for none, or a :data:`StepCallback`. Every ``cfg.save_every`` steps the
    resume state is saved (a working file, kept after a crash so that ``resume`` can continue);
    the checkpoint is written once, at the end, to ``checkpoint`` (default
    ``checkpoint_path(cfg.out)``). ``cancel()`` returning True stops before the next step:
    the resume state is saved and ``Cancelled`` raised, no checkpoint written.
    """
    d = init_distributed(cfg.device)
    trainer = Trainer(cfg, cases=cases, dist=d, log=log)
    sp = state_path(cfg.out)
    if resume and sp.is_file():
        trainer.load_state(read_state(sp))
        if d.main:
            log(f"resumed from {sp} at step {trainer.step}")
    elif resume and d.main:
        log(f"no state at {sp}: starting from step 0")
    end = cfg.steps if stop_after is None else min(cfg.steps, trainer.step + stop_after)
    show, bar = (progress, None) if callable(progress) else (None, None)
    if progress is True and d.main:
        show, bar = _tqdm_progress(cfg, trainer.step)
    t0 = time.perf_counter()
    try:
        while trainer.step < end:
            if any_rank(cancel is not None and cancel(), d, trainer.device):
                trainer.save_state()
                raise Cancelled(f"Training stopped at step {trainer.step} of {cfg.steps}; no "
                                f"checkpoint written. The resume state {sp} holds this step: "
                                "run again with --resume to continue.")
            rec = trainer.train_step()
            if show is not None and d.main:
                show(trainer, rec)
            if cfg.save_every and rec["step"] % cfg.save_every == 0 and rec["step"] < end:
                trainer.save_state()
    finally:
        if bar is not None:
            bar.close()
    trainer.elapsed = time.perf_counter() - t0
    trainer.save(final=trainer.step >= cfg.steps, checkpoint=checkpoint)
    leave_distributed(d)  # the other ranks wait here until rank 0 has written
    return trainer
