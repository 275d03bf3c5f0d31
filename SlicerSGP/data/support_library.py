"""Support library: named support sets (:mod:`.support_set`) in one folder, listed, renamed,
deleted, exported to and imported from one zip, and usable by name as a ``--support-bank``.

The folder is :func:`default_root` unless given. Every change is atomic: a new set is built in
a hidden temporary folder inside the library (same file system) and renamed into place, a
deleted set is renamed away before it is removed, so a failed save or import leaves nothing
and a reader never sees half a set. Names are unique regardless of letter case (folders on
macOS and Windows are case-insensitive). numpy, SimpleITK and the standard library only.
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from SlicerSGP.data.support_set import (
    MANIFEST,
    is_support_set,
    read_manifest,
    read_support_set,
    safe_member,
    verify_files,
    write_json,
    write_support_set,
)
from SlicerSGP.errors import SGPInputError
from SlicerSGP.filesystem import (
    atomic_write,
    copy_hashing,
    move_folder,
    remove_folder,
    staging_folder,
    swap_in_folder,
)

ENV_ROOT = "SGP_SUPPORT_LIBRARY"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.()+-]{0,99}")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: the same set exports to the same bytes
MAX_IMPORT_BYTES = 8 << 30
"""Largest total uncompressed size an imported zip may declare (a guard against zip bombs)."""


def default_root() -> Path:
    """``$SGP_SUPPORT_LIBRARY``, else ``$XDG_DATA_HOME/slicersgp/support``, else
    ``%LOCALAPPDATA%/slicersgp/support`` (Windows) or ``~/.local/share/slicersgp/support``.
    User data, beside the weights cache's ``slicersgp`` name but not in it: a cache may be
    cleared."""
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec: relative values are ignored
        return Path(xdg) / "slicersgp" / "support"
    local = os.environ.get("LOCALAPPDATA")
    if sys.platform == "win32" and local:
        return Path(local) / "slicersgp" / "support"
    return Path.home() / ".local" / "share" / "slicersgp" / "support"


def check_name(name: str) -> str:
    """A set name usable as a folder name everywhere: letters, digits, space and ``_.()+-``,
    starting with a letter or digit, at most 100 characters."""
    text = str(name).strip()
    if not _NAME.fullmatch(text) or text.endswith("."):
        raise SGPInputError(
            f"Support set name {name!r} is not allowed: use letters, digits, spaces and "
            "_ . ( ) + -, start with a letter or digit, at most 100 characters (e.g. 'liver CT')."
        )
    return text


@dataclass(frozen=True)
class SupportSetSummary:
    """One line of ``list()``."""

    name: str
    path: Path
    structures: dict[int, str]
    slices: dict[int, int]
    """Per structure value: how many slices it has in the set."""
    created: str
    size: int
    """Bytes on disk."""
    source: str
    description: str


def _summary(path: Path) -> SupportSetSummary:
    m = read_manifest(path)
    return SupportSetSummary(
        name=path.name,
        path=path,
        structures={int(s["value"]): str(s["name"]) for s in m["structures"]},
        slices={int(s["value"]): len(s["slices"]) for s in m["structures"]},
        created=str(m.get("created", "")),
        size=sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
        source=str(m.get("source", "")),
        description=str(m.get("description", "")),
    )


class SupportLibrary:
    """The support sets in ``root`` (default: :func:`default_root`)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            (
                p.name
                for p in self.root.iterdir()
                if p.is_dir() and not p.name.startswith(".") and is_support_set(p)
            ),
            key=str.lower,
        )

    def _existing(self, name: str) -> Path | None:
        """The folder of the set called ``name`` in any letter case, or None."""
        wanted = str(name).strip().lower()
        return next((self.root / n for n in self.names() if n.lower() == wanted), None)

    def path(self, name: str) -> Path:
        """The folder of set ``name`` (usable as ``--support-bank``)."""
        found = self._existing(name)
        if found is None:
            known = ", ".join(self.names()) or "none yet (save one with `sgp support save`)"
            raise SGPInputError(
                f"No support set named {name!r} in the library {self.root}. Sets there: {known}."
            )
        return found

    def list(self) -> list[SupportSetSummary]:
        return [_summary(self.root / n) for n in self.names()]

    def show(self, name: str) -> dict:
        """The manifest of set ``name``, its files checked against their sha256."""
        path = self.path(name)
        manifest = read_manifest(path)
        verify_files(path, manifest)
        return manifest

    def load(self, name: str, *, intensity: str = "auto"):
        """``({value: [SupportItem, ...]}, {value: name})`` of set ``name``."""
        return read_support_set(self.path(name), intensity=intensity)

    # ------------------------------------------------------------------ writing

    @contextmanager
    def _staging(self) -> Iterator[Path]:
        """A hidden temporary folder inside the library, removed unless moved into place."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SGPInputError(
                f"Cannot create the support library folder {self.root} ({exc}); "
                f"set {ENV_ROOT} to a writable folder."
            ) from exc
        with staging_folder(self.root) as tmp:
            yield tmp

    def _target(self, name: str, overwrite: bool, verb: str) -> tuple[str, Path | None]:
        name = check_name(name)
        old = self._existing(name)
        if old is not None and not overwrite:
            raise SGPInputError(
                f"A support set named {old.name!r} already exists in {self.root}; "
                f"choose another name, or {verb} with overwrite (--overwrite)."
            )
        return name, old

    def _publish(self, staged: Path, name: str, old: Path | None) -> Path:
        """Rename ``staged`` to ``name``; an overwritten set is moved away first and removed only
        once the new one is in place (restored if that rename fails)."""
        return swap_in_folder(staged, self.root / name, old)

    def save(
        self, name: str, image, masks, slices, *, overwrite: bool = False, **options
    ) -> SupportSetSummary:
        """Save a new set (arguments: :func:`~.support_set.write_support_set`)."""
        name, old = self._target(name, overwrite, "save")
        with self._staging() as tmp:
            write_support_set(tmp / "set", image, masks, slices, name=name, **options)
            return _summary(self._publish(tmp / "set", name, old))

    def rename(self, name: str, new_name: str, *, overwrite: bool = False) -> Path:
        path = self.path(name)
        new_name = check_name(new_name)
        if path.name == new_name:
            return path
        other = self._existing(new_name)
        same = other is not None and other.name.lower() == path.name.lower()
        if other is not None and not same and not overwrite:
            raise SGPInputError(
                f"A support set named {other.name!r} already exists; choose "
                "another name, or rename with overwrite (--overwrite)."
            )
        if other is not None and not same:
            self.delete(other.name)
        final = move_folder(path, self.root / new_name)
        manifest = read_manifest(final)
        manifest["name"] = new_name
        write_json(final / MANIFEST, manifest)
        return final

    def delete(self, name: str) -> None:
        remove_folder(self.path(name))

    # ------------------------------------------------------------------ zip

    def export_zip(self, name: str, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write set ``name`` as one zip (the manifest first, files in sorted order, fixed
        timestamps); the set's files are checked against their sha256 first."""
        folder = self.path(name)
        manifest = self.show(folder.name)
        out = Path(path)
        if out.suffix.lower() != ".zip":
            raise SGPInputError(f"The export file {out} must end with .zip.")
        if out.exists() and not overwrite:
            raise SGPInputError(
                f"{out} exists; choose another file or export with overwrite (--overwrite)."
            )

        def write(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                for rel in [MANIFEST, *sorted(manifest["files"])]:
                    info = zipfile.ZipInfo(rel, _ZIP_TIME)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    zf.writestr(info, (folder / rel).read_bytes())

        return atomic_write(out, write)

    def import_zip(
        self, path: str | os.PathLike, name: str | None = None, *, overwrite: bool = False
    ) -> SupportSetSummary:
        """Add the set in zip ``path`` (as ``name``, else the name it was exported under).

        Refused, with nothing left behind: not a zip, a member path that would leave the set
        (absolute, ``..``, a drive, a link), no manifest, a file the manifest does not list or
        lists but is missing, a size or sha256 that differs, images that cannot be read."""
        path = Path(path)
        if not path.is_file():
            raise SGPInputError(f"Support set zip not found: {path}.")
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise SGPInputError(
                f"{path} is not a zip file ({exc}); give a support set exported "
                "with `sgp support export`."
            ) from exc
        with zf, self._staging() as tmp:
            staged = tmp / "set"
            _extract(zf, path, staged)
            manifest = read_manifest(staged)
            verify_files(staged, manifest)
            read_support_set(staged, verify=False)  # the images themselves must load
            name, old = self._target(name or manifest.get("name") or path.stem, overwrite, "import")
            if manifest.get("name") != name:
                write_json(staged / MANIFEST, {**manifest, "name": name})
            return _summary(self._publish(staged, name, old))


def _extract(zf: zipfile.ZipFile, path: Path, staged: Path) -> None:
    """Check every member of an exported set's zip, then extract it with its sha256 checked."""
    members = {}
    for info in zf.infolist():
        if info.is_dir():
            safe_member(info.filename.rstrip("/"))
            continue
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise SGPInputError(f"Refused: {path} holds a symbolic link ({info.filename}).")
        members[safe_member(info.filename)] = info
    if MANIFEST not in members:
        raise SGPInputError(
            f"{path} has no {MANIFEST} at its top: it is not a support set "
            "exported with `sgp support export`."
        )
    if members[MANIFEST].file_size > 16 << 20:
        raise SGPInputError(f"Refused: the {MANIFEST} in {path} is implausibly large.")
    staged.mkdir()
    (staged / MANIFEST).write_bytes(zf.read(members[MANIFEST]))
    listed = read_manifest(staged)["files"]
    extra = sorted(set(members) - set(listed) - {MANIFEST})
    missing = sorted(set(listed) - set(members))
    if extra or missing:
        raise SGPInputError(
            f"Refused: {path} does not match its manifest (not listed: "
            f"{extra or 'none'}; missing: {missing or 'none'})."
        )
    if sum(int(m["size"]) for m in listed.values()) > MAX_IMPORT_BYTES:
        raise SGPInputError(f"Refused: {path} declares more than {MAX_IMPORT_BYTES >> 30} GiB.")
    for rel, meta in sorted(listed.items()):
        if members[rel].file_size != int(meta["size"]):
            raise SGPInputError(
                f"Refused: {rel} in {path} has {members[rel].file_size} bytes, "
                f"its manifest says {meta['size']}."
            )
        target = staged / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(members[rel]) as src, open(target, "wb") as dst:
            digest, _ = copy_hashing(src, dst)
        if digest != meta["sha256"]:
            raise SGPInputError(
                f"Refused: {rel} in {path} does not match its sha256 (the file "
                "was changed or damaged after export)."
            )


def resolve_support_bank(
    name_or_path: str | os.PathLike, library: SupportLibrary | None = None
) -> Path:
    """A ``--support-bank`` value as a folder: an existing folder as is, else the set of that
    name in the library."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    library = library or SupportLibrary()
    if "/" in text or os.sep in text or library._existing(text) is None:
        known = ", ".join(library.names()) or "none"
        raise SGPInputError(
            f"Support bank {text!r} is neither a folder nor a support set in the library "
            f"{library.root} (sets: {known}). Give a folder of labeled cases (image.* + "
            "labels.*, or images/ + masks/) or the name of a set from `sgp support list`."
        )
    return library.path(text)


__all__ = [
    "ENV_ROOT",
    "MANIFEST",
    "SupportLibrary",
    "SupportSetSummary",
    "check_name",
    "default_root",
    "read_support_set",
    "resolve_support_bank",
    "write_support_set",
]
