"""SAM2's own modules doing the same work faster at inference, with bit-identical results.

Measured on a CPU (bf16 autocast, one thread, 512 px): a fifth to a quarter of an image-encoder
pass went into position encodings that are the same for every slice (Hiera's interpolated
position embedding and the FPN neck's sine encodings, recomputed and copied per call), and
half of a memory encoding into a matmul that PyTorch runs as a batched product over a copy of
the weight 32 times over, because the ConvNeXt block hands its linear layer a permuted (not
contiguous) input. :func:`install` caches the constants (computed once per size, dtype and
device, never while their parameters train) and hands that linear layer a contiguous input
(the same products, one matrix multiply). Nothing of SAM2 is re-implemented: the wrapped
functions compute what they computed, once; ``Testing/engine/test_fast_paths.py`` checks equality.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from sam2.modeling.memory_encoder import CXBlock
from torch import nn

INSTALLED = "_sgp_fast_paths"
"""Attribute marking a SAM2 model whose fast paths are installed (installing twice is a no-op)."""


class CachedPositionEncoding(nn.Module):
    """A sine position encoding (no parameters: a function of the feature map's shape) computed
    once per shape, dtype and device, already in the feature map's dtype (both SAM2 callers
    cast it to that dtype at once)."""

    def __init__(self, encoding: nn.Module):
        super().__init__()
        self.encoding = encoding
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        pos = self._cache.get(key)
        if pos is None:
            # A normal tensor (not an inference one), so training may read it too.
            with torch.inference_mode(False), torch.no_grad():
                pos = self.encoding(x).to(x.dtype)
            self._cache[key] = pos
        return pos


def _cached_hiera_position_embedding(trunk: nn.Module, hw: Any) -> torch.Tensor:
    """Hiera's ``_get_pos_embed`` (a bicubic interpolation of its position embedding plus the
    tiled window embedding) once per input grid, autocast state and parameter version; computed
    anew whenever the embeddings train. Bound to the trunk, so a deep copy caches its own."""
    compute = type(trunk)._get_pos_embed
    params = (trunk.pos_embed, trunk.pos_embed_window)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return compute(trunk, hw)
    try:
        versions = tuple((p.data_ptr(), p._version) for p in params)
    except RuntimeError:  # parameters made in inference mode carry no version
        return compute(trunk, hw)
    device = trunk.pos_embed.device.type
    key = (tuple(hw), device, torch.is_autocast_enabled(device),
           torch.get_autocast_dtype(device), versions)
    cache = trunk.__dict__.setdefault("_sgp_pos_embed_cache", {})
    pos = cache.get(key)
    if pos is None:
        cache.clear()  # one grid per model in practice; other versions are stale
        with torch.inference_mode(False), torch.no_grad():
            pos = compute(trunk, hw)
        cache[key] = pos
    return pos


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def install(sam: nn.Module) -> None:
    """Install the fast paths on a SAM2 model (see the module docstring)."""
    if getattr(sam, INSTALLED, False):
        return
    neck = sam.image_encoder.neck
    neck.position_encoding = CachedPositionEncoding(neck.position_encoding)
    memory_encoder = sam.memory_encoder
    memory_encoder.position_encoding = CachedPositionEncoding(memory_encoder.position_encoding)
    trunk = sam.image_encoder.trunk
    if hasattr(trunk, "pos_embed_window") and hasattr(type(trunk), "_get_pos_embed"):
        trunk._get_pos_embed = types.MethodType(_cached_hiera_position_embedding, trunk)
    for block in memory_encoder.modules():
        if isinstance(block, CXBlock):
            block.pwconv1.register_forward_pre_hook(_contiguous_input)
    setattr(sam, INSTALLED, True)
