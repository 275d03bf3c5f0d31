"""SAM2.1 checkpoints: download and import into the cache, ``--weights`` resolution, loading.

Builds on ``SlicerSGP.weights_registry`` (the registry, the cache folder, file checks) and
re-exports its public names, so ``from SlicerSGP import weights`` is the one entry point the
command line (``sgp weights``) and the Slicer module share. Never imports argparse.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from SlicerSGP.errors import SGPError, SGPWeightsError
from SlicerSGP.filesystem import atomic_write, copy_hashing
from SlicerSGP.weights_registry import (
    ALIASES,
    HASH_CHUNK,
    MODEL_NAMES,
    REGISTRY,
    URL_BASE,
    CheckpointInfo,
    cache_dir,
    cache_status,
    cached_checkpoint_path,
    check_note,
    file_sha256,
    format_mb,
    hash_message,
    is_model_name,
    is_valid_checkpoint,
    registry_entry_by_size,
    resolve_model_name,
    size_message,
    verify_checkpoint,
    write_sidecar,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALIASES",
    "MODEL_NAMES",
    "REGISTRY",
    "URL_BASE",
    "CheckpointInfo",
    "DownloadProgress",
    "ResolvedWeights",
    "cache_dir",
    "cache_status",
    "cached_checkpoint_path",
    "check_note",
    "download_checkpoint",
    "fetch_hint",
    "file_sha256",
    "import_checkpoint",
    "is_model_name",
    "is_valid_checkpoint",
    "load_sam2_state_dict",
    "resolve_model_name",
    "resolve_weights",
    "verify_checkpoint",
    "verify_file",
]

DownloadProgress = Callable[[int, int], None]
"""Called as ``progress_callback(done_bytes, total_bytes)`` after each chunk."""


# ---------------------------------------------------------------------------- download / import


def _offline_hint(info: CheckpointInfo, url: str) -> str:
    host = urllib.parse.urlparse(url).netloc or url
    return (
        f"This machine may be offline or unable to reach {host}. On a machine with internet "
        f"access download {url} ({format_mb(info.size)}), copy it here, and then either run "
        f"`sgp weights fetch {info.name} --file /path/to/{info.filename}` (checks it and copies "
        f"it into {cache_dir()}) or pass it directly with `--weights /path/to/{info.filename}`."
    )


class _NoBar(contextlib.AbstractContextManager):
    def update(self, n: int) -> None:
        pass

    def __exit__(self, *exc) -> None:
        return None


def _progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm byte bar, imported only when shown (Slicer ships no tqdm and reads the registry)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)


def _install(
    open_source: Callable[[], tuple[BinaryIO, int]],
    target: Path,
    info: CheckpointInfo,
    *,
    source: str,
    action: str,
    hint: str,
    progress: bool,
    progress_callback: DownloadProgress | None,
    chunk: int,
) -> Path:
    """Stream a source into a temporary beside ``target`` while hashing, check it, then
    rename it into place (:func:`~SlicerSGP.filesystem.atomic_write`)."""
    digest = ""

    def write(part: Path) -> None:
        nonlocal digest
        reader, total = open_source()
        shown = 0
        with (
            contextlib.closing(reader),
            open(part, "wb") as out,
            _progress_bar(total, info.filename, progress) as bar,
        ):

            def on_block(done: int) -> None:
                nonlocal shown
                if done > info.size:
                    # Stop early rather than fetch gigabytes of the wrong thing.
                    raise SGPWeightsError(
                        f"{action} {source} gave more than the expected {info.size:,} bytes "
                        f"of {info.filename}; it is not the official file. {hint}".strip()
                    )
                bar.update(done - shown)
                shown = done
                if progress_callback is not None:
                    progress_callback(done, total)

            digest, done = copy_hashing(reader, out, chunk=chunk, on_block=on_block)
            out.flush()
            os.fsync(out.fileno())
        if done != info.size:
            raise SGPWeightsError(
                f"{action} {source} stopped after {done:,} of {info.size:,} bytes of "
                f"{info.filename} (truncated). {hint}".strip()
            )
        if info.sha256 is not None and digest != info.sha256:
            raise SGPWeightsError(f"{hash_message(source, info, digest)} {hint}".strip())

    try:
        atomic_write(target, write)
    except SGPError:
        raise
    except Exception as exc:
        raise SGPWeightsError(
            f"{action} {source} failed ({type(exc).__name__}: {exc}). {hint}".strip()
        ) from exc
    write_sidecar(target, digest)
    return target


def download_checkpoint(
    info: CheckpointInfo,
    dest_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    force: bool = False,
    url: str | None = None,
    chunk: int = HASH_CHUNK,
    progress_callback: DownloadProgress | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``info`` into ``dest_dir`` (default: the cache) and return the verified path.

    A valid file already there is kept unless ``force``; an invalid one is replaced. ``url``
    overrides ``info.url`` (``file://`` works). Nothing is left behind on failure.
    """
    target = (
        Path(dest_dir) / info.filename if dest_dir is not None else cached_checkpoint_path(info)
    )
    if not force and target.exists() and is_valid_checkpoint(target, info):
        return target
    src = url or info.url

    def open_source() -> tuple[BinaryIO, int]:
        request = urllib.request.Request(src, headers={"User-Agent": "SlicerSGP"})
        response = urllib.request.urlopen(request, timeout=timeout)
        length = response.headers.get("Content-Length")
        return response, int(length) if length else info.size

    return _install(
        open_source,
        target,
        info,
        source=src,
        action="Downloading",
        hint=_offline_hint(info, src),
        progress=progress,
        progress_callback=progress_callback,
        chunk=chunk,
    )


