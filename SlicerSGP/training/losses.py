"""The SAM2-SGP training loss, paper eq. (9):

    L = l_dice * Dice(y_hat, y) + l_ce * BCE(y_hat, y) + l_kl * KL(y_hat_detached || y')

``y_hat`` is the final (PMA) prediction, ``y`` the ground truth and ``y'`` the PMG pseudo-mask.
The KL term is the per-pixel Bernoulli KL divergence with the *detached* final prediction as the
target distribution and the pseudo-mask as the approximating one::

    KL(t || p) = t log(t / p) + (1 - t) log((1 - t) / (1 - p)),   t = sigmoid(final).detach()

so its gradient reaches only the pseudo-mask branch (PMG) and pulls it towards what PMA
predicts; PMA itself is trained by Dice + BCE against the ground truth. Its gradient with
respect to the pseudo-mask logits is ``sigmoid(pseudo) - t`` (the same as a BCE with soft
targets; the two differ by the entropy of ``t``, a constant for the pseudo-mask).

One auxiliary term goes beyond eq. (9): SAM2's own object-score loss (BCE of the object-score
logit against "the structure is present in this slice"), for the PMG's and the PMA decoder's
object heads (weight ``obj``; 0 switches it off). It is needed because SAM2 replaces the
pseudo-mask by a constant -1024 wherever its object score is negative, which cuts every
gradient to the pseudo-mask; without it a PMG trained from a random start can fall silent for
good.

A second optional term goes beyond eq. (9) for models trained from a random start
(``pseudo``, default 0): the same Dice + BCE against the ground truth on the pseudo-mask itself.
The paper's PMG is pretrained SAM2 and only needs the KL pull; a PMG learning from nothing gets
its signal otherwise only second-hand (through PMA's features and the KL towards a PMA that is
itself still guessing), and multi-structure volume training from random was measured to stay
silent without it.

All terms are means over the pixels where ``valid`` is 1 (the letterbox padding is left out)
and over the batch. Inputs are logits ``(B, 1, H, W)``; the pseudo-mask may be at a lower
resolution (SAM2's quarter-resolution logits) and is upsampled bilinearly to the target's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1.0
"""Additive smoothing of the soft Dice: an empty target with an empty prediction costs 0."""


LOSS_TERMS = ("dice", "bce", "kl", "obj", "pseudo")
"""The unweighted terms :func:`sgp_loss` reports (beside ``loss``), as each step records them."""


@dataclass(frozen=True)
class LossWeights:
    dice: float = 1.0
    ce: float = 1.0
    kl: float = 1.0
    obj: float = 1.0
    pseudo: float = 0.0


def _valid(target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(target) if valid is None else valid.to(target.dtype)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
              smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum(p y) + s) / (sum(p) + sum(y) + s)`` per item, averaged."""
    v = _valid(target, valid)
    p = torch.sigmoid(logits.float()) * v
    y = target.float() * v
    dims = tuple(range(1, p.ndim))
    inter = (p * y).sum(dims)
    denom = p.sum(dims) + y.sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-mean binary cross-entropy (numerically stable, from logits)."""
    v = _valid(target, valid)
    per_px = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return (per_px * v).sum() / v.sum().clamp_min(1.0)


NO_OBJECT_SENTINEL = -1024.0
"""SAM2's NO_OBJ_SCORE: the logit it writes on every pixel of a slice it finds empty."""


def bernoulli_kl(pseudo_logits: torch.Tensor, final_logits: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-mean ``KL(t || p)``, ``t = sigmoid(final_logits)`` detached, ``p = sigmoid(pseudo)``.

    Computed from logits (stable for saturated pixels): ``KL = BCE(p_logits, t) - H(t)``.
    ``pseudo_logits`` are resized to ``final_logits``' size if they differ.
    """
    target_logits = final_logits.detach().float()
    pseudo_logits = upsampled(pseudo_logits, target_logits)
    t = torch.sigmoid(target_logits)
    # SAM2 writes its no-object sentinel (-1024) where PMG saw nothing: those pixels carry no
    # pseudo-mask to teach, so they are left out (a clamp would also stop real gradients).
    real = (pseudo_logits > NO_OBJECT_SENTINEL / 2).float()
    cross = F.binary_cross_entropy_with_logits(pseudo_logits, t, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(target_logits, t, reduction="none")
    per_px = (cross - entropy).clamp_min(0.0)
    v = _valid(t, valid) * real
    return (per_px * v).sum() / v.sum().clamp_min(1.0)


def upsampled(logits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``logits`` at ``like``'s spatial size (bilinear), as float."""
    if logits.shape[-2:] == like.shape[-2:]:
        return logits.float()
    return F.interpolate(logits.float(), size=like.shape[-2:], mode="bilinear",
                         align_corners=False)


def object_loss(object_logits: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean BCE of object-score logits against "the target mask is not empty" (per item)."""
    present = (target.flatten(1) > 0.5).any(dim=1).float()
    terms = [F.binary_cross_entropy_with_logits(o.float().reshape(-1), present.to(o.device))
             for o in object_logits]
    return torch.stack(terms).mean()


def sgp_loss(final_logits: torch.Tensor, pseudo_logits: torch.Tensor | None,
             target: torch.Tensor, valid: torch.Tensor | None = None,
             weights: LossWeights = LossWeights(),
             object_logits: list[torch.Tensor] | None = None,
             pmg_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Eq. (9) (+ the object-score and pseudo-mask terms). Returns ``{"loss", "dice", "bce",
    "kl", "obj", "pseudo"}`` (the unweighted terms detached).

    ``pseudo_logits`` None (PMG switched off, or PMA off so the final mask *is* the pseudo-mask)
    drops the KL term; ``object_logits`` None or empty drops the object-score term;
    ``pmg_logits`` (the pseudo-mask, supervised directly when ``weights.pseudo``) None drops the
    pseudo-mask term.
    """
    d = dice_loss(final_logits, target, valid)
    b = bce_loss(final_logits, target, valid)
    total = weights.dice * d + weights.ce * b
    zero = torch.zeros((), device=final_logits.device)
    k = o = q = zero
    if pseudo_logits is not None and weights.kl:
        k = bernoulli_kl(pseudo_logits, final_logits, valid)
        total = total + weights.kl * k
    if object_logits and weights.obj:
        o = object_loss(object_logits, target)
        total = total + weights.obj * o
    if pmg_logits is not None and weights.pseudo:
        # A pseudo-mask PMG gated away (-1024) is a constant: no gradient, presence is taught
        # by the object-score term.
        pseudo = upsampled(pmg_logits, target)
        q = dice_loss(pseudo, target, valid) + bce_loss(pseudo, target, valid)
        total = total + weights.pseudo * q
    return {"loss": total, "dice": d.detach(), "bce": b.detach(), "kl": k.detach(),
            "obj": o.detach(), "pseudo": q.detach()}


__all__ = ["LOSS_TERMS", "LossWeights", "bce_loss", "bernoulli_kl", "dice_loss", "object_loss", "sgp_loss"]
