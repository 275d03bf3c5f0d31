"""What travels between the engine client and `sgp serve`: stdlib + numpy only (runs in Slicer).

Bodies that carry arrays are ``.npz`` archives (``.npy`` for a volume upload): exact dtypes and
shapes, no pickle, readable by any numpy. JSON that goes with them rides in the archive as the
UTF-8 bytes of entry ``meta``. Label maps travel as their labeled slices only: the slices along
the run's axis that hold any non-zero voxel. Every other slice is all zeros, so the server
rebuilds exactly the caller's label map from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
import threading
import types
import typing
import zipfile
from typing import Any

import numpy as np

from SlicerSGP.errors import SGPError, SGPInputError
from SlicerSGP.types import Geometry, SegmentationResult, SegmentOptions, SupportItem

PROTOCOL_VERSION = 1
"""Bumped whenever a request or response changes shape; client and server must agree."""
PROTOCOL_HEADER = "X-SGP-Protocol"
GEOMETRY_HEADER = "X-SGP-Geometry"
NPZ = "application/x-npz"
NPY = "application/x-npy"


class LimitExceeded(SGPError):
    """A request refused by one of the server's limits before any work: HTTP ``status`` (413:
    the request is too large; 429: the queue is full; 503: the server is busy), a message
    naming the limit and the option that raises it, and ``retry_after`` seconds where waiting
    helps (sent as Retry-After)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


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


def volume_to_npy(volume: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(volume), allow_pickle=False)
    return buf.getvalue()


def volume_from_npy(data: bytes) -> np.ndarray:
    """The volume in an uploaded .npy body (see :func:`npy_from_bytes`)."""
    return npy_from_bytes(data, "The uploaded volume")


# --------------------------------------------------------------------------- strict .npy

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


# --------------------------------------------------------------------------- volumes

def geometry_to_json(geometry: Geometry | None) -> dict[str, list[float]] | None:
    if geometry is None:
        return None
    return {"origin": [float(x) for x in geometry.origin],
            "spacing": [float(x) for x in geometry.spacing],
            "direction": [float(x) for x in geometry.direction]}


def geometry_from_json(data: Any, field: str = "geometry") -> Geometry | None:
    """A Geometry from JSON, every number checked (finite; spacing positive)."""
    if data is None:
        return None
    _check_keys(_dict(data, field), field, required=("origin", "spacing", "direction"))
    sizes = {"origin": 3, "spacing": 3, "direction": 9}
    values = {}
    for key, n in sizes.items():
        items = _list(data[key], f"{field}.{key}", exact=n)
        values[key] = tuple(_number(v, f"{field}.{key}[{i}]") for i, v in enumerate(items))
    if min(values["spacing"]) <= 0:
        raise _bad(f"{field}.spacing", "must be positive (voxel sizes in mm)",
                   list(values["spacing"]))
    return Geometry(**values)


def volume_id(volume: np.ndarray, geometry: Geometry | None) -> str:
    """Content address of a volume: its dtype, shape, geometry and voxels (sha256)."""
    arr = np.ascontiguousarray(volume)
    if arr.dtype.hasobject:
        raise SGPInputError("The volume holds Python objects: give a numeric array.")
    h = hashlib.sha256(b"sgp-volume-1|")
    h.update(json.dumps([arr.dtype.str, list(arr.shape), geometry_to_json(geometry)]).encode())
    h.update(arr.reshape(-1).view(np.uint8))
    return h.hexdigest()


# --------------------------------------------------------------------------- run requests

def options_to_json(options: SegmentOptions | None) -> dict[str, Any]:
    return dataclasses.asdict(options or SegmentOptions())


def options_from_json(data: Any, field: str = "options") -> SegmentOptions:
    """SegmentOptions from JSON, each value checked against the field's type (the engine then
    checks the ranges)."""
    if data is None:
        return SegmentOptions()
    names = {f.name for f in dataclasses.fields(SegmentOptions)}
    unknown = sorted(set(_dict(data, field)) - names)
    if unknown:
        raise SGPInputError(f"Unknown option(s) {unknown}: the client is newer than the server; "
                            "update the server's SlicerSGP.")
    hints = typing.get_type_hints(SegmentOptions)
    return SegmentOptions(**{k: _typed(v, hints[k], f"{field}.{k}") for k, v in data.items()})


def labeled_slices_of(labels: np.ndarray, axis: int) -> dict[int, np.ndarray]:
    """The slices along ``axis`` holding any non-zero voxel (NaN counts as non-zero)."""
    moved = np.moveaxis(labels, axis, 0)
    drawn = moved.reshape(moved.shape[0], -1).any(axis=1) if moved.size else []
    return {int(k): np.ascontiguousarray(moved[k]) for k in np.flatnonzero(drawn)}


