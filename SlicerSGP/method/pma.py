"""PMA, pseudo-mask attention (paper eq. 7-8): mask attention over the memory-conditioned
features, a two-stage (H-SAM style) decoder, and the pseudo-mask's box prompt; and the two
trained paths from the support to PMG (its object pointer and a prior map)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn


class MaskAttention(nn.Module):
    """Paper eq. (7): ``F_hat = y' * softmax(Q K^T / sqrt(d)) V + F_tilde``.

    ``y'`` is the pseudo-mask probability resized to the embedding grid, so attention output
    only enters where the pseudo-mask says the structure is; a zero pseudo-mask leaves the
    features unchanged.
    """

    def __init__(self, dim: int = 256, num_heads: int = 8):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor, pseudo_prob: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        # Area pooling: a structure a few pixels wide keeps its share of each grid cell
        # (bilinear sampling would skip it and close the gate on small structures).
        y = F.interpolate(pseudo_prob.to(features.dtype), size=(h, w), mode="area")
        x = features.flatten(2).transpose(1, 2)  # B, HW, C

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, h * w, self.num_heads, c // self.num_heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        )
        attended = attended.transpose(1, 2).reshape(b, h * w, c)
        out = y.flatten(2).transpose(1, 2) * attended + x
        return out.transpose(1, 2).reshape(b, c, h, w)


class HierarchicalDecoder(nn.Module):
    """H-SAM style two-stage decoder: SAM2's mask decoder, then a pixel decoder to full size.

    Stage 1 is a copy of the pretrained SAM2 mask decoder (prompted by the pseudo-mask box). Stage
    2 fuses its quarter-resolution logits with the high-resolution FPN features and the input
    image, upsampling x4 to input resolution. Its last layer starts at zero, so an untrained
    stage 2 returns stage 1 upsampled: training starts from SAM2's behaviour.
    """

    def __init__(self, sam_mask_decoder: nn.Module, hidden: int = 32):
        super().__init__()
        self.stage1 = copy.deepcopy(sam_mask_decoder)
        # Stage 1 is trained through its single-mask output. SAM2's tracking rule of swapping in
        # one of the multimask outputs when that one looks unstable (eval mode only) would hand
        # out heads that training never touched, so a trained PMA always uses the single mask.
        if hasattr(self.stage1, "dynamic_multimask_via_stability"):
            self.stage1.dynamic_multimask_via_stability = False
        s0 = self.stage1.conv_s0.out_channels if hasattr(self.stage1, "conv_s0") else 0
        s1 = self.stage1.conv_s1.out_channels if hasattr(self.stage1, "conv_s1") else 0
        self.quarter = nn.Sequential(
            nn.Conv2d(1 + s0 + s1, hidden, 3, padding=1), nn.GroupNorm(4, hidden), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(),
        )
        # not ``half``: that name is nn.Module.half(), which would shadow the layer
        self.up_half = nn.Sequential(
            nn.ConvTranspose2d(hidden, hidden // 2, 2, stride=2), nn.GELU(),
            nn.Conv2d(hidden // 2, hidden // 2, 3, padding=1), nn.GELU(),
        )
        self.full = nn.ConvTranspose2d(hidden // 2, hidden // 2, 2, stride=2)
        self.image_stem = nn.Sequential(nn.Conv2d(3, hidden // 2, 3, padding=1), nn.GELU())
        self.head = nn.Sequential(
            nn.Conv2d(hidden, hidden // 2, 3, padding=1), nn.GELU(),
            nn.Conv2d(hidden // 2, 1, 1),
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def refine(self, low_res_logits: torch.Tensor, high_res_features: list[torch.Tensor],
               image: torch.Tensor) -> torch.Tensor:
        """Quarter-resolution logits + FPN features + image -> full-resolution logits."""
        quarter_size = low_res_logits.shape[-2:]
        feats = [low_res_logits]
        for f in high_res_features:
            feats.append(f if f.shape[-2:] == quarter_size else
                         F.interpolate(f, size=quarter_size, mode="bilinear", align_corners=False))
        x = self.quarter(torch.cat(feats, dim=1).to(self.quarter[0].weight.dtype))
        x = self.full(self.up_half(x))
        x = torch.cat([x, self.image_stem(image.to(x.dtype))], dim=1)
        base = F.interpolate(low_res_logits.float(), size=image.shape[-2:], mode="bilinear",
                             align_corners=False)
        return base + self.head(x).float()


class PseudoMaskAttention(nn.Module):
    """PMA: box prompt from the pseudo-mask, mask attention, hierarchical decoder (eq. 7-8)."""

    def __init__(self, sam_mask_decoder: nn.Module, dim: int = 256, num_heads: int = 8):
        super().__init__()
        self.mask_attention = MaskAttention(dim, num_heads)
        # Values start at zero, so the attention term of eq. (7) is zero and an untrained PMA
        # starts exactly from SAM2's decoder (as the zero last layer of stage 2 does).
        nn.init.zeros_(self.mask_attention.v_proj.weight)
        nn.init.zeros_(self.mask_attention.v_proj.bias)
        self.decoder = HierarchicalDecoder(sam_mask_decoder)


class SupportPointer(nn.Module):
    """Adds the support's masked-average features (projected) to its object pointer.

    SAM2's pointer of a mask-prompted frame is its decoder's output token, which carries what
    the mask covers only once the decoder has learnt to attend there; from random weights the
    pointers of different structures stayed identical for 1200 steps (measured). The masked
    average of the image features differs with the structure from the first step, so the
    content path opens at once. The projection starts at zero: an untrained model (and a
    checkpoint written without it) behaves exactly as before.
    """

    def __init__(self, dim: int = 256):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, obj_ptr: torch.Tensor, features: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """``features`` (B, C, g, g), ``mask`` (B, 1, S, S) in [0, 1] -> pointer (B, C)."""
        m = F.interpolate(mask.to(features.dtype), size=features.shape[-2:], mode="area")
        area = m.sum(dim=(2, 3))
        average = (features * m).sum(dim=(2, 3)) / area.clamp_min(1e-6)
        return obj_ptr + self.proj(average.to(self.proj.weight.dtype)).to(obj_ptr.dtype)


CUE_PIXELS = 512
"""Most feature vectors a support cue keeps per side (foreground, background): evenly spaced,
so a 1024 px item (64 x 64 grid) costs at most 2 x 512 x C values."""


@dataclass
class SupportCue:
    """What a support item's mask covers in the image encoder's feature space: the masked
    feature sums and areas (for prototypes pooled over all items) and unit-length feature
    vectors of covered and uncovered cells (for per-pixel nearest-support similarity)."""

    sums: torch.Tensor    # (2, C): foreground, background feature sums
    areas: torch.Tensor   # (2,): their areas in grid cells
    inside: torch.Tensor  # (n, C) unit vectors under the mask (n may be 0)
    outside: torch.Tensor  # (m, C) unit vectors outside it


def centred_cells(features: torch.Tensor) -> torch.Tensor:
    """``features`` (1, C, g, g) -> (C, g*g), minus the image's mean feature.

    The cells of one image share a large common component (more so as training goes on:
    cosine similarities of 0.98-1.0 between any two cells of a CT slice were measured), which
    squeezes every similarity map into a sliver; without it, foreground and background cells
    of the same slice differ by 0.5-1.0 instead of 0.02-0.2."""
    f = features[0].float().flatten(1)
    return f - f.mean(dim=1, keepdim=True)


def support_cue(features: torch.Tensor, mask: torch.Tensor) -> SupportCue:
    """``features`` (1, C, g, g), ``mask`` (1, 1, S, S) in [0, 1] -> the item's cue."""
    m = F.interpolate(mask.to(features.dtype), size=features.shape[-2:], mode="area")[0, 0]
    f = centred_cells(features)  # (C, g*g)
    w = m.float().flatten()
    sums = torch.stack([f @ w, f @ (1 - w)])
    areas = torch.stack([w.sum(), (1 - w).sum()])
    unit = F.normalize(f.t(), dim=1)
    return SupportCue(sums, areas, _evenly(unit[w > 0.5]), _evenly(unit[w <= 0.5]))


