"""Support memories: support items encoded by SAM2's memory encoder, and top-K selection.

A support item's mask goes in as SAM2 takes a mask prompt on a conditioning frame (directly as
the output, logits +-10, then binarised for the memory encoder). Items from other cases are
encoded once and kept across runs (a bank reused over many queries is encoded once).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sam2.modeling.sam2_base import NO_OBJ_SCORE

from SlicerSGP.data import preprocess
from SlicerSGP.errors import Cancelled, SGPInputError
from SlicerSGP.method.encoding import EncodedSlices, SliceEncoder, content_key
from SlicerSGP.method.pma import SupportCue, support_cue
from SlicerSGP.method.runtime import Runtime, flat
from SlicerSGP.types import CancelCheck, SupportItem

# bf16 halves memory storage; SAM2's video predictor stores its memories the same way.
MEMORY_DTYPE = torch.bfloat16
SUPPORT_CACHE_SIZE = 256
"""Encoded external support items kept between runs (about 0.5 MB each at 1024 px)."""


@dataclass
class Memory:
    """One encoded memory: a support item or a predicted slice."""

    features: torch.Tensor        # (1, mem_dim, g, g), MEMORY_DTYPE
    obj_ptr: torch.Tensor         # (1, C)
    pooled: torch.Tensor          # (C,) embedding of the image it came from
    slice_index: int | None       # position in the query volume; None for other cases
    cue: SupportCue | None = None  # what the mask covers, for the trained support prior


class SupportMemories:
    """Turns support items into memories and picks the K most similar for a query slice."""

    def __init__(self, runtime: Runtime, encoder: SliceEncoder):
        self.rt = runtime
        self.encoder = encoder
        self._external: OrderedDict[str, Memory] = OrderedDict()
        self._images: OrderedDict[str, EncodedSlices] = OrderedDict()

    def memory(self, feats: EncodedSlices, i: int, mask_model: torch.Tensor,
               slice_index: int | None, grad: bool = False,
               exclude: torch.Tensor | None = None) -> Memory:
        """Encode support item ``i`` of ``feats`` with its mask (1, 1, S, S) into a memory;
        ``exclude``: "not here" model pixels, kept clear of the mask SAM2 smooths at 1/4
        resolution (its edge would reach into a touching neighbour)."""
        rt = self.rt
        sam = rt.sam
        g = feats.grid
        mask = mask_model.to(rt.device)
        with rt.mode(grad), rt.autocast():
            if rt.model.pma is None:
                out = sam._use_mask_as_output(feats.top_of(i), feats.high_res(i), mask)
            else:
                out = _mask_decides_presence(sam, feats.top_of(i), feats.high_res(i), mask,
                                             rt.model.support_pointer)
            low_res, obj_ptr, obj_score = out[3], out[5], out[6]
            high_res = F.interpolate(low_res, size=(rt.image_size, rt.image_size),
                                     mode="bilinear", align_corners=False)
            if exclude is not None:
                high_res = high_res.masked_fill(exclude, NO_OBJ_SCORE)
            mem, _ = sam._encode_new_memory(
                current_vision_feats=[flat(feats.top_of(i))], feat_sizes=[(g, g)],
                pred_masks_high_res=high_res, object_score_logits=obj_score,
                is_mask_from_pts=True,
            )
            cue = None if rt.model.support_prior is None else support_cue(feats.top_of(i), mask)
        return Memory(mem.to(MEMORY_DTYPE), obj_ptr, feats.pooled_of(i), slice_index, cue)

    def from_slices(self, feats: EncodedSlices, transform: preprocess.LetterboxTransform,
                    masks: dict[int, np.ndarray],
                    exclude_of: Callable[[int], torch.Tensor | None] | None = None,
                    ) -> list[Memory]:
        """Memories of the query volume's own labeled slices, in slice order."""
        return [self.memory(feats, k, transform.mask_to_model(
            torch.from_numpy(masks[k][None, None].astype(np.float32))), k,
            exclude=exclude_of(k) if exclude_of else None) for k in sorted(masks)]

    def external(self, items: list[SupportItem], stop: CancelCheck) -> list[Memory]:
        """Encode support items from other cases (each image at its own size) into memories."""
        memories = []
        for item in items:
            if stop():
                raise Cancelled("Cancelled while encoding the support bank; nothing was written.")
            img = np.asarray(item.image, dtype=np.float32)
            mask = np.asarray(item.mask).astype(bool)
            if mask.shape != img.shape[:2]:
                raise SGPInputError(
                    f"Support item {item.source or '?'}: mask shape {mask.shape} does not match "
                    f"its image {img.shape[:2]}. Give each support image its own mask."
                )
            image_key = content_key(img)
            key = image_key + content_key(np.packbits(mask), np.asarray(mask.shape))
            memory = self._external.pop(key, None)
            if memory is None:
                feats, tf = self._image_features(image_key, img)
                m = tf.mask_to_model(torch.from_numpy(mask[None, None].astype(np.float32)))
                memory = self.memory(feats, 0, m, None)
            # Most recently used last; a bank reused across queries is encoded once.
            self._external[key] = memory
            while len(self._external) > SUPPORT_CACHE_SIZE:
                self._external.popitem(last=False)
            memories.append(memory)
        return memories

    def _image_features(self, key: str, img: np.ndarray
                        ) -> tuple[EncodedSlices, preprocess.LetterboxTransform]:
        """One support image's features, encoded once however many structures it shows."""
        tf = preprocess.LetterboxTransform(img.shape[0], img.shape[1], self.rt.image_size)
        feats = self._images.pop(key, None)
        if feats is None:
            feats = self.encoder.encode_images(preprocess.to_model_input(img[None], tf), 1)
        self._images[key] = feats
        while len(self._images) > SUPPORT_CACHE_SIZE:
            self._images.popitem(last=False)
        return feats, tf

    def clear(self) -> None:
        self._external.clear()
        self._images.clear()


