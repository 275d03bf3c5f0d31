"""The training support pool's pooled embeddings: computed for every support-bank slice with the
current weights (no autograd), refreshed every ``--refresh-every`` steps, and used to pick the
candidates an episode encodes with autograd (the engine then re-picks per slice with fresh
embeddings)."""

from __future__ import annotations

import numpy as np
import torch

from SlicerSGP.training.episodes import BankItem, TargetKey, to_model

PoolCache = dict[tuple[int, int], torch.Tensor]
"""(case index, slice) -> pooled embedding (float32, on the CPU)."""


def pooled_embeddings(seg, cases: list, bank: dict[TargetKey, list[BankItem]],
                      chunk: int = 16) -> PoolCache:
    """Pooled embeddings of every slice in ``bank`` (model put in eval mode meanwhile)."""
    keys = sorted({(b.case, b.slice) for items in bank.values() for b in items})
    model = seg.model
    was_training = model.training
    model.eval()
    cache: PoolCache = {}
    with torch.no_grad():
        for start in range(0, len(keys), chunk):
            groups: dict[tuple, list] = {}
            for key in keys[start:start + chunk]:
                img = cases[key[0]].slices01[key[1]:key[1] + 1]
                groups.setdefault(img.shape[1:], []).append((key, img))
            for items in groups.values():
                imgs = np.concatenate([i for _, i in items])
                x, _, _ = to_model(imgs, None, seg.image_size)
                feats = seg.encode_images(x, len(items))
                for (key, _), pooled in zip(items, feats.pooled, strict=True):
                    cache[key] = pooled.detach().float().cpu()
    model.train(was_training)
    return cache


def preselect(cache: PoolCache, query_pooled: torch.Tensor, pool: list[BankItem],
              k: int) -> list[BankItem]:
    """Union over query slices of the top-``k`` pool items by cosine similarity (ties: the
    earlier item)."""
    if len(pool) <= k:
        return pool
    emb = torch.stack([cache[(b.case, b.slice)] for b in pool])
    sims = (query_pooled.detach().float().cpu() @ emb.T).numpy()
    chosen: set[int] = set()
    for row in sims:
        order = sorted(range(len(pool)), key=lambda i: (-round(float(row[i]), 6), i))
        chosen.update(order[:k])
    return [pool[i] for i in sorted(chosen)]
