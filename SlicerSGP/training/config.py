"""What a training run is: its settings (``TrainConfig``; ``--model`` may name a CPU-sized preset,
:data:`~SlicerSGP.method.model.MODEL_PRESETS`) and where it writes (the checkpoint and the
resume state beside it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from SlicerSGP.build_model import resolve_model

# --------------------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = "tiny"
    """SAM2.1 size (tiny, small, base_plus, large) or a CPU-sized preset (MODEL_PRESETS)."""
    weights: str | None = None
    """'random', a registry name, a .pt file; None = the cached pretrained checkpoint."""
    image_size: int = 1024
    lora_rank: int = 8
    lora_alpha: float = 16.0
    train_all: bool | None = None
    """Train every weight (None: yes for --weights random, else LoRA + PMA only)."""
    sam2_overrides: list[str] = field(default_factory=list)
    steps: int = 2000
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 50
    grad_clip: float = 1.0
    seq_len: int = 4
    own_support: float = 0.5
    """Fraction of volume episodes whose first slice is labeled support, as at inference."""
    prior_share: float = 0.0
    """Fraction of the episodes with a drawn first slice whose last slice is drawn too, PMA
    prompted between them by their interpolation (Fill between slices; needs ITK)."""
    own_image_support: float = 0.0
    """Fraction of 2D episodes whose support also holds the query image itself, flipped or
    rotated, with its answer (teaches reading the support's masks early; see Trainer)."""
    top_k: int = 4
    memory_size: int | None = None
    memory_policy: str = "least_similar"
    train_pmg: bool = False
    """Also train PMG (memory attention, memory encoder, SAM2's decoder), stored in the
    checkpoint; with --weights random every weight trains anyway."""
    use_pmg: bool = True
    use_pma: bool = True
    use_3d_memory: bool = True
    loss_dice: float = 1.0
    loss_ce: float = 1.0
    loss_kl: float = 1.0
    loss_obj: float = 1.0
    loss_pseudo: float = 0.0
    """Dice + BCE on PMG's pseudo-mask too (beyond eq. 9; for PMG trained from random)."""
    structures: list[int] | None = None
    targets: list[str] | None = None
    """What episodes ask for: label values or unions ('1+2'); None = each structure alone."""
    hold_out: list[str] | None = None
    """Targets never asked for in training (to test a structure defined only by support)."""
    absent_share: float = 0.2
    """Fraction of episodes whose answer is empty (absent run, or empty support)."""
    paired_targets: bool = True
    """With several targets, a step also asks the same query for another target it shows
    (its own support): a model that ignores its support cannot answer both."""
    axis: int = 0
    intensity: str = "auto"
    cases: str | None = None
    """Which cases of ``data`` train, as index ranges ('0:60'); None = all."""
    augment: bool = True
    refresh_every: int = 50
    save_every: int = 200
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None

    # the fields a resumed run must share with the run it continues
    RESUME_KEYS = ("data", "model", "weights", "image_size", "lora_rank", "lora_alpha",
                   "train_all", "sam2_overrides", "lr", "weight_decay", "warmup", "seq_len", "own_support", "prior_share",
                   "own_image_support",
                   "top_k", "memory_size", "memory_policy", "train_pmg", "use_pmg", "use_pma",
                   "use_3d_memory", "loss_dice", "loss_ce", "loss_kl", "loss_obj", "loss_pseudo",
                   "structures", "targets", "hold_out",
                   "absent_share", "paired_targets", "axis",
                   "intensity", "cases", "augment", "refresh_every", "seed")

    def resolved_model(self) -> tuple[str, list[str]]:
        """The SAM2.1 size and hydra overrides: a preset's, then ``--sam2-override``'s."""
        size, overrides = resolve_model(self.model)
        return size, overrides + list(self.sam2_overrides)

    def is_random(self) -> bool:
        return str(self.weights).strip().lower() == "random"

    def trains_all(self) -> bool:
        return self.is_random() if self.train_all is None else bool(self.train_all)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def checkpoint_path(out: str | os.PathLike) -> Path:
    p = Path(out)
    return p if p.suffix == ".safetensors" else p.with_suffix(".safetensors")


def state_path(out: str | os.PathLike) -> Path:
    """The resume file beside the checkpoint: ``NAME.state.pt``."""
    ck = checkpoint_path(out)
    return ck.with_name(ck.name[: -len(".safetensors")] + ".state.pt")
