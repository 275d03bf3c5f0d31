"""SAM2.1 checkpoints: the registry, the local cache, download, verification and loading.

Also the ``sgp weights list|fetch|verify`` subcommands (``add_weights_subparser``), so that the
command line and the Slicer module share one implementation.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from tqdm import tqdm

from SlicerSGP.errors import SGPError, SGPInputError, SGPWeightsError

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
    "add_weights_subparser",
    "cache_dir",
    "cached_checkpoint_path",
    "cli_fetch",
    "cli_list",
    "cli_verify",
    "download_checkpoint",
    "file_sha256",
    "import_checkpoint",
    "load_sam2_state_dict",
    "resolve_model_name",
    "resolve_weights",
    "verify_checkpoint",
]

URL_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
HASH_CHUNK = 1 << 20
SIDECAR_SUFFIX = ".verified"
PART_SUFFIX = ".part"

DownloadProgress = Callable[[int, int], None]
"""Called as ``progress_callback(done_bytes, total_bytes)`` after each chunk."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One official SAM2.1 checkpoint. ``sha256`` is None where none is published (size only)."""

    name: str
    config: str
    url: str
    size: int
    sha256: str | None
    filename: str


def _entry(name: str, short: str, size: int, sha256: str | None) -> CheckpointInfo:
    filename = f"sam2.1_hiera_{name}.pt"
    return CheckpointInfo(
        name=name,
        config=f"configs/sam2.1/sam2.1_hiera_{short}.yaml",
        url=URL_BASE + filename,
        size=size,
        sha256=sha256,
        filename=filename,
    )


REGISTRY: dict[str, CheckpointInfo] = {
    "tiny": _entry(
        "tiny", "t", 156_008_466, "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69"
    ),
    "small": _entry(
        "small",
        "s",
        184_416_285,
        "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
    ),
    "base_plus": _entry("base_plus", "b+", 323_606_802, None),
    "large": _entry("large", "l", 898_083_611, None),
}
MODEL_NAMES: tuple[str, ...] = tuple(REGISTRY)

_SHORT = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
ALIASES: dict[str, str] = {}
for _name, _short in _SHORT.items():
    for _alias in (_name, _short, f"sam2.1_hiera_{_name}", f"sam2.1_hiera_{_short}"):
        ALIASES[_alias] = _name
ALIASES.update({"base+": "base_plus", "baseplus": "base_plus", "b_plus": "base_plus"})


def _normalise_name(name: str) -> str:
    key = name.strip().lower().replace("\\", "/").rsplit("/", 1)[-1].replace("-", "_")
    for suffix in (".pt", ".yaml"):
        key = key.removesuffix(suffix)
    return key


def resolve_model_name(name: str) -> CheckpointInfo:
    """Registry entry for a model name or alias ("tiny", "t", "b+", "sam2.1_hiera_large", ...)."""
    canonical = ALIASES.get(_normalise_name(str(name)))
    if canonical is None:
        aliases = ", ".join(a for a in ALIASES if a not in REGISTRY)
        raise SGPInputError(
            f"Unknown SAM2 model {name!r}. Valid names: {', '.join(MODEL_NAMES)} "
            f"(aliases: {aliases})."
        )
    # Looked up at call time so that tests (and mirrors) can replace an entry.
    return REGISTRY[canonical]


def _is_model_name(name: str) -> bool:
    return _normalise_name(name) in ALIASES


# ---------------------------------------------------------------------------- cache folder


