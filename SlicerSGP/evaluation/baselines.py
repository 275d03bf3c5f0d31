"""What clinicians use today, on the same drawn slices, for comparison with SGP propagation.

* :func:`fill_between_slices`: Segment Editor's "Fill between slices", which is ITK's
  morphological contour interpolation (``itk-morphologicalcontourinterpolation``): each
  structure is interpolated between its drawn slices, nothing beyond the outermost ones.
* :func:`nearest_slice_copy`: every slice takes the mask of the nearest drawn slice.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from SlicerSGP.errors import SGPInputError

BASELINES = ("interpolation", "nearest")


def _drawn_only(labels: np.ndarray, drawn: dict[int, list[int]], axis: int) -> np.ndarray:
    """A label map holding each structure on its drawn slices only."""
    moved = np.moveaxis(np.asarray(labels), axis, 0)
    out = np.zeros(moved.shape, np.uint16 if moved.max(initial=0) > 255 else np.uint8)
    for value, slices in drawn.items():
        for k in slices:
            out[k][moved[k] == value] = value
    return out


def fill_between_slices(labels: np.ndarray, drawn: dict[int, list[int]],
                        axis: int = 0) -> np.ndarray:
    """Segment Editor's Fill between slices from the structures' drawn slices (``drawn``:
    value -> slice indices along ``axis``); returns a label map in ``labels``' array order.

    ITK runs in a child process: its wheels bundle their own ITK, which corrupts the heap of a
    process that has SimpleITK loaded too (seen as an abort at exit).
    """
    if importlib.util.find_spec("itk") is None:
        raise SGPInputError(
            "The interpolation baseline needs ITK's morphological contour interpolation: "
            "pip install itk-morphologicalcontourinterpolation"
        )
    sparse = _drawn_only(labels, drawn, axis)
    if sparse.any():
        with tempfile.TemporaryDirectory(prefix="sgp-fill-") as folder:
            src, dst = Path(folder) / "drawn.npy", Path(folder) / "filled.npy"
            np.save(src, np.ascontiguousarray(sparse))
            done = subprocess.run([sys.executable, "-m", __name__, str(src), str(dst)],
                                  capture_output=True, text=True)
            if done.returncode != 0 or not dst.is_file():
                raise SGPInputError("Fill between slices (ITK) failed: "
                                    + (done.stderr.strip().splitlines() or ["no output"])[-1])
            sparse = np.load(dst).astype(sparse.dtype)
    return np.ascontiguousarray(np.moveaxis(sparse, 0, axis))


def _interpolate_file(src: str, dst: str) -> None:
    """The child process's work: ITK's morphological contour interpolation along axis 0."""
    import itk

    image = itk.image_from_array(np.load(src))
    interpolator = itk.MorphologicalContourInterpolator.New(image)
    interpolator.SetAxis(2)  # ITK counts x, y, z: numpy axis 0 is z
    interpolator.Update()
    np.save(dst, itk.array_from_image(interpolator.GetOutput()))


def nearest_slice_copy(labels: np.ndarray, drawn: dict[int, list[int]],
                       axis: int = 0) -> np.ndarray:
    """Every slice gets, per structure, the mask of that structure's nearest drawn slice (ties
    to the lower slice), out to the volume's edges."""
    sparse = _drawn_only(labels, drawn, axis)
    out = np.zeros_like(sparse)
    n = sparse.shape[0]
    for value, slices in drawn.items():
        if not slices:
            continue
        ordered = sorted(slices)
        for k in range(n):
            source = min(ordered, key=lambda s: (abs(s - k), s))
            out[k][sparse[source] == value] = value
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def run_baseline(name: str, labels: np.ndarray, drawn: dict[int, list[int]],
                 axis: int = 0) -> np.ndarray:
    if name == "interpolation":
        return fill_between_slices(labels, drawn, axis)
    if name == "nearest":
        return nearest_slice_copy(labels, drawn, axis)
    raise SGPInputError(f"Unknown baseline {name!r}: use one of {', '.join(BASELINES)}.")


if __name__ == "__main__":
    _interpolate_file(sys.argv[1], sys.argv[2])
