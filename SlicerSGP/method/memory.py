"""3DM: the volumetric memory bank, and SAM2's memory attention over support + bank.

Support memories are conditioning frames (SAM2's temporal position 0); slice memories carry
the temporal encoding of their distance to the slice being predicted, as SAM2's tracker gives
its non-conditioning frames. Object pointers follow SAM2's rules (signed distance, past only in
eval where SAM2 configures it).
"""

from __future__ import annotations

import numpy as np
import torch
from sam2.modeling.sam2_utils import get_1d_sine_pe

from SlicerSGP.errors import SGPInputError
from SlicerSGP.method.encoding import EncodedSlices
from SlicerSGP.method.model import SGPModel
from SlicerSGP.method.runtime import Runtime, flat
from SlicerSGP.method.support import Memory
from SlicerSGP.types import SegmentOptions

MEMORY_POLICIES = ("least_similar", "fifo")


MAX_SUPPORT = 16
"""Largest K (and bank) accepted: the paper ablates K up to 16."""


def bank_size(opts: SegmentOptions) -> int:
    """The 3D bank's size: as given, else K, the support-set size (the paper's rule), the same
    in training and inference and whatever the number of labeled slices."""
    return int(opts.memory_size or opts.top_k)


def check_bank_options(opts: SegmentOptions, model: SGPModel) -> None:
    if opts.memory_policy not in MEMORY_POLICIES:
        raise SGPInputError(f"Unknown memory policy {opts.memory_policy!r}: use one of "
                            f"{', '.join(MEMORY_POLICIES)}.")
    if not 1 <= opts.top_k <= MAX_SUPPORT:
        raise SGPInputError(f"top_k {opts.top_k} is out of range: use 1..{MAX_SUPPORT}.")
    size = bank_size(opts)
    if not 1 <= size <= MAX_SUPPORT:
        raise SGPInputError(f"memory_size {size} is out of range: use 1..{MAX_SUPPORT} slice "
                            "memories (SAM2 encodes distances 1..6; farther memories share the "
                            "last encoding).")


def evict(bank: list[Memory], feats: EncodedSlices, j: int, reverse: bool, size: int,
          policy: str) -> list[Memory]:
    """Keep the bank within ``size`` before slice ``j`` uses it."""
    if policy == "fifo":
        # SAM2's rule: the slices 1..size positions behind, in sweep direction.
        return [m for m in bank if 1 <= (m.slice_index - j) * (1 if reverse else -1) <= size]
    bank = list(bank)
    while len(bank) > size:
        sims = [float(torch.dot(feats.pooled_of(j), m.pooled)) for m in bank]
        bank.pop(int(np.argmin(sims)))
    return bank


