"""Build SAM2-SGP and save and load its checkpoints, as sam2 keeps ``build_sam.py`` apart from
its networks: the network (``SlicerSGP.method.model``) knows nothing of hydra configs, weight
files or the checkpoint format.

- :func:`build_sam2_base`: the official SAM2Base from its sam2.1 hydra config, at any input
  size; :func:`build_model`: SAM2-SGP from a SAM2.1 size and weights.
- :func:`preset_overrides`, :func:`resolve_model`: what a model preset
  (:data:`~SlicerSGP.method.model.MODEL_PRESETS`) stands for in hydra overrides.
- :func:`save_sgp_checkpoint`, :func:`read_sgp_metadata`, :func:`load_sgp_checkpoint`: the SGP
  checkpoint (safetensors, its JSON metadata in the header and beside it).

May import ``SlicerSGP.method``, ``SlicerSGP.weights`` and the top-level helpers; never
training/, evaluation/, service/ or cli/ (they call it).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from SlicerSGP.errors import SGPWeightsError
from SlicerSGP.filesystem import atomic_write, atomic_write_text
from SlicerSGP.method.model import (
    MODEL_PRESETS,
    ZERO_START_PREFIXES,
    ModelConfig,
    ModelPreset,
    SGPModel,
    is_sgp_owned,
)
from SlicerSGP.method.pma import SupportPrior

CHECKPOINT_FORMAT = "slicersgp-checkpoint/1"

# The overrides SAM2's video predictor applies on top of a config (minus its hole filling,
# which needs the optional CUDA extension), so that PMG behaves exactly as SAM2 tracking does.
_SAM2_TRACKING_OVERRIDES = [
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    "++model.binarize_mask_from_pts_for_mem_enc=true",
]


# --------------------------------------------------------------------------- presets

def _listed(values: tuple[int, ...]) -> str:
    return "[" + ",".join(str(int(v)) for v in values) + "]"


def preset_overrides(preset: ModelPreset) -> list[str]:
    """The hydra overrides that make the SAM2.1 config ``preset.size`` into ``preset``."""
    d = int(preset.dim)
    e = int(preset.embed_dim)
    # Memories no wider than the model: SAM2 splits a pointer into mem_dim-wide tokens, which
    # needs mem_dim <= dim (SAM2.1 keeps 64).
    mem = min(64, d)
    return [
        f"++model.image_encoder.trunk.embed_dim={e}",
        f"++model.image_encoder.trunk.num_heads={int(preset.heads)}",
        f"++model.image_encoder.trunk.stages={_listed(preset.stages)}",
        f"++model.image_encoder.trunk.global_att_blocks={_listed(preset.global_attention_blocks)}",
        "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size="
        f"{_listed(preset.window_background)}",
        f"++model.image_encoder.neck.backbone_channel_list=[{8 * e},{4 * e},{2 * e},{e}]",
        f"++model.image_encoder.neck.d_model={d}",
        f"++model.image_encoder.neck.position_encoding.num_pos_feats={d}",
        f"++model.memory_attention.d_model={d}",
        f"++model.memory_attention.layer.d_model={d}",
        f"++model.memory_attention.layer.dim_feedforward={4 * d}",
        f"++model.memory_attention.layer.self_attention.embedding_dim={d}",
        f"++model.memory_attention.layer.cross_attention.embedding_dim={d}",
        f"++model.memory_attention.num_layers={int(preset.memory_attention_layers)}",
        f"++model.memory_encoder.in_dim={d}",
        f"++model.memory_encoder.mask_downsampler.embed_dim={d}",
        f"++model.memory_encoder.fuser.layer.dim={d}",
        f"++model.memory_encoder.fuser.num_layers={int(preset.memory_fuser_layers)}",
        f"++model.memory_encoder.out_dim={mem}",
        f"++model.memory_attention.layer.cross_attention.kv_in_dim={mem}",
        f"++model.memory_encoder.position_encoding.num_pos_feats={mem}",
    ]


def resolve_model(name: str) -> tuple[str, list[str]]:
    """The SAM2.1 size and hydra overrides a model name stands for: a preset's (``cpu-mini``),
    or a size with none (any other name, checked when the model is built)."""
    preset = MODEL_PRESETS.get(name)
    if preset is None:
        return name, []
    return preset.size, preset_overrides(preset)


# --------------------------------------------------------------------------- building

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


__all__ = [
    "CHECKPOINT_FORMAT",
    "build_model",
    "build_sam2_base",
    "load_sgp_checkpoint",
    "preset_overrides",
    "read_sgp_metadata",
    "resolve_model",
    "save_sgp_checkpoint",
]
