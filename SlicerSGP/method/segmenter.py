"""Segment a volume from a support set: SAM2-SGP with bidirectional slice propagation.

One run, per structure:

1. every slice of the volume (and every external support image) is encoded once; features
   are cached for the other direction, the other structures and later runs on the same volume;
2. each support item becomes a memory through SAM2's memory encoder, its mask given as a
   confident prediction, exactly as SAM2 encodes a mask prompt on a conditioning frame;
3. two sweeps run outward from the labeled slices, one per direction. For each slice, the K
   most similar support memories and the 3D memory bank condition its features (SAM2's
   memory attention); SAM2's mask decoder with no prompt gives the pseudo-mask (PMG); PMA turns
   pseudo-mask + features into the final mask; the result is encoded into the 3D memory;
4. slices reached from both sides are fused with weights that fall with distance; labeled
   slices are returned exactly as drawn.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from SlicerSGP.errors import Cancelled, SGPDeviceError, SGPInputError
from SlicerSGP.method.model import SGPModel, pseudo_mask_box
from SlicerSGP.types import (
    CancelCheck,
    Geometry,
    ProgressCallback,
    SegmentationResult,
    SegmentOptions,
    SupportItem,
)

SCORE_DTYPE = np.dtype([
    ("slice", "i4"), ("confidence", "f4"), ("predicted_iou", "f4"), ("object_score", "f4"),
    ("pseudo_final_dice", "f4"), ("area_px", "i8"), ("source", "U8"),
])
MEMORY_POLICIES = ("least_similar", "fifo")
# bf16 halves memory storage; SAM2's video predictor stores its memories the same way.
MEMORY_DTYPE = torch.bfloat16
SUPPORT_CACHE_SIZE = 256
"""Encoded external support items kept between runs (about 0.5 MB each at 1024 px)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SGPDeviceError(
                f"--device {device} was asked for, but this machine has no usable CUDA GPU "
                f"(torch {torch.__version__} sees none). Use --device cpu (slower) or "
                "--device auto, or install a CUDA build of torch that matches the driver."
            )
        index = 0 if name == "cuda" else name.partition(":")[2]
        try:
            index = int(index)
        except ValueError:
            raise SGPInputError(f"Unknown device {device!r}: use auto, cpu, cuda or cuda:N.") from None
        if index >= torch.cuda.device_count():
            raise SGPDeviceError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})."
            )
        return torch.device(f"cuda:{index}")
    raise SGPInputError(f"Unknown device {device!r}: use auto, cpu, cuda or cuda:N.")


# --------------------------------------------------------------------------- features

@dataclass
class EncodedSlices:
    """Image features of a stack of slices, as SAM2's decoder and memory modules take them."""

    s0: torch.Tensor          # (N, C0, S/4, S/4), after the decoder's conv_s0
    s1: torch.Tensor          # (N, C1, S/8, S/8), after conv_s1
    top: torch.Tensor         # (N, C, S/16, S/16)
    pos: torch.Tensor         # (1, C, S/16, S/16): identical for every slice
    pooled: torch.Tensor      # (N, C) unit vectors, for similarity

    compute_dtype: torch.dtype = torch.float32
    """Features may be stored compactly (bf16); they are handed out in this dtype."""

    def __len__(self) -> int:
        return int(self.top.shape[0])

    @property
    def grid(self) -> int:
        return int(self.top.shape[-1])

    def top_of(self, i: int) -> torch.Tensor:
        return self.top[i:i + 1].to(self.compute_dtype)

    def high_res(self, i: int) -> list[torch.Tensor]:
        return [self.s0[i:i + 1].to(self.compute_dtype), self.s1[i:i + 1].to(self.compute_dtype)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.s0, self.s1, self.top))


@dataclass
class Memory:
    """One encoded memory: a support item or a predicted slice."""

    features: torch.Tensor        # (1, mem_dim, g, g), MEMORY_DTYPE
    obj_ptr: torch.Tensor         # (1, C)
    pooled: torch.Tensor          # (C,) embedding of the image it came from
    slice_index: int | None       # position in the query volume; None for other cases


@dataclass
class StepOutput:
    pseudo_low: torch.Tensor      # (1, 1, S/4, S/4) PMG logits
    final_high: torch.Tensor      # (1, 1, S, S) final logits
    memory: Memory | None
    predicted_iou: float
    object_score: float
    pmg_object_logits: torch.Tensor | None = None  # (1, 1) PMG object score (training)
    final_object_logits: torch.Tensor | None = None  # (1, 1) PMA object score (training)


@dataclass
class _Accumulator:
    """Distance-weighted sum of per-direction predictions for one structure."""

    prob: np.ndarray
    weight: np.ndarray
    pseudo: np.ndarray | None
    pseudo_weight: np.ndarray
    scores: dict[int, list[tuple[float, dict[str, float]]]] = field(default_factory=dict)
    sources: dict[int, set[str]] = field(default_factory=dict)


