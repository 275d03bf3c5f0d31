"""How a request is refused: :class:`LimitExceeded` (over a server limit) and the field-by-field
checks of a request's JSON and arrays, each naming the field it refuses (stdlib + numpy only).

Everything a client sends is checked here before the engine sees it: a malformed request is an
SGPInputError (HTTP 422) that names the field, never an engine fault (500).
"""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Any

import numpy as np

from SlicerSGP.errors import SGPError, SGPInputError
from SlicerSGP.types import SlicePrompt


class LimitExceeded(SGPError):
    """A request refused by one of the server's limits before any work: HTTP ``status`` (413:
    the request is too large; 429: the queue is full; 503: the server is busy), a message
    naming the limit and the option that raises it, and ``retry_after`` seconds where waiting
    helps (sent as Retry-After)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


RUN_FIELDS = ("volume_id", "structures", "options", "support_slices", "labels", "bank",
              "prompts")
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


def prompts_from_json(data: Any, arrays: dict[str, np.ndarray]) -> list[SlicePrompt] | None:
    """A run's ``prompts``: ``[{"value", "slice", "box": [x0, y0, x1, y1] | null, "points":
    [[x, y, positive], ...], "mask": bool}]``, a mask as array ``prompt_mask_<i>``. Field
    types here; boxes and clicks against the slice in ``data.prompt_checks``."""
    if data is None:
        return None
    out = []
    for i, item in enumerate(_list(data, "prompts")):
        field = f"prompts[{i}]"
        _check_keys(_dict(item, field), field, required=("value", "slice"),
                    optional=("box", "points", "mask"))
        box = item.get("box")
        if box is not None:
            box = tuple(_number(v, f"{field}.box[{j}]")
                        for j, v in enumerate(_list(box, f"{field}.box", exact=4)))
        points = []
        for j, point in enumerate(_list(item.get("points") or [], f"{field}.points")):
            x, y, positive = _list(point, f"{field}.points[{j}]", exact=3)
            if not isinstance(positive, bool):
                raise _bad(f"{field}.points[{j}][2]", "must be true (add) or false (not here)",
                           positive)
            points.append((_number(x, f"{field}.points[{j}][0]"),
                           _number(y, f"{field}.points[{j}][1]"), positive))
        has_mask = item.get("mask", False)
        if not isinstance(has_mask, bool):
            raise _bad(f"{field}.mask", "must be true or false", has_mask)
        mask = _array(arrays, f"prompt_mask_{i}", f"{field}.mask", kinds="biuf",
                      ndims=(2,)) if has_mask else None
        out.append(SlicePrompt(_int(item["value"], f"{field}.value", 1),
                               _int(item["slice"], f"{field}.slice", 0), box, points,
                               None if mask is None else mask != 0))
    return out


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
