"""``sgp train``: train SAM2-SGP (LoRA on the image encoder + PMA/decoder) on labeled cases.

One training step is one *episode*, built the way ``sgp segment`` runs:

1. pick a training case and a structure; for a volume, a run of ``--seq-len`` consecutive slices
   (around a slice that shows the structure) in a random direction; a 2D image is a one-slice
   volume;
2. encode the query slices (with autograd, flips/rot90 augmentation if on); the support pool is
   the support bank drawn from the *other* training cases (slices with the structure plus as
   many evenly spaced slices without it, as ``io.load_support_sets`` builds a bank); the K most
   similar items per query slice are picked by cosine similarity of pooled embeddings (cached
   for the pool, refreshed every ``--refresh-every`` steps; the engine then re-picks per slice
   with fresh embeddings), encoded with autograd and turned into memories by SAM2's memory
   encoder (``Segmenter.support_memory``);
3. ``Segmenter.run_sweep(grad=True)`` runs PMG -> PMA slice by slice with the 3D memory, exactly
   the inference code path, so the ablation switches (``--no-pmg``, ``--no-pma``,
   ``--no-3d-memory``) act in training as they do in ``sgp segment``;
4. the loss is paper eq. (9) (``SlicerSGP.training.losses``) per predicted slice, averaged over the run.

From pretrained SAM2 weights only the LoRA adapters and the PMA are trained (the base is
frozen, the checkpoint stores only those tensors). From a random start (``--weights random``)
there is no base to keep, so the whole network trains and the checkpoint stores every tensor
(``--train-all`` forces either way).

Reproducible and resumable: every step draws its episode, augmentation and dropout from RNGs
seeded by ``(seed, step, rank)``, so a run resumed from its ``.state.pt`` (model, optimizer,
schedule, pooled-embedding cache) continues exactly as an uninterrupted one. bf16 autocast on
CUDA (``--dtype``); several GPUs with ``torchrun --nproc_per_node N -m SlicerSGP.cli train ...``
(gradients averaged across ranks; rank 0 writes).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from SlicerSGP.data.preprocess import evenly_spaced
from SlicerSGP.errors import SGPInputError

# --------------------------------------------------------------------------- small model

def small_overrides(dim: int = 128, embed_dim: int = 32) -> list[str]:
    """Hydra overrides for a small SAM2 (on top of the tiny config) that trains on CPU in
    minutes: Hiera with 5 blocks (stages 1-1-2-1) of width 32-256, a ``dim``-wide neck, memory
    attention with 2 layers, a 1-layer memory fuser. Use with ``image_size`` 256."""
    d = int(dim)
    e = int(embed_dim)
    return [
        f"++model.image_encoder.trunk.embed_dim={e}",
        "++model.image_encoder.trunk.num_heads=1",
        "++model.image_encoder.trunk.stages=[1,1,2,1]",
        "++model.image_encoder.trunk.global_att_blocks=[3]",
        "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
        f"++model.image_encoder.neck.backbone_channel_list=[{8 * e},{4 * e},{2 * e},{e}]",
        f"++model.image_encoder.neck.d_model={d}",
        f"++model.image_encoder.neck.position_encoding.num_pos_feats={d}",
        f"++model.memory_attention.d_model={d}",
        f"++model.memory_attention.layer.d_model={d}",
        f"++model.memory_attention.layer.dim_feedforward={4 * d}",
        f"++model.memory_attention.layer.self_attention.embedding_dim={d}",
        f"++model.memory_attention.layer.cross_attention.embedding_dim={d}",
        "++model.memory_attention.num_layers=2",
        f"++model.memory_encoder.in_dim={d}",
        f"++model.memory_encoder.mask_downsampler.embed_dim={d}",
        f"++model.memory_encoder.fuser.layer.dim={d}",
        "++model.memory_encoder.fuser.num_layers=1",
    ]


MODEL_PRESETS: dict[str, tuple[str, list[str]]] = {"cpu-mini": ("tiny", small_overrides())}
"""``--model cpu-mini``: the SAM2.1 tiny config made smaller (see :func:`small_overrides`);
not SAM2.1 small, which keeps its name."""


# --------------------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = "tiny"
    """SAM2.1 size (tiny, small, base_plus, large) or 'cpu-mini' (the CPU-sized preset)."""
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
    top_k: int = 4
    memory_size: int | None = None
    memory_policy: str = "least_similar"
    use_pmg: bool = True
    use_pma: bool = True
    use_3d_memory: bool = True
    loss_dice: float = 1.0
    loss_ce: float = 1.0
    loss_kl: float = 1.0
    loss_obj: float = 1.0
    structures: list[int] | None = None
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
                   "train_all", "sam2_overrides", "lr", "weight_decay", "warmup", "seq_len", "own_support",
                   "top_k", "memory_size", "memory_policy", "use_pmg", "use_pma",
                   "use_3d_memory", "loss_dice", "loss_ce", "loss_kl", "loss_obj", "structures", "axis",
                   "intensity", "cases", "augment", "refresh_every", "seed")

    def resolved_model(self) -> tuple[str, list[str]]:
        if self.model in MODEL_PRESETS:
            size, ov = MODEL_PRESETS[self.model]
            return size, list(ov) + list(self.sam2_overrides)
        return self.model, list(self.sam2_overrides)

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


# --------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return Dist(rank, world, local)


def _all_reduce_grads(params: list[torch.nn.Parameter], d: Dist) -> None:
    if d.world <= 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(d.world)


# --------------------------------------------------------------------------- episodes

@dataclass
class BankItem:
    case: int
    slice: int
    value: int


def build_support_bank(cases: list, values: list[int]) -> dict[int, list[BankItem]]:
    """Per structure: every slice showing it, plus as many evenly spaced slices without it (of
    the same case) - the rule ``io.load_support_sets`` uses for a support bank. For 2D image
    sets (one slice per case) the cases without the structure are thinned the same way."""
    bank: dict[int, list[BankItem]] = {}
    two_d = all(c.num_slices == 1 for c in cases)
    for v in values:
        items: list[BankItem] = []
        if two_d:
            pos = [ci for ci, c in enumerate(cases) if (c.labels == v).any()]
            neg = [ci for ci, c in enumerate(cases) if not (c.labels == v).any()]
            for ci in sorted(pos + evenly_spaced(neg, len(pos))):
                items.append(BankItem(ci, 0, v))
        else:
            for ci, c in enumerate(cases):
                present = c.slices_with(v)
                absent = sorted(set(range(c.num_slices)) - set(present))
                for k in sorted(present + evenly_spaced(absent, len(present))):
                    items.append(BankItem(ci, k, v))
        bank[v] = items
    return bank


def _augment(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator):
    """Same random flips / 90-degree rotation for every slice of a run: (N, H, W[, 3])."""
    if rng.random() < 0.5:
        img, lab = img[:, :, ::-1], lab[:, :, ::-1]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    if rng.random() < 0.5:
        img, lab = np.swapaxes(img, 1, 2), np.swapaxes(lab, 1, 2)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def _to_model(slices01: np.ndarray, masks: np.ndarray | None, size: int):
    """(N, H, W[, 3]) slices + (N, H, W) bool masks -> model-space images, masks, valid area."""
    from SlicerSGP.data import preprocess

    tf = preprocess.LetterboxTransform(slices01.shape[1], slices01.shape[2], size)
    images = preprocess.to_model_input(slices01, tf)
    if masks is None:
        return images, None, None
    m = tf.mask_to_model(torch.from_numpy(masks[:, None].astype(np.float32)))
    valid = tf.mask_to_model(torch.ones(1, 1, tf.height, tf.width))
    return images, m, valid


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class Trainer:
    """Holds the model, the data and the optimizer; :meth:`train_step` runs one episode."""

    def __init__(self, cfg: TrainConfig, cases: list | None = None, model=None,
                 dist: Dist | None = None, log=print):
        from SlicerSGP.data.datasets import load_dataset, parse_split
        from SlicerSGP.method.model import build_model
        from SlicerSGP.method.segmenter import Segmenter
        from SlicerSGP.training.losses import LossWeights
        from SlicerSGP.types import SegmentOptions

        self.cfg = cfg
        self.dist = dist or Dist()
        self.log = log
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        if cases is None:
            all_cases = load_dataset(cfg.data, axis=cfg.axis, intensity=cfg.intensity)
            idx, _ = parse_split(cfg.cases, len(all_cases))
            cases = [all_cases[i] for i in idx]
        if not cases:
            raise SGPInputError(f"No training cases in {cfg.data} (cases {cfg.cases!r}).")
        self.cases = cases
        present = sorted({v for c in cases for v in c.values()})
        values = list(cfg.structures) if cfg.structures else present
        missing = [v for v in values if v not in present]
        if missing:
            raise SGPInputError(f"Label value(s) {missing} appear in no training case "
                                f"(present: {present or 'none'}).")
        if not values:
            raise SGPInputError("The training cases hold no labeled voxels.")
        self.values = values
        self.bank = build_support_bank(cases, values)
        # episodes: (case, value) pairs where the structure is present
        self.episodes = [(ci, v) for ci, c in enumerate(cases) for v in values
                         if (c.labels == v).any()]
        if cfg.lora_rank <= 0:
            raise SGPInputError("--lora-rank must be at least 1 for a trained SGP model.")

        size, overrides = cfg.resolved_model()
        if model is None:
            torch.manual_seed(cfg.seed)
            model = build_model(size, weights=cfg.weights, image_size=cfg.image_size,
                                seed=cfg.seed, mode="trained", lora_rank=cfg.lora_rank,
                                lora_alpha=cfg.lora_alpha, sam2_overrides=overrides)
        self.model = model
        if cfg.trains_all():
            for p in model.parameters():
                p.requires_grad = True
        else:
            model.freeze_base()
        device = cfg.device
        if self.dist.world > 1 and torch.cuda.is_available() and device != "cpu":
            device = f"cuda:{self.dist.local_rank}"
        self.seg = Segmenter(model, device=device, dtype=cfg.dtype)
        self.device = self.seg.device
        self._broadcast_params()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.opts = SegmentOptions(top_k=cfg.top_k, memory_size=cfg.memory_size,
                                   memory_policy=cfg.memory_policy, use_pmg=cfg.use_pmg,
                                   use_pma=cfg.use_pma, use_3d_memory=cfg.use_3d_memory)
        self.weights = LossWeights(cfg.loss_dice, cfg.loss_ce, cfg.loss_kl, cfg.loss_obj)
        self.step = 0
        self.pool_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ helpers

    def _lr_factor(self, step: int) -> float:
        warm = max(1, self.cfg.warmup)
        if step < warm:
            return (step + 1) / warm
        span = max(1, self.cfg.steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / span))) * 0.95 + 0.05

    def _broadcast_params(self) -> None:
        if self.dist.world <= 1:
            return
        import torch.distributed as dist

        for t in self.model.state_dict().values():
            dist.broadcast(t, 0)

    def refresh_pool_cache(self) -> None:
        """Pooled embeddings of every support-bank slice (no autograd, current weights)."""
        keys = sorted({(b.case, b.slice) for items in self.bank.values() for b in items})
        was_training = self.model.training
        self.model.eval()
        cache = {}
        with torch.no_grad():
            for start in range(0, len(keys), 16):
                chunk = keys[start:start + 16]
                groups: dict[tuple, list] = {}
                for key in chunk:
                    img = self.cases[key[0]].slices01[key[1]:key[1] + 1]
                    groups.setdefault(img.shape[1:], []).append((key, img))
                for items in groups.values():
                    imgs = np.concatenate([i for _, i in items])
                    x, _, _ = _to_model(imgs, None, self.seg.image_size)
                    feats = self.seg.encode_images(x, len(items))
                    for (key, _), pooled in zip(items, feats.pooled, strict=True):
                        cache[key] = pooled.detach().float().cpu()
        self.model.train(was_training)
        self.pool_cache = cache

    def _episode(self, rng: np.random.Generator):
        ci, v = self.episodes[int(rng.integers(len(self.episodes)))]
        case = self.cases[ci]
        n = case.num_slices
        T = min(self.cfg.seq_len, n)
        if n > 1:
            with_v = case.slices_with(v)
            centre = int(with_v[int(rng.integers(len(with_v)))])
            start = int(np.clip(centre - int(rng.integers(T)), 0, n - T))
            window = list(range(start, start + T))
        else:
            window = [0]
        reverse = bool(rng.random() < 0.5) if T > 1 else False
        img = case.slices01[window]
        lab = case.labels[window] == v
        if self.cfg.augment:
            img, lab = _augment(img, lab, rng)
        others = [b for b in self.bank[v] if b.case != ci]
        if not others:  # a one-case dataset: slices of the same case outside the run
            others = [b for b in self.bank[v] if b.case == ci and b.slice not in window]
        if not others:
            raise SGPInputError("The support bank holds no slice outside the query: training "
                                "needs at least two labeled cases (or slices).")
        return ci, v, window, reverse, img, lab, others

    def _preselect(self, query_pooled: torch.Tensor, pool: list[BankItem]) -> list[BankItem]:
        """Union over query slices of the top-K pool items (cached pooled embeddings)."""
        k = self.cfg.top_k
        if len(pool) <= k:
            return pool
        emb = torch.stack([self.pool_cache[(b.case, b.slice)] for b in pool])
        sims = (query_pooled.detach().float().cpu() @ emb.T).numpy()
        chosen: set[int] = set()
        for row in sims:
            order = sorted(range(len(pool)), key=lambda i: (-round(float(row[i]), 6), i))
            chosen.update(order[:k])
        return [pool[i] for i in sorted(chosen)]

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict[str, float]:
        from SlicerSGP.method.segmenter import EncodedSlices
        from SlicerSGP.training.losses import sgp_loss

        cfg = self.cfg
        if not self.pool_cache or (cfg.refresh_every and self.step % cfg.refresh_every == 0):
            self.refresh_pool_cache()
        seed = _step_seed(cfg.seed, self.step, self.dist.rank)
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.model.train()
        ci, v, window, reverse, img, lab, pool = self._episode(rng)
        size = self.seg.image_size
        q_images, q_masks, valid = _to_model(img, lab, size)
        q_images, q_masks, valid = (t.to(self.device) for t in (q_images, q_masks, valid))
        feats = self.seg.encode_images(q_images, len(window), grad=True)
        chosen = self._preselect(feats.pooled, pool)
        memories = []
        by_shape: dict[tuple, list[BankItem]] = {}
        for b in chosen:
            by_shape.setdefault(self.cases[b.case].slices01.shape[1:3], []).append(b)
        for items in by_shape.values():
            s_img = np.stack([self.cases[b.case].slices01[b.slice] for b in items])
            s_lab = np.stack([self.cases[b.case].labels[b.slice] == b.value for b in items])
            s_images, s_masks, _ = _to_model(s_img, s_lab, size)
            s_feats: EncodedSlices = self.seg.encode_images(s_images.to(self.device), len(items),
                                                            grad=True)
            for i in range(len(items)):
                memories.append(self.seg.support_memory(s_feats, i, s_masks[i:i + 1], None,
                                                        grad=True))
        order = list(range(len(window)))
        if reverse:
            order = order[::-1]
        labeled: set[int] = set()
        if len(order) > 1 and rng.random() < cfg.own_support:
            # As at inference: a slice the user labeled in this volume starts the sweep and is
            # support itself (the other episodes use other cases only).
            a = order[0]
            memories.insert(0, self.seg.support_memory(feats, a, q_masks[a:a + 1], a, grad=True))
            labeled = {a}
        use_kl = cfg.use_pmg and cfg.use_pma and self.model.pma is not None

        losses = []
        terms = {"dice": 0.0, "bce": 0.0, "kl": 0.0, "obj": 0.0}
        predicted = len(order) - len(labeled)
        for j, out in self.seg.run_sweep(feats, order, reverse, labeled, memories, self.opts,
                                         lambda j: q_images[j:j + 1], grad=True):
            if out is None:
                continue  # the labeled slice: support, not a prediction
            obj = []
            if cfg.use_pmg and out.pmg_object_logits is not None:
                obj.append(out.pmg_object_logits)
            if cfg.use_pma and out.final_object_logits is not None:
                obj.append(out.final_object_logits)
            parts = sgp_loss(out.final_high, out.pseudo_low if use_kl else None,
                             q_masks[j:j + 1], valid, self.weights, obj)
            losses.append(parts["loss"])
            for name in terms:
                terms[name] += float(parts[name]) / predicted
        loss = torch.stack(losses).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        _all_reduce_grads(self.params, self.dist)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        rec = {"step": self.step, "loss": float(loss.detach()), **terms,
               "lr": float(self.opt.param_groups[0]["lr"]), "case": ci, "value": v,
               "own_support": bool(labeled)}
        self.history.append(rec)
        return rec

    # ------------------------------------------------------------------ saving

    def state(self) -> dict[str, Any]:
        keys = sorted(self.pool_cache)
        return {
            "format": "slicersgp-train-state/1",
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "pool_keys": keys,
            "pool": torch.stack([self.pool_cache[k] for k in keys]) if keys else None,
            "history": self.history,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        old = state.get("config", {})
        diff = [k for k in TrainConfig.RESUME_KEYS if k in old and old[k] != getattr(self.cfg, k)]
        if diff:
            raise SGPInputError(
                "Cannot resume: these settings differ from the run being resumed: "
                + ", ".join(f"{k} ({old[k]!r} -> {getattr(self.cfg, k)!r})" for k in diff)
                + ". Use the same settings, or start afresh without --resume.")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        keys = [tuple(k) for k in state.get("pool_keys", [])]
        pool = state.get("pool")
        self.pool_cache = {k: pool[i] for i, k in enumerate(keys)} if keys else {}
        self.history = list(state.get("history", []))

    def save(self, final: bool = False) -> Path | None:
        """Write the SGP checkpoint and the resume state (rank 0 only)."""
        from SlicerSGP.method.model import save_sgp_checkpoint

        if not self.dist.main:
            return None
        cfg = self.cfg
        out = checkpoint_path(cfg.out)
        base: dict[str, Any] = {"weights": cfg.weights or "pretrained", "seed": cfg.seed}
        if not cfg.is_random():
            from SlicerSGP.weights import file_sha256, resolve_weights

            size, _ = cfg.resolved_model()
            resolved = resolve_weights(size, cfg.weights)
            if resolved.checkpoint:
                base["sha256"] = file_sha256(resolved.checkpoint)
                base["model"] = resolved.model
        recent = self.history[-50:]
        extra = {"training": {
            "steps": self.step, "final": final, "config": cfg.to_dict(),
            "train_cases": [c.name for c in self.cases], "structures": self.values,
            "names": {str(v): self.cases[0].names.get(v, f"label_{v}") for v in self.values},
            "recent_loss": float(np.mean([r["loss"] for r in recent])) if recent else None,
            "options": {"top_k": cfg.top_k, "memory_size": cfg.memory_size,
                        "memory_policy": cfg.memory_policy, "use_pmg": cfg.use_pmg,
                        "use_pma": cfg.use_pma, "use_3d_memory": cfg.use_3d_memory},
        }}
        was_training = self.model.training
        path = save_sgp_checkpoint(self.model, out, base=base, extra=extra,
                                   full_state=cfg.trains_all())
        self.model.train(was_training)
        sp = state_path(cfg.out)
        tmp = sp.with_name(sp.name + ".part")
        torch.save(self.state(), tmp)
        tmp.replace(sp)
        return path


def train(cfg: TrainConfig, *, cases: list | None = None, resume: bool = False,
          progress: bool = True, stop_after: int | None = None, log=print) -> Trainer:
    """Train to ``cfg.steps`` (or ``stop_after`` steps in this call); returns the trainer.

    ``resume``: continue from ``<out>.state.pt`` if it exists.
    """
    d = _init_distributed(cfg.device)
    trainer = Trainer(cfg, cases=cases, dist=d, log=log)
    sp = state_path(cfg.out)
    if resume and sp.is_file():
        trainer.load_state(torch.load(sp, map_location="cpu", weights_only=False))
        if d.main:
            log(f"resumed from {sp} at step {trainer.step}")
    elif resume and d.main:
        log(f"no state at {sp}: starting from step 0")
    end = cfg.steps if stop_after is None else min(cfg.steps, trainer.step + stop_after)
    bar = None
    if progress and d.main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=trainer.step, desc="train", unit="step",
                   dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        while trainer.step < end:
            rec = trainer.train_step()
            if bar is not None:
                bar.update(1)
                recent = trainer.history[-20:]
                bar.set_postfix(loss=f"{np.mean([r['loss'] for r in recent]):.3f}",
                                dice=f"{np.mean([r['dice'] for r in recent]):.3f}",
                                kl=f"{np.mean([r['kl'] for r in recent]):.3f}")
            if cfg.save_every and rec["step"] % cfg.save_every == 0 and rec["step"] < end:
                trainer.save()
    finally:
        if bar is not None:
            bar.close()
    trainer.elapsed = time.perf_counter() - t0
    trainer.save(final=trainer.step >= cfg.steps)
    return trainer


# --------------------------------------------------------------------------- CLI

def add_train_subparser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train LoRA adapters + PMA (or a whole small model) on labeled cases",
        description="Train SAM2-SGP on a folder of labeled cases (sub-folders with image.* + "
                    "labels.*: NIfTI, NRRD, .seg.nrrd) or 2D pairs (images/ + masks/). Writes "
                    "an SGP checkpoint (.safetensors + .json) that `sgp segment --model` and "
                    "the Slicer module load, and NAME.state.pt to resume from.",
    )
    p.add_argument("data", type=Path, help="dataset folder")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--cases", default=None,
                   help="which cases train, as index ranges of the sorted case list "
                        "(e.g. 0:60 or 0:40,50:60); default all")
    p.add_argument("--label", dest="structures", type=int, action="append",
                   help="label value to train on (repeatable; default every value)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny",
                   help="SAM2.1 size (tiny, small, base_plus, large) or 'cpu-mini' (a CPU-sized "
                        "preset built on tiny; use with --image-size 256)")
    g.add_argument("--weights", default=None,
                   help="'random' (train from scratch), a registry name or a .pt file; default "
                        "the cached pretrained checkpoint")
    g.add_argument("--image-size", type=int, default=1024)
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0,
                   help="LoRA scaling numerator (scale = alpha / rank); stored in the checkpoint")
    ta = g.add_mutually_exclusive_group()
    ta.add_argument("--train-all", dest="train_all", action="store_true", default=None,
                    help="train every weight (default with --weights random)")
    ta.add_argument("--lora-only", dest="train_all", action="store_false",
                    help="train only LoRA + PMA (default with pretrained weights)")
    g.add_argument("--sam2-override", dest="sam2_overrides", action="append", default=[],
                   help="extra hydra override for the SAM2 config (repeatable)")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA), float32, bfloat16")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=2000, help="episodes (optimizer steps)")
    o.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 1e-4; 5e-4 with --weights random)")
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--warmup", type=int, default=50)
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--no-augment", dest="augment", action="store_false")
    o.add_argument("--loss-dice", type=float, default=1.0)
    o.add_argument("--loss-ce", type=float, default=1.0)
    o.add_argument("--loss-kl", type=float, default=1.0)
    o.add_argument("--loss-obj", type=float, default=1.0,
                   help="weight of SAM2's object-score loss (auxiliary, not in eq. 9; 0 = off)")
    m = p.add_argument_group("method")
    m.add_argument("--seq-len", type=int, default=4, help="slices per volume episode")
    m.add_argument("--own-support", type=float, default=0.5,
                   help="fraction of volume episodes that start from one of the volume's own "
                        "labeled slices as support, as at inference (default 0.5)")
    m.add_argument("--top-k", type=int, default=4)
    m.add_argument("--memory-size", type=int, default=None)
    m.add_argument("--memory-policy", choices=("least_similar", "fifo"), default="least_similar")
    m.add_argument("--no-pmg", action="store_true", help="ablation: no pseudo-mask generation")
    m.add_argument("--no-pma", action="store_true", help="ablation: no pseudo-mask attention")
    m.add_argument("--no-3d-memory", action="store_true", help="ablation: no volumetric memory")
    m.add_argument("--axis", default="k")
    m.add_argument("--intensity", default="auto")
    r = p.add_argument_group("run")
    r.add_argument("--resume", action="store_true", help="continue from OUT's .state.pt")
    r.add_argument("--save-every", type=int, default=200)
    r.add_argument("--refresh-every", type=int, default=50,
                   help="steps between refreshes of the support pool's embeddings")
    r.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from SlicerSGP.cli import parse_axis

    axis = parse_axis(args.axis)
    if args.steps < 1:
        raise SGPInputError("--steps must be at least 1.")
    if not 0.0 <= args.own_support <= 1.0:
        raise SGPInputError("--own-support is a fraction: give a value between 0 and 1.")
    random_start = str(args.weights).lower() == "random"
    lr = args.lr if args.lr is not None else (5e-4 if random_start else 1e-4)
    return TrainConfig(
        data=str(args.data), out=str(checkpoint_path(args.out)), model=args.model,
        weights=args.weights, image_size=args.image_size, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        train_all=args.train_all,
        sam2_overrides=list(args.sam2_overrides), steps=args.steps, lr=lr,
        weight_decay=args.weight_decay, warmup=args.warmup, grad_clip=args.grad_clip,
        seq_len=args.seq_len, own_support=args.own_support, top_k=args.top_k, memory_size=args.memory_size,
        memory_policy=args.memory_policy, use_pmg=not args.no_pmg, use_pma=not args.no_pma,
        use_3d_memory=not args.no_3d_memory, loss_dice=args.loss_dice, loss_ce=args.loss_ce,
        loss_kl=args.loss_kl, loss_obj=args.loss_obj, structures=args.structures, axis=axis, intensity=args.intensity,
        cases=args.cases, augment=args.augment, refresh_every=args.refresh_every,
        save_every=args.save_every, seed=args.seed, device=args.device, dtype=args.dtype,
        threads=args.threads,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from SlicerSGP.method.model import describe

    cfg = config_from_args(args)
    out = checkpoint_path(cfg.out)
    if out.exists() and not args.resume and state_path(out).exists():
        print(f"note: {out} exists; starting afresh (use --resume to continue it)")
    trainer = train(cfg, resume=args.resume, progress=not args.quiet)
    if trainer.dist.main:
        recent = trainer.history[-50:]
        mean = (lambda k: float(np.mean([r[k] for r in recent]))) if recent else (lambda k: float("nan"))
        print(f"trained {describe(trainer.model)} on {len(trainer.cases)} case(s), "
              f"structures {trainer.values}, to step {trainer.step}/{cfg.steps} in "
              f"{trainer.elapsed:.1f} s on {trainer.device} "
              f"({'all weights' if cfg.trains_all() else 'LoRA + PMA'}); last-50 loss "
              f"{mean('loss'):.4f} (dice {mean('dice'):.4f}, bce {mean('bce'):.4f}, "
              f"kl {mean('kl'):.4f})")
        print(f"wrote {out}, {out.with_suffix('.json')}, {state_path(out)}")
    return 0


__all__ = ["MODEL_PRESETS", "TrainConfig", "Trainer", "add_train_subparser", "small_overrides",
           "train"]
