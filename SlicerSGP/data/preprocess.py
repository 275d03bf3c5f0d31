"""Preprocessing: intensity mapping, volume checks, slicing axis, and the model-space letterbox.

Rules:

* One intensity mapping per volume, never per slice: :func:`intensity_range` looks at the whole
  volume once and :func:`normalize_intensity` applies the same ``(lo, hi)`` window to every voxel,
  so a brighter slice stays brighter after mapping.
* Slices are taken along one array axis; :func:`reorient` moves it to the front and
  :func:`restore_orientation` is its exact inverse (pure axis permutations, no resampling).
* Slices go to the model at ``size x size`` with the aspect ratio kept: resized so the longer
  side is ``size`` and padded at the bottom/right (:class:`LetterboxTransform`). Padding is added
  *after* SAM2's ImageNet normalisation with the value 0, i.e. the padding is the ImageNet mean
  colour, which is what a zero-mean input means to the encoder. Model outputs (logits at any
  model-space resolution) are mapped back onto the original pixel grid with the exact inverse
  coordinate mapping.

Geometry is never touched here: arrays only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from SlicerSGP.data.intensity import (  # noqa: F401  (re-exported: one place to import from)
    AUTO_CT_PRESET,
    CT_PRESETS,
    INTENSITY_MODES,
    PERCENTILES,
    evenly_spaced,
    intensity_range,
    is_rgb,
    normalize_intensity,
)
from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import AXIS_LABELS, axis_label

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MIN_SLICE_SIZE = 16
"""Smallest in-plane size (pixels, either axis) accepted by :func:`validate_volume`."""


# --------------------------------------------------------------------------------------------
# Checks and orientation
# --------------------------------------------------------------------------------------------


def _check_axis(axis: int) -> int:
    if (
        isinstance(axis, bool)
        or not isinstance(axis, (int, np.integer))
        or int(axis) not in (0, 1, 2)
    ):
        choices = ", ".join(f"{a} = {label}" for a, label in AXIS_LABELS.items())
        got = int(axis) if isinstance(axis, np.integer) else axis  # plain, not np.int64(...)
        raise SGPInputError(f"Slicing axis must be one of {choices}; got {got!r}.")
    return int(axis)


def validate_volume(volume: np.ndarray, axis: int = 0, *, min_size: int = MIN_SLICE_SIZE) -> None:
    """Raise :class:`SGPInputError` (problem + fix) if ``volume`` cannot be segmented.

    Accepted: ``(K, J, I)`` scalar or ``(K, J, I, 3)`` RGB, finite, non-empty, with slices
    along ``axis`` at least ``min_size`` pixels on both in-plane axes.
    """
    axis = _check_axis(axis)
    if not isinstance(volume, np.ndarray):
        volume = np.asarray(volume)
    shape = tuple(int(s) for s in volume.shape)
    if volume.ndim < 3:
        raise SGPInputError(
            f"Volume must be 3D (K, J, I) or RGB (K, J, I, 3); got shape {shape}. "
            "For a single 2D image add a slice axis first (image[None])."
        )
    if volume.ndim > 4:
        raise SGPInputError(
            f"{volume.ndim}D input (shape {shape}) is not supported: pick one time point / "
            "channel first so that a 3D (K, J, I) or RGB (K, J, I, 3) volume remains."
        )
    if volume.ndim == 4 and shape[-1] != 3:
        raise SGPInputError(
            f"4D input (shape {shape}) is not supported: pick one time point / channel first "
            "(e.g. volume[t] or volume[..., c]); only a last axis of 3 (RGB) is accepted"
            + (" (for RGBA drop the alpha channel: volume[..., :3])." if shape[-1] == 4 else ".")
        )
    if volume.size == 0:
        raise SGPInputError(f"Volume is empty (shape {shape}); load a volume with voxels in it.")
    if not (np.issubdtype(volume.dtype, np.number) or volume.dtype == np.bool_) or \
            volume.dtype.kind == "m":  # timedelta64 counts as a number to numpy
        raise SGPInputError(
            f"Volume has a non-numeric data type ({volume.dtype}); convert it to a numeric array."
        )
    if np.issubdtype(volume.dtype, np.complexfloating):
        raise SGPInputError(
            "Volume has complex values; take the magnitude (np.abs) or the real part first."
        )
    if np.issubdtype(volume.dtype, np.floating):
        finite = np.isfinite(volume)
        if not finite.all():
            n_nan = int(np.isnan(volume).sum())
            n_inf = int(volume.size - finite.sum()) - n_nan
            raise SGPInputError(
                f"Volume has {n_nan} NaN and {n_inf} infinite voxels (of {volume.size}); "
                "fill them (e.g. np.nan_to_num or the background value) or mask them out first."
            )
    spatial = shape[:3]
    in_plane = [spatial[a] for a in range(3) if a != axis]
    if min(in_plane) < min_size:
        raise SGPInputError(
            f"Slices along axis {axis_label(axis)} are {in_plane[0]} x {in_plane[1]} pixels "
            f"(volume shape {shape}); at least {min_size} x {min_size} is needed. Choose another "
            "slicing axis or resample the volume to a finer grid."
        )


def reorient(volume, axis: int):
    """Move the slicing ``axis`` (0, 1, 2 of the ``(K, J, I[, C])`` array) to the front.

    Returns a view (numpy) or a view-like tensor (torch); a colour channel stays last.
    """
    axis = _check_axis(axis)
    if isinstance(volume, torch.Tensor):
        return volume.movedim(axis, 0)
    return np.moveaxis(volume, axis, 0)


def restore_orientation(arr, axis: int):
    """Exact inverse of :func:`reorient`: move the front axis back to position ``axis``."""
    axis = _check_axis(axis)
    if isinstance(arr, torch.Tensor):
        return arr.movedim(0, axis)
    return np.moveaxis(arr, 0, axis)


# --------------------------------------------------------------------------------------------
# Letterbox: aspect-preserving resize + pad to the model size, and its exact inverse
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LetterboxTransform:
    """Maps ``height x width`` slices to ``size x size`` model inputs and back.

    ``scale = size / max(height, width)``; the slice is resized to
    ``(resized_h, resized_w) = (round(height * scale), round(width * scale))`` and padded at the
    bottom and right to ``size x size``. A pixel coordinate ``u`` (continuous, pixel edges at
    integers) of the slice maps to ``u * resized / original`` in model space, the convention of
    ``F.interpolate(..., align_corners=False)``; :meth:`logits_to_image` inverts exactly this.
    """

    height: int
    width: int
    size: int

    def __post_init__(self) -> None:
        for name in ("height", "width", "size"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise SGPInputError(
                    f"LetterboxTransform {name} must be a positive integer; got "
                    f"{value.item() if isinstance(value, np.generic) else value!r}."
                )
            object.__setattr__(self, name, int(value))

    @property
    def scale(self) -> float:
        return self.size / max(self.height, self.width)

    @property
    def resized_h(self) -> int:
        return min(self.size, max(1, round(self.height * self.scale)))

    @property
    def resized_w(self) -> int:
        return min(self.size, max(1, round(self.width * self.scale)))

    @property
    def is_identity(self) -> bool:
        return self.height == self.size and self.width == self.size

    def _check(self, x: torch.Tensor, what: str) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim != 4 or tuple(x.shape[-2:]) != (self.height, self.width):
            raise SGPInputError(
                f"{what} must have shape [N, C, {self.height}, {self.width}]; got {tuple(x.shape)}."
            )
        if not x.is_floating_point():
            x = x.float()
        return x

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = self.size - x.shape[-2], self.size - x.shape[-1]
        if pad_h == 0 and pad_w == 0:
            return x
        return F.pad(x, (0, pad_w, 0, pad_h), mode="constant", value=0.0)

    def image_to_model(self, slices: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` float (already ImageNet-normalised) -> ``[N, C, size, size]``.

        Bilinear (``align_corners=False``; antialiased when downscaling), then zero padding at
        bottom/right: after normalisation 0 is the ImageNet mean colour.
        """
        x = self._check(slices, "slices")
        h, w = self.resized_h, self.resized_w
        if (h, w) != (self.height, self.width):
            down = h < self.height or w < self.width
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=down)
        return self._pad(x)

    def mask_to_model(self, masks: torch.Tensor, cover: bool = False) -> torch.Tensor:
        """``[N, 1, H, W]`` binary masks -> ``[N, 1, size, size]`` binary float masks.

        As SAM2's video predictor does for a mask prompt: bilinear with antialias, then
        ``>= 0.5``; the padding is background (0). With ``cover``, every model pixel the mask
        touches at all (``> 0``): a region to keep clear, never a voxel of it missed.
        """
        x = self._check(masks, "masks")
        h, w = self.resized_h, self.resized_w
        if (h, w) != (self.height, self.width):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = ((x > 0) if cover else (x >= 0.5)).to(x.dtype)
        return self._pad(x)

    def points_to_model(self, xy: np.ndarray) -> np.ndarray:
        """``[N, 2]`` voxel (column, row) of the slice -> SAM2's (x, y) prompt coordinates in
        model pixels (clicks and box corners). The voxel centre ``(c + 0.5, r + 0.5)`` lies at
        ``(c + 0.5) * resized / original`` in model space; SAM2's prompt encoder adds 0.5 to
        every coordinate it gets (a pixel index to its centre), so that is taken off here."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        scale = np.array([self.resized_w / self.width, self.resized_h / self.height])
        return (xy + 0.5) * scale - 0.5

    def logits_to_image(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, C, s, s]`` model-space maps at any resolution ``s`` -> ``[N, C, H, W]``.

        The un-padded region is ``resized_h * s / size`` by ``resized_w * s / size`` model-space
        pixels. When that is a whole number of pixels it is cropped and resized with bilinear
        ``F.interpolate(align_corners=False)`` (a plain crop when it already is ``H x W``: the
        identity case is bit-exact); otherwise ``grid_sample`` samples the fractional region at
        the exact positions of the original pixel centres. No antialiasing (as SAM2 does when it
        upsamples its logits).
        """
        x = torch.as_tensor(logits)
        if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
            raise SGPInputError(f"logits must have shape [N, C, s, s]; got {tuple(x.shape)}.")
        if not x.is_floating_point():
            x = x.float()
        s = int(x.shape[-1])
        H, W = self.height, self.width
        num_h, num_w = self.resized_h * s, self.resized_w * s
        if num_h % self.size == 0 and num_w % self.size == 0:
            crop_h, crop_w = num_h // self.size, num_w // self.size
            x = x[..., :crop_h, :crop_w]
            if (crop_h, crop_w) == (H, W):
                return x.clone()
            return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        # Normalised grid_sample coordinates (align_corners=False: -1 and 1 are the outer edges of
        # the s x s map): original pixel centre y + 0.5 lies at (y + 0.5) * resized_h / H model
        # pixels of the full `size` grid, i.e. at fraction (y + 0.5) * resized_h / (H * size).
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        ys = (torch.arange(H, dtype=torch.float64) + 0.5) * (
            2.0 * self.resized_h / (H * self.size)
        ) - 1.0
        xs = (torch.arange(W, dtype=torch.float64) + 0.5) * (
            2.0 * self.resized_w / (W * self.size)
        ) - 1.0
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((gx, gy), dim=-1).to(dtype=dtype, device=x.device)
        grid = grid.unsqueeze(0).expand(x.shape[0], H, W, 2)
        out = F.grid_sample(
            x.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        return out.to(x.dtype)


def to_model_input(
    slices01: np.ndarray,
    transform: LetterboxTransform,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Slices in [0, 1] -> the SAM2 image encoder's input ``[N, 3, size, size]`` float32.

    ``slices01`` is ``(N, H, W)`` (grayscale, replicated to 3 channels) or ``(N, H, W, 3)``
    (RGB). ImageNet mean/std normalisation as SAM2 does, then
    :meth:`LetterboxTransform.image_to_model`
    (resize, zero = mean-colour padding).
    """
    arr = torch.as_tensor(np.asarray(slices01), dtype=torch.float32)
    if arr.ndim == 3:
        x = arr.unsqueeze(1).expand(-1, 3, -1, -1)
    elif arr.ndim == 4 and arr.shape[-1] == 3:
        x = arr.permute(0, 3, 1, 2)
    else:
        raise SGPInputError(
            f"Slices must be (N, H, W) or (N, H, W, 3) in [0, 1]; got shape {tuple(arr.shape)}."
        )
    if device is not None:
        x = x.to(device)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return transform.image_to_model(x.contiguous())