class MemoryAttention:
    """Conditions a query slice's features on its support memories, bank and pointers."""

    def __init__(self, runtime: Runtime):
        self.rt = runtime

    def condition(self, feats: EncodedSlices, j: int, support: list[Memory],
                  bank: list[Memory], ptr_history: dict[int, torch.Tensor], reverse: bool,
                  num_frames: int, use_pmg: bool) -> torch.Tensor:
        """Memory-conditioned features of slice ``j`` (SAM2's memory attention)."""
        rt = self.rt
        sam = rt.sam
        top = feats.top_of(j)
        b, c, g, _ = top.shape
        if not use_pmg or (not support and not bank):
            # SAM2's own "no memory" path.
            return (flat(top) + sam.no_mem_embed).permute(1, 2, 0).view(b, c, g, g)
        mem_pos = self._memory_pos(g)
        n_mem = sam.num_maskmem
        memories, memory_pos = [], []
        for m in support:  # conditioning frames: temporal position 0
            memories.append(flat(m.features))
            memory_pos.append(mem_pos + sam.maskmem_tpos_enc[n_mem - 1])
        for m in sorted(bank, key=lambda m: -abs(j - m.slice_index)):
            t_rel = min(max(abs(j - m.slice_index), 1), n_mem - 1)
            memories.append(flat(m.features))
            memory_pos.append(mem_pos + sam.maskmem_tpos_enc[t_rel - 1])

        num_ptr_tokens = 0
        pointers = self._pointers(j, support, ptr_history, reverse, num_frames, b, c)
        if pointers is not None:
            memories.append(pointers[0])
            memory_pos.append(pointers[1])
            num_ptr_tokens = pointers[0].shape[0]

        dtype = top.dtype if rt.autocast_dtype is None else torch.float32
        memory = torch.cat([m.to(dtype) for m in memories], dim=0)
        memory_pos = torch.cat([p.to(dtype) for p in memory_pos], dim=0)
        with rt.timed("memory_attention"):
            out = sam.memory_attention(curr=[flat(top)], curr_pos=[flat(feats.pos)],
                                       memory=memory, memory_pos=memory_pos,
                                       num_obj_ptr_tokens=num_ptr_tokens)
        return out.permute(1, 2, 0).view(b, c, g, g)

    def _pointers(self, j: int, support: list[Memory], ptr_history: dict[int, torch.Tensor],
                  reverse: bool, num_frames: int, b: int,
                  c: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Object-pointer tokens and their temporal encodings, as SAM2's tracker builds them."""
        sam = self.rt.sam
        if not sam.use_obj_ptrs_in_encoder:
            return None
        max_ptrs = min(num_frames, sam.max_obj_ptrs_in_encoder)
        sign = -1 if reverse else 1
        past_only = not sam.training and sam.only_obj_ptrs_in_the_past_for_eval
        pos_and_ptrs = []
        for m in support:
            if m.slice_index is None:
                # Another case: a conditioning frame with no slice distance, so distance 0.
                # Its pointer is the one content token free of RoPE (what the support shows,
                # pooled over its mask), which a trained model needs to tell structures apart.
                pos_and_ptrs.append((0, m.obj_ptr))
                continue
            t = m.slice_index
            if past_only and not (t >= j if reverse else t <= j):
                continue
            d = (j - t) * sign if sam.use_signed_tpos_enc_to_obj_ptrs else abs(j - t)
            pos_and_ptrs.append((d, m.obj_ptr))
        for t_diff in range(1, max_ptrs):
            t = j + t_diff if reverse else j - t_diff
            if t < 0 or t >= num_frames:
                break
            if t in ptr_history:
                pos_and_ptrs.append((t_diff, ptr_history[t]))
        if not pos_and_ptrs:
            return None
        pos_list = [p for p, _ in pos_and_ptrs]
        obj_ptrs = torch.stack([ptr for _, ptr in pos_and_ptrs], dim=0)
        mem_dim = sam.mem_dim
        if sam.add_tpos_enc_to_obj_ptrs:
            tpos_dim = c if sam.proj_tpos_enc_in_obj_ptrs else mem_dim
            # A single slice (2D) has only distance-0 pointers: keep the divisor at least 1.
            obj_pos = torch.tensor(pos_list).to(self.rt.device) / max(max_ptrs - 1, 1)
            obj_pos = sam.obj_ptr_tpos_proj(get_1d_sine_pe(obj_pos, dim=tpos_dim))
            obj_pos = obj_pos.unsqueeze(1).expand(-1, b, mem_dim)
        else:
            obj_pos = obj_ptrs.new_zeros(len(pos_list), b, mem_dim)
        if mem_dim < c:
            obj_ptrs = obj_ptrs.reshape(-1, b, c // mem_dim, mem_dim)
            obj_ptrs = obj_ptrs.permute(0, 2, 1, 3).flatten(0, 1)
            obj_pos = obj_pos.repeat_interleave(c // mem_dim, dim=0)
        return obj_ptrs, obj_pos

    def _memory_pos(self, g: int) -> torch.Tensor:
        """Spatial position encoding of a memory (the same for every memory)."""
        sam = self.rt.sam
        pe = sam.memory_encoder.position_encoding
        dummy = torch.zeros(1, sam.mem_dim, g, g, device=self.rt.device)
        return flat(pe(dummy).to(dummy.dtype))
