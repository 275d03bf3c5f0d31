"""Bidirectional propagation: sweeps outward from the labeled slices, seed choice, fusion.

One sweep runs forward from the first labeled slice, one backward from the last; each keeps
its own 3D bank and object-pointer history. A slice reached from both sides gets both
predictions, weighted by inverse distance to each side's labeled slice (linear interpolation
between the two). With only external support the sweeps start at the slice whose pseudo-mask
is most confident.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from SlicerSGP.data import preprocess
from SlicerSGP.errors import Cancelled
from SlicerSGP.method.encoding import EncodedSlices
from SlicerSGP.method.memory import bank_size, evict
from SlicerSGP.method.runtime import Runtime
from SlicerSGP.method.step import SlicePredictor, StepOutput
from SlicerSGP.method.support import Memory, select_top_k
from SlicerSGP.types import CancelCheck, SegmentOptions

ImageOf = Callable[[int], torch.Tensor | None]


@dataclass
class Accumulator:
    """Distance-weighted sum of per-direction predictions for one structure."""

    prob: np.ndarray
    weight: np.ndarray
    pseudo: np.ndarray | None
    pseudo_weight: np.ndarray
    scores: dict[int, list[tuple[float, dict[str, float]]]] = field(default_factory=dict)
    sources: dict[int, set[str]] = field(default_factory=dict)

    @classmethod
    def empty(cls, shape: tuple[int, int, int], keep_pseudo: bool) -> Accumulator:
        n = shape[0]
        return cls(prob=np.zeros(shape, np.float32), weight=np.zeros(n, np.float32),
                   pseudo=np.zeros(shape, np.float32) if keep_pseudo else None,
                   pseudo_weight=np.zeros(n, np.float32))

    def add(self, j: int, out: StepOutput, transform: preprocess.LetterboxTransform,
            weight: float, source: str, quality: float = float("nan")) -> None:
        final = transform.logits_to_image(out.final_high.float())
        prob = torch.sigmoid(final)[0, 0].cpu().numpy()
        pseudo_prob = torch.sigmoid(transform.logits_to_image(out.pseudo_low.float()))[0, 0]
        pseudo_prob = pseudo_prob.cpu().numpy()
        self.prob[j] += weight * prob
        self.weight[j] += weight
        if self.pseudo is not None:
            self.pseudo[j] += weight * pseudo_prob
        self.pseudo_weight[j] += weight
        inter = float((prob * pseudo_prob).sum())
        denom = float(prob.sum() + pseudo_prob.sum())
        dice = 2 * inter / denom if denom > 0 else 1.0
        self.scores.setdefault(j, []).append((weight, {
            "predicted_iou": out.predicted_iou, "object_score": out.object_score,
            "pseudo_final_dice": dice, "quality": quality,
        }))
        self.sources.setdefault(j, set()).add(source)


PRESENT_ABOVE = 0.5
"""Presence over which a slice resets the run of absent slices (the upper hysteresis level)."""


def presence_run(run: int, presence: float, absent_below: float) -> int:
    """Length of the current run of confidently absent slices after one more slice.

    Hysteresis: under ``absent_below`` extends the run, over ``PRESENT_ABOVE`` resets it, and
    in between leaves it as it is, so a flickering score neither ends nor revives a structure.
    """
    if presence < absent_below:
        return run + 1
    if presence > PRESENT_ABOVE:
        return 0
    return run


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
                  limits: tuple[int, int] | None = None) -> Accumulator:
        """Both sweeps for one structure from its drawn slices ``masks`` (slice -> mask);
        ``support_pool`` holds their memories (in slice order) followed by external ones.
        ``limits`` (first, last) bounds the slices the structure may occupy."""
        labeled = sorted(masks)
        n = len(feats)
        first, last = limits if limits is not None else (0, n - 1)
        first, last = max(0, int(first)), min(n - 1, int(last))
        acc = Accumulator.empty((n, *slices01.shape[1:3]), opts.keep_pseudo_masks)
        need_image = self.rt.model.pma is not None and opts.use_pma

        def image_of(j: int) -> torch.Tensor | None:
            if not need_image:
                return None
            return preprocess.to_model_input(slices01[j:j + 1], transform).to(self.rt.device)

        seed: tuple[int, StepOutput] | None = None
        if labeled:
            anchors = labeled
            fwd_start, bwd_start = labeled[0], labeled[-1]
        else:
            seed = self.choose_seed(feats, support_pool, image_of, opts, stop, (first, last))
            anchors = [seed[0]]
            fwd_start = bwd_start = seed[0]
        if not opts.bidirectional:
            # One pass like SAM2's tracker: forward from the first anchor, back to the start.
            bwd_start = anchors[0]

        sweeps = [(False, [j for j in range(fwd_start, n) if first <= j <= last or j in anchors]),
                  (True, [j for j in range(bwd_start, -1, -1) if first <= j <= last
                          or j in anchors])]
        total = sum(len(s) for _, s in sweeps)
        done = 0
        for reverse, order in sweeps:
            outermost = min(anchors) if reverse else max(anchors)
            absent_run = 0
            for j, out in self.run_sweep(feats, order, reverse, set(labeled), support_pool, opts,
                                         image_of, stop, seed):
                done += 1
                if out is None:
                    continue
                weight = fusion_weight(j, anchors, reverse, n)
                quality = float("nan")
                if opts.reverse_quality and labeled:
                    anchor = nearest_anchor(j, labeled, reverse)
                    quality = self.reverse_dice(feats, j, out, anchor, masks[anchor], transform,
                                                opts)
                    if opts.quality_fusion:
                        weight *= quality_factor(quality)
                source = "seed" if seed and j == seed[0] else ("backward" if reverse else "forward")
                with self.rt.timed("write_back"):
                    acc.add(j, out, transform, weight, source, quality)
                report(done / total)
                beyond = j < outermost if reverse else j > outermost
                if beyond and opts.stop_after_absent:
                    absent_run = presence_run(absent_run, out.object_score, opts.absent_below)
                    if absent_run >= opts.stop_after_absent:
                        break  # the structure has ended in this direction
        report(1.0)
        return acc

    def reverse_dice(self, feats: EncodedSlices, j: int, out: StepOutput, anchor: int,
                     drawn: np.ndarray, transform: preprocess.LetterboxTransform,
                     opts: SegmentOptions) -> float:
        """RevSAM2's quality of slice ``j``: its final mask, as the only support, re-predicts
        the drawn slice ``anchor`` (PMG); the Dice with the drawing. NaN where ``j``'s mask is
        empty (an absent structure has nothing to propagate back)."""
        mask = (out.final_high > 0).float()
        if not bool(mask.any()):
            return float("nan")
        rt = self.rt
        with rt.timed("quality"), rt.mode(False), rt.autocast():
            memory = self.support_encoder(feats, j, mask, j)
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
                  stop: CancelCheck | None = None, seed: tuple[int, StepOutput] | None = None,
                  grad: bool = False) -> Iterator[tuple[int, StepOutput | None]]:
        """One directional pass over ``order``; yields ``(slice, StepOutput | None)``.

        Labeled slices yield None (they are support, not predicted). The 3D memory bank and the
        object-pointer history live for this sweep only; the bank holds K memories (the same
        rule in training and inference).
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
                if j in labeled:
                    yield j, None
                    continue
                if seed is not None and j == seed[0]:
                    out = seed[1]
                else:
                    support = select_top_k(feats, j, support_pool, opts.top_k)
                    if opts.use_3d_memory:
                        bank = evict(bank, feats, j, reverse, size, opts.memory_policy)
                    out = self.predictor.step(feats, j, image_of(j) if image_of else None,
                                              support, bank if opts.use_3d_memory else [],
                                              ptr_history, reverse, n, opts,
                                              encode_memory=opts.use_3d_memory)
                if opts.use_3d_memory and out.memory is not None:
                    bank.append(out.memory)
                    ptr_history[j] = out.memory.obj_ptr
                yield j, out

    def choose_seed(self, feats: EncodedSlices, support: list[Memory], image_of: ImageOf,
                    opts: SegmentOptions, stop: CancelCheck,
                    limits: tuple[int, int] | None = None) -> tuple[int, StepOutput]:
        """With only external support: the slice whose pseudo-mask is most confident."""
        best: tuple[float, int] | None = None
        pmg_only = SegmentOptions(**{**opts.__dict__, "use_pma": False})
        step = self.predictor.step
        first, last = limits if limits is not None else (0, len(feats) - 1)
        with torch.inference_mode(), self.rt.autocast():
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
                       encode_memory=True)
        return j, out
