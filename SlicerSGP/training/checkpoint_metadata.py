"""What an SGP checkpoint written by ``sgp train`` records about its run: the SAM2 weights it
started from (name, seed, sha256) and the run itself (steps, settings, cases, structures,
targets, recent loss). The checkpoint is written by the builder
(:func:`SlicerSGP.build_model.save_sgp_checkpoint`), which knows nothing of training."""

from __future__ import annotations

from typing import Any

import numpy as np

from SlicerSGP.data.targets import target_name
from SlicerSGP.weights import file_sha256, resolve_weights

# The Trainer comes as ``trainer: Any``: trainer.py imports this module, so importing Trainer
# back (even for type checking) would close an import circle.


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
