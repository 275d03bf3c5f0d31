""".npz archives, the bodies that carry arrays: :func:`pack` and the bounded, strict
:func:`unpack` (stdlib + numpy only). JSON that goes with the arrays rides in the archive as the
UTF-8 bytes of entry ``meta``."""

from __future__ import annotations

import io
import json
import re
import threading
import zipfile
from typing import Any

import numpy as np

from SlicerSGP.errors import SGPInputError
from SlicerSGP.service.npy import NPY_HEADER_LIMIT, npy_from_bytes
from SlicerSGP.service.request_checks import LimitExceeded

ARCHIVE_MAX_DIRECTORY = 2**20
"""Largest zip directory read from a request (about 15,000 arrays): parsing it costs memory per
entry before any entry's size can be checked."""


# --------------------------------------------------------------------------- archives

def pack(arrays: dict[str, np.ndarray], meta: dict[str, Any], compress: bool = False) -> bytes:
    """An .npz holding ``arrays`` and ``meta`` (JSON). Compression pays for sparse label slices
    only; results go uncompressed (float probabilities barely shrink and zlib costs seconds)."""
    buf = io.BytesIO()
    payload = dict(arrays)
    payload["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    (np.savez_compressed if compress else np.savez)(buf, **payload)
    return buf.getvalue()


def unpack(data: bytes, *, structured: bool = False, max_bytes: int | None = None
           ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of :func:`pack`; a malformed archive is an input error naming the problem.

    ``max_bytes`` (the server's ``--max-upload-mb``) bounds what the archive inflates to: the
    sizes its zip directory declares must add up to at most that, checked before anything is
    inflated (a 200 KB body of zeros can declare 200 MB), and no member is inflated past its
    declared size (:func:`_read_member`). LimitExceeded (413) otherwise.

    Members are read with :func:`npy_from_bytes` (never numpy's ``ast``-based header reader:
    see :func:`npy_header`); structured arrays (a result's slice scores) only where
    ``structured`` (the client reading a result), with numpy's reader under a lock.
    """
    try:
        arrays: dict[str, np.ndarray] = {}
        if max_bytes is not None:
            _check_directory_size(data)
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if max_bytes is not None:
                _check_inflated_size(z.infolist(), max_bytes)
            for info in z.infolist():
                name = info.filename.removesuffix(".npy")
                raw = _read_member(z, info)
                what = f"Array {name!r} of the archive"
                if structured and re.search(rb"'descr'\s*:\s*\[", bytes(raw[:NPY_HEADER_LIMIT])):
                    with _NUMPY_READER_LOCK:
                        arrays[name] = np.lib.format.read_array(io.BytesIO(raw),
                                                                allow_pickle=False)
                else:
                    arrays[name] = npy_from_bytes(raw, what)
        meta = json.loads(arrays.pop("meta").tobytes().decode()) if "meta" in arrays else {}
    except SGPInputError:
        raise
    except (ValueError, OSError, KeyError, EOFError, NotImplementedError, zipfile.BadZipFile,
            zipfile.LargeZipFile) as e:  # json.JSONDecodeError and UnicodeError are ValueErrors
        raise SGPInputError(f"The request body is not a SlicerSGP .npz archive ({e}); use "
                            "SlicerSGP.service.client to talk to the server.") from None
    return arrays, meta


def _check_directory_size(data: bytes) -> None:
    """Refuse an archive whose zip directory is larger than ARCHIVE_MAX_DIRECTORY, read from
    its end record (and the zip64 one, which zipfile prefers) before zipfile parses it."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65557))
    if end < 0 or end + 22 > len(data):
        return  # not a zip: zipfile says so
    size = int.from_bytes(data[end + 12:end + 16], "little")
    if end >= 76 and data[end - 20:end - 16] == b"PK\x06\x07" and \
            data[end - 76:end - 72] == b"PK\x06\x06":
        size = max(size, int.from_bytes(data[end - 36:end - 28], "little"))
    if size > ARCHIVE_MAX_DIRECTORY:
        raise LimitExceeded(413, f"The request's archive lists {size / 2**20:.1f} MB of entries "
                            f"(at most {ARCHIVE_MAX_DIRECTORY / 2**20:g} MB, about 15,000 "
                            "arrays): send fewer arrays per request.")


def _check_inflated_size(infos: list[zipfile.ZipInfo], max_bytes: int) -> None:
    total = sum(max(0, info.file_size) for info in infos)
    if total > max_bytes:
        raise LimitExceeded(413, f"The request's arrays inflate to {total / 2**20:.1f} MB (as "
                            "its archive declares) but this server accepts at most "
                            f"{max_bytes / 2**20:g} MB per request: restart it with a larger "
                            "--max-upload-mb, or send less (fewer labeled slices or support "
                            "items).")


_NUMPY_READER_LOCK = threading.Lock()


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytearray:
    """A member's bytes in a bytearray (so the array read from it is writable, no copy)."""
    buf = bytearray(info.file_size)
    view, got = memoryview(buf), 0
    with z.open(info) as f:
        while got < len(buf):
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        if f.read(1):
            raise SGPInputError(f"Archive member {info.filename!r} is longer than it declares.")
    view.release()
    del buf[got:]
    return buf
