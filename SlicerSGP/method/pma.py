"""PMA, pseudo-mask attention (paper eq. 7-8): mask attention over the memory-conditioned
features, a two-stage (H-SAM style) decoder, and the pseudo-mask's box prompt."""

from __future__ import annotations

import copy

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


BOX_MARGIN = 0.05
"""Fraction of the box's side added on each side (at least one pixel), so a pseudo-mask that
falls a little short still yields a box around the whole structure."""


def pseudo_mask_box(prob: torch.Tensor, threshold: float = 0.5) -> torch.Tensor | None:
    """Box (x0, y0, x1, y1) around the largest connected component of ``prob >= threshold``
    per batch item, with a margin, in pixel units of ``prob``; None where the pseudo-mask is
    empty (no box, never a full-image box). One stray blob does not inflate the box."""
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
            m = components == (int(np.argmax(sizes)) + 1)
        ys, xs = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        x0, y0, x1, y1 = xs[0], ys[0], xs[-1] + 1, ys[-1] + 1
        mx = max(1.0, BOX_MARGIN * (x1 - x0))
        my = max(1.0, BOX_MARGIN * (y1 - y0))
        boxes.append([max(0.0, x0 - mx), max(0.0, y0 - my), min(float(size_x), x1 + mx),
                      min(float(size_y), y1 + my)])
    return torch.tensor(boxes, dtype=torch.float32, device=prob.device)