def cache_dir() -> Path:
    """``$SGP_CACHE_DIR``, else ``$XDG_CACHE_HOME/slicersgp``, else ``~/.cache/slicersgp``."""
    env = os.environ.get("SGP_CACHE_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        # The XDG spec says relative values are invalid and must be ignored.
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
        path = base / "slicersgp"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SGPWeightsError(
            f"Cannot create the weights cache folder {path} ({exc}). "
            "Set SGP_CACHE_DIR to a writable folder."
        ) from exc
    return path


def cached_checkpoint_path(model: str | CheckpointInfo) -> Path:
    """Where the cache keeps a registry checkpoint (the file may not exist)."""
    info = model if isinstance(model, CheckpointInfo) else resolve_model_name(model)
    return cache_dir() / info.filename


# ---------------------------------------------------------------------------- verification


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _write_sidecar(path: Path, digest: str) -> None:
    st = path.stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    # A read-only folder only costs a re-hash next time, so failure to write is not an error.
    with contextlib.suppress(OSError):
        _sidecar(path).write_text(json.dumps(record))


def _read_sidecar(path: Path) -> str | None:
    try:
        record = json.loads(_sidecar(path).read_text())
        st = path.stat()
        if record["size"] == st.st_size and record["mtime_ns"] == st.st_mtime_ns:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def file_sha256(path: str | os.PathLike[str], *, use_cache: bool = True) -> str:
    """sha256 of a file, hashed in 1 MiB chunks; cached in ``<file>.verified`` by size+mtime."""
    path = Path(path)
    if use_cache:
        cached = _read_sidecar(path)
        if cached is not None:
            return cached
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_CHUNK):
            h.update(block)
    digest = h.hexdigest()
    if use_cache:
        _write_sidecar(path, digest)
    return digest


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _size_message(path: Path | str, info: CheckpointInfo, actual: int) -> str:
    msg = (
        f"{path} has {actual:,} bytes, but the SAM2.1 {info.name} checkpoint ({info.filename}) "
        f"has {info.size:,} bytes. "
    )
    if actual < info.size:
        msg += "The file is truncated (an interrupted download?). "
    else:
        msg += "It is not the official file. "
    return msg + (
        f"Run `sgp weights fetch {info.name} --force` to download it again, "
        "or choose the right file."
    )


def _hash_message(path: Path | str, info: CheckpointInfo, actual: str) -> str:
    return (
        f"{path} has sha256 {actual}, but the published sha256 of the SAM2.1 {info.name} "
        f"checkpoint ({info.filename}) is {info.sha256}. The file is corrupt or is not the "
        f"official checkpoint. Run `sgp weights fetch {info.name} --force` to download it "
        "again, or choose the right file."
    )


def verify_checkpoint(path: str | os.PathLike[str], info: CheckpointInfo) -> None:
    """Raise SGPWeightsError unless ``path`` has the size (and sha256, if published) of ``info``.

    Entries without a published sha256 (base_plus, large) are checked by size only.
    """
    path = Path(path)
    if not path.is_file():
        raise SGPWeightsError(
            f"Checkpoint file {path} does not exist. Run `sgp weights fetch {info.name}`."
        )
    actual_size = path.stat().st_size
    if actual_size != info.size:
        raise SGPWeightsError(_size_message(path, info, actual_size))
    if info.sha256 is None:
        return
    digest = file_sha256(path)
    if digest != info.sha256:
        raise SGPWeightsError(_hash_message(path, info, digest))


# ---------------------------------------------------------------------------- download / import