class Segmenter:
    """A loaded SAM2-SGP model and the embeddings of the last volume it saw.

    Keep one for the session: a re-run on the same volume (after correcting a slice, or for
    another structure) reuses the cached slice embeddings.
    """

    def __init__(self, model: str | SGPModel = "tiny", *, weights: str | None = None,
                 device: str | torch.device = "auto", image_size: int | None = None,
                 seed: int = 0, dtype: str = "auto", feature_dtype: str = "auto"):
        from SlicerSGP.method.model import build_model, load_sgp_checkpoint

        self.device = resolve_device(device)
        if isinstance(model, SGPModel):
            net = model
        elif str(model).endswith(".safetensors"):
            # weights None: the base SAM2 weights the checkpoint names in its metadata.
            net = load_sgp_checkpoint(model, image_size=image_size, weights=weights)
        else:
            net = build_model(str(model), weights=weights, image_size=image_size or 1024,
                              seed=seed)
        self.model = net.to(self.device).eval()
        self.autocast_dtype = _autocast_dtype(self.device, dtype)
        self.feature_dtype = _feature_dtype(feature_dtype)
        self.stage_times: dict[str, float] = {}
        self.sync_timers = False
        """Synchronise the device around each timed stage (benchmarks only)."""
        self._cache_key: str | None = None
        self._cache: EncodedSlices | None = None
        self.encode_count = 0
        self._support_size = 1
        self._support_cache: dict[str, Memory] = {}

    @property
    def image_size(self) -> int:
        return self.model.image_size

    # ------------------------------------------------------------------ public entry point

    def segment(
        self,
        volume: np.ndarray,
        labels: np.ndarray | None = None,
        structures: dict[int, str] | None = None,
        options: SegmentOptions | None = None,
        *,
        support_slices: list[int] | None = None,
        support_bank: dict[int, list[SupportItem]] | None = None,
        geometry: Geometry | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
    ) -> SegmentationResult:
        """Segment ``structures`` through ``volume``; see the module docstring for the method."""
        from SlicerSGP.data import preprocess

        opts = options or SegmentOptions()
        _validate_options(opts, self.model)
        report = progress or (lambda stage, frac: None)
        stop = cancel or (lambda: False)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        self.stage_times = {}

        preprocess.validate_volume(volume, axis=opts.axis, min_size=16)
        spatial = volume.shape[:3]
        if labels is not None:
            labels = _check_labels(labels, spatial)
        structures = _resolve_structures(structures, labels, support_bank)
        bank = support_bank or {}

        vol = preprocess.reorient(volume, opts.axis)
        lab = preprocess.reorient(labels, opts.axis) if labels is not None else None
        n, h, w = vol.shape[:3]
        labeled = _labeled_slices(lab, structures, support_slices, n)
        if not labeled and not any(bank.get(v) for v in structures):
            raise SGPInputError(
                "No labeled slice: draw the structure on at least one slice (or pass "
                "--support-slices / a support bank of other labeled cases) and run again."
            )
        for v, name in structures.items():
            if not labeled and not bank.get(v):
                raise SGPInputError(f"Structure {name!r} (label {v}) has no support: the "
                                    "support bank holds no example of it.")

        lo, hi = preprocess.intensity_range(vol, opts.intensity)
        slices01 = preprocess.normalize_intensity(vol, lo, hi)
        transform = preprocess.LetterboxTransform(h, w, self.image_size)

        te = time.perf_counter()
        feats = self._encode_volume(slices01, transform, opts, report, stop)
        timings["encode"] = time.perf_counter() - te

        per_structure: dict[int, _Accumulator] = {}
        tp = time.perf_counter()
        for si, (value, name) in enumerate(structures.items()):
            masks = {k: (lab[k] == value) for k in labeled} if lab is not None else {}
            masks.update({k: np.zeros((h, w), bool) for k in labeled if k not in masks})
            ext = self._external_support(bank.get(value, []), opts, stop)

            def stage_progress(frac: float, _si: int = si, _name: str = name) -> None:
                report(f"propagate {_name}", (_si + frac) / len(structures))

            per_structure[value] = self._propagate(
                feats, slices01, transform, masks, ext, opts, stage_progress, stop
            )
        timings["propagate"] = time.perf_counter() - tp

        tw = time.perf_counter()
        report("write", 0.0)
        result = self._assemble(per_structure, structures, lab, labeled, opts, (n, h, w))
        # Back to the input's array order, contiguous (callers hand these to VTK and ITK).
        def restore(arr: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(preprocess.restore_orientation(arr, opts.axis))

        result.labels = restore(result.labels)
        for d in (result.probabilities, result.pseudo_masks):
            for k in d:
                d[k] = restore(d[k])
        report("write", 1.0)
        timings["assemble"] = time.perf_counter() - tw
        timings["total"] = time.perf_counter() - t0
        timings.update({f"stage:{k}": v for k, v in self.stage_times.items()})
        result.geometry = geometry
        result.timings = timings
        result.stats = {"slices": n, "slices_encoded": self.encode_count,
                        "support_slices": len(labeled)}
        return result

    # ------------------------------------------------------------------ encoding

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _mode(self, grad: bool):
        """Inference mode for segmentation; autograd on for training (LoRA, PMA)."""
        return torch.enable_grad() if grad else torch.inference_mode()

    def encode_images(self, images: torch.Tensor | Any, batch_size: int = 4,
                      progress: Any = None, cancel: CancelCheck | None = None,
                      grad: bool = False, count: int | None = None) -> EncodedSlices:
        """Run the image encoder over model-ready images (N, 3, S, S), in batches.

        ``images`` may also be a function ``(start, stop) -> tensor`` with ``count`` slices, so
        a whole volume's model input never has to exist at once.
        """
        sam = self.model.sam
        parts: dict[str, list[torch.Tensor]] = {"s0": [], "s1": [], "top": []}
        pooled: list[torch.Tensor] = []
        pos = None
        n = images.shape[0] if count is None else count
        store = self.feature_dtype or (self.autocast_dtype or torch.float32)
        with self._mode(grad), self._autocast():
            for start in range(0, n, batch_size):
                if cancel is not None and cancel():
                    raise Cancelled("Cancelled while encoding slices; nothing was written.")
                stop = min(n, start + batch_size)
                batch = images[start:stop] if count is None else images(start, stop)
                with self._timed("encode"):
                    out = sam.forward_image(batch.to(self.device, non_blocking=True).float())
                    fpn = out["backbone_fpn"][-sam.num_feature_levels:]
                    keep = (lambda t: t) if grad else (lambda t: t.to(store))
                    parts["s0"].append(keep(fpn[0]))
                    parts["s1"].append(keep(fpn[1]))
                    parts["top"].append(keep(fpn[2]))
                    pooled.append(F.normalize(fpn[2].float().mean(dim=(2, 3)), dim=1))
                if pos is None:
                    pos = out["vision_pos_enc"][-1][:1]
                self.encode_count += stop - start
                if progress is not None:
                    progress(stop / n)
        compute = self.autocast_dtype if self.autocast_dtype is not None else torch.float32
        return EncodedSlices(torch.cat(parts["s0"]), torch.cat(parts["s1"]),
                             torch.cat(parts["top"]), pos, torch.cat(pooled),
                             compute_dtype=torch.float32 if grad else compute)

    @contextmanager
    def _timed(self, stage: str):
        if self.sync_timers and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.sync_timers and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stage_times[stage] = self.stage_times.get(stage, 0.0) + time.perf_counter() - t

    def _encode_volume(self, slices01: np.ndarray, transform: Any, opts: SegmentOptions,
                       report: ProgressCallback, stop: CancelCheck) -> EncodedSlices:
        from SlicerSGP.data import preprocess

        key = _volume_key(slices01, self.image_size, self.model, self.autocast_dtype)
        if key == self._cache_key and self._cache is not None:
            report("encode", 1.0)
            return self._cache
        # Drop the old volume's features before encoding the new one (device memory).
        self._cache_key, self._cache = None, None
        feats = self.encode_images(
            lambda a, b: preprocess.to_model_input(slices01[a:b], transform),
            self._batch_size(opts), lambda f: report("encode", f), stop, count=len(slices01))
        self._cache_key, self._cache = key, feats
        return feats

    def _batch_size(self, opts: SegmentOptions) -> int:
        if opts.encode_batch_size:
            return int(opts.encode_batch_size)
        return 8 if self.device.type == "cuda" else 1

    def clear_cache(self) -> None:
        """Forget cached slice features and support memories (e.g. after changing weights)."""
        self._cache_key, self._cache = None, None
        self._support_cache.clear()

    # ------------------------------------------------------------------ support memories

    def support_memory(self, feats: EncodedSlices, i: int, mask_model: torch.Tensor,
                       slice_index: int | None, grad: bool = False) -> Memory:
        """Encode support item ``i`` of ``feats`` with its mask (1, 1, S, S) into a memory.

        The mask goes in as SAM2 takes a mask prompt on a conditioning frame: directly as the
        output (logits +-10), then binarised for the memory encoder.
        """
        sam = self.model.sam
        g = feats.grid
        with self._mode(grad), self._autocast():
            out = sam._use_mask_as_output(feats.top_of(i), feats.high_res(i),
                                          mask_model.to(self.device))
            low_res, obj_ptr, obj_score = out[3], out[5], out[6]
            high_res = F.interpolate(low_res, size=(self.image_size, self.image_size),
                                     mode="bilinear", align_corners=False)
            mem, _ = sam._encode_new_memory(
                current_vision_feats=[_flat(feats.top_of(i))], feat_sizes=[(g, g)],
                pred_masks_high_res=high_res, object_score_logits=obj_score,
                is_mask_from_pts=True,
            )
        return Memory(mem.to(MEMORY_DTYPE), obj_ptr, feats.pooled[i], slice_index)

    def _external_support(self, items: list[SupportItem], opts: SegmentOptions,
                          stop: CancelCheck) -> list[Memory]:
        """Encode support items from other cases (each image at its own size) into memories."""
        from SlicerSGP.data import preprocess

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
            key = _support_key(img, mask)
            memory = self._support_cache.pop(key, None)
            if memory is None:
                tf = preprocess.LetterboxTransform(img.shape[0], img.shape[1], self.image_size)
                feats = self.encode_images(preprocess.to_model_input(img[None], tf), 1)
                m = tf.mask_to_model(torch.from_numpy(mask[None, None].astype(np.float32)))
                memory = self.support_memory(feats, 0, m, None)
            # Most recently used last; a bank reused across queries is encoded once.
            self._support_cache[key] = memory
            while len(self._support_cache) > SUPPORT_CACHE_SIZE:
                self._support_cache.pop(next(iter(self._support_cache)))
            memories.append(memory)
        return memories

    # ------------------------------------------------------------------ one slice

    def _condition(self, feats: EncodedSlices, j: int, support: list[Memory],
                   bank: list[Memory], ptr_history: dict[int, torch.Tensor], reverse: bool,
                   num_frames: int, use_pmg: bool) -> torch.Tensor:
        """Memory-conditioned features of slice ``j`` (SAM2's memory attention)."""
        sam = self.model.sam
        top = feats.top_of(j)
        b, c, g, _ = top.shape
        if not use_pmg or (not support and not bank):
            # SAM2's own "no memory" path.
            return (_flat(top) + sam.no_mem_embed).permute(1, 2, 0).view(b, c, g, g)
        mem_pos = self._memory_pos(g)
        n_mem = sam.num_maskmem
        memories, memory_pos = [], []
        for m in support:  # conditioning frames: temporal position 0
            memories.append(_flat(m.features))
            memory_pos.append(mem_pos + sam.maskmem_tpos_enc[n_mem - 1])
        for m in sorted(bank, key=lambda m: -abs(j - m.slice_index)):
            t_rel = min(max(abs(j - m.slice_index), 1), n_mem - 1)
            memories.append(_flat(m.features))
            memory_pos.append(mem_pos + sam.maskmem_tpos_enc[t_rel - 1])

        num_ptr_tokens = 0
        if sam.use_obj_ptrs_in_encoder:
            max_ptrs = min(num_frames, sam.max_obj_ptrs_in_encoder)
            sign = -1 if reverse else 1
            past_only = not sam.training and sam.only_obj_ptrs_in_the_past_for_eval
            pos_and_ptrs = []
            for m in support:
                if m.slice_index is None:
                    continue  # other cases: no slice distance to encode
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
            if pos_and_ptrs:
                pos_list, ptrs = zip(*pos_and_ptrs, strict=True)
                obj_ptrs = torch.stack(ptrs, dim=0)
                mem_dim = sam.mem_dim
                if sam.add_tpos_enc_to_obj_ptrs:
                    from sam2.modeling.sam2_utils import get_1d_sine_pe

                    tpos_dim = c if sam.proj_tpos_enc_in_obj_ptrs else mem_dim
                    obj_pos = torch.tensor(pos_list).to(self.device) / (max_ptrs - 1)
                    obj_pos = sam.obj_ptr_tpos_proj(get_1d_sine_pe(obj_pos, dim=tpos_dim))
                    obj_pos = obj_pos.unsqueeze(1).expand(-1, b, mem_dim)
                else:
                    obj_pos = obj_ptrs.new_zeros(len(pos_list), b, mem_dim)
                if mem_dim < c:
                    obj_ptrs = obj_ptrs.reshape(-1, b, c // mem_dim, mem_dim)
                    obj_ptrs = obj_ptrs.permute(0, 2, 1, 3).flatten(0, 1)
                    obj_pos = obj_pos.repeat_interleave(c // mem_dim, dim=0)
                memories.append(obj_ptrs)
                memory_pos.append(obj_pos)
                num_ptr_tokens = obj_ptrs.shape[0]

        dtype = top.dtype if self.autocast_dtype is None else torch.float32
        memory = torch.cat([m.to(dtype) for m in memories], dim=0)
        memory_pos = torch.cat([p.to(dtype) for p in memory_pos], dim=0)
        with self._timed("memory_attention"):
            out = sam.memory_attention(curr=[_flat(top)], curr_pos=[_flat(feats.pos)],
                                       memory=memory, memory_pos=memory_pos,
                                       num_obj_ptr_tokens=num_ptr_tokens)
        return out.permute(1, 2, 0).view(b, c, g, g)

    def _memory_pos(self, g: int) -> torch.Tensor:
        """Spatial position encoding of a memory (the same for every memory)."""
        pe = self.model.sam.memory_encoder.position_encoding
        dummy = torch.zeros(1, self.model.sam.mem_dim, g, g, device=self.device)
        return _flat(pe(dummy).to(dummy.dtype))

    def step(self, feats: EncodedSlices, j: int, image: torch.Tensor | None,
             support: list[Memory], bank: list[Memory], ptr_history: dict[int, torch.Tensor],
             reverse: bool, num_frames: int, opts: SegmentOptions,
             encode_memory: bool = True) -> StepOutput:
        """Predict slice ``j``: PMG (pseudo-mask), PMA (final mask), then its 3D memory."""
        sam = self.model.sam
        g = feats.grid
        pix = self._condition(feats, j, support, bank, ptr_history, reverse, num_frames,
                              opts.use_pmg)
        hr = feats.high_res(j)
        with self._timed("decode"):
            pmg = sam._forward_sam_heads(
                backbone_features=pix, point_inputs=None, mask_inputs=None,
                high_res_features=hr, multimask_output=sam._use_multimask(False, None),
            )
        _, _, ious, pseudo_low, pseudo_high, obj_ptr, obj_score = pmg
        if not opts.use_pmg:
            pseudo_low = torch.full_like(pseudo_low, -20.0)
            pseudo_high = torch.full_like(pseudo_high, -20.0)
        final_high, final_iou, final_obj = pseudo_high, ious.max(dim=-1).values, obj_score
        if opts.use_pma:
            with self._timed("decode"):
                final_high, final_iou, final_obj = self._pma(pix, hr, pseudo_low, pseudo_high,
                                                             image, opts)
        memory = None
        if encode_memory:
            with self._timed("memory_encode"):
                mem, _ = sam._encode_new_memory(
                    current_vision_feats=[_flat(feats.top_of(j))], feat_sizes=[(g, g)],
                    pred_masks_high_res=final_high.to(pix.dtype), object_score_logits=final_obj,
                    is_mask_from_pts=False,
                )
            memory = Memory(mem.to(MEMORY_DTYPE), obj_ptr, feats.pooled[j], j)
        return StepOutput(pseudo_low, final_high.float(), memory,
                          float(final_iou.detach().float().reshape(-1)[0]),
                          float(torch.sigmoid(final_obj.detach().float()).reshape(-1)[0]),
                          obj_score, final_obj)

    def _pma(self, pix: torch.Tensor, hr: list[torch.Tensor], pseudo_low: torch.Tensor,
             pseudo_high: torch.Tensor, image: torch.Tensor | None, opts: SegmentOptions):
        """Pseudo-mask attention: box prompt + (trained) mask attention + decoder."""
        sam = self.model.sam
        prob_high = torch.sigmoid(pseudo_high.float())
        box = pseudo_mask_box(prob_high, opts.threshold)
        if box is not None:
            # SAM2 takes a box as two points labeled 2 and 3.
            points = {"point_coords": box.view(-1, 2, 2).to(pix.device),
                      "point_labels": torch.tensor([[2, 3]], dtype=torch.int32,
                                                   device=pix.device)}
        else:
            points = None
        pma = self.model.pma
        if pma is None:
            # Training-free: the pretrained decoder with the box and the pseudo-mask as prompts.
            out = sam._forward_sam_heads(backbone_features=pix, point_inputs=points,
                                         mask_inputs=pseudo_low, high_res_features=hr,
                                         multimask_output=False)
            return out[4], out[2].max(dim=-1).values, out[6]
        feats = pma.mask_attention(pix, torch.sigmoid(pseudo_low.float()))
        stage1 = _decode_with(sam, pma.decoder.stage1, feats, points, hr)
        low_res, ious, obj_score = stage1
        if image is None:
            raise ValueError("the trained PMA decoder needs the model-space image")
        final = pma.decoder.refine(low_res, hr, image.to(pix.device))
        return final, ious.max(dim=-1).values, obj_score

    # ------------------------------------------------------------------ propagation

    def _propagate(self, feats: EncodedSlices, slices01: np.ndarray, transform: Any,
                   masks: dict[int, np.ndarray], external: list[Memory],
                   opts: SegmentOptions, report: Any, stop: CancelCheck) -> _Accumulator:
        from SlicerSGP.data import preprocess

        n = len(feats)
        h, w = slices01.shape[1:3]
        labeled = sorted(masks)
        own = {k: self.support_memory(
            feats, k, transform.mask_to_model(torch.from_numpy(masks[k][None, None].astype(
                np.float32))), k) for k in labeled}
        support_pool = [own[k] for k in labeled] + external
        # The paper sizes the 3D bank like the support set: the items each slice attends to.
        self._support_size = max(1, min(opts.top_k, len(support_pool)))
        acc = _Accumulator(
            prob=np.zeros((n, h, w), np.float32), weight=np.zeros(n, np.float32),
            pseudo=np.zeros((n, h, w), np.float32) if opts.keep_pseudo_masks else None,
            pseudo_weight=np.zeros(n, np.float32),
        )
        need_image = self.model.pma is not None and opts.use_pma

        def image_of(j: int) -> torch.Tensor | None:
            if not need_image:
                return None
            return preprocess.to_model_input(slices01[j:j + 1], transform).to(self.device)

        seed: tuple[int, StepOutput] | None = None
        if labeled:
            anchors = labeled
            fwd_start, bwd_start = labeled[0], labeled[-1]
        else:
            seed = self._choose_seed(feats, support_pool, image_of, opts, stop)
            anchors = [seed[0]]
            fwd_start = bwd_start = seed[0]
        if not opts.bidirectional:
            # One pass like SAM2's tracker: forward from the first anchor, back to the start.
            bwd_start = anchors[0]

        sweeps = [(False, list(range(fwd_start, n))), (True, list(range(bwd_start, -1, -1)))]
        total = sum(len(s) for _, s in sweeps)
        done = 0
        for reverse, order in sweeps:
            for j, out in self.run_sweep(feats, order, reverse, masks, support_pool, opts,
                                         image_of, stop, seed):
                done += 1
                if out is None:
                    continue
                weight = _fusion_weight(j, anchors, reverse, n, opts.bidirectional)
                source = "seed" if seed and j == seed[0] else ("backward" if reverse else "forward")
                with self._timed("write_back"):
                    self._accumulate(acc, j, out, transform, weight, source)
                report(done / total)
        return acc

    def run_sweep(self, feats: EncodedSlices, order: list[int], reverse: bool,
                  labeled: dict[int, Any] | set[int], support_pool: list[Memory],
                  opts: SegmentOptions, image_of: Any = None, stop: CancelCheck | None = None,
                  seed: tuple[int, StepOutput] | None = None, grad: bool = False):
        """One directional pass over ``order``; yields ``(slice, StepOutput | None)``.

        Labeled slices yield None (they are support, not predicted). The 3D memory bank and the
        object-pointer history live for this sweep only.
        """
        n = len(feats)
        bank: list[Memory] = []
        ptr_history: dict[int, torch.Tensor] = {}
        with self._mode(grad), self._autocast():
            for j in order:
                if stop is not None and stop():
                    raise Cancelled("Cancelled during propagation; nothing was written.")
                if j in labeled:
                    yield j, None
                    continue
                if seed is not None and j == seed[0]:
                    out = seed[1]
                else:
                    support = self._select_support(feats, j, support_pool, opts.top_k)
                    if opts.use_3d_memory:
                        bank = self._evict(bank, feats, j, reverse, opts)
                    out = self.step(feats, j, image_of(j) if image_of else None, support,
                                    bank if opts.use_3d_memory else [], ptr_history,
                                    reverse, n, opts, encode_memory=opts.use_3d_memory)
                if opts.use_3d_memory and out.memory is not None:
                    bank.append(out.memory)
                    ptr_history[j] = out.memory.obj_ptr
                yield j, out

    def _choose_seed(self, feats: EncodedSlices, support: list[Memory], image_of: Any,
                     opts: SegmentOptions, stop: CancelCheck) -> tuple[int, StepOutput]:
        """With only external support: the slice whose pseudo-mask is most confident."""
        best: tuple[float, int, StepOutput] | None = None
        pmg_only = SegmentOptions(**{**opts.__dict__, "use_pma": False})
        with torch.inference_mode(), self._autocast():
            for j in range(len(feats)):
                if stop():
                    raise Cancelled("Cancelled while choosing the start slice; nothing was written.")
                sel = self._select_support(feats, j, support, opts.top_k)
                out = self.step(feats, j, None, sel, [], {}, False, len(feats), pmg_only,
                                encode_memory=False)
                conf = out.predicted_iou * out.object_score
                if best is None or conf > best[0]:
                    best = (conf, j, out)
            j = best[1]
            sel = self._select_support(feats, j, support, opts.top_k)
            out = self.step(feats, j, image_of(j), sel, [], {}, False, len(feats), opts,
                            encode_memory=True)
        return j, out

    def _select_support(self, feats: EncodedSlices, j: int, pool: list[Memory],
                        k: int) -> list[Memory]:
        """Top-K by cosine similarity of pooled embeddings; ties go to the nearer slice."""
        if len(pool) <= k:
            return pool
        query = feats.pooled[j]
        sims = torch.stack([torch.dot(query, m.pooled) for m in pool]).detach()
        sims = sims.float().cpu().numpy()
        dist = [abs(j - m.slice_index) if m.slice_index is not None else 10**9 for m in pool]
        order = sorted(range(len(pool)), key=lambda i: (-round(float(sims[i]), 6), dist[i], i))
        chosen = sorted(order[:k])  # keep pool order: labeled slices first, by index
        return [pool[i] for i in chosen]

    def _evict(self, bank: list[Memory], feats: EncodedSlices, j: int, reverse: bool,
               opts: SegmentOptions) -> list[Memory]:
        """Keep the bank within its size before slice ``j`` uses it."""
        size = opts.memory_size or self._support_size
        if opts.memory_policy == "fifo":
            # SAM2's rule: the slices 1..size positions behind, in sweep direction.
            return [m for m in bank if 1 <= (m.slice_index - j) * (1 if reverse else -1) <= size]
        bank = list(bank)
        while len(bank) > size:
            sims = [float(torch.dot(feats.pooled[j], m.pooled)) for m in bank]
            bank.pop(int(np.argmin(sims)))
        return bank

    def _accumulate(self, acc: _Accumulator, j: int, out: StepOutput, transform: Any,
                    weight: float, source: str) -> None:
        final = transform.logits_to_image(out.final_high.float())
        prob = torch.sigmoid(final)[0, 0].cpu().numpy()
        pseudo_prob = torch.sigmoid(transform.logits_to_image(out.pseudo_low.float()))[0, 0]
        pseudo_prob = pseudo_prob.cpu().numpy()
        acc.prob[j] += weight * prob
        acc.weight[j] += weight
        if acc.pseudo is not None:
            acc.pseudo[j] += weight * pseudo_prob
        acc.pseudo_weight[j] += weight
        inter = float((prob * pseudo_prob).sum())
        denom = float(prob.sum() + pseudo_prob.sum())
        dice = 2 * inter / denom if denom > 0 else 1.0
        acc.scores.setdefault(j, []).append((weight, {
            "predicted_iou": out.predicted_iou, "object_score": out.object_score,
            "pseudo_final_dice": dice,
        }))
        acc.sources.setdefault(j, set()).add(source)

    # ------------------------------------------------------------------ result

    def _assemble(self, per_structure: dict[int, _Accumulator], structures: dict[int, str],
                  lab: np.ndarray | None, labeled: list[int], opts: SegmentOptions,
                  shape: tuple[int, int, int]) -> SegmentationResult:
        n = shape[0]
        probabilities, pseudo_masks, scores = {}, {}, {}
        for value, acc in per_structure.items():
            # In place: the accumulators become the results (a volume-sized copy saved each).
            prob = acc.prob
            prob /= np.maximum(acc.weight, 1e-12)[:, None, None]
            pseudo = acc.pseudo
            if pseudo is not None:
                pseudo /= np.maximum(acc.pseudo_weight, 1e-12)[:, None, None]
            for k in labeled:
                user = (lab[k] == value) if lab is not None else np.zeros(shape[1:], bool)
                prob[k] = user
                if pseudo is not None:
                    pseudo[k] = user
            probabilities[value] = prob
            if pseudo is not None:
                pseudo_masks[value] = pseudo
            table = np.zeros(n, SCORE_DTYPE)
            table["slice"] = np.arange(n)
            for j in range(n):
                if j in labeled:
                    table[j]["confidence"] = table[j]["predicted_iou"] = 1.0
                    table[j]["object_score"] = table[j]["pseudo_final_dice"] = 1.0
                    table[j]["source"] = "labeled"
                    continue
                entries = acc.scores.get(j, [])
                tw = sum(w for w, _ in entries) or 1.0
                for fname in ("predicted_iou", "object_score", "pseudo_final_dice"):
                    table[j][fname] = sum(w * e[fname] for w, e in entries) / tw
                table[j]["confidence"] = table[j]["predicted_iou"] * table[j]["object_score"]
                src = acc.sources.get(j, set())
                table[j]["source"] = "fused" if len(src) > 1 else (next(iter(src)) if src else "")
            scores[value] = table

        label_map = label_map_from_probabilities(probabilities, opts.threshold, shape)
        for k in labeled:
            if lab is not None:
                # User-drawn slices come back exactly as drawn (requested structures only).
                keep = np.isin(lab[k], list(structures))
                label_map[k] = np.where(keep, lab[k], 0)
        for value, table in scores.items():
            table["area_px"] = (label_map == value).reshape(n, -1).sum(axis=1)
        return SegmentationResult(
            labels=label_map, probabilities=probabilities, pseudo_masks=pseudo_masks,
            slice_scores=scores, structures=dict(structures), axis=opts.axis,
            labeled_slices=list(labeled),
        )


# --------------------------------------------------------------------------- helpers

def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (HW, B, C), the sequence layout SAM2's attention modules take."""
    return x.flatten(2).permute(2, 0, 1)


def _decode_with(sam: Any, decoder: Any, feats: torch.Tensor, points: dict | None,
                 hr: list[torch.Tensor]):
    """Run a SAM2-style mask decoder (prompt = box points or nothing) on ``feats``."""
    b = feats.shape[0]
    if points is None:
        coords = torch.zeros(b, 1, 2, device=feats.device)
        labels = -torch.ones(b, 1, dtype=torch.int32, device=feats.device)
    else:
        coords, labels = points["point_coords"], points["point_labels"]
    sparse, dense = sam.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    low_res, ious, _, obj_score = decoder(
        image_embeddings=feats, image_pe=sam.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        multimask_output=False, repeat_image=False, high_res_features=hr,
    )
    return low_res.float(), ious, obj_score


def _fusion_weight(j: int, anchors: list[int], reverse: bool, n: int, bidirectional: bool) -> float:
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


def label_map_from_probabilities(probabilities: dict[int, np.ndarray], threshold: float,
                                 shape: tuple[int, ...]) -> np.ndarray:
    """Each voxel gets the most probable structure if that probability reaches ``threshold``."""
    values = list(probabilities)
    dtype = np.uint8 if max(values, default=0) < 256 else np.uint16
    out = np.zeros(shape, dtype)
    if len(values) == 1:
        out[probabilities[values[0]] >= threshold] = values[0]
        return out
    lut = np.asarray(values, dtype)
    for k in range(shape[0]):  # slice by slice: no volume-sized stack or int64 argmax
        stack = np.stack([probabilities[v][k] for v in values])
        best = stack.argmax(axis=0)
        out[k] = np.where(stack.max(axis=0) >= threshold, lut[best], 0)
    return out


def _validate_options(opts: SegmentOptions, model: SGPModel) -> None:
    if opts.axis not in (0, 1, 2):
        raise SGPInputError(f"axis must be 0, 1 or 2 (array axis to slice along), got {opts.axis}.")
    if opts.top_k < 1:
        raise SGPInputError(f"top_k must be at least 1, got {opts.top_k}.")
    if opts.memory_policy not in MEMORY_POLICIES:
        raise SGPInputError(f"Unknown memory policy {opts.memory_policy!r}: use one of "
                            f"{', '.join(MEMORY_POLICIES)}.")
    size = opts.memory_size or opts.top_k
    limit = model.sam.num_maskmem - 1
    if not 1 <= size <= limit:
        raise SGPInputError(f"memory_size {size} is out of range: SAM2 has temporal encodings "
                            f"for 1..{limit} slice memories.")
    if not 0.0 < opts.threshold < 1.0:
        raise SGPInputError(f"threshold must lie in (0, 1), got {opts.threshold}.")


def _check_labels(labels: np.ndarray, spatial: tuple[int, ...]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != tuple(spatial):
        raise SGPInputError(
            f"The label map has shape {labels.shape} but the image has {tuple(spatial)}: "
            "they must share the voxel grid. Resample the labels onto the image first."
        )
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise SGPInputError("The label map holds non-integer values: it must be a label "
                                "map (0 = background, 1, 2, ... = structures).")
        labels = labels.astype(np.int64)
    return labels


def _resolve_structures(structures: dict[int, str] | None, labels: np.ndarray | None,
                        bank: dict[int, list[SupportItem]] | None) -> dict[int, str]:
    present = set(np.unique(labels).tolist()) - {0} if labels is not None else set()
    available = present | {v for v, items in (bank or {}).items() if items}
    if structures is None:
        if not available:
            raise SGPInputError("The labels hold no structure (all voxels are 0): draw the "
                                "structure on at least one slice.")
        return {int(v): f"Segment_{int(v)}" for v in sorted(available)}
    if not structures:
        raise SGPInputError("No structure to segment was given.")
    missing = [v for v in structures if int(v) not in available]
    if missing:
        raise SGPInputError(
            f"Label value(s) {missing} are absent from the labels and the support bank "
            f"(present: {sorted(available) or 'none'}). Pick a label that was drawn, e.g. "
            f"--label {min(available) if available else 1}."
        )
    return {int(v): str(n) for v, n in structures.items()}


def _labeled_slices(lab: np.ndarray | None, structures: dict[int, str],
                    support_slices: list[int] | None, n: int) -> list[int]:
    """Slices counted as labeled: those given, or those where any requested structure is drawn.

    A labeled slice is taken as fully annotated for every requested structure (an empty mask
    there means "absent here").
    """
    if support_slices is not None:
        bad = [k for k in support_slices if not 0 <= int(k) < n]
        if bad:
            raise SGPInputError(f"Support slice(s) {bad} are outside the volume (0..{n - 1}).")
        if lab is None:
            raise SGPInputError("Support slices were given but no label map to read them from.")
        return sorted({int(k) for k in support_slices})
    if lab is None:
        return []
    drawn = np.isin(lab, list(structures)).reshape(n, -1).any(axis=1)
    return [int(k) for k in np.flatnonzero(drawn)]


def _support_key(image: np.ndarray, mask: np.ndarray) -> str:
    h = hashlib.sha1(np.ascontiguousarray(image).view(np.uint8))
    h.update(np.packbits(mask).tobytes())
    h.update(f"{image.shape}|{mask.shape}".encode())
    return h.hexdigest()


def _volume_key(slices01: np.ndarray, image_size: int, model: SGPModel,
                dtype: torch.dtype | None) -> str:
    h = hashlib.sha1(np.ascontiguousarray(slices01).view(np.uint8))
    h.update(f"{slices01.shape}|{image_size}|{id(model)}|{dtype}".encode())
    return h.hexdigest()


def _feature_dtype(name: str) -> torch.dtype | None:
    """Storage dtype of cached slice features. 'auto' stores bf16 (half the memory of float32;
    SAM2 itself runs its features in bf16 on GPUs); 'float32' keeps them exact, which the
    equality with SAM2's video predictor is proven at."""
    if name in ("auto", "bfloat16", "bf16"):
        return torch.bfloat16
    if name in ("float32", "fp32"):
        return torch.float32
    raise SGPInputError(f"Unknown feature dtype {name!r}: use auto, float32 or bfloat16.")


def _autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    if dtype in ("float32", "fp32"):
        return None
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if dtype != "auto":
        raise SGPInputError(f"Unknown dtype {dtype!r}: use auto, float32 or bfloat16.")
    return torch.bfloat16 if device.type == "cuda" else None


__all__ = ["EncodedSlices", "Memory", "Segmenter", "label_map_from_probabilities", "resolve_device"]
