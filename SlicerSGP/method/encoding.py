"""FE: slice encoding with SAM2's image encoder (+ LoRA), and the cache of encoded volumes.

Every slice of a volume is encoded once per run; the features of recent volumes are kept, keyed
by content, within a memory budget, so a re-run after a correction (or for another structure)
skips the encoder entirely.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from SlicerSGP.data import preprocess
from SlicerSGP.errors import Cancelled
from SlicerSGP.method.runtime import Runtime
from SlicerSGP.types import CancelCheck, ProgressCallback

DEFAULT_CACHE_MB = 2048
"""Budget for cached volume features when none is given (a 200-slice volume at 512 px in bf16
is about 0.2 GB; at 1024 px about 0.8 GB)."""


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


class SliceEncoder:
    """Runs the image encoder in batches and keeps recent volumes' features (LRU, bounded)."""

    def __init__(self, runtime: Runtime, cache_mb: float | None = None):
        self.rt = runtime
        self.cache_bytes = int((DEFAULT_CACHE_MB if cache_mb is None else cache_mb) * 2**20)
        self._volumes: OrderedDict[str, EncodedSlices] = OrderedDict()
        self.encode_count = 0
        """Slices run through the image encoder since this encoder was made."""

    def encode_images(self, images: torch.Tensor | Callable[[int, int], torch.Tensor],
                      batch_size: int = 4, progress: Callable[[float], None] | None = None,
                      cancel: CancelCheck | None = None, grad: bool = False,
                      count: int | None = None) -> EncodedSlices:
        """Run the image encoder over model-ready images (N, 3, S, S), in batches.

        ``images`` may also be a function ``(start, stop) -> tensor`` with ``count`` slices, so
        a whole volume's model input never has to exist at once.
        """
        rt = self.rt
        sam = rt.sam
        parts: dict[str, list[torch.Tensor]] = {"s0": [], "s1": [], "top": []}
        pooled: list[torch.Tensor] = []
        pos = None
        n = images.shape[0] if count is None else count
        store = rt.feature_dtype or rt.compute_dtype
        with rt.mode(grad), rt.autocast():
            for start in range(0, n, batch_size):
                if cancel is not None and cancel():
                    raise Cancelled("Cancelled while encoding slices; nothing was written.")
                stop = min(n, start + batch_size)
                batch = images[start:stop] if count is None else images(start, stop)
                with rt.timed("encode"):
                    out = sam.forward_image(batch.to(rt.device, non_blocking=True).float())
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
        return EncodedSlices(torch.cat(parts["s0"]), torch.cat(parts["s1"]),
                             torch.cat(parts["top"]), pos, torch.cat(pooled),
                             compute_dtype=torch.float32 if grad else rt.compute_dtype)

    def encode_volume(self, slices01: np.ndarray, transform: preprocess.LetterboxTransform,
                      batch_size: int, report: ProgressCallback,
                      stop: CancelCheck) -> EncodedSlices:
        """Features of every slice of ``slices01`` (N, H, W[, 3] in [0, 1]), cached by content."""
        key = _volume_key(slices01, self.rt)
        cached = self._volumes.pop(key, None)
        if cached is not None:
            self._volumes[key] = cached  # most recently used last
            self._trim()
            report("encode", 1.0)
            return cached
        feats = self.encode_images(
            lambda a, b: preprocess.to_model_input(slices01[a:b], transform), batch_size,
            lambda f: report("encode", f), stop, count=len(slices01))
        self._remember(key, feats)
        return feats

    def _remember(self, key: str, feats: EncodedSlices) -> None:
        self._volumes[key] = feats
        self._trim()

    def _trim(self) -> None:
        # Drop the least recently used volumes beyond the budget; the newest is always kept.
        while len(self._volumes) > 1 and self.cached_bytes() > self.cache_bytes:
            self._volumes.popitem(last=False)

    def cached_bytes(self) -> int:
        return sum(f.nbytes() for f in self._volumes.values())

    def cached_volumes(self) -> int:
        return len(self._volumes)

    def clear(self) -> None:
        self._volumes.clear()


def _volume_key(slices01: np.ndarray, rt: Runtime) -> str:
    h = hashlib.sha1(np.ascontiguousarray(slices01).view(np.uint8))
    h.update(f"{slices01.shape}|{rt.image_size}|{id(rt.model)}|{rt.autocast_dtype}".encode())
    h.update(f"|{rt.feature_dtype}".encode())
    return h.hexdigest()


def content_key(*arrays: Any) -> str:
    """A content hash of numpy arrays (shape and dtype included)."""
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}|{a.dtype}|".encode())
        h.update(a.view(np.uint8))
    return h.hexdigest()
