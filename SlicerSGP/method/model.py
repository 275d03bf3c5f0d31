"""The SAM2-SGP network: the official SAM2 modules plus the parts the paper adds.

- FE: SAM2's image encoder (Hiera + FPN) with LoRA adapters (peft) on the Hiera attention
  projections; base weights frozen.
- PMG: SAM2's memory encoder, memory attention and mask decoder, used as SAM2 uses them (the
  engine assembles the memories; see ``SlicerSGP.method.segmenter``).
- PMA: mask attention, paper eq. (7), and a hierarchical decoder that starts from the pretrained
  SAM2 mask decoder and refines its quarter-resolution output to full input resolution.

Nothing here re-implements SAM2: every SAM2 part is the ``sam2`` package's own module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from SlicerSGP.errors import SGPInputError, SGPWeightsError
from SlicerSGP.filesystem import atomic_write, atomic_write_text
from SlicerSGP.method.pma import (
    MaskAttention,
    PseudoMaskAttention,
    SupportPointer,
    SupportPrior,
    pseudo_mask_box,
)

SUPPORTED_IMAGE_SIZES = tuple(range(256, 1025, 64))
CHECKPOINT_FORMAT = "slicersgp-checkpoint/1"
LORA_TARGETS = r".*trunk\.blocks\.\d+\.attn\.(qkv|proj)"

# The overrides SAM2's video predictor applies on top of a config (minus its hole filling,
# which needs the optional CUDA extension), so that PMG behaves exactly as SAM2 tracking does.
_SAM2_TRACKING_OVERRIDES = [
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    "++model.binarize_mask_from_pts_for_mem_enc=true",
]


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


def build_sam2_base(config: ModelConfig, state_dict: dict[str, torch.Tensor] | None, seed: int = 0):
    """Build the official SAM2Base from its sam2.1 config at ``config.image_size``.

    With ``state_dict`` None the weights are SAM2's own random initialisation under ``seed``.
    """
    import sam2  # noqa: F401  (initialises hydra's config search path)
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from SlicerSGP.weights import resolve_model_name

    config.validate()
    info = resolve_model_name(config.size)
    grid = config.image_size // 16
    overrides = list(_SAM2_TRACKING_OVERRIDES) + [
        f"++model.image_size={config.image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]",
    ] + list(config.sam2_overrides)
    cfg = compose(config_name=info.config, overrides=overrides)
    OmegaConf.resolve(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = instantiate(cfg.model, _recursive_=True)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        # Position tables sized for 1024 px are interpolated by SAM2 itself, so only real
        # parameters count; a mismatch means the file is for another model size.
        if missing or unexpected:
            raise SGPWeightsError(
                f"The checkpoint does not fit SAM2.1 {info.name}: {len(missing)} missing and "
                f"{len(unexpected)} unexpected tensors (e.g. {(missing or unexpected)[:3]}). "
                f"Pick the weights file that matches --model {info.name}."
            )
    return model


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


# --------------------------------------------------------------------------- checkpoints

def save_sgp_checkpoint(model: SGPModel, path: str | Path, *, base: dict[str, Any],
                        extra: dict[str, Any] | None = None,
                        full_state: bool = False) -> Path:
    """Write an SGP checkpoint: safetensors with the JSON metadata in its header and beside it.

    ``base`` names the SAM2 weights the adapters were trained on: {"weights": "random", "seed": 0}
    or {"weights": "tiny", "sha256": ...}. ``full_state`` stores every tensor (for a model trained
    from a random start, where the base alone cannot be rebuilt to the trained state).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    state = (
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if full_state else model.trainable_state_dict()
    )
    meta = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(model.config),
        "base": base,
        "full_state": full_state,
        "support_prior": SupportPrior.VERSION,
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"sgp": json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=header))
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return path


