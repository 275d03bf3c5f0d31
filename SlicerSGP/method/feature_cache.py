"""Slice features on disk: a volume opened again later (by a new :class:`Segmenter`, another
``sgp segment`` process, a restarted ``sgp serve``) loads its encoded slices instead of running
the image encoder again.

It is the ``disk`` of a :class:`~SlicerSGP.method.encoding.SliceEncoder`: each aligned batch
of a volume's slices is one file, saved once it is encoded and loaded the next time that batch
is needed. A loaded batch is bit-identical to the encoded one (features are stored in their
storage dtype), so a run on loaded features equals the run that encoded them.

What a file may be used for is decided by its key, never by its name alone:

* the volume's key (:func:`~SlicerSGP.method.encoding.stable_volume_key`: the content of the
  normalized slices, their shape and dtype, image size, autocast and feature dtypes, batch
  size and alignment);
* the model's fingerprint: a hash of every parameter and buffer the image features depend on
  (image encoder with its LoRA adapters, the decoder's high-resolution projections), the
  model's configuration and structure, the versions of SlicerSGP, torch and sam2, and the
  device type. Weights changed in place (fine-tuning) change it, so old features are never
  used for new weights (:meth:`FeatureCache.refresh`, called by ``Segmenter.clear_cache``,
  recomputes it).

Files are safetensors (loading runs no code), written under a temporary name and renamed into
place (``os.replace``), so no partial file is ever visible under a final name. A file that
does not load, or whose metadata names another key, or whose tensors have other names, shapes
or dtypes than this model makes, or whose data does not match the digest it was written with,
is ignored (the batch is encoded again and the file rewritten). Over the size cap the least
recently used batches (loading one counts as a use) are deleted first.

Layout: ``DIR/sgp-features-v1/<model>/pos.safetensors`` (the position encoding, the same for
every slice of every volume) and ``DIR/sgp-features-v1/<model>/<volume>/<start>-<end>.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from SlicerSGP.errors import SGPInputError
from SlicerSGP.filesystem import atomic_write_bytes, is_temp_name
from SlicerSGP.method.encoding import EncodedSlices
from SlicerSGP.method.feature_identity import FORMAT, model_fingerprint
from SlicerSGP.method.feature_identity import tensor_digest as _digest
from SlicerSGP.method.runtime import Runtime

DEFAULT_FEATURE_CACHE_MB = 4096
"""Disk space for features when no cap is given (a 200-slice volume at 1024 px in bf16 takes
about 1.6 GB; at 512 px about 0.4 GB)."""

SUFFIX = ".safetensors"
POS_NAME = f"pos{SUFFIX}"
NAMES = ("s0", "s1", "top", "pooled")
STALE_TEMP_S = 3600.0
"""A temporary file older than this was left by a process that died while writing: removed."""
MAX_HEADER = 1 << 20

log = logging.getLogger(__name__)


class FeatureCache:
    """Encoded slice batches in a folder, keyed by volume and model, bounded by ``max_mb``."""

    def __init__(self, folder: str | os.PathLike, runtime: Runtime,
                 max_mb: float | None = None):
        self.folder = Path(folder).expanduser()
        self.rt = runtime
        self.root, self.max_bytes = prepare_folder(self.folder, max_mb)
        self.loaded_batches = 0
        """Batches read from disk instead of encoded, since this cache was made."""
        self.loaded_slices = 0
        self.saved_batches = 0
        self.rejected_files = 0
        """Files found under a batch's name but not used (damaged, foreign, other shapes)."""
        self._model_key: str | None = None
        self._pos: torch.Tensor | None = None
        self._pos_on_disk = False
        self._bytes: int | None = None  # estimate of what the folder holds; None: scan
        self._warned = False

    # ------------------------------------------------------------------ keys

    @property
    def model_key(self) -> str:
        """The model's fingerprint (computed on first use: hashing the weights takes ~0.3 s
        for the tiny model, a few seconds for the large one)."""
        if self._model_key is None:
            self._model_key = model_fingerprint(self.rt)
        return self._model_key

    def refresh(self) -> None:
        """Compute the model's fingerprint again (after its weights changed in place)."""
        self._model_key = None
        self._pos = None
        self._pos_on_disk = False

    def _model_dir(self) -> Path:
        return self.root / self.model_key[:32]

    def batch_path(self, key: str, start: int, end: int) -> Path:
        """The file of slices ``start..end-1`` of the volume ``key``."""
        return self._model_dir() / _safe(key)[:40] / f"{start:05d}-{end:05d}{SUFFIX}"

    def _pos_path(self) -> Path:
        return self._model_dir() / POS_NAME

    # ------------------------------------------------------------------ the encoder's hook

    def load(self, key: str, start: int, end: int) -> EncodedSlices | None:
        """The batch ``start..end-1`` of volume ``key`` if a valid file holds it, else None."""
        path = self.batch_path(key, start, end)
        if not path.is_file():
            return None
        meta = {"kind": "batch", "model": self.model_key, "volume": key,
                "start": str(start), "end": str(end)}
        tensors = self._read(path, meta, self._expected(end - start))
        if tensors is None:
            return None
        pos = self._load_pos()
        if pos is None:
            return None
        dev = self.rt.device
        self.loaded_batches += 1
        self.loaded_slices += end - start
        return EncodedSlices(*(tensors[n].to(dev) for n in ("s0", "s1", "top")), pos.to(dev),
                             tensors["pooled"].to(dev), compute_dtype=self.rt.compute_dtype)

    def save(self, key: str, start: int, end: int, batch: EncodedSlices) -> None:
        """Write a just-encoded batch (a failure to write is logged, never fails the run)."""
        try:
            if not self._pos_on_disk:
                self._write(self._pos_path(), {"pos": batch.pos[:1]}, {"kind": "pos"})
                self._pos_on_disk = True
            self._write(self.batch_path(key, start, end),
                        {n: getattr(batch, n) for n in NAMES},
                        {"kind": "batch", "volume": key, "start": str(start), "end": str(end)})
            self.saved_batches += 1
            self.trim()
        except OSError as exc:
            if not self._warned:
                log.warning("Slice features not saved in %s (%s); runs go on, encoding as "
                            "usual.", self.root, exc.strerror or exc)
                self._warned = True

    # ------------------------------------------------------------------ files

    def _expected(self, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Names, shapes and dtypes of a batch of ``n`` slices as this model encodes them."""
        sam = self.rt.sam
        g, c = int(sam.sam_image_embedding_size), int(sam.hidden_dim)
        if getattr(sam, "use_high_res_features_in_sam", False):
            c0 = int(sam.sam_mask_decoder.conv_s0.out_channels)
            c1 = int(sam.sam_mask_decoder.conv_s1.out_channels)
        else:
            c0 = c1 = c
        store = self.rt.feature_dtype or self.rt.compute_dtype
        return {"s0": ((n, c0, 4 * g, 4 * g), store), "s1": ((n, c1, 2 * g, 2 * g), store),
                "top": ((n, c, g, g), store), "pooled": ((n, c), torch.float32)}

    def _load_pos(self) -> torch.Tensor | None:
        if self._pos is None:
            sam = self.rt.sam
            g, c = int(sam.sam_image_embedding_size), int(sam.hidden_dim)
            found = self._read(self._pos_path(), {"kind": "pos", "model": self.model_key},
                               {"pos": ((1, c, g, g), None)})
            if found is None:
                self._pos_on_disk = False
                return None
            self._pos, self._pos_on_disk = found["pos"], True
        else:
            _touch(self._pos_path())
        return self._pos

    def _read(self, path: Path, meta: dict[str, str],
              expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]]
              ) -> dict[str, torch.Tensor] | None:
        """The tensors of ``path`` if it is exactly what ``meta`` and ``expected`` say, else
        None (and the file is counted as rejected)."""
        try:
            data = path.read_bytes()
        except OSError:
            return None  # gone meanwhile (another process trimmed it), or unreadable
        problem = _check(data, {"format": FORMAT, **meta}, expected)
        if isinstance(problem, str):
            self.rejected_files += 1
            log.info("Ignoring feature file %s: %s; it is encoded and written again.", path,
                     problem)
            return None
        _touch(path)
        return problem

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        from safetensors.torch import save

        # Stored row-major, with each tensor's memory layout in the metadata: the encoder
        # makes some channels-last, and kernels given another layout round differently.
        channels_last = ",".join(n for n, t in tensors.items() if _is_channels_last(t))
        cpu = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
        meta = {"format": FORMAT, "model": self.model_key, **meta,
                "channels_last": channels_last, "digest": _digest(cpu)}
        data = save(cpu, metadata=meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.stat().st_size if path.exists() else 0
        atomic_write_bytes(path, data)
        if self._bytes is not None:
            self._bytes += len(data) - old

    # ------------------------------------------------------------------ size cap

    def files(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every feature file, removing temporaries left by a
        process that died while writing."""
        found, now = [], time.time()
        for path in self.root.rglob("*"):
            try:
                st = path.stat()
            except OSError:
                continue
            if not path.is_file():
                continue
            if is_temp_name(path.name):
                if now - st.st_mtime > STALE_TEMP_S:
                    _unlink(path)
                continue
            found.append((st.st_mtime, st.st_size, path))
        return found

    def usage(self) -> int:
        """Bytes the feature files take now."""
        return sum(size for _, size, _ in self.files())

    def trim(self) -> None:
        """Delete the least recently used batches while the folder holds more than the cap
        (the batch written last is always kept; a model's position encoding goes with its
        last batch)."""
        if self._bytes is not None and self._bytes <= self.max_bytes:
            return
        files = self.files()
        total = sum(size for _, size, _ in files)
        batches = sorted((f for f in files if f[2].name != POS_NAME), key=lambda f: f[0])
        for _, size, path in batches[:-1]:
            if total <= self.max_bytes:
                break
            if _unlink(path):
                total -= size
                _rmdir(path.parent)  # the volume's folder, once empty
        for _, size, path in files:
            # A model none of whose batches is left: its position encoding and folder too.
            if path.name == POS_NAME and not _has_folders(path.parent):
                if _unlink(path):
                    total -= size
                    _rmdir(path.parent)
                    if path.parent == self._model_dir():
                        self._pos_on_disk = False
        self._bytes = total


# --------------------------------------------------------------------------- helpers

def prepare_folder(folder: str | os.PathLike, max_mb: float | None = None) -> tuple[Path, int]:
    """Check the cap and make the cache's folder (before a model loads, so a bad option fails
    at once): its root and the cap in bytes."""
    max_mb = DEFAULT_FEATURE_CACHE_MB if max_mb is None else float(max_mb)
    if not max_mb > 0:  # also NaN
        raise SGPInputError(f"--feature-cache-mb {max_mb:g}: give the disk space for slice "
                            "features in MB, a positive number (default "
                            f"{DEFAULT_FEATURE_CACHE_MB}).")
    folder = Path(folder).expanduser()
    root = folder / FORMAT
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise SGPInputError(f"--feature-cache {folder}: {probe} is a file, not a folder. Give "
                            "a folder (it is created if missing), or leave the option out.")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SGPInputError(f"--feature-cache {folder}: cannot create {root} "
                            f"({exc.strerror or exc}). Give a folder you can write to, or "
                            "leave the option out.") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise SGPInputError(f"--feature-cache {folder}: {root} is not writable. Give a folder "
                            "you can write to (or fix its permissions), or leave the option "
                            "out.")
    return root, int(max_mb * 2**20)


def _check(data: bytes, meta: dict[str, str],
           expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]]
           ) -> dict[str, torch.Tensor] | str:
    """The tensors in ``data`` if it holds exactly ``expected`` with metadata ``meta`` and
    the digest it was written with; otherwise what is wrong."""
    from safetensors.torch import load

    if len(data) < 8:
        return "truncated (no header)"
    size = int.from_bytes(data[:8], "little")
    if size > MAX_HEADER or 8 + size > len(data):
        return "truncated or not a safetensors file (header length)"
    try:
        header = json.loads(data[8:8 + size])
        found = header.get("__metadata__") or {}
    except (ValueError, AttributeError):
        return "damaged header"
    for k, v in meta.items():
        if found.get(k) != v:
            return f"written for another {k} ({str(found.get(k))[:16]!r}, not {v[:16]!r})"
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors' own errors: truncated data, bad offsets
        return f"damaged ({exc})"
    if set(tensors) != set(expected):
        return f"holds {sorted(tensors)}, not {sorted(expected)}"
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
            return (f"{name} is {tuple(t.shape)} {t.dtype}, not {shape} "
                    f"{dtype or 'floating point'}")
        if dtype is None and not t.is_floating_point():
            return f"{name} is {t.dtype}, not floating point"
    if found.get("digest") != _digest(tensors):
        return "damaged data (digest differs)"
    for name in str(found.get("channels_last", "")).split(","):
        if name in tensors and tensors[name].dim() == 4:
            tensors[name] = tensors[name].contiguous(memory_format=torch.channels_last)
    return tensors


def _is_channels_last(t: torch.Tensor) -> bool:
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def _safe(key: str) -> str:
    return "".join(c for c in key if c.isalnum()) or "volume"


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _has_folders(path: Path) -> bool:
    try:
        return any(d.is_dir() for d in path.iterdir())
    except OSError:
        return True  # unreadable or gone: leave it alone


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # not empty (or gone)
        pass


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:
        return False