def encode_labels(labels: np.ndarray | dict[int, np.ndarray] | None, axis: int,
                  arrays: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Add the label slices to ``arrays``; return their description for the request's meta.

    ``labels`` is a full label map (sent as its labeled slices) or ``{slice: 2D label slice}``
    along ``axis`` (shape: the volume's). Arrays that cannot be sliced along ``axis`` (wrong
    rank, bad axis) go whole so that the engine reports the problem in its own words.
    """
    if labels is None:
        return None
    if isinstance(labels, dict):
        slices = {int(k): np.asarray(v) for k, v in labels.items()}
        dtype = np.result_type(*slices.values()) if slices else np.dtype(np.uint8)
        for k, v in slices.items():
            arrays[f"label_{k}"] = v.astype(dtype, copy=False)
        return {"shape": None, "dtype": dtype.str, "axis": axis, "slices": sorted(slices)}
    labels = np.asarray(labels)
    if labels.dtype.hasobject:
        raise SGPInputError("The label map holds Python objects: give an integer array.")
    if labels.ndim < 3 or axis not in (0, 1, 2):
        arrays["labels_full"] = labels
        return {"shape": list(labels.shape), "dtype": labels.dtype.str, "full": True}
    slices = labeled_slices_of(labels, axis)
    for k, v in slices.items():
        arrays[f"label_{k}"] = v
    return {"shape": list(labels.shape), "dtype": labels.dtype.str, "axis": axis,
            "slices": sorted(slices)}


def decode_labels(desc: Any, arrays: dict[str, np.ndarray],
                  volume_shape: tuple[int, ...]) -> np.ndarray | None:
    """Rebuild the caller's label map: zeros with the labeled slices written back. Every
    field is checked first, so a malformed description is an input error naming the field and
    nothing larger than the volume is ever allocated."""
    if desc is None:
        return None
    _dict(desc, "labels")
    if desc.get("full"):
        _check_keys(desc, "labels", required=("full",), optional=("shape", "dtype"))
        return _label_array(arrays, "labels_full", "labels.full")
    _check_keys(desc, "labels", required=("dtype", "axis", "slices"), optional=("shape",))
    spatial = tuple(int(s) for s in volume_shape[:3])
    if desc.get("shape") is not None:
        shape = tuple(_int(v, f"labels.shape[{i}]", 0)
                      for i, v in enumerate(_list(desc["shape"], "labels.shape")))
        if shape != spatial:
            raise _bad("labels.shape", "must be the volume's shape: the label map shares the "
                       f"image's voxel grid (resample the labels onto the image); the volume is "
                       f"{list(spatial)}", list(shape))
    dtype = _label_dtype(desc["dtype"], "labels.dtype")
    axis = _int(desc["axis"], "labels.axis", 0, 2)
    labels = np.zeros(spatial, dtype)
    view = np.moveaxis(labels, axis, 0)
    slices = _list(desc["slices"], "labels.slices", most=view.shape[0])
    for i, k in enumerate(slices):
        k = _int(k, f"labels.slices[{i}]")
        if not 0 <= k < view.shape[0]:
            raise SGPInputError(f"Labeled slice {k} is outside the volume (0..{view.shape[0] - 1}) "
                                "(request field labels.slices).")
        part = _label_array(arrays, f"label_{k}", f"labels.slices[{i}]")
        if part.shape != view.shape[1:]:
            raise SGPInputError(f"Labeled slice {k} has shape {part.shape}; slices of this "
                                f"volume along the axis have shape {view.shape[1:]}.")
        view[k] = part
    return labels


def encode_bank(bank: dict[int, list[SupportItem]] | None,
                arrays: dict[str, np.ndarray]) -> dict[str, list[str]] | None:
    if bank is None:
        return None
    out: dict[str, list[str]] = {}
    for value, items in bank.items():
        out[str(int(value))] = [item.source for item in items]
        for i, item in enumerate(items):
            arrays[f"bank_{int(value)}_{i}_image"] = np.asarray(item.image)
            arrays[f"bank_{int(value)}_{i}_mask"] = np.asarray(item.mask)
    return out


def decode_bank(desc: Any,
                arrays: dict[str, np.ndarray]) -> dict[int, list[SupportItem]] | None:
    if desc is None:
        return None
    bank: dict[int, list[SupportItem]] = {}
    for v, sources in _dict(desc, "bank").items():
        value = _label_value(v, f"bank key {v!r}")
        items = []
        for i, src in enumerate(_list(sources, f"bank.{v}")):
            where = f"bank.{v}[{i}]"
            image = _array(arrays, f"bank_{v}_{i}_image", where, kinds="biuf", ndims=(2, 3))
            mask = _array(arrays, f"bank_{v}_{i}_mask", where, kinds="biuf", ndims=(2,))
            items.append(SupportItem(image, mask, _str(src, where)))
        bank[value] = items
    return bank


def structures_to_json(structures: dict[int, str] | None) -> dict[str, str] | None:
    return None if structures is None else {str(int(k)): str(v) for k, v in structures.items()}


def structures_from_json(data: Any) -> dict[int, str] | None:
    if data is None:
        return None
    return {_label_value(k, f"structures key {k!r}"): _str(v, f"structures.{k}")
            for k, v in _dict(data, "structures").items()}


# --------------------------------------------------------------------------- request checks
# Everything a client sends is checked here before the engine sees it: a malformed request is
# an SGPInputError (HTTP 422) that names the field, never an engine fault (500).

RUN_FIELDS = ("volume_id", "structures", "options", "support_slices", "labels", "bank")
REFINE_FIELDS = ("volume_id", "slice_index", "points", "point_labels", "options")
INT_LIMIT = 2**31
"""Integers in a request (slice indices, label values) stay within +-2**31."""
MAX_LIST = 100_000
"""Longest list in a request's JSON (no volume has more slices, clicks or structures)."""


def check_meta(meta: Any, fields: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Any]:
    """The request's ``meta`` as a dict with only known fields and the required ones."""
    _check_keys(_dict(meta, "meta"), "meta", required=required,
                optional=tuple(f for f in fields if f not in required))
    if not isinstance(meta["volume_id"], str) or not re.fullmatch(r"[0-9a-f]{64}",
                                                                  meta["volume_id"]):
        raise _bad("meta.volume_id", "must be the 64 hex digits protocol.volume_id gives",
                   meta["volume_id"])
    return meta


def slices_from_json(data: Any, field: str) -> list[int] | None:
    if data is None:
        return None
    return [_int(v, f"{field}[{i}]") for i, v in enumerate(_list(data, field))]


def refine_from_json(meta: Any) -> tuple[int, list[tuple[float, float]], list[int]]:
    """(slice_index, points, point_labels) of a refine request, checked."""
    meta = check_meta(meta, REFINE_FIELDS, ("volume_id", "slice_index", "points",
                                            "point_labels"))
    index = _int(meta["slice_index"], "slice_index", 0)
    points = []
    for i, p in enumerate(_list(meta["points"], "points")):
        pair = _list(p, f"points[{i}]", exact=2)
        points.append((_number(pair[0], f"points[{i}][0]"), _number(pair[1], f"points[{i}][1]")))
    labels = [_int(v, f"point_labels[{i}]", 0, 1)
              for i, v in enumerate(_list(meta["point_labels"], "point_labels"))]
    if len(labels) != len(points):
        raise _bad("point_labels", f"needs one label per click ({len(points)} points)",
                   f"{len(labels)} labels")
    return index, points, labels


def refine_mask(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    if "mask" not in arrays:
        return None
    return _array(arrays, "mask", "mask", kinds="biuf", ndims=(2,))


def _bad(field: str, rule: str, got: Any) -> SGPInputError:
    shown = repr(got)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return SGPInputError(f"Request field {field} {rule}; got {shown} ({type(got).__name__}). "
                         "Requests are built by SlicerSGP.service.client (same version as the "
                         "server).")


def _dict(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(field, "must be a JSON object", value)
    return value


def _list(value: Any, field: str, *, exact: int | None = None,
          most: int = MAX_LIST) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(field, "must be a JSON list", value)
    if exact is not None and len(value) != exact:
        raise _bad(field, f"must hold {exact} values", value)
    if len(value) > most:
        raise _bad(field, f"must hold at most {most} values", f"{len(value)} values")
    return value


def _check_keys(data: dict[str, Any], field: str, required: tuple[str, ...] = (),
                optional: tuple[str, ...] = ()) -> None:
    missing = [k for k in required if k not in data]
    if missing:
        raise _bad(field, f"lacks {', '.join(missing)}", sorted(data))
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise _bad(field, f"has unknown key(s) {unknown} (the client is newer than the server? "
                   "update the server's SlicerSGP)", sorted(data))


def _int(value: Any, field: str, lo: int = -INT_LIMIT, hi: int = INT_LIMIT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(field, "must be an integer", value)
    if not lo <= value <= hi:
        raise _bad(field, f"must lie in {lo}..{hi}", value)
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise _bad(field, "must be a finite number", value)
    return float(value)


def _str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _bad(field, "must be a string", value)
    return value


def _label_value(key: Any, field: str) -> int:
    """A label value given as a JSON object key (a string of digits)."""
    try:
        value = int(key)
    except (TypeError, ValueError):
        raise _bad(field, "must be a label value (an integer)", key) from None
    return _int(value, field, 1)


def _typed(value: Any, tp: Any, field: str) -> Any:
    """``value`` checked against an option's type (int, float, bool, str, None, list[...],
    dict[int, ...] and unions of them); dict keys from JSON become ints."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:
            return _typed(value, kinds[0], field)
        raise _bad(field, f"must be {tp}", value)  # no such option today
    if origin is list:
        return [_typed(v, args[0], f"{field}[{i}]") for i, v in enumerate(_list(value, field))]
    if origin is dict:
        return {_label_value(k, f"{field} key {k!r}"): _typed(v, args[1], f"{field}.{k}")
                for k, v in _dict(value, field).items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(field, "must be true or false", value)
        return value
    if tp is int:
        return _int(value, field)
    if tp is float:
        return _number(value, field)
    if tp is str:
        return _str(value, field)
    raise _bad(field, f"has a type this server cannot check ({tp})", value)


def _array(arrays: dict[str, np.ndarray], name: str, field: str, *, kinds: str,
           ndims: tuple[int, ...]) -> np.ndarray:
    if name not in arrays:
        raise SGPInputError(f"Request field {field} needs the array {name!r}, which the body "
                            "lacks. Requests are built by SlicerSGP.service.client (same version "
                            "as the server).")
    arr = arrays[name]
    if arr.dtype.kind not in kinds or arr.ndim not in ndims:
        raise SGPInputError(f"Array {name!r} ({field}) is {arr.ndim}D {arr.dtype}; it must be "
                            f"{' or '.join(f'{n}D' for n in ndims)} numbers (bool, integer or "
                            "float).")
    return arr


def _label_array(arrays: dict[str, np.ndarray], name: str, field: str) -> np.ndarray:
    ndims = (0, 1, 2, 3, 4, 5) if name == "labels_full" else (2,)
    return _array(arrays, name, field, kinds="biuf", ndims=ndims)


def _label_dtype(value: Any, field: str) -> np.dtype:
    try:
        dtype = np.dtype(_str(value, field))
    except TypeError:
        raise _bad(field, "must name a numpy integer, bool or float type (e.g. '|u1')",
                   value) from None
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise _bad(field, "must name a numpy integer, bool or float type (e.g. '|u1')", value)
    return dtype


# --------------------------------------------------------------------------- results

def encode_result(result: SegmentationResult, probabilities: bool) -> bytes:
    """The result as one .npz; probabilities only when asked (they are the bulk).

    Field by field, so that a field the engine adds travels without a protocol change: arrays
    and dicts of arrays as .npy entries, geometry and dicts as JSON (dicts as key/value pairs,
    keeping int keys), everything else as JSON.
    """
    arrays: dict[str, np.ndarray] = {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(SegmentationResult):
        value = getattr(result, f.name)
        if f.name == "probabilities" and not probabilities:
            fields[f.name] = {"kind": "arrays", "keys": []}
        elif isinstance(value, np.ndarray):
            arrays[f.name] = value
            fields[f.name] = {"kind": "array"}
        elif isinstance(value, Geometry) or (value is None and f.name == "geometry"):
            fields[f.name] = {"kind": "geometry", "value": geometry_to_json(value)}
        elif isinstance(value, dict) and any(isinstance(v, np.ndarray) for v in value.values()):
            for k, v in value.items():
                arrays[f"{f.name}__{k}"] = v
            fields[f.name] = {"kind": "arrays", "keys": [_plain(k) for k in value]}
        elif isinstance(value, dict):
            fields[f.name] = {"kind": "dict", "items": [[_plain(k), _plain(v)]
                                                        for k, v in value.items()]}
        else:
            fields[f.name] = {"kind": "json", "value": _plain(value)}
    return pack(arrays, {"fields": fields})


def decode_result(data: bytes) -> SegmentationResult:
    arrays, meta = unpack(data, structured=True)
    values: dict[str, Any] = {}
    for name, spec in meta["fields"].items():
        kind = spec["kind"]
        if kind == "array":
            values[name] = arrays[name]
        elif kind == "arrays":
            values[name] = {k: arrays[f"{name}__{k}"] for k in spec["keys"]}
        elif kind == "geometry":
            values[name] = geometry_from_json(spec["value"])
        elif kind == "dict":
            values[name] = {k: v for k, v in spec["items"]}
        else:
            values[name] = spec["value"]
    known = {f.name for f in dataclasses.fields(SegmentationResult)}
    return SegmentationResult(**{k: v for k, v in values.items() if k in known})


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


ERROR_TYPES = ("input", "weights", "device", "engine", "internal", "cancelled", "busy",
               "dropped")
"""``error_type`` of a failed run or a refused request; the client maps them back to the
engine's exception classes. ``busy``: refused for a full queue or store, or a click refinement
that waited too long (429/503, try again); ``dropped``: a finished run whose result was freed
before download to keep within --max-results-mb."""
