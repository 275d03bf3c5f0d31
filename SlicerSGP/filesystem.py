"""Files written whole or not at all, folders swapped in at once, and file hashes.

The one implementation of these helpers for the engine and for Slicer's process (standard
library only, so the Slicer module may import it; ``Testing/project/test_layout.py`` fails when a second
copy appears elsewhere).

Temporary names: a hidden sibling ``.STEM.tmp-TOKEN.SUFFIX`` in the destination's folder. The
same folder keeps the final rename atomic (one file system); the suffix is kept because some
writers choose the format by it (SimpleITK, slicerio). :func:`is_temp_name` recognises these
names, e.g. for removing those a killed process left behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from SlicerSGP.errors import SGPInputError

HASH_CHUNK = 1 << 20
"""Bytes read at a time when hashing or copying (1 MiB)."""

COMPOUND_SUFFIXES = (".seg.nrrd", ".nii.gz", ".state.pt")
"""File endings of two parts that stay together when a temporary name is made."""

_TEMP = re.compile(r"^\..*\.tmp-[0-9a-f]{8,}(\.|$)")


def split_suffix(name: str) -> tuple[str, str]:
    """'x.seg.nrrd' -> ('x', '.seg.nrrd'); 'x.csv' -> ('x', '.csv')."""
    low = name.lower()
    for suffix in COMPOUND_SUFFIXES:
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot and stem else (name, "")


def new_token() -> str:
    """A random hexadecimal tag for temporary names (10 characters)."""
    return uuid.uuid4().hex[:10]


def temp_path(path: str | os.PathLike, token: str | None = None) -> Path:
    """The hidden temporary sibling of ``path``: ``.STEM.tmp-TOKEN.SUFFIX``."""
    path = Path(path)
    stem, suffix = split_suffix(path.name)
    return path.with_name(f".{stem}.tmp-{token or new_token()}{suffix}")


def is_temp_name(name: str) -> bool:
    """True for a name :func:`temp_path` makes."""
    return bool(_TEMP.match(name))


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a finished temporary onto its final name in one step (``os.replace``): a reader
    sees the old file or the whole new one, never a part."""
    os.replace(tmp, final)


def remove_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)``, then move the result onto ``path``; on any failure (an
    interrupt too) the temporary is removed and ``path`` is left as it was."""
    path = Path(path)
    if path.is_dir():
        raise SGPInputError(f"Output path {path} is a folder; give a file name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        writer(tmp)
        publish(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    return path


def write_all(f: BinaryIO, data: bytes, chunk: int = 8 << 20) -> None:
    """Write ``data`` in pieces (a huge single write may be refused by some systems)."""
    view = memoryview(data)
    for i in range(0, len(view), chunk):
        f.write(view[i:i + chunk])


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write_all(f, data)

    return atomic_write(path, writer)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def copy_hashing(
    reader: BinaryIO,
    out: BinaryIO,
    *,
    chunk: int = HASH_CHUNK,
    on_block: Callable[[int], object] | None = None,
) -> tuple[str, int]:
    """Copy ``reader`` to ``out`` while hashing; ``(sha256 hex, bytes)``. ``on_block(done)``
    is called after each block is written (it may raise to stop, e.g. at a size limit)."""
    digest, done = hashlib.sha256(), 0
    while block := reader.read(chunk):
        digest.update(block)
        out.write(block)
        done += len(block)
        if on_block is not None:
            on_block(done)
    return digest.hexdigest(), done


def file_sha256(path: str | os.PathLike, chunk: int = HASH_CHUNK) -> str:
    """sha256 (hex) of a file, read in ``chunk`` bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ folders


@contextmanager
def staging_folder(parent: Path) -> Iterator[Path]:
    """A hidden temporary folder inside ``parent`` (same file system as the final place),
    removed on leaving unless it was moved away (:func:`swap_in_folder`)."""
    tmp = temp_path(parent / "staged")
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in_folder(staged: Path, final: Path, old: Path | None = None) -> Path:
    """Rename ``staged`` to ``final``. ``old`` (an existing folder being replaced, e.g. the
    same name in another letter case) is moved away first and removed only once the new one
    is in place; it is put back if that rename fails."""
    trash = None
    if old is not None:
        trash = temp_path(final.parent / "trash")
        os.rename(old, trash)
    try:
        os.rename(staged, final)
    except OSError:
        if trash is not None and old is not None:
            os.rename(trash, old)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def move_folder(path: Path, final: Path) -> Path:
    """Rename a folder, also where only the letter case changes (through a temporary name,
    since case-insensitive file systems see the two names as one)."""
    if path.name.lower() == final.name.lower() and path.parent == final.parent:
        hop = temp_path(path.parent / "rename")
        os.rename(path, hop)
        path = hop
    os.rename(path, final)
    return final


def remove_folder(path: Path) -> None:
    """Rename a folder away (gone at once for readers), then remove it."""
    trash = temp_path(path.parent / "trash")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
