"""The resume state of a training run (``NAME.state.pt``: model, optimizer, schedule,
pooled-embedding cache, history), from which a resumed run continues exactly. The SGP checkpoint
itself is the builder's (:func:`SlicerSGP.build_model.save_sgp_checkpoint`), with what
:mod:`~SlicerSGP.training.checkpoint_metadata` says about the run."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from SlicerSGP.errors import SGPInputError
from SlicerSGP.filesystem import atomic_write
from SlicerSGP.training.config import TrainConfig

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


def write_state(trainer: Any, path: Path) -> Path:
    """The resume state, atomically (a crash while writing keeps the previous one)."""
    return atomic_write(path, lambda tmp: torch.save(trainer_state(trainer), tmp))
