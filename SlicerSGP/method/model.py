"""The SAM2-SGP network: the official SAM2 modules plus the parts the paper adds.

- FE: SAM2's image encoder (Hiera + FPN) with LoRA adapters (peft) on the Hiera attention
  projections; base weights frozen.
- PMG: SAM2's memory encoder, memory attention and mask decoder, used as SAM2 uses them (the
  engine assembles the memories; see ``SlicerSGP.method.segmenter``).
- PMA: mask attention, paper eq. (7), and a hierarchical decoder that starts from the pretrained
  SAM2 mask decoder and refines its quarter-resolution output to full input resolution.

Nothing here re-implements SAM2: every SAM2 part is the ``sam2`` package's own module. Building
the network from a :class:`ModelConfig` or a preset, and saving and loading SGP checkpoints, is
the builder's (:mod:`SlicerSGP.build_model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from SlicerSGP.errors import SGPInputError
from SlicerSGP.method.pma import PseudoMaskAttention, SupportPointer, SupportPrior

SUPPORTED_IMAGE_SIZES = tuple(range(256, 1025, 64))
LORA_TARGETS = r".*trunk\.blocks\.\d+\.attn\.(qkv|proj)"


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network (stored in SGP checkpoints)."""

    size: str = "tiny"
    image_size: int = 1024
    mode: str = "training_free"
    """'training_free' (pretrained SAM2 only) or 'trained' (LoRA + PMA decoder)."""
    lora_rank: int = 0
    lora_alpha: float = 16.0
    pma_heads: int = 8
    sam2_overrides: list[str] = field(default_factory=list)
    """Extra hydra overrides, e.g. a smaller Hiera for CPU training."""
    train_pmg: bool = False
    """PMG (memory attention, memory encoder, SAM2's mask decoder, pointer projection) is
    trained too and stored in the checkpoint, so the KL term can teach it to agree with PMA."""

    def validate(self) -> None:
        if self.image_size not in SUPPORTED_IMAGE_SIZES:
            raise SGPInputError(
                f"Input size {self.image_size} is not supported: use a multiple of 64 between "
                f"256 and 1024 (1024 is what the pretrained SAM2 weights were trained at)."
            )
        if self.mode not in ("training_free", "trained"):
            raise SGPInputError(f"Unknown mode {self.mode!r}: use 'training_free' or 'trained'.")


@dataclass(frozen=True)
class ModelPreset:
    """A SAM2.1 config made smaller, to train on a CPU in minutes (use with ``image_size`` 256).

    A name in :data:`MODEL_PRESETS` stands for one wherever a SAM2.1 size is asked for in
    training (``--model cpu-mini``); :func:`SlicerSGP.build_model.preset_overrides` turns it
    into the hydra overrides of the SAM2.1 config it shrinks."""

    size: str
    """The SAM2.1 size whose config is made smaller."""
    dim: int
    """Width of the image encoder's neck, memory attention and memory encoder."""
    embed_dim: int
    """Width of Hiera's first stage; each later stage doubles it."""
    stages: tuple[int, ...] = (1, 1, 2, 1)
    """Hiera blocks per stage."""
    global_attention_blocks: tuple[int, ...] = (3,)
    """Hiera blocks that attend globally (the rest attend within windows)."""
    heads: int = 1
    """Hiera's attention heads in the first stage."""
    window_background: tuple[int, int] = (4, 4)
    """Size of Hiera's background position embedding."""
    memory_attention_layers: int = 2
    memory_fuser_layers: int = 1


MODEL_PRESETS: dict[str, ModelPreset] = {
    "cpu-mini": ModelPreset(size="tiny", dim=128, embed_dim=32),
    "cpu-micro": ModelPreset(size="tiny", dim=32, embed_dim=8),
}
"""``--model cpu-mini``: the SAM2.1 tiny config made smaller (5 Hiera blocks of width 32-256, a
128-wide neck); not SAM2.1 small, which keeps its name. ``cpu-micro``: narrower still (1.1M
parameters), for checkpoints small enough to keep beside the tests."""


class SGPModel(nn.Module):
    """SAM2 + LoRA + PMA. The engine drives it slice by slice; training drives it too."""

    def __init__(self, sam: nn.Module, config: ModelConfig):
        super().__init__()
        self.config = config
        self.sam = sam
        self.pma: PseudoMaskAttention | None = None
        self.support_pointer: SupportPointer | None = None
        self.support_prior: SupportPrior | None = None
        if config.lora_rank > 0:
            inject_lora(self.sam.image_encoder, config.lora_rank, config.lora_alpha)
        if config.mode == "trained":
            self.pma = PseudoMaskAttention(sam.sam_mask_decoder, sam.hidden_dim, config.pma_heads)
            self.support_pointer = SupportPointer(sam.hidden_dim)
            self.support_prior = SupportPrior(sam.hidden_dim)

    @property
    def image_size(self) -> int:
        return int(self.sam.image_size)

    def freeze_base(self) -> None:
        """Freeze SAM2's weights; LoRA adapters and PMA (and PMG with ``train_pmg``) stay
        trainable."""
        for name, p in self.named_parameters():
            p.requires_grad = is_sgp_owned(name, self.config)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if is_sgp_owned(k, self.config)}


PMG_PREFIXES = ("sam.memory_attention.", "sam.memory_encoder.", "sam.sam_mask_decoder.",
                "sam.obj_ptr_proj.")
"""The modules PMG runs on top of the image encoder: trained with ``train_pmg``."""


ZERO_START_PREFIXES = ("support_pointer.", "support_prior.")
"""Modules whose projections start at zero: a checkpoint written before they existed lacks
them, and their zero start is what it was trained with."""


def is_sgp_owned(key: str, config: ModelConfig) -> bool:
    """Whether a tensor is the SGP checkpoint's (trained here) rather than base SAM2's."""
    if "lora_" in key or key.startswith(("pma.", *ZERO_START_PREFIXES)):
        return True
    return config.train_pmg and key.startswith(PMG_PREFIXES)


def inject_lora(module: nn.Module, rank: int, alpha: float) -> None:
    """Add peft LoRA adapters to the Hiera attention projections (``qkv`` and ``proj``).

    peft initialises the B matrices at zero, so the adapted encoder starts equal to the base.
    """
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                     bias="none")
    inject_adapter_in_model(cfg, module)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def describe(model: SGPModel) -> str:
    c = model.config
    return (f"SAM2.1 {c.size} @ {c.image_size}px, {c.mode}"
            f"{f', LoRA r={c.lora_rank}' if c.lora_rank else ''}, "
            f"{count_parameters(model) / 1e6:.1f}M parameters")


__all__ = [
    "LORA_TARGETS",
    "MODEL_PRESETS",
    "PMG_PREFIXES",
    "SUPPORTED_IMAGE_SIZES",
    "ZERO_START_PREFIXES",
    "ModelConfig",
    "ModelPreset",
    "SGPModel",
    "count_parameters",
    "describe",
    "inject_lora",
    "is_sgp_owned",
]
