"""Where and in which precision the model runs: device choice, autocast, stage timers.

One :class:`Runtime` is shared by the parts of a :class:`~SlicerSGP.method.segmenter.Segmenter`
(encoder, support memories, slice predictor, propagation), so they agree on device, dtype and
the stage timers a benchmark reads.
"""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager, nullcontext
from functools import lru_cache

import torch

from SlicerSGP.errors import SGPDeviceError, SGPInputError
from SlicerSGP.host import cpu_flags
from SlicerSGP.method import fast_paths
from SlicerSGP.method.model import SGPModel


def mps_available() -> bool:
    """Apple-silicon GPU (Metal) usable by this torch."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' (CUDA, else Apple MPS, else CPU), 'cpu', 'mps', 'cuda' or 'cuda:N'."""
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps_available():
            raise SGPDeviceError(
                f"--device mps was asked for, but torch {torch.__version__} sees no Apple GPU "
                "(MPS needs an Apple-silicon Mac and macOS 12.3 or later). Use --device cpu or "
                "--device auto."
            )
        return torch.device("mps")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SGPDeviceError(
                f"--device {device} was asked for, but this machine has no usable CUDA GPU "
                f"(torch {torch.__version__} sees none). Use --device cpu (slower) or "
                "--device auto, or install a CUDA build of torch that matches the driver."
            )
        index = 0 if name == "cuda" else name.partition(":")[2]
        try:
            index = int(index)
        except ValueError:
            raise SGPInputError(
                f"Unknown device {device!r}: use auto, cpu, mps, cuda or cuda:N.") from None
        if index >= torch.cuda.device_count():
            raise SGPDeviceError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})."
            )
        return torch.device(f"cuda:{index}")
    raise SGPInputError(f"Unknown device {device!r}: use auto, cpu, mps, cuda or cuda:N.")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AMX or AVX512-BF16).

    Elsewhere (AVX2 only) bf16 is emulated and was measured 9x slower than float32, so 'auto'
    must not choose it there.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The autocast dtype for ``dtype`` ('auto', 'float32', 'bfloat16'); None = float32.

    'auto' is bf16 on CUDA and on CPUs with native bf16, float32 elsewhere (MPS included:
    its mixed precision is unmeasured here).
    """
    if dtype in ("float32", "fp32"):
        return None
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if dtype != "auto":
        raise SGPInputError(f"Unknown dtype {dtype!r}: use auto, float32 or bfloat16.")
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return None


def feature_dtype(name: str) -> torch.dtype | None:
    """Storage dtype of cached slice features. 'auto' stores bf16 (half the memory of float32;
    SAM2 itself runs its features in bf16 on GPUs); 'float32' keeps them exact, which the
    equality with SAM2's video predictor is proven at."""
    if name in ("auto", "bfloat16", "bf16"):
        return torch.bfloat16
    if name in ("float32", "fp32"):
        return torch.float32
    raise SGPInputError(f"Unknown feature dtype {name!r}: use auto, float32 or bfloat16.")


class Runtime:
    """The model with its device, precision and per-stage timers."""

    def __init__(self, model: SGPModel, device: torch.device, dtype: str = "auto",
                 features: str = "auto"):
        self.model = model
        fast_paths.install(model.sam)
        self.device = device
        self.autocast_dtype = autocast_dtype(device, dtype)
        self.feature_dtype = feature_dtype(features)
        self.stage_times: dict[str, float] = {}
        self.sync_timers = False
        """Synchronise the device around each timed stage (benchmarks only)."""

    @property
    def sam(self):
        return self.model.sam

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast_dtype if self.autocast_dtype is not None else torch.float32

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def mode(self, grad: bool):
        """Autograd off for segmentation, on for training (LoRA, PMA).

        Under autocast, ``no_grad`` rather than ``inference_mode``: autocast keeps each
        weight's low-precision copy for the whole autocast region only outside inference mode
        (inside it, every layer casts its weights again on every call). The values computed
        are the same."""
        if grad:
            return torch.enable_grad()
        return torch.inference_mode() if self.autocast_dtype is None else torch.no_grad()

    @contextmanager
    def timed(self, stage: str):
        if self.sync_timers and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.sync_timers and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stage_times[stage] = self.stage_times.get(stage, 0.0) + time.perf_counter() - t


def flat(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (HW, B, C), the sequence layout SAM2's attention modules take."""
    return x.flatten(2).permute(2, 0, 1)