def read_sgp_metadata(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SGPWeightsError(f"SGP checkpoint {path} does not exist. Check the path.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("sgp")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise SGPWeightsError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated. "
            "Copy it again or re-run `sgp train`."
        ) from exc
    if raw is None:
        raise SGPWeightsError(
            f"{path} has no SGP metadata: it is not a checkpoint written by `sgp train`."
        )
    meta = json.loads(raw)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise SGPWeightsError(f"{path} has format {meta.get('format')!r}; this version reads "
                              f"{CHECKPOINT_FORMAT!r}.")
    return meta


def build_model(size: str = "tiny", *, weights: str | None = "random", image_size: int = 1024,
                seed: int = 0, mode: str = "training_free", lora_rank: int = 0,
                lora_alpha: float = 16.0, sam2_overrides: list[str] | None = None,
                train_pmg: bool = False) -> SGPModel:
    """Build SAM2-SGP from a SAM2.1 size and weights ('random', a registry name, a .pt file)."""
    from SlicerSGP.weights import load_sam2_state_dict, resolve_weights

    resolved = resolve_weights(size, weights)
    state = load_sam2_state_dict(resolved.checkpoint) if resolved.checkpoint else None
    config = ModelConfig(size=size, image_size=image_size, mode=mode, lora_rank=lora_rank,
                         lora_alpha=lora_alpha, sam2_overrides=list(sam2_overrides or []),
                         train_pmg=train_pmg)
    return SGPModel(build_sam2_base(config, state, seed=seed), config)


def load_sgp_checkpoint(path: str | Path, *, weights: str | None = None,
                        image_size: int | None = None) -> SGPModel:
    """Rebuild the base SAM2 named in the checkpoint, then load the adapters and PMA."""
    from safetensors.torch import load_file

    meta = read_sgp_metadata(path)
    config = ModelConfig(**meta["config"])
    if image_size is not None and image_size != config.image_size:
        config.image_size = image_size
    base = meta.get("base", {})
    base_weights = weights or base.get("weights", "random")
    if meta.get("full_state"):
        base_weights = "random"
    model = build_model(config.size, weights=base_weights, image_size=config.image_size,
                        seed=int(base.get("seed", 0)), mode=config.mode,
                        lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                        sam2_overrides=config.sam2_overrides)
    model.config = config
    state = load_file(str(path))
    own = model.state_dict()
    wrong = [k for k in state if k not in own or own[k].shape != state[k].shape]
    if wrong:
        raise SGPWeightsError(
            f"{path} does not fit the model it names ({len(wrong)} tensors differ, e.g. "
            f"{wrong[:3]}). It was probably written by another version; retrain or convert it."
        )
    # Every tensor the checkpoint is responsible for must be in it: a missing PMA or LoRA
    # tensor would otherwise keep its random initialisation without a word.
    needed = own if meta.get("full_state") else [k for k in own if is_sgp_owned(k, config)]
    missing = [k for k in needed if k not in state and not k.startswith(ZERO_START_PREFIXES)]
    if missing:
        raise SGPWeightsError(
            f"{path} lacks {len(missing)} tensors the model needs (e.g. {missing[:3]}): it is "
            "incomplete or from another configuration. Use the checkpoint `sgp train` wrote "
            "(re-run it with --resume if it was interrupted)."
        )
    prior = [v for k, v in state.items() if k.startswith("support_prior.")]
    written = meta.get("support_prior", 1)
    if written != SupportPrior.VERSION and any(bool(v.any()) for v in prior):
        raise SGPWeightsError(
            f"{path} was trained with version {written} of the support prior, whose maps this "
            f"version ({SupportPrior.VERSION}) computes differently (centred features, scaled), "
            "so its segmentations would be wrong. Retrain it with this version (sgp train).")
    model.load_state_dict(state, strict=False)
    return model


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def describe(model: SGPModel) -> str:
    c = model.config
    return (f"SAM2.1 {c.size} @ {c.image_size}px, {c.mode}"
            f"{f', LoRA r={c.lora_rank}' if c.lora_rank else ''}, "
            f"{count_parameters(model) / 1e6:.1f}M parameters")


__all__ = [
    "SUPPORTED_IMAGE_SIZES",
    "MaskAttention",
    "ModelConfig",
    "PseudoMaskAttention",
    "SGPModel",
    "build_model",
    "build_sam2_base",
    "describe",
    "inject_lora",
    "load_sgp_checkpoint",
    "pseudo_mask_box",
    "read_sgp_metadata",
    "save_sgp_checkpoint",
]