def _evenly(rows: torch.Tensor, limit: int = CUE_PIXELS) -> torch.Tensor:
    if rows.shape[0] <= limit:
        return rows
    return rows[torch.linspace(0, rows.shape[0] - 1, limit, device=rows.device).long()]


class SupportPrior(nn.Module):
    """A prior map of where the query looks like what the support's masks cover, added to the
    memory-conditioned features PMG decodes (a prior mask, as few-shot segmenters use).

    The support reaches PMG otherwise only through memory attention, which from random weights
    learnt *whether* a structure is asked for but not *which* (cytoplasm support still gave the
    nucleus, measured). These maps differ with the support's masks from the first step: cosine
    similarity of each query cell to the pooled foreground and background prototypes, and to the
    nearest covered and uncovered support cell. The projection starts at zero: an untrained
    model (and a checkpoint written without it) behaves exactly as before.
    """

    CHANNELS = 5
    VERSION = 2
    """How the maps are computed, written into checkpoints: 1 = uncentred at unit scale (before
    :func:`centred_cells` and :attr:`GAIN`); a projection trained on one is wrong for another."""
    GAIN = 40.0
    """The maps are scaled up before the projection: an optimizer step moves each weight by
    about the learning rate, so at unit scale the prior took hundreds of steps to matter at all
    (on 8 CT organs from random, a 150-step run matched one without the prior to three
    decimals; 10-step means of the Dice loss: with 10, 0.95 down to 0.60 at step 210; with 40,
    0.65-0.70 at steps 90-130 and 0.46-0.59 at steps 170-200)."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.proj = nn.Conv2d(self.CHANNELS, dim, kernel_size=1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def maps(self, query: torch.Tensor, cues: list[SupportCue]) -> torch.Tensor:
        """``query`` (1, C, g, g) -> (1, 5, g, g): prototype similarity (fg, bg), nearest-cell
        similarity (fg, bg), and whether any support item shows the structure at all."""
        g = query.shape[-1]
        q = F.normalize(centred_cells(query).t(), dim=1)  # (g*g, C)
        sums = torch.stack([cue.sums for cue in cues]).sum(0)
        areas = torch.stack([cue.areas for cue in cues]).sum(0)
        out = []
        for side in (0, 1):
            present = bool(areas[side] > 0)
            proto = F.normalize(sums[side], dim=0)
            out.append(q @ proto if present else q.new_zeros(g * g))
        for rows in ([cue.inside for cue in cues], [cue.outside for cue in cues]):
            pixels = torch.cat(rows)
            out.append((q @ pixels.t()).max(dim=1).values if pixels.shape[0]
                       else q.new_zeros(g * g))
        out.append(q.new_full((g * g,), float(areas[0] > 0)))
        return torch.stack(out).view(1, self.CHANNELS, g, g)

    def forward(self, features: torch.Tensor, query: torch.Tensor,
                cues: list[SupportCue]) -> torch.Tensor:
        """Memory-conditioned ``features`` (1, C, g, g) plus the projected prior of ``query``."""
        prior = self.maps(query, cues).to(self.proj.weight.dtype)
        return features + self.proj(prior * self.GAIN).to(features.dtype)


BOX_MARGIN = 0.05
"""Fraction of the box's side added on each side (at least one pixel), so a pseudo-mask that
falls a little short still yields a box around the whole structure."""


BOX_COMPONENT_SHARE = 0.25
"""Components at least this share of the largest one's area count as the structure (the lobes
of a segmented nucleus, both lungs); smaller ones are strays and stay out of the box."""


def pseudo_mask_box(prob: torch.Tensor, threshold: float = 0.5) -> torch.Tensor | None:
    """Box (x0, y0, x1, y1) around the largest connected components of ``prob >= threshold``
    (:data:`BOX_COMPONENT_SHARE`) per batch item, with a margin, in pixel units of ``prob``;
    None where the pseudo-mask is empty (no box, never a full-image box). A stray blob does not
    inflate the box."""
    fg = (prob[:, 0] >= threshold).detach().cpu().numpy()
    if not fg.any():
        return None
    size_y, size_x = fg.shape[1:]
    boxes = []
    for m in fg:
        if not m.any():
            return None
        components, count = ndimage.label(m)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            m = np.isin(components, 1 + np.flatnonzero(sizes >= BOX_COMPONENT_SHARE
                                                       * sizes.max()))
        ys, xs = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        x0, y0, x1, y1 = xs[0], ys[0], xs[-1] + 1, ys[-1] + 1
        mx = max(1.0, BOX_MARGIN * (x1 - x0))
        my = max(1.0, BOX_MARGIN * (y1 - y0))
        boxes.append([max(0.0, x0 - mx), max(0.0, y0 - my), min(float(size_x), x1 + mx),
                      min(float(size_y), y1 + my)])
    return torch.tensor(boxes, dtype=torch.float32, device=prob.device)
