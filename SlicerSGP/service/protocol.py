"""What travels between the engine client and `sgp serve`: stdlib + numpy only (runs in Slicer).

Bodies that carry arrays are ``.npz`` archives (``.npy`` for a volume upload): exact dtypes and
shapes, no pickle, readable by any numpy. JSON that goes with them rides in the archive as the
UTF-8 bytes of entry ``meta``. Label maps travel as their labeled slices only: the slices along
the run's axis that hold any non-zero voxel. Every other slice is all zeros, so the server
rebuilds exactly the caller's label map from them.

Here: the wire constants and the encoding and decoding of volumes, run requests and results.
The archive format is in archive.py, the strict .npy reader in npy.py, the field checks in
request_checks.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any

import numpy as np

from SlicerSGP.errors import SGPInputError

# The names imported ``as`` themselves moved to archive, npy and request_checks; they are
# imported back so that ``protocol.<name>`` keeps working for every caller.
from SlicerSGP.service.archive import ARCHIVE_MAX_DIRECTORY as ARCHIVE_MAX_DIRECTORY
from SlicerSGP.service.archive import pack, unpack
from SlicerSGP.service.npy import NPY_HEADER_LIMIT as NPY_HEADER_LIMIT
from SlicerSGP.service.npy import NPY_MAGIC as NPY_MAGIC
from SlicerSGP.service.npy import NPY_MAX_DIMS as NPY_MAX_DIMS
from SlicerSGP.service.npy import npy_from_bytes as npy_from_bytes
from SlicerSGP.service.npy import npy_header as npy_header
from SlicerSGP.service.npy import volume_from_npy as volume_from_npy
from SlicerSGP.service.npy import volume_to_npy as volume_to_npy
from SlicerSGP.service.request_checks import INT_LIMIT as INT_LIMIT
from SlicerSGP.service.request_checks import MAX_LIST as MAX_LIST
from SlicerSGP.service.request_checks import REFINE_FIELDS as REFINE_FIELDS
from SlicerSGP.service.request_checks import RUN_FIELDS as RUN_FIELDS
from SlicerSGP.service.request_checks import LimitExceeded as LimitExceeded
from SlicerSGP.service.request_checks import (
    _array,
    _bad,
    _check_keys,
    _dict,
    _int,
    _label_array,
    _label_dtype,
    _label_value,
    _list,
    _number,
    _str,
    _typed,
)
from SlicerSGP.service.request_checks import check_meta as check_meta
from SlicerSGP.service.request_checks import prompts_from_json as prompts_from_json
from SlicerSGP.service.request_checks import refine_from_json as refine_from_json
from SlicerSGP.service.request_checks import refine_mask as refine_mask
from SlicerSGP.service.request_checks import slices_from_json as slices_from_json
from SlicerSGP.types import Geometry, SegmentationResult, SegmentOptions, SlicePrompt, SupportItem

PROTOCOL_VERSION = 1
"""Bumped whenever a request or response changes shape; client and server must agree."""
PROTOCOL_HEADER = "X-SGP-Protocol"
GEOMETRY_HEADER = "X-SGP-Geometry"
VOLUME_HEADER = "X-SGP-Volume"
"""The volume id a request concerns, sent by the client with every volume, run and refine
request (a run's requests carry its volume's id). The server does not read it: it is for a
reverse proxy that sends a volume's requests to the server holding its embeddings."""
NPZ = "application/x-npz"
NPY = "application/x-npy"


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


def encode_prompts(prompts: list[SlicePrompt] | None,
                   arrays: dict[str, np.ndarray]) -> list[dict[str, Any]] | None:
    """A run's prompts as JSON, each mask as array ``prompt_mask_<i>`` (see prompts_from_json)."""
    if prompts is None:
        return None
    out = []
    for i, p in enumerate(prompts):
        if p.mask is not None:
            arrays[f"prompt_mask_{i}"] = np.asarray(p.mask).astype(bool)
        out.append({"value": _plain(p.value), "slice": _plain(p.slice_index),
                    "box": None if p.box is None else [float(v) for v in p.box],
                    "points": [[float(x), float(y), bool(pos)] for x, y, pos in p.points],
                    "mask": p.mask is not None})
    return out


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