def _offline_hint(info: CheckpointInfo, url: str) -> str:
    host = urllib.parse.urlparse(url).netloc or url
    return (
        f"This machine may be offline or unable to reach {host}. On a machine with internet "
        f"access download {url} ({_mb(info.size)}), copy it here, and then either run "
        f"`sgp weights fetch {info.name} --file /path/to/{info.filename}` (checks it and copies "
        f"it into {cache_dir()}) or pass it directly with `--weights /path/to/{info.filename}`."
    )


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
    """Stream a source into ``target.part`` while hashing, check it, then rename atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + PART_SUFFIX)
    try:
        reader, total = open_source()
        h = hashlib.sha256()
        done = 0
        with (
            contextlib.closing(reader),
            open(part, "wb") as out,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=info.filename,
                disable=not progress,
            ) as bar,
        ):
            while block := reader.read(chunk):
                done += len(block)
                if done > info.size:
                    # Stop early rather than fetch gigabytes of the wrong thing.
                    raise SGPWeightsError(
                        f"{action} {source} gave more than the expected {info.size:,} bytes of "
                        f"{info.filename}; it is not the official file. {hint}".strip()
                    )
                h.update(block)
                out.write(block)
                bar.update(len(block))
                if progress_callback is not None:
                    progress_callback(done, total)
            out.flush()
            os.fsync(out.fileno())
        if done != info.size:
            raise SGPWeightsError(
                f"{action} {source} stopped after {done:,} of {info.size:,} bytes of "
                f"{info.filename} (truncated). {hint}".strip()
            )
        digest = h.hexdigest()
        if info.sha256 is not None and digest != info.sha256:
            raise SGPWeightsError(f"{_hash_message(source, info, digest)} {hint}".strip())
        os.replace(part, target)
    except SGPError:
        raise
    except Exception as exc:
        raise SGPWeightsError(
            f"{action} {source} failed ({type(exc).__name__}: {exc}). {hint}".strip()
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
    _write_sidecar(target, digest)
    return target


def _existing_ok(target: Path, info: CheckpointInfo) -> bool:
    try:
        verify_checkpoint(target, info)
    except SGPWeightsError:
        return False
    return True


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
    if not force and target.exists() and _existing_ok(target, info):
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
        raise SGPWeightsError(_size_message(src, info, src.stat().st_size))
    if target.exists() and os.path.samefile(src, target):
        verify_checkpoint(target, info)
        return target
    if not force and target.exists() and _existing_ok(target, info):
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


def _registry_by_size(size: int) -> CheckpointInfo | None:
    return next((i for i in REGISTRY.values() if i.size == size), None)


def _fetch_hint(info: CheckpointInfo) -> str:
    return (
        f"Run `sgp weights fetch {info.name}` to download it ({_mb(info.size)} from {info.url}). "
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
        _is_model_name(spec) and not Path(spec).expanduser().is_file()
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
                f"({path}). {_fetch_hint(info)}"
            )
        verify_checkpoint(path, info)
        return ResolvedWeights(
            info.config, path, f"pretrained SAM2.1 {info.name} ({_check_note(info)})", info.name
        )

    path = Path(spec).expanduser()
    if not path.exists():
        raise SGPWeightsError(
            f"Checkpoint file {path} does not exist. Give the path to a .pt file, a model name "
            f"({', '.join(MODEL_NAMES)}), 'pretrained' or 'random'."
        )
    if not path.is_file():
        raise SGPWeightsError(f"{path} is not a file; --weights needs a .pt checkpoint file.")
    official = _registry_by_size(path.stat().st_size)
    if official is not None:
        if official.name != info.name:
            raise SGPWeightsError(
                f"{path} has the size of the SAM2.1 {official.name} checkpoint but --model is "
                f"{info.name}; use `--model {official.name}` or choose the right file."
            )
        verify_checkpoint(path, info)
        return ResolvedWeights(
            info.config, path, f"SAM2.1 {info.name} from {path} ({_check_note(info)})", info.name
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


def _check_note(info: CheckpointInfo) -> str:
    if info.sha256 is None:
        return "size checked; no sha256 is published for it"
    return "size and sha256 checked"


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


# ---------------------------------------------------------------------------- command line


def add_weights_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``weights list|fetch NAME [--file PATH] [--force]|verify [NAME|PATH]``.

    Each leaf parser sets ``func`` to the ``cli_*`` function to call with the parsed args.
    """
    parser = subparsers.add_parser(
        "weights",
        help="list, download and verify the SAM2.1 checkpoints",
        description="SAM2.1 checkpoints. Cache folder: $SGP_CACHE_DIR, "
        "else $XDG_CACHE_HOME/slicersgp, else ~/.cache/slicersgp.",
    )
    sub = parser.add_subparsers(dest="weights_command", metavar="{list,fetch,verify}")
    sub.required = True

    p_list = sub.add_parser("list", help="show the known checkpoints and which are cached")
    p_list.set_defaults(func=cli_list)

    p_fetch = sub.add_parser(
        "fetch", help="download a checkpoint into the cache (or copy a local file there)"
    )
    p_fetch.add_argument("name", help=f"model name: {', '.join(MODEL_NAMES)}")
    p_fetch.add_argument(
        "--file",
        metavar="PATH",
        help="a copy of the official file downloaded elsewhere: check it and copy it to the cache",
    )
    p_fetch.add_argument("--force", action="store_true", help="replace a valid cached file")
    p_fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    p_fetch.set_defaults(func=cli_fetch)

    p_verify = sub.add_parser(
        "verify", help="check cached checkpoints, one model's, or a file, by size and sha256"
    )
    p_verify.add_argument(
        "target", nargs="?", metavar="NAME|PATH", help="a model name or a checkpoint file"
    )
    p_verify.set_defaults(func=cli_verify)
    return parser


