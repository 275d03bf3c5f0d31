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
from typing import Any

import numpy as np

from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import Geometry, SegmentationResult, SegmentOptions, SupportItem

PROTOCOL_VERSION = 1
"""Bumped whenever a request or response changes shape; client and server must agree."""
PROTOCOL_HEADER = "X-SGP-Protocol"
GEOMETRY_HEADER = "X-SGP-Geometry"
NPZ = "application/x-npz"
NPY = "application/x-npy"


# --------------------------------------------------------------------------- archives

def pack(arrays: dict[str, np.ndarray], meta: dict[str, Any], compress: bool = False) -> bytes:
    """An .npz holding ``arrays`` and ``meta`` (JSON). Compression pays for sparse label slices
    only; results go uncompressed (float probabilities barely shrink and zlib costs seconds)."""
    buf = io.BytesIO()
    payload = dict(arrays)
    payload["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    (np.savez_compressed if compress else np.savez)(buf, **payload)
    return buf.getvalue()


def unpack(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of :func:`pack`; a malformed archive is an input error naming the problem."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode()) if "meta" in arrays else {}
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        raise SGPInputError(f"The request body is not a SlicerSGP .npz archive ({e}); use "
                            "SlicerSGP.service.client to talk to the server.") from None
    return arrays, meta


def volume_to_npy(volume: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(volume), allow_pickle=False)
    return buf.getvalue()


def volume_from_npy(data: bytes) -> np.ndarray:
    try:
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise SGPInputError(f"The uploaded volume is not a .npy array without objects ({e}).") \
            from None


# --------------------------------------------------------------------------- volumes

def geometry_to_json(geometry: Geometry | None) -> dict[str, list[float]] | None:
    if geometry is None:
        return None
    return {"origin": [float(x) for x in geometry.origin],
            "spacing": [float(x) for x in geometry.spacing],
            "direction": [float(x) for x in geometry.direction]}


def geometry_from_json(data: dict[str, list[float]] | None) -> Geometry | None:
    if data is None:
        return None
    return Geometry(origin=tuple(data["origin"]), spacing=tuple(data["spacing"]),
                    direction=tuple(data["direction"]))


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


def options_from_json(data: dict[str, Any] | None) -> SegmentOptions:
    names = {f.name for f in dataclasses.fields(SegmentOptions)}
    unknown = sorted(set(data or {}) - names)
    if unknown:
        raise SGPInputError(f"Unknown option(s) {unknown}: the client is newer than the server; "
                            "update the server's SlicerSGP.")
    return SegmentOptions(**(data or {}))


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


def decode_labels(desc: dict[str, Any] | None, arrays: dict[str, np.ndarray],
                  volume_shape: tuple[int, ...]) -> np.ndarray | None:
    """Rebuild the caller's label map: zeros with the labeled slices written back."""
    if desc is None:
        return None
    if desc.get("full"):
        return arrays["labels_full"]
    shape = tuple(desc["shape"]) if desc.get("shape") is not None else tuple(volume_shape[:3])
    labels = np.zeros(shape, np.dtype(desc["dtype"]))
    view = np.moveaxis(labels, int(desc["axis"]), 0)
    for k in desc["slices"]:
        if not 0 <= int(k) < view.shape[0]:
            raise SGPInputError(f"Labeled slice {k} is outside the volume (0..{view.shape[0] - 1}).")
        part = arrays[f"label_{k}"]
        if part.shape != view.shape[1:]:
            raise SGPInputError(f"Labeled slice {k} has shape {part.shape}; slices of this "
                                f"volume along the axis have shape {view.shape[1:]}.")
        view[int(k)] = part
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


def decode_bank(desc: dict[str, list[str]] | None,
                arrays: dict[str, np.ndarray]) -> dict[int, list[SupportItem]] | None:
    if desc is None:
        return None
    return {int(v): [SupportItem(arrays[f"bank_{v}_{i}_image"], arrays[f"bank_{v}_{i}_mask"], src)
                     for i, src in enumerate(sources)] for v, sources in desc.items()}


def structures_to_json(structures: dict[int, str] | None) -> dict[str, str] | None:
    return None if structures is None else {str(int(k)): str(v) for k, v in structures.items()}


def structures_from_json(data: dict[str, str] | None) -> dict[int, str] | None:
    return None if data is None else {int(k): v for k, v in data.items()}


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
    arrays, meta = unpack(data)
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


ERROR_TYPES = ("input", "weights", "device", "engine", "internal", "cancelled")
"""``error_type`` of a failed run or a refused request; the client maps them back to the
engine's exception classes."""
