"""Intensity mapping, numpy only: one window per volume (CT presets, percentiles), and evenly
spaced picks. Kept free of torch so Slicer's process (the module's reference cases) can use the
very same code as the engine.
"""

from __future__ import annotations

import numpy as np

from SlicerSGP.errors import SGPInputError

CT_PRESETS: dict[str, tuple[float, float]] = {
    "ct_abdomen": (40.0, 400.0),
    "ct_lung": (-600.0, 1500.0),
    "ct_bone": (400.0, 1800.0),
    "ct_brain": (40.0, 80.0),
    "ct_soft_tissue": (50.0, 350.0),
}
"""CT window presets: name -> (center, width) in Hounsfield units."""

AUTO_CT_PRESET = "ct_abdomen"
"""Preset 'auto' uses for data that looks like CT in Hounsfield units."""

PERCENTILES = (0.5, 99.5)
"""Percentile clipping used by 'percentile' (and by 'auto' for non-CT, non-8-bit data)."""

INTENSITY_MODES: tuple[str, ...] = ("auto", "percentile", "none", *CT_PRESETS)


def is_rgb(volume: np.ndarray) -> bool:
    return volume.ndim == 4 and volume.shape[-1] == 3


def intensity_range(volume: np.ndarray, mode: str = "auto",
                    drawn: np.ndarray | None = None) -> tuple[float, float]:
    """The ``(lo, hi)`` intensity window for a whole volume (one mapping per volume).

    ``mode``:

    * ``'auto'``: uint8 data or RGB -> ``(0, 255)`` (RGB float data already in [0, 1] ->
      ``(0, 1)``); data that looks like CT in HU (min <= -500 and max > 300) -> the CT preset
      that fits the ``drawn`` voxels' intensities best (:func:`ct_window_for`), the
      ``'ct_abdomen'`` window when nothing is drawn; anything else -> ``'percentile'``.
    * ``'percentile'``: the 0.5 and 99.5 percentiles over all voxels.
    * ``'none'``: min..max of the volume.
    * a CT preset (:data:`CT_PRESETS`): ``center -/+ width / 2``.

    A bool volume is a binary image: ``(0, 1)`` in every mode but a CT preset.

    A window that would be empty (constant volume) is widened to ``(lo, lo + 1)``.
    """
    if mode not in INTENSITY_MODES:
        raise SGPInputError(
            f"Unknown intensity mode {mode!r}. Use one of: {', '.join(INTENSITY_MODES)}."
        )
    if mode in CT_PRESETS:
        center, width = CT_PRESETS[mode]
        return center - width / 2.0, center + width / 2.0

    arr = np.asarray(volume)
    if arr.size == 0:
        raise SGPInputError("Cannot compute an intensity range of an empty volume.")
    if arr.dtype == np.bool_:
        # A binary image (e.g. a thresholded scan): False is 0, True is 1, whatever the mode.
        return 0.0, 1.0
    if mode == "auto":
        if arr.dtype == np.uint8:
            return 0.0, 255.0
        vmin, vmax = float(arr.min()), float(arr.max())
        if is_rgb(arr):
            if np.issubdtype(arr.dtype, np.floating) and vmin >= 0.0 and vmax <= 1.0:
                return 0.0, 1.0
            return 0.0, 255.0
        if vmin <= -500.0 and vmax > 300.0:
            return intensity_range(arr, ct_window_for(drawn))
        mode = "percentile"

    if mode == "percentile":
        lo, hi = (float(v) for v in np.percentile(arr, PERCENTILES))
    else:  # 'none'
        lo, hi = float(arr.min()), float(arr.max())
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def normalize_intensity(volume: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto ``[0, 1]`` (clipped), as float32, same shape."""
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        raise SGPInputError(f"Intensity window is empty (lo={lo:g}, hi={hi:g}); hi must exceed lo.")
    out = np.asarray(volume, dtype=np.float32).copy()
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out




MIN_DRAWN_VOXELS = 20
"""Fewer drawn voxels than this say too little about a structure's intensities."""


def ct_window_for(drawn: np.ndarray | None) -> str:
    """The CT preset for a structure with these voxel intensities (HU): the narrowest window
    holding their 5-95 % range, else the one holding most of that range; the abdomen window
    when too little is drawn. A lung nodule gets the lung window, a vertebra the bone window,
    liver the soft-tissue window."""
    values = np.asarray(drawn, dtype=np.float64).ravel() if drawn is not None else np.empty(0)
    values = values[np.isfinite(values)]
    if values.size < MIN_DRAWN_VOXELS:
        return AUTO_CT_PRESET
    p5, p95 = (float(v) for v in np.percentile(values, (5, 95)))

    def window(name: str) -> tuple[float, float]:
        center, width = CT_PRESETS[name]
        return center - width / 2.0, center + width / 2.0

    holding = [n for n in CT_PRESETS if window(n)[0] <= p5 and p95 <= window(n)[1]]
    if holding:
        return min(holding, key=lambda n: (CT_PRESETS[n][1], n))

    def covered(name: str) -> float:
        lo, hi = window(name)
        return max(0.0, min(hi, p95) - max(lo, p5)) / max(p95 - p5, 1e-6)

    return max(CT_PRESETS, key=lambda n: (covered(n), -CT_PRESETS[n][1]))


def evenly_spaced(indices: list[int], count: int) -> list[int]:
    """``count`` items of ``indices`` spread evenly from first to last (all if ``count`` is
    large enough), e.g. to pick empty slices that teach "absent here"."""
    if count >= len(indices):
        return list(indices)
    if count <= 0:
        return []
    picks = np.linspace(0, len(indices) - 1, count).round().astype(int)
    return [indices[i] for i in sorted(set(picks.tolist()))]
