"""The interpolation prior: Fill between slices between two drawn slices, inside propagation.

Between two drawn slices of a structure, ITK's morphological contour interpolation (Segment
Editor's Fill between slices, :mod:`~SlicerSGP.method.interpolation`) gives a contour on every
slice; beyond the outermost drawn slices it gives nothing, and propagation runs as without it.
``SegmentOptions.interpolation_prior`` says where the interpolated mask enters:

* ``prompt``: PMA takes its box and the mask as the dense prompt (logits of +-10, clamped to
  +-32 as the pseudo-mask is) in place of the pseudo-mask's; training-free, SAM2's own
  decoder then fits that contour to the image; a trained PMA has learnt from episodes with it
  how far to trust it.
* ``fuse``: each side's probability is blended with the interpolation before the two sides
  are fused (:func:`prior_trust`, :func:`blend`).
* ``both``: the two together. ``off``: the interpolation is not computed.

The fusion rule: a side's trust ``t`` grows with its reverse-propagation quality ``q``
(RevSAM2: the Dice with which its mask re-predicts the drawn slice; 0 where it cannot be
scored), ``t = clip(2 q - 1, 0, 1)``, and the side's probability becomes
``t * p_side + (1 - t) * p_interpolation``. A side whose mask re-predicts the drawing no better
than half right keeps nothing of its own; it decides the pixels in dispute only from q = 0.75
on, and keeps all of its own at a perfect re-prediction. Why so strict: between two drawn
slices Fill between slices is the proven default, so the model has to earn the right to
overrule it; in the 3D learning check (docs/training-and-evaluation.md), even on the structures
the model was trained on, sides with q up to 0.73 segmented those slices worse than Fill
between slices, and a side that agrees with the interpolation can still be the worse of the
two, so agreement grants no trust.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from SlicerSGP.errors import SGPInputError
from SlicerSGP.method.interpolation import InterpolationWorker, shared_worker
from SlicerSGP.method.rerun import mask_token
from SlicerSGP.types import PRIOR_MODES

PRIOR_LOGIT = 10.0
"""The interpolated mask as a dense prompt: logits of +-this (SAM2's mask-prompt scale)."""
CACHED_PRIORS = 16
"""Interpolations kept for re-runs (per structure and drawing; least recently used dropped),
bit-packed: a 512 x 512 slice takes 32 KiB."""

Prior = dict[int, np.ndarray]
"""Slice -> (H, W) bool interpolated mask, for the undrawn slices between two drawn ones."""


def check_mode(mode: str) -> str:
    if mode not in PRIOR_MODES:
        raise SGPInputError(f"interpolation_prior must be one of {', '.join(PRIOR_MODES)}; got "
                            f"{mode!r}.")
    return mode


def prompts(mode: str) -> bool:
    return mode in ("prompt", "both")


def fuses(mode: str) -> bool:
    return mode in ("fuse", "both")


def between_drawn(masks: dict[int, np.ndarray]) -> list[tuple[int, int]]:
    """Pairs of consecutive drawn slices that both show the structure: the intervals the
    interpolation fills (an empty drawn slice says the structure is not there, so nothing is
    interpolated across it)."""
    drawn = sorted(masks)
    return [(a, b) for a, b in zip(drawn, drawn[1:], strict=False)
            if b > a + 1 and masks[a].any() and masks[b].any()]


def interpolate_prior(masks: dict[int, np.ndarray], n: int,
                      worker: InterpolationWorker) -> Prior:
    """The interpolated masks of the undrawn slices between drawn ones (``masks``: drawn
    slice -> (H, W) bool), one ITK call per structure."""
    intervals = between_drawn(masks)
    if not intervals:
        return {}
    first, last = intervals[0][0], intervals[-1][1]
    sparse = np.zeros((last - first + 1, *next(iter(masks.values())).shape), np.uint8)
    for a, b in intervals:
        sparse[a - first] = masks[a]
        sparse[b - first] = masks[b]
    filled = worker.interpolate(sparse) > 0
    return {j: filled[j - first] for a, b in intervals for j in range(a + 1, b)}


def drawing_key(masks: dict[int, np.ndarray], tokens: dict[int, str]) -> tuple:
    shape = next(iter(masks.values())).shape if masks else ()
    return (shape, tuple(sorted(tokens.items())))


def prompt_tokens(tokens: dict[int, str]) -> dict[int, str]:
    """Re-run tokens of the drawn slices when their interpolation is PMA's prompt: a slice
    between drawn slices a and b depends on both, so each drawn slice's token also names its
    neighbours' (a changed drawing then redoes the sweeps that start beside it)."""
    drawn = sorted(tokens)
    out = {}
    for i, k in enumerate(drawn):
        around = [tokens[d] for d in drawn[max(0, i - 1):i + 2]]
        out[k] = hashlib.sha1("|".join(around).encode()).hexdigest()
    return out


class PriorCache:
    """One interpolation per structure and drawing, reused while the drawing is unchanged."""

    def __init__(self, worker: InterpolationWorker | None = None):
        self.worker = worker or shared_worker()
        self._priors: OrderedDict[tuple, dict[int, np.ndarray]] = OrderedDict()

    def for_run(self, masks: dict[int, np.ndarray], n: int, mode: str,
                timings: dict[str, float]) -> tuple[Prior | None, dict[int, str]]:
        """A structure's prior under ``mode`` (None when off) and its drawn slices' re-run
        tokens (:func:`prompt_tokens` when the prior prompts PMA)."""
        tokens = {k: mask_token(m) for k, m in masks.items()}
        if mode == "off":
            return None, tokens
        prior = self.prior(masks, tokens, n, timings)
        return prior, (prompt_tokens(tokens) if prompts(mode) else tokens)

    def prior(self, masks: dict[int, np.ndarray], tokens: dict[int, str], n: int,
              timings: dict[str, float]) -> Prior:
        """The structure's prior (``timings["interpolation"]`` gains the seconds spent)."""
        key = drawing_key(masks, tokens) + (n,)
        shape = key[0]
        if key in self._priors:
            self._priors.move_to_end(key)
            return {j: np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)
                    for j, bits in self._priors[key].items()}
        t0 = time.perf_counter()
        prior = interpolate_prior(masks, n, self.worker)
        timings["interpolation"] = timings.get("interpolation", 0.0) + time.perf_counter() - t0
        self._priors[key] = {j: np.packbits(m) for j, m in prior.items()}
        while len(self._priors) > CACHED_PRIORS:
            self._priors.popitem(last=False)
        return prior

    def clear(self) -> None:
        self._priors.clear()

    def close(self) -> None:
        self.worker.close()


