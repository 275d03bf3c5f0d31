"""Voxel-grid geometry: SimpleITK images <-> :class:`~SlicerSGP.types.Geometry`, the IJK-to-LPS
matrix, and the check that a label map lies on its image's grid.

Messages print plain numbers (``(0.7, 1.3, 2.5)``), never numpy reprs such as ``np.float64(0.7)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import SimpleITK as sitk

from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import Geometry

GEOMETRY_TOLERANCE = 1e-3
"""Relative tolerance when a label map's geometry is compared with its image's: spacing relative
to the spacing, origin relative to the largest voxel size, direction (unit vectors) absolute."""


def format_numbers(values: Iterable, digits: int = 6) -> str:
    """``(0.7, 1.3, 2.5)``: plain Python numbers rounded to ``digits`` significant digits, for
    messages (numpy scalars would print as ``np.float64(0.7)``)."""
    parts = []
    for v in values:
        v = v.item() if isinstance(v, np.generic) else v
        parts.append(str(int(v)) if isinstance(v, (int, np.integer)) else f"{float(v):.{digits}g}")
    return "(" + ", ".join(parts) + ")"


def geometry_from_sitk(img: sitk.Image) -> Geometry:
    """The :class:`Geometry` of a 2D or 3D SimpleITK image (2D: z origin 0, z spacing 1)."""
    dim = img.GetDimension()
    if dim == 3:
        return Geometry(
            origin=tuple(float(v) for v in img.GetOrigin()),
            spacing=tuple(float(v) for v in img.GetSpacing()),
            direction=tuple(float(v) for v in img.GetDirection()),
        )
    if dim == 2:
        ox, oy = img.GetOrigin()
        sx, sy = img.GetSpacing()
        d = img.GetDirection()
        return Geometry(
            origin=(float(ox), float(oy), 0.0),
            spacing=(float(sx), float(sy), 1.0),
            direction=(float(d[0]), float(d[1]), 0.0, float(d[2]), float(d[3]), 0.0, 0.0, 0.0, 1.0),
        )
    raise SGPInputError(f"Only 2D and 3D images are supported; this image is {dim}D.")


def sitk_from_array(
    array: np.ndarray, geometry: Geometry | None, is_vector: bool = False
) -> sitk.Image:
    """A 3D SimpleITK image from a ``(K, J, I)`` (or ``(K, J, I, C)`` with ``is_vector``) array."""
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    expected = 4 if is_vector else 3
    if arr.ndim != expected:
        raise SGPInputError(
            f"Expected a {'(K, J, I, C)' if is_vector else '(K, J, I)'} array; got shape "
            f"{tuple(int(s) for s in arr.shape)}."
        )
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=is_vector)
    geometry = geometry or Geometry()
    img.SetOrigin(tuple(float(v) for v in geometry.origin))
    img.SetSpacing(tuple(float(v) for v in geometry.spacing))
    img.SetDirection(tuple(float(v) for v in geometry.direction))
    return img


def ijk_to_lps(geometry: Geometry) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) to LPS millimetres."""
    m = np.eye(4)
    m[:3, :3] = geometry.direction_matrix() * np.asarray(geometry.spacing, dtype=float)[None, :]
    m[:3, 3] = np.asarray(geometry.origin, dtype=float)
    return m


def geometry_from_ijk_to_lps(matrix) -> Geometry:
    """Inverse of :func:`ijk_to_lps` (spacing = column lengths, direction = unit columns)."""
    m = np.asarray(matrix, dtype=float)
    cols = m[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    if np.any(spacing <= 0):
        raise SGPInputError(f"Voxel-to-physical matrix has a zero-length axis: {cols.tolist()}.")
    direction = cols / spacing[None, :]
    return Geometry(
        origin=tuple(float(v) for v in m[:3, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=tuple(float(v) for v in direction.reshape(-1)),
    )


def geometry_mismatch(geom: Geometry, ref: Geometry) -> str | None:
    """How ``geom`` differs from the image geometry ``ref`` beyond :data:`GEOMETRY_TOLERANCE`
    (spacing, then origin, then direction), or None when they agree."""
    tol = GEOMETRY_TOLERANCE
    sp, rsp = np.asarray(geom.spacing, float), np.asarray(ref.spacing, float)
    if np.any(np.abs(sp - rsp) > tol * np.abs(rsp)):
        return f"spacing {format_numbers(sp)} vs image {format_numbers(rsp)}"
    o, ro = np.asarray(geom.origin, float), np.asarray(ref.origin, float)
    if np.any(np.abs(o - ro) > tol * max(float(rsp.max()), 1e-12)):
        return f"origin {format_numbers(o)} vs image {format_numbers(ro)}"
    d, rd = geom.direction_matrix(), ref.direction_matrix()
    if np.any(np.abs(d - rd) > tol):
        return (
            f"direction {format_numbers(d.reshape(-1), 4)} vs image "
            f"{format_numbers(rd.reshape(-1), 4)}"
        )
    return None
