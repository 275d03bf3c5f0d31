"""FE: slice encoding with SAM2's image encoder (+ LoRA), and the cache of encoded volumes.

A volume's slices are encoded when propagation first needs them (:class:`VolumeFeatures`), so
the cost follows the structure, not the volume: slices past a structure's end or outside the
slice limits are never encoded. Each slice is encoded once; the features of recent volumes are
kept, keyed by content, within a memory budget, so a later run (another structure, a
correction, a wider range) encodes only the slices no run has needed yet.

Slices are encoded in fixed, aligned batches (slice ``i`` always in batch ``i // batch_size``),
whatever order they are asked for in, so a slice's features are bit-identical to encoding the
whole volume first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from SlicerSGP.data import preprocess
from SlicerSGP.errors import Cancelled, SGPInputError
from SlicerSGP.method.runtime import Runtime
from SlicerSGP.types import CancelCheck, ProgressCallback

DEVICE_RESERVE_MB = 2048
"""GPU memory left to the model's own work (activations, memories) when features are placed:
the default device budget is the free memory less this."""
FEATURE_PLACES = ("auto", "device", "host")

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

    def pooled_of(self, i: int) -> torch.Tensor:
        return self.pooled[i]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.s0, self.s1, self.top))


class VolumeFeatures:
    """The features of one volume's slices, each aligned batch encoded the first time a slice
    of it is needed (see the module docstring), then kept.

    Reads like :class:`EncodedSlices` (``top_of``, ``high_res``, ``pooled_of``, ``grid``,
    ``pos``, ``len``); the whole-volume attributes (``pooled``, ``s0``, ``s1``, ``top``) encode
    every slice first.
    """

    def __init__(self, encoder: SliceEncoder, count: int,
                 make_input: Callable[[int, int], torch.Tensor], batch_size: int,
                 key: str = ""):
        rt = encoder.rt
        self._encoder = encoder
        self.key = key
        """The volume's key across processes (:func:`stable_volume_key`: content and
        preprocessing; the disk cache adds the model's fingerprint)."""
        self._make_input = make_input
        self.count = int(count)
        self.batch_size = max(1, int(batch_size))
        self.compute_dtype = rt.compute_dtype
        self.device = rt.device
        self.pos: torch.Tensor | None = None
        self._s0: list[torch.Tensor | None] = [None] * self.count
        self._s1: list[torch.Tensor | None] = [None] * self.count
        self._top: list[torch.Tensor | None] = [None] * self.count
        self._pooled: list[torch.Tensor | None] = [None] * self.count
        self.stop: CancelCheck | None = None
        """Checked before each batch is encoded (the run's cancel check while one runs)."""
        self.on_host: bool | None = None
        """Features kept in host memory, a batch at a time on the device (decided when the
        first batch is encoded, from the device budget)."""
        self._window: tuple[int, list[list[torch.Tensor]]] | None = None
        """With features on the host: the device copy of the batch being read."""

    def __len__(self) -> int:
        return self.count

    @property
    def grid(self) -> int:
        return int(self._encoder.rt.sam.sam_image_embedding_size)

    # ------------------------------------------------------------------ encoding on demand

    def is_encoded(self, i: int) -> bool:
        return self._top[i] is not None

    def encoded_slices(self) -> list[int]:
        return [i for i in range(self.count) if self._top[i] is not None]

    def ensure(self, indices: Iterable[int], progress: Callable[[float], None] | None = None,
               stop: CancelCheck | None = None) -> None:
        """Encode the batches holding ``indices`` that are not encoded yet."""
        starts = sorted({(int(i) // self.batch_size) * self.batch_size for i in indices
                         if self._top[int(i)] is None})
        for done, start in enumerate(starts):
            self._encode_batch(start, stop or self.stop)
            if progress is not None:
                progress((done + 1) / len(starts))

    def _encode_batch(self, start: int, stop: CancelCheck | None) -> None:
        end = min(self.count, start + self.batch_size)
        if stop is not None and stop():
            raise Cancelled("Cancelled while encoding slices; nothing was written.")
        disk = self._encoder.disk
        batch = disk.load(self.key, start, end) if disk is not None else None
        if batch is None:
            batch = self._encoder.encode_images(self._make_input(start, end), end - start)
            if disk is not None:
                disk.save(self.key, start, end, batch)
        if self.on_host is None:
            self.on_host = self._encoder.keep_on_host(batch.nbytes() * self.count // (end - start))
        if self.on_host:
            batch = _to_host(batch)
        for k, i in enumerate(range(start, end)):
            self._s0[i], self._s1[i] = batch.s0[k:k + 1], batch.s1[k:k + 1]
            self._top[i], self._pooled[i] = batch.top[k:k + 1], batch.pooled[k]
        if self.pos is None:
            self.pos = batch.pos.to(self.device)
        self._encoder._trim()
        self._encoder.note_device_bytes()

    # ------------------------------------------------------------------ reading

    def _on_device(self, i: int) -> list[torch.Tensor]:
        """[s0, s1, top] of slice ``i`` on the compute device."""
        self.ensure((i,))
        if not self.on_host:
            return [self._s0[i], self._s1[i], self._top[i]]
        start = (i // self.batch_size) * self.batch_size
        if self._window is None or self._window[0] != start:
            # The whole batch at once, ahead of the sweep (one transfer per batch).
            self._window = None
            end = min(self.count, start + self.batch_size)
            self._window = (start, [[t.to(self.device, non_blocking=True)
                                     for t in (self._s0[k], self._s1[k], self._top[k])]
                                    for k in range(start, end)])
            self._encoder.note_device_bytes()
        return self._window[1][i - start]

    def top_of(self, i: int) -> torch.Tensor:
        return self._on_device(i)[2].to(self.compute_dtype)

    def high_res(self, i: int) -> list[torch.Tensor]:
        s0, s1, _ = self._on_device(i)
        return [s0.to(self.compute_dtype), s1.to(self.compute_dtype)]

    def device_bytes(self) -> int:
        """Feature bytes this volume holds on the device (the batch window when on the host)."""
        if not self.on_host:
            return self.nbytes()
        if self._window is None:
            return 0
        return sum(t.numel() * t.element_size() for ts in self._window[1] for t in ts)

    def release_window(self) -> None:
        self._window = None

    def pooled_of(self, i: int) -> torch.Tensor:
        self.ensure((i,))
        return self._pooled[i]

    def _all(self, parts: list[torch.Tensor | None]) -> torch.Tensor:
        self.ensure(range(self.count))
        return torch.cat(parts) if parts[0].dim() == 4 else torch.stack(parts)

    @property
    def pooled(self) -> torch.Tensor:
        return self._all(self._pooled)

    @property
    def s0(self) -> torch.Tensor:
        return self._all(self._s0)

    @property
    def s1(self) -> torch.Tensor:
        return self._all(self._s1)

    @property
    def top(self) -> torch.Tensor:
        return self._all(self._top)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in (self._s0, self._s1, self._top)
                   for t in parts if t is not None)


class SliceEncoder:
    """Runs the image encoder in batches and keeps recent volumes' features (LRU, bounded)."""

    def __init__(self, runtime: Runtime, cache_mb: float | None = None,
                 features_on: str = "auto", device_budget_mb: float | None = None):
        if features_on not in FEATURE_PLACES:
            raise SGPInputError(f"Unknown feature placement {features_on!r}: use "
                                + ", ".join(FEATURE_PLACES) + ".")
        if device_budget_mb is not None and device_budget_mb < 0:
            raise SGPInputError("The device budget must be 0 MB or more.")
        self.rt = runtime
        self.cache_bytes = int((DEFAULT_CACHE_MB if cache_mb is None else cache_mb) * 2**20)
        self.features_on = features_on
        self.device_budget_mb = device_budget_mb
        self.peak_device_bytes = 0
        """Most feature bytes held on the device at once (the model's weights not included)."""
        self._volumes: OrderedDict[str, VolumeFeatures] = OrderedDict()
        self.encode_count = 0
        """Slices run through the image encoder since this encoder was made."""
        self.disk = None
        """Features on disk (``load(key, start, stop)`` / ``save(key, start, stop, batch)``),
        or None."""

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

    def volume(self, slices01: np.ndarray, transform: preprocess.LetterboxTransform,
               batch_size: int) -> VolumeFeatures:
        """The features of ``slices01`` (N, H, W[, 3] in [0, 1]), cached by content: slices
        are encoded when first read (a cached volume keeps those encoded by earlier runs)."""
        content = content_key(slices01)
        key = _volume_key(slices01, self.rt, content)
        feats = self._volumes.pop(key, None)
        if feats is None:
            feats = VolumeFeatures(
                self, len(slices01),
                lambda a, b: preprocess.to_model_input(slices01[a:b], transform), batch_size,
                stable_volume_key(slices01, self.rt, batch_size, content))
        self._volumes[key] = feats  # most recently used last
        self._trim()
        return feats

    def encode_volume(self, slices01: np.ndarray, transform: preprocess.LetterboxTransform,
                      batch_size: int, report: ProgressCallback,
                      stop: CancelCheck) -> VolumeFeatures:
        """Features of every slice of ``slices01``, all encoded now (cached by content)."""
        feats = self.volume(slices01, transform, batch_size)
        feats.ensure(range(len(feats)), lambda f: report("encode", f), stop)
        report("encode", 1.0)
        return feats

    def device_budget_bytes(self) -> int | None:
        """Bytes of features the device may hold: the option, else on CUDA its free memory
        less :data:`DEVICE_RESERVE_MB`; None (no limit) on a CPU or an Apple GPU (unified
        memory: host and device are the same RAM)."""
        if self.device_budget_mb is not None:
            return int(self.device_budget_mb * 2**20)
        if self.rt.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.rt.device)
        return max(0, int(free) - DEVICE_RESERVE_MB * 2**20 + self.device_bytes())

    def keep_on_host(self, volume_bytes: int) -> bool:
        """Where a new volume's features go (see ``features_on``)."""
        if self.features_on != "auto":
            return self.features_on == "host"
        budget = self.device_budget_bytes()
        return budget is not None and self.device_bytes() + volume_bytes > budget

    def device_bytes(self) -> int:
        return sum(f.device_bytes() for f in self._volumes.values())

    def note_device_bytes(self) -> None:
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes())

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


