"""Bidirectional propagation: sweeps that restart at every drawn slice, seed choice, fusion.

The slices between two consecutive drawn slices a < b are predicted by a forward sweep from a
and a backward sweep from b, each with its own 3D bank and object-pointer history, started
empty at its drawn slice; before the first drawn slice only a backward sweep runs and after the
last only a forward one, each stopping where the structure ends (hysteresis) or at the slice
limits. Every sweep picks its support per slice from the same pool (all the structure's drawn
slices and the external bank, top-K by similarity). A slice reached from both sides gets both
predictions, weighted by inverse distance to each side's drawn slice (linear interpolation
between the two) times each side's reverse-propagation quality.

Restarting at every drawn slice makes an interval's result depend on its own two drawn slices
and the support its slices pick: :mod:`~SlicerSGP.method.rerun` reuses the rest exactly (with
``local_support`` a new drawn slice changes only the two intervals beside it). With only
external support the sweeps start at the slice whose pseudo-mask is most confident; with
``bidirectional`` off, one SAM2-style pass. Between two drawn slices, the interpolated contour
may prompt PMA or join the fusion (:mod:`~SlicerSGP.method.prior`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from SlicerSGP.data import preprocess
from SlicerSGP.errors import Cancelled
from SlicerSGP.method.encoding import EncodedSlices
from SlicerSGP.method.extent import breaks_continuity, presence_run, tapers
from SlicerSGP.method.memory import bank_size, evict
from SlicerSGP.method.prior import Prior, blend, fuses, prompt_source
from SlicerSGP.method.rerun import SliceResult, StructureRun, SweepReplay
from SlicerSGP.method.runtime import Runtime
from SlicerSGP.method.slice_predictor import SlicePredictor, StepOutput
from SlicerSGP.method.support import Memory, select_top_k
from SlicerSGP.types import CancelCheck, SegmentOptions

ImageOf = Callable[[int], torch.Tensor | None]
ExcludeOf = Callable[[int], torch.Tensor | None]
"""Slice -> its "not here" model pixels (see :mod:`~SlicerSGP.method.prompts`), or None."""


@dataclass
class Accumulator:
    """Distance-weighted sum of per-direction predictions for one structure."""

    prob: np.ndarray
    weight: np.ndarray
    pseudo: np.ndarray | None
    pseudo_weight: np.ndarray
    scores: dict[int, list[tuple[float, dict[str, float]]]] = field(default_factory=dict)
    sources: dict[int, set[str]] = field(default_factory=dict)
    predicted: int = 0
    """Slice predictions made in this run (a slice reached from both sides counts twice)."""
    reused: int = 0
    """Slice predictions taken from the last run, every input unchanged."""

    @classmethod
    def empty(cls, shape: tuple[int, int, int], keep_pseudo: bool) -> Accumulator:
        n = shape[0]
        return cls(prob=np.zeros(shape, np.float32), weight=np.zeros(n, np.float32),
                   pseudo=np.zeros(shape, np.float32) if keep_pseudo else None,
                   pseudo_weight=np.zeros(n, np.float32))

    def add(self, j: int, result: SliceResult, weight: float, source: str,
            transform: preprocess.LetterboxTransform) -> None:
        self.prob[j] += weight * result.prob
        self.weight[j] += weight
        if self.pseudo is not None:
            self.pseudo[j] += weight * pseudo_prob(result, transform)
        self.pseudo_weight[j] += weight
        self.scores.setdefault(j, []).append((weight, {
            "predicted_iou": result.predicted_iou, "object_score": result.object_score,
            "pseudo_final_dice": result.pseudo_final_dice, "quality": result.quality,
        }))
        self.sources.setdefault(j, set()).add(source)


def pseudo_prob(result: SliceResult, transform: preprocess.LetterboxTransform) -> np.ndarray:
    """The PMG pseudo-mask probability in image space."""
    if result.pseudo_prob is not None:
        return result.pseudo_prob
    prob = torch.sigmoid(transform.logits_to_image(result.pseudo_low.float()))[0, 0]
    return prob.cpu().numpy()


def slice_result(out: StepOutput, transform: preprocess.LetterboxTransform,
                 quality: float) -> SliceResult:
    """What fusion, the stop rule, the bank and a later re-run need of one prediction."""
    final = transform.logits_to_image(out.final_high.float())
    prob = torch.sigmoid(final)[0, 0].cpu().numpy()
    result = SliceResult(out.memory, out.predicted_iou, out.object_score, prob,
                         out.pseudo_low.detach(), 1.0, quality)
    result.pseudo_prob = pseudo = pseudo_prob(result, transform)
    denom = float(prob.sum() + pseudo.sum())
    result.pseudo_final_dice = 2 * float((prob * pseudo).sum()) / denom if denom > 0 else 1.0
    return result


@dataclass(frozen=True)
class Sweep:
    """One directional pass: from ``start`` (a drawn slice or the seed) over ``order``, in
    the range the drawn slices ``ends`` bound (one of them at the volume's ends)."""

    start: int
    reverse: bool
    order: list[int]
    ends: tuple[int, ...]


def plan_sweeps(anchors: list[int], n: int, limits: tuple[int, int],
                bidirectional: bool) -> list[Sweep]:
    """The sweeps of one structure (see the module docstring); slices outside ``limits``
    are skipped, the anchors themselves always visited (they start the sweeps)."""
    first, last = limits

    def span(a: int, stop: int, step: int) -> list[int]:
        return [a] + [j for j in range(a + step, stop, step) if first <= j <= last]

    if not bidirectional:
        a, ends = anchors[0], tuple(anchors)
        return [Sweep(a, False, [j for j in range(a, n) if first <= j <= last or j in anchors],
                      ends),
                Sweep(a, True, [j for j in range(a, -1, -1) if first <= j <= last
                                or j in anchors], ends)]
    forward = [Sweep(a, False, span(a, b, 1), (a, b) if b < n else (a,))
               for a, b in zip(anchors, [*anchors[1:], n], strict=True)]
    backward = [Sweep(b, True, span(b, a, -1), (a, b) if a >= 0 else (b,))
                for b, a in zip(anchors[::-1], [*anchors[-2::-1], -1], strict=True)]
    # A sweep is kept even with nothing to predict when it is the only one (a seed in a
    # one-slice range), so the seed's own prediction is still fused.
    return [s for s in forward + backward if len(s.order) > 1] or forward[:1]


def sweep_pool(pool: list[Memory], labeled: list[int], sweep: Sweep,
               local: bool) -> list[Memory]:
    """The support a sweep's slices pick from: every drawn slice and the external items, or
    with ``local`` only the drawn slices bounding its range (and the external items)."""
    if not local or not labeled:
        return pool
    own = [m for k, m in zip(labeled, pool, strict=False) if k in sweep.ends]
    return own + pool[len(labeled):]


NEUTRAL_QUALITY = 0.5
"""Quality assumed for a slice reverse propagation cannot score (the structure absent there)."""
MIN_QUALITY = 0.05
"""Floor on the quality factor: a poor side is down-weighted, never silenced."""


def quality_factor(quality: float) -> float:
    """The factor a side's reverse-propagation quality contributes to its fusion weight."""
    if not np.isfinite(quality):
        return NEUTRAL_QUALITY
    return max(MIN_QUALITY, float(quality))


def fusion_weight(j: int, anchors: list[int], reverse: bool, n: int) -> float:
    """Weight of this sweep's prediction at slice ``j``: inverse distance to its anchor.

    A slice between two anchors gets w_fwd = d_bwd / (d_fwd + d_bwd) after normalisation,
    i.e. linear interpolation between the two sides.
    """
    if reverse:
        src = [a for a in anchors if a >= j]
        d = (min(src) - j) if src else n
    else:
        src = [a for a in anchors if a <= j]
        d = (j - max(src)) if src else n
    return 1.0 / max(d, 1)


def nearest_anchor(j: int, anchors: list[int], reverse: bool) -> int:
    """The drawn slice this sweep started from for slice ``j`` (the one behind it)."""
    behind = [a for a in anchors if (a >= j if reverse else a <= j)]
    if behind:
        return min(behind) if reverse else max(behind)
    return min(anchors, key=lambda a: (abs(a - j), a))


class Propagator:
    """Runs the sweeps of one structure over an encoded volume."""

    def __init__(self, runtime: Runtime, predictor: SlicePredictor,
                 support_encoder: Callable[..., Memory]):
        self.rt = runtime
        self.predictor = predictor
        self.support_encoder = support_encoder
        """Turns (features, slice, mask, slice index) into a support memory."""

    def propagate(self, feats: EncodedSlices, slices01: np.ndarray,
                  transform: preprocess.LetterboxTransform, masks: dict[int, np.ndarray],
                  support_pool: list[Memory], opts: SegmentOptions,
                  report: Callable[[float], None], stop: CancelCheck,
                  limits: tuple[int, int] | None = None,
                  rerun: StructureRun | None = None, exclude_of: ExcludeOf | None = None,
                  prior: Prior | None = None) -> Accumulator:
        """All sweeps of one structure from its drawn slices ``masks`` (slice -> mask);
        ``support_pool`` holds their memories (in slice order) followed by external ones.
        ``limits`` (first, last) bounds the slices the structure may occupy. With ``rerun``,
        results of the structure's last run whose inputs are unchanged are reused (exactly).
        ``exclude_of`` gives each slice's "not here" pixels, cleared before a mask is memory.
        ``prior``: the interpolated masks between drawn slices, used as ``opts`` says."""
        labeled = sorted(masks)
        n = len(feats)
        first, last = (max(0, int(limits[0])), min(n - 1, int(limits[1]))) if limits \
            else (0, n - 1)
        acc = Accumulator.empty((n, *slices01.shape[1:3]), opts.keep_pseudo_masks)
        need_image = self.rt.model.pma is not None and opts.use_pma

        def image_of(j: int) -> torch.Tensor | None:
            return (preprocess.to_model_input(slices01[j:j + 1], transform).to(self.rt.device)
                    if need_image else None)

        prior = prior or {}
        fuse = fuses(opts.interpolation_prior) and bool(prior)
        prior_of = prompt_source(prior, transform, opts.interpolation_prior)

        seed: tuple[int, SliceResult] | None = None
        anchors = labeled
        if not labeled:
            seed = self._seed(feats, support_pool, image_of, transform, opts, stop,
                              (first, last), rerun, exclude_of)
            anchors = [seed[0]]
        sweeps = plan_sweeps(anchors, n, (first, last), opts.bidirectional)
        watch = bool(opts.stop_after_absent) and opts.min_continuity > 0
        # Whether each end narrows (read off the drawn slices once; only sweeps past it use it).
        taper_towards = {rev: watch and tapers(masks, rev) for rev in (False, True)}
        total = sum(len(s.order) for s in sweeps)
        done = 0
        for sweep in sweeps:
            reverse = sweep.reverse
            outermost = min(anchors) if reverse else max(anchors)
            absent_run = 0
            kept: np.ndarray | None = None  # the last mask this sweep kept (image space)
            replay = rerun.replay(sweep.start, reverse) if rerun is not None else None
            pool = sweep_pool(support_pool, labeled, sweep, opts.local_support)
            for j, out in self.run_sweep(feats, sweep.order, reverse, set(labeled), pool, opts,
                                         image_of, stop, seed, replay=replay,
                                         exclude_of=exclude_of, prior_of=prior_of):
                done += 1
                if out is None:
                    if j in masks and masks[j].any():
                        kept = masks[j]  # a drawn slice: what comes next continues it
                    continue
                if isinstance(out, SliceResult):
                    acc.reused += 0 if seed is not None and j == seed[0] else 1
                else:  # predicted in this run
                    acc.predicted += 1
                    quality = float("nan")
                    if opts.reverse_quality and labeled:
                        anchor = nearest_anchor(j, labeled, reverse)
                        quality = self.reverse_dice(feats, j, out, anchor, masks[anchor],
                                                    transform, opts)
                    with self.rt.timed("write_back"):
                        out = slice_result(out, transform, quality)
                    if replay is not None:
                        replay.complete(out)
                weight = fusion_weight(j, anchors, reverse, n)
                if opts.reverse_quality and labeled and opts.quality_fusion:
                    weight *= quality_factor(out.quality)
                source = "seed" if seed and j == seed[0] else ("backward" if reverse else "forward")
                beyond = j < outermost if reverse else j > outermost
                # The mask is only needed where the rule of leaving the structure is on.
                mask = out.prob >= opts.threshold if watch else None
                broken = beyond and watch and breaks_continuity(mask, kept, opts.min_continuity,
                                                                taper_towards[reverse])
                if not broken:  # a slice that left the structure is not written
                    with self.rt.timed("write_back"):
                        acc.add(j, blend(out, prior[j]) if fuse and j in prior
                                else out, weight, source, transform)
                    kept = mask if watch and mask.any() else kept
                report(done / total)
                if beyond and opts.stop_after_absent:
                    absent_run = absent_run + 1 if broken else presence_run(
                        absent_run, out.object_score, opts.absent_below)
                    if absent_run >= opts.stop_after_absent:
                        break  # the structure has ended in this direction (extent.py)
        report(1.0)
        return acc

    def _seed(self, feats: EncodedSlices, pool: list[Memory], image_of: ImageOf,
              transform: preprocess.LetterboxTransform, opts: SegmentOptions,
              stop: CancelCheck, limits: tuple[int, int], rerun: StructureRun | None,
              exclude_of: ExcludeOf | None = None) -> tuple[int, SliceResult]:
        """The start slice with only external support (last run's choice if it applies)."""
        cached = rerun.cached_seed(pool, limits) if rerun is not None else None
        if cached is not None:
            return cached.slice, cached.result
        j, out = self.choose_seed(feats, pool, image_of, opts, stop, limits, exclude_of)
        result = slice_result(out, transform, float("nan"))
        if rerun is not None:
            rerun.new_seed(pool, limits, j, result)
        return j, result

    def reverse_dice(self, feats: EncodedSlices, j: int, out: StepOutput, anchor: int,
                     drawn: np.ndarray, transform: preprocess.LetterboxTransform,
                     opts: SegmentOptions) -> float:
        """RevSAM2's quality of slice ``j``: its final mask, as the only support, re-predicts
        the drawn slice ``anchor`` (PMG); the Dice with the drawing. NaN where ``j``'s mask is
        empty (an absent structure has nothing to propagate back).

        The mask enters as the memory the sweep already made of it for the 3D bank (the same
        slice features, the same final mask and pointer), so scoring costs one memory-attention
        step and one decode, not a second memory encoding; without a 3D memory the mask is
        encoded here as a support item."""
        mask = (out.final_high > 0).float()
        if not bool(mask.any()):
            return float("nan")
        rt = self.rt
        with rt.timed("quality"), rt.mode(False), rt.autocast():
            memory = out.memory if out.memory is not None else self.support_encoder(
                feats, j, mask, j)
            back = self.predictor.step(feats, anchor, None, [memory], [], {}, anchor > j,
                                       len(feats), replace(opts, use_pma=False),
                                       encode_memory=False)
            pred = transform.logits_to_image(back.pseudo_low.float())[0, 0] > 0
        pred = pred.cpu().numpy()
        total = int(pred.sum()) + int(drawn.sum())
        return 1.0 if total == 0 else 2.0 * float((pred & drawn).sum()) / total

    def run_sweep(self, feats: EncodedSlices, order: list[int], reverse: bool,
                  labeled: set[int] | dict[int, object], support_pool: list[Memory],
                  opts: SegmentOptions, image_of: ImageOf | None = None,
                  stop: CancelCheck | None = None,
                  seed: tuple[int, StepOutput | SliceResult] | None = None, grad: bool = False,
                  replay: SweepReplay | None = None, exclude_of: ExcludeOf | None = None,
                  prior_of: ImageOf | None = None,
                  ) -> Iterator[tuple[int, StepOutput | SliceResult | None]]:
        """One directional pass over ``order``; yields ``(slice, StepOutput | None)``.

        Labeled slices yield None (they are support, not predicted). The 3D memory bank and the
        object-pointer history live for this sweep only; the bank holds K memories (the same
        rule in training and inference). With ``replay``, a slice whose inputs are last run's
        yields last run's :class:`SliceResult` instead of being predicted again. ``prior_of(j)``:
        the interpolation prompting PMA at slice ``j`` (None where there is none).
        """
        rt = self.rt
        n = len(feats)
        size = bank_size(opts)
        bank: list[Memory] = []
        ptr_history: dict[int, torch.Tensor] = {}
        with rt.mode(grad), rt.autocast():
            for j in order:
                if stop is not None and stop():
                    raise Cancelled("Cancelled during propagation; nothing was written.")
                is_seed = seed is not None and j == seed[0]
                if j in labeled or is_seed:
                    if replay is not None:
                        replay.anchor(j)
                    if not is_seed:
                        yield j, None
                        continue
                    out = seed[1]
                else:
                    support = select_top_k(feats, j, support_pool, opts.top_k)
                    if opts.use_3d_memory:
                        bank = evict(bank, feats, j, reverse, size, opts.memory_policy)
                    out = replay.visit(j, support) if replay is not None else None
                    if out is None:
                        out = self.predictor.step(feats, j, image_of(j) if image_of else None,
                                                  support, bank if opts.use_3d_memory else [],
                                                  ptr_history, reverse, n, opts,
                                                  encode_memory=opts.use_3d_memory,
                                                  exclude=exclude_of(j) if exclude_of else None,
                                                  prior=prior_of(j) if prior_of else None)
                if opts.use_3d_memory and out.memory is not None:
                    bank.append(out.memory)
                    ptr_history[j] = out.memory.obj_ptr
                yield j, out

    def choose_seed(self, feats: EncodedSlices, support: list[Memory], image_of: ImageOf,
                    opts: SegmentOptions, stop: CancelCheck,
                    limits: tuple[int, int] | None = None,
                    exclude_of: ExcludeOf | None = None) -> tuple[int, StepOutput]:
        """With only external support: the slice whose pseudo-mask is most confident."""
        best: tuple[float, int] | None = None
        pmg_only = SegmentOptions(**{**opts.__dict__, "use_pma": False})
        step = self.predictor.step
        first, last = limits if limits is not None else (0, len(feats) - 1)
        with self.rt.mode(False), self.rt.autocast():
            for j in range(first, last + 1):
                if stop():
                    raise Cancelled("Cancelled while choosing the start slice; nothing was written.")
                sel = select_top_k(feats, j, support, opts.top_k)
                out = step(feats, j, None, sel, [], {}, False, len(feats), pmg_only,
                           encode_memory=False)
                conf = out.predicted_iou * out.object_score
                if best is None or conf > best[0]:
                    best = (conf, j)
            j = best[1]
            sel = select_top_k(feats, j, support, opts.top_k)
            out = step(feats, j, image_of(j), sel, [], {}, False, len(feats), opts,
                       encode_memory=True, exclude=exclude_of(j) if exclude_of else None)
        return j, out
