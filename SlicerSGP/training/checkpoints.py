"""What a training run writes: the SGP checkpoint (``.safetensors`` + ``.json``) with its
training metadata, and the resume state (``NAME.state.pt``: model, optimizer, schedule,
pooled-embedding cache, history), from which a resumed run continues exactly."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from SlicerSGP.data.targets import target_name
from SlicerSGP.errors import SGPInputError
from SlicerSGP.filesystem import atomic_write
from SlicerSGP.method.model import save_sgp_checkpoint
from SlicerSGP.training.config import TrainConfig
from SlicerSGP.weights import file_sha256, resolve_weights

# Functions here take the Trainer as ``trainer: Any``: trainer.py imports this module, so
# importing Trainer back (even for type checking) would close an import circle.

STATE_FORMAT = "slicersgp-train-state/1"


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and paths as plain Python values, so that the resume state
    loads with ``torch.load(weights_only=True)`` (no arbitrary unpickling)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def trainer_state(trainer: Any) -> dict[str, Any]:
    """Everything a resumed run needs, as one torch-serialisable dict."""
    keys = sorted(trainer.pool_cache)
    return {
        "format": STATE_FORMAT,
        "step": trainer.step,
        "config": _plain(trainer.cfg.to_dict()),
        "model": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
        "optimizer": trainer.opt.state_dict(),
        "scheduler": trainer.sched.state_dict(),
        "pool_keys": keys,
        "pool": torch.stack([trainer.pool_cache[k] for k in keys]) if keys else None,
        "history": _plain(trainer.history),
    }


def read_state(path: Path) -> dict[str, Any]:
    """A resume state written by :func:`write_state`, loaded without arbitrary unpickling."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise SGPInputError(
            f"Cannot resume from {path}: it holds objects other than tensors and plain values "
            f"(written by an older version, or not by sgp train), and it is not unpickled for "
            f"safety ({err}). Delete it and start afresh without --resume.") from err
    except (FileNotFoundError, PermissionError):
        raise  # their own message says what is wrong
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        # torch.save writes a zip archive; a cut-off or overwritten copy has no central directory.
        raise SGPInputError(
            f"Cannot resume from {path}: the file is damaged or incomplete (copied while being "
            f"written, or cut off: {err}). Resume from an intact copy, or delete it and start "
            "afresh without --resume.") from err


def restore_state(trainer: Any, state: dict[str, Any]) -> None:
    """Load a :func:`trainer_state` dict; refuse one written with other settings."""
    cfg = trainer.cfg
    old = state.get("config", {})
    diff = [k for k in TrainConfig.RESUME_KEYS if k in old and old[k] != getattr(cfg, k)]
    if diff:
        raise SGPInputError(
            "Cannot resume: these settings differ from the run being resumed: "
            + ", ".join(f"{k} ({old[k]!r} -> {getattr(cfg, k)!r})" for k in diff)
            + ". Use the same settings, or start afresh without --resume.")
    trainer.model.load_state_dict(state["model"])
    trainer.opt.load_state_dict(state["optimizer"])
    trainer.sched.load_state_dict(state["scheduler"])
    trainer.step = int(state["step"])
    keys = [tuple(k) for k in state.get("pool_keys", [])]
    pool = state.get("pool")
    trainer.pool_cache = {k: pool[i] for i, k in enumerate(keys)} if keys else {}
    trainer.history = list(state.get("history", []))


def training_metadata(trainer: Any, final: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base, extra) metadata of the checkpoint: what it was trained from, and how."""
    cfg = trainer.cfg
    base: dict[str, Any] = {"weights": cfg.weights or "pretrained", "seed": cfg.seed}
    if not cfg.is_random():
        size, _ = cfg.resolved_model()
        resolved = resolve_weights(size, cfg.weights)
        if resolved.checkpoint:
            base["sha256"] = file_sha256(resolved.checkpoint)
            base["model"] = resolved.model
    recent = trainer.history[-50:]
    names = trainer.cases[0].names
    extra = {"training": {
        "steps": trainer.step, "final": final, "config": cfg.to_dict(),
        "train_cases": [c.name for c in trainer.cases], "structures": trainer.values,
        "names": {str(v): names.get(v, f"label_{v}") for v in trainer.values},
        "targets": [target_name(t) for t in trainer.targets],
        "recent_loss": float(np.mean([r["loss"] for r in recent])) if recent else None,
        "options": {"top_k": cfg.top_k, "memory_size": cfg.memory_size,
                    "memory_policy": cfg.memory_policy, "use_pmg": cfg.use_pmg,
                    "use_pma": cfg.use_pma, "use_3d_memory": cfg.use_3d_memory},
    }}
    return base, extra


def write_checkpoint(trainer: Any, path: Path, final: bool) -> Path:
    """The SGP checkpoint at ``path`` (``.safetensors``) and its ``.json`` beside it."""
    base, extra = training_metadata(trainer, final)
    was_training = trainer.model.training
    written = save_sgp_checkpoint(trainer.model, path, base=base, extra=extra,
                                  full_state=trainer.cfg.trains_all())
    trainer.model.train(was_training)
    return written


def write_state(trainer: Any, path: Path) -> Path:
    """The resume state, atomically (a crash while writing keeps the previous one)."""
    return atomic_write(path, lambda tmp: torch.save(trainer_state(trainer), tmp))