def _mask_decides_presence(sam, top: torch.Tensor, high_res: list[torch.Tensor],
                           mask: torch.Tensor, support_pointer=None) -> tuple:
    """SAM2's ``_use_mask_as_output`` with the mask alone deciding presence (SAM2's stated rule
    for mask inputs), for trained models: SAM2 also lets its decoder's object score swap the
    pointer for the no-object pointer, a hard gate without gradient which, from random weights,
    can close for every support item and cut the one content path the pointers give (measured:
    disk and square support then had identical pointers). The trained model's
    :class:`SupportPointer` adds what the mask covers. Pretrained models keep SAM2's rule
    exactly (the video-predictor oracle)."""
    if not sam.pred_obj_scores:
        return sam._use_mask_as_output(top, high_res, mask)
    sam.pred_obj_scores = False  # skips both of SAM2's pointer gates; the mask's is redone below
    try:
        out = list(sam._use_mask_as_output(top, high_res, mask))
    finally:
        sam.pred_obj_scores = True
    present = torch.any(mask.flatten(1) > 0, dim=1)[..., None].float()
    obj_ptr = out[5] if support_pointer is None else support_pointer(out[5], top, mask)
    obj_ptr = present * obj_ptr if sam.fixed_no_obj_ptr else obj_ptr
    out[5] = obj_ptr + (1 - present) * sam.no_obj_ptr
    return tuple(out)


def select_top_k(feats: EncodedSlices, j: int, pool: list[Memory], k: int) -> list[Memory]:
    """Top-K by cosine similarity of pooled embeddings; ties go to the nearer slice."""
    if len(pool) <= k:
        return pool
    query = feats.pooled_of(j)  # volume features encode slice j on its first read
    sims = torch.stack([torch.dot(query, m.pooled) for m in pool]).detach()
    sims = sims.float().cpu().numpy()
    dist = [abs(j - m.slice_index) if m.slice_index is not None else 10**9 for m in pool]
    order = sorted(range(len(pool)), key=lambda i: (-round(float(sims[i]), 6), dist[i], i))
    chosen = sorted(order[:k])  # keep pool order: labeled slices first, by index
    return [pool[i] for i in chosen]