def _err(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def _status(info: CheckpointInfo) -> str:
    path = cache_dir() / info.filename
    if not path.is_file():
        return "not downloaded"
    size = path.stat().st_size
    if size != info.size:
        return f"incomplete ({size:,} of {info.size:,} bytes)"
    if info.sha256 is not None and _read_sidecar(path) == info.sha256:
        return "cached, verified"
    return "cached"


def cli_list(args: argparse.Namespace) -> int:
    """``sgp weights list``: the registry and what is in the cache."""
    try:
        folder = cache_dir()
        print(f"SAM2.1 checkpoints (cache: {folder})")
        print(f"  {'name':<10} {'config':<36} {'size':>9}  {'check':<11} status")
        for info in REGISTRY.values():
            check = "sha256" if info.sha256 else "size only"
            print(
                f"  {info.name:<10} {info.config:<36} {_mb(info.size):>9}  {check:<11} "
                f"{_status(info)}"
            )
        unhashed = [i.name for i in REGISTRY.values() if i.sha256 is None]
        if unhashed:
            print(f"No sha256 is published for {', '.join(unhashed)}: only their size is checked.")
        print("Download one with `sgp weights fetch NAME`.")
    except SGPError as exc:
        return _err(exc)
    return 0


def cli_fetch(args: argparse.Namespace) -> int:
    """``sgp weights fetch NAME [--file PATH] [--force]``."""
    try:
        info = resolve_model_name(args.name)
        show = not getattr(args, "quiet", False)
        force = bool(getattr(args, "force", False))
        file = getattr(args, "file", None)
        if file:
            path = import_checkpoint(file, info, force=force, progress=show)
        else:
            target = cached_checkpoint_path(info)
            if not force and target.exists() and _existing_ok(target, info):
                print(f"{target} is already there ({_check_note(info)}); --force downloads again.")
                return 0
            print(f"Downloading {info.url} ({_mb(info.size)}) to {target}", file=sys.stderr)
            path = download_checkpoint(info, force=force, progress=show)
        print(f"OK: {path} ({_check_note(info)})")
    except SGPError as exc:
        return _err(exc)
    return 0


def _verify_file(path: Path) -> str:
    """Check one file; return a one-line verdict or raise SGPWeightsError."""
    if not path.is_file():
        raise SGPWeightsError(f"{path} does not exist or is not a file.")
    info = next((i for i in REGISTRY.values() if i.filename == path.name), None)
    info = info or _registry_by_size(path.stat().st_size)
    if info is not None:
        verify_checkpoint(path, info)
        return f"OK: {path} is the SAM2.1 {info.name} checkpoint ({_check_note(info)})"
    state = load_sam2_state_dict(path, mmap=True)
    return (
        f"OK: {path} is a readable PyTorch checkpoint with {len(state)} tensors "
        "(not an official file, so there is nothing to compare it with)"
    )


def cli_verify(args: argparse.Namespace) -> int:
    """``sgp weights verify [NAME|PATH]``; no argument checks every cached checkpoint."""
    target = getattr(args, "target", None)
    try:
        if target and not (_is_model_name(target) and not Path(target).expanduser().exists()):
            print(_verify_file(Path(target).expanduser()))
            return 0
        infos = [resolve_model_name(target)] if target else list(REGISTRY.values())
        failed = 0
        found = 0
        for info in infos:
            path = cache_dir() / info.filename
            if not path.is_file():
                if target:
                    raise SGPWeightsError(f"{path} is not there. {_fetch_hint(info)}")
                continue
            found += 1
            try:
                verify_checkpoint(path, info)
                print(f"OK: {path} ({_check_note(info)})")
            except SGPWeightsError as exc:
                failed += 1
                print(f"FAILED: {exc}", file=sys.stderr)
        if not target and found == 0:
            print(f"No checkpoints in {cache_dir()}. Download one with `sgp weights fetch NAME`.")
        return 1 if failed else 0
    except SGPError as exc:
        return _err(exc)
