"""The strict .npy reader that reads every array of a request or result (never numpy's
``ast``-based one), and the .npy form of an uploaded volume: stdlib + numpy only."""

from __future__ import annotations

import io
import math
import re

import numpy as np

from SlicerSGP.errors import SGPInputError

NPY_MAGIC = b"\x93NUMPY"
NPY_HEADER_LIMIT = 16384
"""Longest .npy header accepted (numpy writes ~120 bytes for a plain array)."""
NPY_MAX_DIMS = 16
_NPY_ENTRY = re.compile(
    r"\s*'(descr|fortran_order|shape)'\s*:\s*"
    r"('[^'\\]{1,64}'|True|False|\(\s*(?:\d{1,19}\s*,\s*)*(?:\d{1,19}\s*)?\))\s*(?:,|$)")


def npy_header(data: bytes | memoryview, what: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset) of a .npy, parsed strictly here.

    numpy's own reader evaluates the header with ``ast.literal_eval``, which on some Python
    3.11 releases (3.11.7 among them) fails at random when threads parse at once ("AST
    constructor recursion depth mismatch"); the server reads requests on many threads. This
    parser accepts exactly what ``numpy.lib.format`` writes for a plain (non-object,
    non-structured) array: format 1.0 to 3.0, a dict of descr, fortran_order and shape.
    """
    fix = "send it as numpy writes it (np.save / protocol.volume_to_npy) from a plain array."
    head = bytes(data[:12])
    if not head.startswith(NPY_MAGIC) or len(head) < 10 or head[6] not in (1, 2, 3):
        raise SGPInputError(f"{what} is not a .npy array (no .npy signature at its start): "
                            f"{fix}")
    if head[6] == 1:
        size, start = int.from_bytes(head[8:10], "little"), 10
    else:
        size, start = int.from_bytes(head[8:12], "little"), 12
    if size > NPY_HEADER_LIMIT or start + size > len(data):
        raise SGPInputError(f"{what} has a .npy header of {size} bytes (at most "
                            f"{NPY_HEADER_LIMIT}, and within the body): {fix}")
    try:
        text = bytes(data[start:start + size]).decode("latin-1" if head[6] < 3 else "utf-8")
    except UnicodeDecodeError:
        raise SGPInputError(f"{what} has a .npy header that is not text: {fix}") from None
    text = text.strip()
    if re.search(r"'descr'\s*:\s*\[", text):
        raise SGPInputError(f"{what} is a structured (record) array: send a plain numeric "
                            "array (one number per voxel).")
    if not (text.startswith("{") and text.endswith("}")):
        raise SGPInputError(f"{what} has a malformed .npy header: {fix}")
    inner, entries, pos = text[1:-1].strip(), {}, 0
    while pos < len(inner):
        m = _NPY_ENTRY.match(inner, pos)
        if m is None or m.group(1) in entries:
            raise SGPInputError(f"{what} has a malformed .npy header: {fix}")
        entries[m.group(1)] = m.group(2)
        pos = m.end()
    if set(entries) != {"descr", "fortran_order", "shape"} or \
            not entries["descr"].startswith("'") or entries["fortran_order"] not in ("True",
                                                                                     "False"):
        raise SGPInputError(f"{what} has a malformed .npy header (it needs descr, "
                            f"fortran_order and shape): {fix}")
    descr = entries["descr"][1:-1]
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError):
        raise SGPInputError(f"{what} has the unknown data type {descr!r}: send a numeric "
                            "array.") from None
    if dtype.hasobject or dtype.fields is not None or dtype.itemsize == 0:
        raise SGPInputError(f"{what} has the data type {descr!r}, which holds no numbers: send "
                            "a numeric array.")
    shape = tuple(int(s) for s in re.findall(r"\d+", entries["shape"]))
    if len(shape) > NPY_MAX_DIMS:
        raise SGPInputError(f"{what} has {len(shape)} dimensions (at most {NPY_MAX_DIMS}).")
    return dtype, shape, entries["fortran_order"] == "True", start + size


def npy_from_bytes(data: bytes | bytearray, what: str = "The array") -> np.ndarray:
    """The array in a .npy body, without numpy's header evaluator (see :func:`npy_header`);
    the data must be exactly what the header declares, so a header that claims more voxels
    than the body holds is refused before anything is allocated. The array is a view of
    ``data`` (read-only for bytes, writable for a bytearray)."""
    dtype, shape, fortran, offset = npy_header(data, what)
    count = math.prod(shape)
    held = len(data) - offset
    if count * dtype.itemsize != held:
        raise SGPInputError(
            f"{what} does not hold what its .npy header declares: shape {shape} of {dtype} is "
            f"{count * dtype.itemsize} bytes, the body has {held} after the header (cut off in "
            "transit, or a forged header). Send it again with the client.")
    flat = np.frombuffer(data, dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


def volume_to_npy(volume: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(volume), allow_pickle=False)
    return buf.getvalue()


def volume_from_npy(data: bytes) -> np.ndarray:
    """The volume in an uploaded .npy body (see :func:`npy_from_bytes`)."""
    return npy_from_bytes(data, "The uploaded volume")
