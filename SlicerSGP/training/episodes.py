"""Episodes: the training support bank, one episode's query run, augmentation, model input.

One step is one episode: a training case and structure, a run of consecutive slices around a
slice showing it (a 2D image is a one-slice run), in a random direction, augmented alike; its
support pool is the bank drawn from the *other* cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from SlicerSGP.data import preprocess
from SlicerSGP.data.preprocess import evenly_spaced
from SlicerSGP.errors import SGPInputError


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


def augment(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator):
    """Same random flips / 90-degree rotation for every slice of a run: (N, H, W[, 3])."""
    if rng.random() < 0.5:
        img, lab = img[:, :, ::-1], lab[:, :, ::-1]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    if rng.random() < 0.5:
        img, lab = np.swapaxes(img, 1, 2), np.swapaxes(lab, 1, 2)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def to_model(slices01: np.ndarray, masks: np.ndarray | None, size: int):
    """(N, H, W[, 3]) slices + (N, H, W) bool masks -> model-space images, masks, valid area."""
    tf = preprocess.LetterboxTransform(slices01.shape[1], slices01.shape[2], size)
    images = preprocess.to_model_input(slices01, tf)
    if masks is None:
        return images, None, None
    m = tf.mask_to_model(torch.from_numpy(masks[:, None].astype(np.float32)))
    valid = tf.mask_to_model(torch.ones(1, 1, tf.height, tf.width))
    return images, m, valid


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's episode, augmentation and dropout: a resumed run draws the same."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


@dataclass
class Episode:
    """One step's query run and the support pool it may draw from."""

    case: int
    value: int
    window: list[int]
    reverse: bool
    images: np.ndarray
    """(T, H, W[, 3]) slices in [0, 1], augmented."""
    masks: np.ndarray
    """(T, H, W) bool."""
    pool: list[BankItem]


def draw_episode(cases: list, bank: dict[int, list[BankItem]],
                 episodes: list[tuple[int, int]], seq_len: int, augmented: bool,
                 rng: np.random.Generator) -> Episode:
    """Pick a (case, structure) pair and a run of ``seq_len`` slices around one showing it."""
    ci, v = episodes[int(rng.integers(len(episodes)))]
    case = cases[ci]
    n = case.num_slices
    T = min(seq_len, n)
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
    if augmented:
        img, lab = augment(img, lab, rng)
    others = [b for b in bank[v] if b.case != ci]
    if not others:  # a one-case dataset: slices of the same case outside the run
        others = [b for b in bank[v] if b.case == ci and b.slice not in window]
    if not others:
        raise SGPInputError("The support bank holds no slice outside the query: training "
                            "needs at least two labeled cases (or slices).")
    return Episode(ci, v, window, reverse, img, lab, others)
