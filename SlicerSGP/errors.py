"""Errors the engine raises on purpose. Each message names the problem and the fix."""

from __future__ import annotations


class SGPError(Exception):
    """Base class: anything the user can act on."""


class SGPInputError(SGPError, ValueError):
    """The image, labels, support or options cannot be used as given."""


class SGPWeightsError(SGPError):
    """A checkpoint is missing, truncated, of the wrong model, or fails its checksum."""


class SGPDeviceError(SGPError):
    """The requested device cannot be used (e.g. CUDA asked for but not available)."""


class Cancelled(SGPError):
    """The caller's cancel check returned True; nothing was written."""


class SGPServiceError(SGPError):
    """The engine service cannot be used: unreachable, wrong token, version or model mismatch,
    or the server process died."""