def model_prompt(mask: np.ndarray, transform) -> torch.Tensor:
    """(H, W) bool mask -> model-space probability (1, 1, S, S) (letterboxed)."""
    return transform.mask_to_model(torch.from_numpy(mask[None, None].astype(np.float32)))


def prompt_source(prior: Prior, transform, mode: str):
    """``j`` -> the model-space prior prompting PMA at slice ``j`` (None where there is none),
    or None when ``mode`` does not prompt."""
    if not prompts(mode) or not prior:
        return None

    def prior_of(j: int) -> torch.Tensor | None:
        return model_prompt(prior[j], transform) if j in prior else None

    return prior_of


def dense_prompt(prior_high: torch.Tensor, low_size: tuple[int, int]) -> torch.Tensor:
    """Model-space prior probability (1, 1, S, S) -> dense-prompt logits at ``low_size``."""
    low = F.interpolate(prior_high.float(), size=low_size, mode="area")
    return (low * 2 - 1) * PRIOR_LOGIT


def prior_trust(quality: float) -> float:
    """How much a side keeps of its own probability against the interpolation (module
    docstring): ``clip(2 q - 1, 0, 1)`` of its quality, an unscored side counting 0."""
    q = float(quality) if np.isfinite(quality) else 0.0
    return float(np.clip(2.0 * q - 1.0, 0.0, 1.0))


def blend(result, prior: np.ndarray):
    """A copy of the side's slice result with its probability blended with the prior."""
    trust = prior_trust(result.quality)
    prob = trust * result.prob + (1.0 - trust) * prior.astype(np.float32)
    return replace(result, prob=prob.astype(np.float32))