def import_checkpoint(
    src: str | os.PathLike[str],
    info: CheckpointInfo,
    dest_dir: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    progress_callback: DownloadProgress | None = None,
    chunk: int = HASH_CHUNK,
) -> Path:
    """Check a local copy of an official checkpoint and copy it into ``dest_dir`` (the cache)."""
    src = Path(src).expanduser()
    target = (
        Path(dest_dir) / info.filename if dest_dir is not None else cached_checkpoint_path(info)
    )
    if not src.is_file():
        raise SGPWeightsError(f"{src} does not exist or is not a file.")
    if src.stat().st_size != info.size:
        raise SGPWeightsError(size_message(src, info, src.stat().st_size))
    if target.exists() and os.path.samefile(src, target):
        verify_checkpoint(target, info)
        return target
    if not force and target.exists() and is_valid_checkpoint(target, info):
        return target

    def open_source() -> tuple[BinaryIO, int]:
        return open(src, "rb"), info.size

    return _install(
        open_source,
        target,
        info,
        source=str(src),
        action="Copying",
        hint="",
        progress=progress,
        progress_callback=progress_callback,
        chunk=chunk,
    )


# ---------------------------------------------------------------------------- resolve / load


@dataclass(frozen=True)
class ResolvedWeights:
    """What to build: the SAM2 config, the checkpoint (None = random init) and a description."""

    config: str
    checkpoint: Path | None
    description: str
    model: str = ""


def fetch_hint(info: CheckpointInfo) -> str:
    return (
        f"Run `sgp weights fetch {info.name}` to download it ({format_mb(info.size)} from {info.url}). "
        f"Offline: download it elsewhere, then run `sgp weights fetch {info.name} --file "
        f"/path/to/{info.filename}` or pass `--weights /path/to/{info.filename}`; "
        "`--weights random` runs without pretrained weights."
    )


