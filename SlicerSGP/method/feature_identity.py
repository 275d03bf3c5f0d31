"""What a file of slice features on disk is keyed by and checked with: the model's
fingerprint (everything a slice's features depend on besides the slice) and a digest of
tensors. Used by :mod:`~SlicerSGP.method.feature_cache`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import torch

from SlicerSGP.method.runtime import Runtime

FORMAT = "sgp-features-v1"
"""The layout and file format; part of every key and the name of the folder inside DIR."""


def model_fingerprint(rt: Runtime) -> str:
    """A hash of everything a slice's features depend on besides the slice itself."""
    import SlicerSGP

    model, sam = rt.model, rt.sam
    h = hashlib.sha256()
    try:
        from importlib.metadata import version

        sam2_version = version("sam2")
    except Exception:  # not installed as a distribution (a source checkout)
        sam2_version = "unknown"
    device = rt.device.type
    if device == "cuda":
        device += "|" + torch.cuda.get_device_name(rt.device)
    config = getattr(model, "config", None)
    header = {"format": FORMAT, "slicersgp": SlicerSGP.__version__, "torch": torch.__version__,
              "sam2": sam2_version, "device": device, "image_size": rt.image_size,
              "autocast": str(rt.autocast_dtype), "features": str(rt.feature_dtype),
              "config": asdict(config) if config is not None else None,
              "sam": type(sam).__name__, "encoder": repr(sam.image_encoder)}
    h.update(json.dumps(header, sort_keys=True, default=str).encode())
    parts = [("image_encoder", sam.image_encoder)]
    if getattr(sam, "use_high_res_features_in_sam", False):
        parts += [("conv_s0", sam.sam_mask_decoder.conv_s0),
                  ("conv_s1", sam.sam_mask_decoder.conv_s1)]
    with torch.no_grad():
        for prefix, module in parts:
            for name, t in module.state_dict().items():
                h.update(f"|{prefix}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(tensor_bytes(t))
    return h.hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
