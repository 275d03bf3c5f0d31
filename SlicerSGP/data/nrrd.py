"""The NRRD files of support sets: a numpy-only writer and reader.

Slicer's process reads and writes support sets without SimpleITK, so this small codec exists
beside :mod:`.readers` (which reads every image format, NRRD included, through SimpleITK). It
writes gzip NRRDs with identity direction and origin 0 that ITK, Slicer and SimpleITK read, and
reads back NRRDs with their data inline (raw or gzip).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_NRRD_TYPES = {"int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16",
               "int32": "int32", "uint32": "uint32", "int64": "int64", "uint64": "uint64",
               "float32": "float", "float64": "double"}  # fmt: skip


def write_nrrd(path: Path, array: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """A gzip NRRD (readable by ITK, Slicer, SimpleITK) of a ``(K, J, I)`` or ``(K, J, I, 3)``
    array; identity direction, origin 0. The same array gives the same bytes (gzip mtime 0)."""
    arr = np.asarray(array)
    if arr.dtype == np.bool_ or arr.dtype.name not in _NRRD_TYPES:
        arr = arr.astype(np.uint8 if arr.dtype == np.bool_ else np.float32)
    vector = arr.ndim == 4
    sizes = [int(s) for s in reversed(arr.shape)]  # fastest axis first
    directions = " ".join(
        "(" + ",".join(repr(float(spacing[a])) if a == b else "0" for b in range(3)) + ")"
        for a in range(3)
    )
    header = [
        "NRRD0004",
        f"type: {_NRRD_TYPES[arr.dtype.name]}",
        f"dimension: {arr.ndim}",
        "space: left-posterior-superior",
        f"sizes: {' '.join(map(str, sizes))}",
        f"space directions: {'none ' if vector else ''}{directions}",
        f"kinds: {'vector ' if vector else ''}domain domain domain",
        "endian: little",
        "encoding: gzip",
        "space origin: (0,0,0)",
    ]
    data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    path.write_bytes(("\n".join(header) + "\n\n").encode() + gzip.compress(data, 6, mtime=0))


def read_nrrd(path: Path) -> np.ndarray:
    """The array of an NRRD with its data inline (raw or gzip), as :func:`write_nrrd` writes."""
    blob = path.read_bytes()
    end = blob.find(b"\n\n")
    if not blob.startswith(b"NRRD") or end < 0:
        raise ValueError("not an NRRD file")
    fields = {}
    for line in blob[:end].decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition(": ")
        if sep and not line.startswith("#"):
            fields[key.strip()] = value.strip()
    names = {v: k for k, v in _NRRD_TYPES.items()}
    dtype = np.dtype(names[fields["type"]]).newbyteorder(
        ">" if fields.get("endian") == "big" else "<")  # fmt: skip
    sizes = [int(s) for s in fields["sizes"].split()]
    data = blob[end + 2 :]
    if fields.get("encoding") == "gzip":
        data = gzip.decompress(data)
    elif fields.get("encoding") != "raw":
        raise ValueError(f"encoding {fields.get('encoding')!r}")
    return np.frombuffer(data, dtype).reshape(sizes[::-1]).astype(dtype.newbyteorder("="))