def _to_host(batch: EncodedSlices) -> EncodedSlices:
    """A batch's features in host memory (pinned on a CUDA machine, for fast copies back)."""
    pin = torch.cuda.is_available()

    def host(t: torch.Tensor) -> torch.Tensor:
        t = t.to("cpu")
        return t.pin_memory() if pin else t

    return EncodedSlices(host(batch.s0), host(batch.s1), host(batch.top), batch.pos,
                         batch.pooled, compute_dtype=batch.compute_dtype)


def _volume_key(slices01: np.ndarray, rt: Runtime, content: str | None = None) -> str:
    """The in-memory cache's key: content, preprocessing and this process's model object."""
    h = hashlib.sha1((content or content_key(slices01)).encode())
    h.update(f"{slices01.shape}|{rt.image_size}|{id(rt.model)}|{rt.autocast_dtype}".encode())
    h.update(f"|{rt.feature_dtype}".encode())
    return h.hexdigest()


def stable_volume_key(slices01: np.ndarray, rt: Runtime, batch_size: int,
                      content: str | None = None) -> str:
    """A volume's key that holds across processes (the disk cache's): the content of the
    normalized slices with their shape and dtype, image size, autocast and feature dtypes and
    the batch alignment. The model's identity is not in it: the disk cache adds its
    fingerprint of the weights (``id(rt.model)`` means nothing in another process)."""
    h = hashlib.sha256((content or content_key(slices01)).encode())
    h.update(f"|{rt.image_size}|{rt.autocast_dtype}|{rt.feature_dtype}".encode())
    h.update(f"|batch {max(1, int(batch_size))}".encode())
    return h.hexdigest()


def content_key(*arrays: Any) -> str:
    """A content hash of numpy arrays (shape and dtype included)."""
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}|{a.dtype}|".encode())
        h.update(a.view(np.uint8))
    return h.hexdigest()
