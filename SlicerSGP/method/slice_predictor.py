"""One slice: PMG (pseudo-mask) -> PMA (final mask) -> its 3D memory; and click refinement.

PMG is SAM2's mask decoder with no prompt on memory-conditioned features. PMA takes the
pseudo-mask's box (none when it is empty) and, training-free, the pseudo-mask as SAM2's dense
prompt; trained, the mask attention of eq. (7) and the hierarchical decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from SlicerSGP.data.preprocess import LetterboxTransform
from SlicerSGP.method.encoding import EncodedSlices
from SlicerSGP.method.memory import MemoryAttention
from SlicerSGP.method.pma import pseudo_mask_box, support_cue
from SlicerSGP.method.prior import dense_prompt
from SlicerSGP.method.runtime import Runtime, flat
from SlicerSGP.method.support import MEMORY_DTYPE, Memory
from SlicerSGP.types import SegmentOptions

MASK_PROMPT_LOGIT = 10.0
"""A boolean mask given as a dense prompt becomes logits of +-this (SAM2's mask-prompt scale)."""
MASK_PROMPT_CLAMP = 32.0
"""SAM2's video predictor clamps mask logits used as a dense prompt to +-32."""
NO_OBJECT_LOGIT = -1024.0
"""SAM2's NO_OBJ_SCORE: the logit of every pixel of a slice where the structure is absent."""


def gate(sam, mask_logits: torch.Tensor, obj_ptr: torch.Tensor, pmg_score: torch.Tensor,
         presence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the combined presence to the final mask and the object pointer, as SAM2 gates its
    own mask and pointer with one object score, so the bank never holds a mask and a pointer
    that disagree. ``obj_ptr`` arrives gated by PMG's score alone."""
    if not sam.pred_obj_scores:
        return mask_logits, obj_ptr
    present = presence > 0
    mask_logits = torch.where(present[:, :, None, None] if present.dim() == 2 else present,
                              mask_logits, torch.full_like(mask_logits, NO_OBJECT_LOGIT))
    # Where PMG saw the object but the combined score does not, swap in SAM2's no-object pointer
    # exactly as _forward_sam_heads would have with that score.
    newly_absent = ((pmg_score > 0) & ~present).to(obj_ptr.dtype)
    if bool(newly_absent.any()):
        kept = obj_ptr * (1 - newly_absent) if sam.fixed_no_obj_ptr else obj_ptr
        obj_ptr = kept + newly_absent * sam.no_obj_ptr
    return mask_logits, obj_ptr


@dataclass
class StepOutput:
    pseudo_low: torch.Tensor      # (1, 1, S/4, S/4) PMG logits
    final_high: torch.Tensor      # (1, 1, S, S) final logits
    memory: Memory | None
    predicted_iou: float
    object_score: float
    pmg_object_logits: torch.Tensor | None = None  # (1, 1) PMG object score (training)
    final_object_logits: torch.Tensor | None = None  # (1, 1) PMA object score (training)


class SlicePredictor:
    """PMG + PMA for one slice, given its support memories and 3D bank."""

    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.attention = MemoryAttention(runtime)

    def step(self, feats: EncodedSlices, j: int, image: torch.Tensor | None,
             support: list[Memory], bank: list[Memory], ptr_history: dict[int, torch.Tensor],
             reverse: bool, num_frames: int, opts: SegmentOptions,
             encode_memory: bool = True, exclude: torch.Tensor | None = None,
             prior: torch.Tensor | None = None) -> StepOutput:
        """Predict slice ``j``: PMG (pseudo-mask), PMA (final mask), then its 3D memory.

        ``exclude``: (1, 1, S, S) bool model pixels that are "not here" (other structures'
        voxels): cleared from the final mask before it becomes the slice's memory.
        ``prior``: the interpolated contour (model-space probability, 1 x 1 x S x S), PMA's
        prompt in place of the pseudo-mask (:mod:`~SlicerSGP.method.prior`)."""
        rt = self.rt
        sam = rt.sam
        g = feats.grid
        pix = self.attention.condition(feats, j, support, bank, ptr_history, reverse,
                                       num_frames, opts.use_pmg)
        cues = [m.cue for m in support if m.cue is not None]
        if rt.model.support_prior is not None and opts.use_pmg and cues:
            pix = rt.model.support_prior(pix, feats.top_of(j), cues)
        hr = feats.high_res(j)
        with rt.timed("decode"):
            pmg = sam._forward_sam_heads(
                backbone_features=pix, point_inputs=None, mask_inputs=None,
                high_res_features=hr, multimask_output=sam._use_multimask(False, None),
            )
        _, _, ious, pseudo_low, pseudo_high, obj_ptr, obj_score = pmg
        if not opts.use_pmg:
            pseudo_low = torch.full_like(pseudo_low, -20.0)
            pseudo_high = torch.full_like(pseudo_high, -20.0)
        final_high, final_iou, final_obj = pseudo_high, ious.max(dim=-1).values, obj_score
        presence = obj_score
        if opts.use_pma:
            with rt.timed("decode"):
                final_high, final_iou, final_obj = self._pma(pix, hr, pseudo_low, pseudo_high,
                                                             image, opts, prior)
            # Present only where PMG and PMA both say so: PMA's box and mask prompts must not
            # resurrect a structure PMG found absent (and without PMG, PMA decides alone).
            presence = torch.minimum(obj_score, final_obj) if opts.use_pmg else final_obj
            gated, obj_ptr = gate(sam, final_high, obj_ptr, obj_score, presence)
            # Training keeps PMA's own logits for its loss (a gated mask is a constant without
            # gradient; presence is learnt by the object-score loss); the bank gets the gated
            # mask either way, so it never disagrees with its pointer.
            memory_mask = gated
            if not torch.is_grad_enabled():
                final_high = gated
        else:
            memory_mask = final_high
        if exclude is not None:
            memory_mask = memory_mask.masked_fill(exclude, NO_OBJECT_LOGIT)
            if not torch.is_grad_enabled():
                final_high = final_high.masked_fill(exclude, NO_OBJECT_LOGIT)
        memory = None
        if encode_memory:
            with rt.timed("memory_encode"):
                mem, _ = sam._encode_new_memory(
                    current_vision_feats=[flat(feats.top_of(j))], feat_sizes=[(g, g)],
                    pred_masks_high_res=memory_mask.to(pix.dtype), object_score_logits=presence,
                    is_mask_from_pts=False,
                )
            # A predicted slice can serve as support too (the reverse check re-predicts the
            # labeled slice from it), so it carries its cue as a drawn one does.
            cue = None if rt.model.support_prior is None else support_cue(
                feats.top_of(j), (memory_mask.detach() > 0).float())
            memory = Memory(mem.to(MEMORY_DTYPE), obj_ptr, feats.pooled_of(j), j, cue)
        return StepOutput(pseudo_low, final_high.float(), memory,
                          float(final_iou.detach().float().reshape(-1)[0]),
                          float(torch.sigmoid(presence.detach().float()).reshape(-1)[0]),
                          obj_score, final_obj)

    def _pma(self, pix: torch.Tensor, hr: list[torch.Tensor], pseudo_low: torch.Tensor,
             pseudo_high: torch.Tensor, image: torch.Tensor | None, opts: SegmentOptions,
             prior: torch.Tensor | None = None):
        """Pseudo-mask attention: box prompt + (trained) mask attention + decoder; with a
        ``prior``, its box and mask prompt PMA instead of the pseudo-mask's."""
        sam = self.rt.sam
        if prior is not None:
            prior = prior.to(device=pix.device, dtype=torch.float32)
        prob_high = torch.sigmoid(pseudo_high.float()) if prior is None else prior
        box = pseudo_mask_box(prob_high, opts.threshold)
        if box is not None:
            # SAM2 takes a box as two points labeled 2 and 3.
            points = {"point_coords": box.view(-1, 2, 2).to(pix.device),
                      "point_labels": torch.tensor([[2, 3]], dtype=torch.int32,
                                                   device=pix.device)}
        else:
            points = None
        pma = self.rt.model.pma
        if pma is None:
            # Training-free: the pretrained decoder with the box and the pseudo-mask as prompts.
            # SAM2 clamps a mask used as a dense prompt to +-32 (an absent pseudo-mask is
            # -1024, which would swamp the prompt encoder).
            dense = pseudo_low if prior is None else dense_prompt(prior, pseudo_low.shape[-2:])
            out = sam._forward_sam_heads(backbone_features=pix, point_inputs=points,
                                         mask_inputs=dense.clamp(-MASK_PROMPT_CLAMP,
                                                                 MASK_PROMPT_CLAMP),
                                         high_res_features=hr, multimask_output=False)
            return out[4], out[2].max(dim=-1).values, out[6]
        if prior is None:
            feats = pma.mask_attention(pix, torch.sigmoid(pseudo_low.float()))
            low_res, ious, obj_score = decode_with(sam, pma.decoder.stage1, feats, points, hr)
        else:
            # Trained: the interpolation gates mask attention and is the decoder's dense
            # prompt, as episodes with it taught (training/episodes.py).
            dense = dense_prompt(prior, pseudo_low.shape[-2:]).to(pix.dtype)
            feats = pma.mask_attention(pix, prior)
            low_res, ious, obj_score = decode_with(sam, pma.decoder.stage1, feats, points, hr,
                                                   dense.clamp(-MASK_PROMPT_CLAMP,
                                                               MASK_PROMPT_CLAMP))
        if image is None:
            raise ValueError("the trained PMA decoder needs the model-space image")
        final = pma.decoder.refine(low_res, hr, image.to(pix.device))
        return final, ious.max(dim=-1).values, obj_score

    def refine(self, feats: EncodedSlices, j: int, transform: LetterboxTransform,
               points: list[tuple[float, float]], point_labels: list[int],
               mask: np.ndarray | None) -> tuple[np.ndarray, float]:
        """Click refinement of slice ``j``: SAM2's point prompts at (row, col) voxels, the
        current mask as the dense prompt, on the slice's own features (no memory: the user's
        clicks decide)."""
        xy = np.array([(c, r) for r, c in points], dtype=np.float64).reshape(-1, 2)
        return self.from_prompts(feats, j, transform, xy, list(point_labels), mask, False)

    def from_prompts(self, feats: EncodedSlices, j: int, transform: LetterboxTransform,
                     xy: np.ndarray, point_labels: list[int], mask: np.ndarray | None,
                     multimask: bool) -> tuple[np.ndarray, float]:
        """Slice ``j``'s mask from SAM2 prompts: points at voxel (column, row) ``xy`` with SAM2's
        labels (1 include, 0 exclude, 2/3 a box's corners), ``mask`` (the current one) as the
        dense prompt, SAM2's own prompt encoder and mask decoder on the slice's features.
        ``multimask``: SAM2's three masks, the one with the highest predicted IoU (SAM2's rule
        for a lone box or click). Returns the mask and its predicted IoU."""
        rt = self.rt
        sam = rt.sam
        coords = torch.tensor(transform.points_to_model(xy)[None], dtype=torch.float32,
                              device=rt.device)
        labels = torch.tensor([list(point_labels)], dtype=torch.int32, device=rt.device)
        mask_inputs = None
        if mask is not None:
            m = transform.mask_to_model(torch.from_numpy(mask[None, None].astype(np.float32)))
            mask_inputs = ((m * 2 - 1) * MASK_PROMPT_LOGIT).to(rt.device)
        top = feats.top_of(j)
        b, c, g, _ = top.shape
        with rt.mode(False), rt.autocast():
            pix = (flat(top) + sam.no_mem_embed).permute(1, 2, 0).view(b, c, g, g)
            # _forward_sam_heads picks, with multimask output, the mask of highest predicted IoU.
            out = sam._forward_sam_heads(
                backbone_features=pix, point_inputs={"point_coords": coords,
                                                     "point_labels": labels},
                mask_inputs=mask_inputs, high_res_features=feats.high_res(j),
                multimask_output=multimask)
        high = out[4].float()
        prob = torch.sigmoid(transform.logits_to_image(high))[0, 0].cpu().numpy()
        return prob >= 0.5, float(out[2].max(dim=-1).values.float().reshape(-1)[0])


def decode_with(sam: Any, decoder: Any, feats: torch.Tensor, points: dict | None,
                hr: list[torch.Tensor], mask_inputs: torch.Tensor | None = None):
    """Run a SAM2-style mask decoder (prompt = box points or nothing, and ``mask_inputs``
    as the dense prompt if given) on ``feats``."""
    b = feats.shape[0]
    if points is None:
        coords = torch.zeros(b, 1, 2, device=feats.device)
        labels = -torch.ones(b, 1, dtype=torch.int32, device=feats.device)
    else:
        coords, labels = points["point_coords"], points["point_labels"]
    sparse, dense = sam.sam_prompt_encoder(points=(coords, labels), boxes=None,
                                           masks=mask_inputs)
    low_res, ious, _, obj_score = decoder(
        image_embeddings=feats, image_pe=sam.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        multimask_output=False, repeat_image=False, high_res_features=hr,
    )
    return low_res.float(), ious, obj_score
