"""The official SAM2.1 checkpoints, the local cache folder, and file checks (size, sha256).

The lowest layer of checkpoint handling: ``SlicerSGP.weights`` builds download, import,
``--weights`` resolution and loading on it (and re-exports these names). Stdlib only.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from SlicerSGP import filesystem
from SlicerSGP.errors import SGPInputError, SGPWeightsError

URL_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
HASH_CHUNK = filesystem.HASH_CHUNK
SIDECAR_SUFFIX = ".verified"


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


def is_model_name(name: str) -> bool:
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


def write_sidecar(path: Path, digest: str) -> None:
    st = path.stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    # A read-only folder only costs a re-hash next time, so failure to write is not an error.
    with contextlib.suppress(OSError):
        filesystem.atomic_write_text(_sidecar(path), json.dumps(record))


def read_sidecar(path: Path) -> str | None:
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
        cached = read_sidecar(path)
        if cached is not None:
            return cached
    digest = filesystem.file_sha256(path)
    if use_cache:
        write_sidecar(path, digest)
    return digest


def format_mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def size_message(path: Path | str, info: CheckpointInfo, actual: int) -> str:
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


def hash_message(path: Path | str, info: CheckpointInfo, actual: str) -> str:
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
        raise SGPWeightsError(size_message(path, info, actual_size))
    if info.sha256 is None:
        return
    digest = file_sha256(path)
    if digest != info.sha256:
        raise SGPWeightsError(hash_message(path, info, digest))


# ---------------------------------------------------------------------------- status


def is_valid_checkpoint(target: Path, info: CheckpointInfo) -> bool:
    """True when ``target`` passes :func:`verify_checkpoint` for ``info``."""
    try:
        verify_checkpoint(target, info)
    except SGPWeightsError:
        return False
    return True


def registry_entry_by_size(size: int) -> CheckpointInfo | None:
    """The official checkpoint with exactly this file size, if any."""
    return next((i for i in REGISTRY.values() if i.size == size), None)


def check_note(info: CheckpointInfo) -> str:
    """How a file of ``info`` is checked, for messages."""
    if info.sha256 is None:
        return "size checked; no sha256 is published for it"
    return "size and sha256 checked"


def cache_status(info: CheckpointInfo) -> str:
    """What the cache holds of ``info``: not downloaded, incomplete, cached (verified)."""
    path = cache_dir() / info.filename
    if not path.is_file():
        return "not downloaded"
    size = path.stat().st_size
    if size != info.size:
        return f"incomplete ({size:,} of {info.size:,} bytes)"
    if info.sha256 is not None and read_sidecar(path) == info.sha256:
        return "cached, verified"
    return "cached"