def resolve_weights(model: str, weights: str | os.PathLike[str] | None) -> ResolvedWeights:
    """Turn ``--model``/``--weights`` into a config and a checked checkpoint path.

    ``weights``: "random" (no file); None, "auto" or "pretrained" (the cached registry file of
    ``model``); a registry name (must be ``model``'s); or a path to a ``.pt`` file.
    """
    info = resolve_model_name(model)
    spec = None if weights is None else os.fspath(weights)
    key = None if spec is None else spec.strip().lower()

    if key == "random":
        return ResolvedWeights(
            info.config, None, f"random initialisation (SAM2.1 {info.name} architecture)", info.name
        )

    if key in (None, "", "auto", "pretrained") or (
        is_model_name(spec) and not Path(spec).expanduser().is_file()
    ):
        if key not in (None, "", "auto", "pretrained"):
            named = resolve_model_name(spec)
            if named.name != info.name:
                raise SGPWeightsError(
                    f"--weights {spec} is the SAM2.1 {named.name} checkpoint but --model is "
                    f"{info.name}; use `--model {named.name}` to run it."
                )
        path = cached_checkpoint_path(info)
        if not path.is_file():
            raise SGPWeightsError(
                f"The pretrained SAM2.1 {info.name} checkpoint is not in the cache "
                f"({path}). {fetch_hint(info)}"
            )
        verify_checkpoint(path, info)
        return ResolvedWeights(
            info.config, path, f"pretrained SAM2.1 {info.name} ({check_note(info)})", info.name
        )

    path = Path(spec).expanduser()
    if not path.exists():
        raise SGPWeightsError(
            f"Checkpoint file {path} does not exist. Give the path to a .pt file, a model name "
            f"({', '.join(MODEL_NAMES)}), 'pretrained' or 'random'."
        )
    if not path.is_file():
        raise SGPWeightsError(f"{path} is not a file; --weights needs a .pt checkpoint file.")
    official = registry_entry_by_size(path.stat().st_size)
    if official is not None:
        if official.name != info.name:
            raise SGPWeightsError(
                f"{path} has the size of the SAM2.1 {official.name} checkpoint but --model is "
                f"{info.name}; use `--model {official.name}` or choose the right file."
            )
        verify_checkpoint(path, info)
        return ResolvedWeights(
            info.config, path, f"SAM2.1 {info.name} from {path} ({check_note(info)})", info.name
        )
    # Not an official file (e.g. fine-tuned): at least make sure torch can read it; mmap keeps
    # this cheap, and the strict load in build_sam2 checks that it fits the config.
    load_sam2_state_dict(path, mmap=True)
    return ResolvedWeights(
        info.config,
        path,
        f"custom checkpoint {path} (not an official file; built as SAM2.1 {info.name})",
        info.name,
    )


def load_sam2_state_dict(
    path: str | os.PathLike[str], *, mmap: bool = False
) -> dict[str, torch.Tensor]:
    """Load a SAM2 state dict (``{"model": sd}`` or a bare ``sd``) safely (weights_only=True)."""
    import torch  # here so that `sgp weights list/fetch` starts without importing torch

    path = Path(path)
    if not path.is_file():
        raise SGPWeightsError(f"Checkpoint file {path} does not exist.")
    size = path.stat().st_size
    is_zip = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except Exception as exc:
        text = str(exc)
        if is_zip and "Unsupported global" in text:
            raise SGPWeightsError(
                f"{path} holds Python objects besides tensors, and is not loaded because "
                "unpickling them could run arbitrary code (torch.load weights_only=True). "
                "Re-save only the tensors: torch.save({'model': model.state_dict()}, path)."
            ) from exc
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise SGPWeightsError(
            f"{path} ({size:,} bytes) is not a readable PyTorch checkpoint "
            f"({type(exc).__name__}: {first[:200]}). It may be truncated or a different kind "
            "of file: download it again (`sgp weights fetch NAME --force`) or choose the "
            "right file."
        ) from exc
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state:
        raise SGPWeightsError(
            f"{path} does not hold a SAM2 state dict (expected {{'model': state_dict}} or a "
            f"state dict, got {type(state).__name__})."
        )
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise SGPWeightsError(
                f"{path} does not hold a SAM2 state dict: entry {k!r} is a "
                f"{type(v).__name__}, not a tensor."
            )
    return dict(state)


def verify_file(path: Path) -> str:
    """Check one file (an official checkpoint by name or size, else any readable state dict);
    return a one-line verdict or raise SGPWeightsError."""
    if not path.is_file():
        raise SGPWeightsError(f"{path} does not exist or is not a file.")
    info = next((i for i in REGISTRY.values() if i.filename == path.name), None)
    info = info or registry_entry_by_size(path.stat().st_size)
    if info is not None:
        verify_checkpoint(path, info)
        return f"OK: {path} is the SAM2.1 {info.name} checkpoint ({check_note(info)})"
    state = load_sam2_state_dict(path, mmap=True)
    return (
        f"OK: {path} is a readable PyTorch checkpoint with {len(state)} tensors "
        "(not an official file, so there is nothing to compare it with)"
    )
