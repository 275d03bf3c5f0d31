"""Episodes: one episode's query run, augmentation, model input (the support bank and the
targets: :mod:`SlicerSGP.data.targets`).

One step is one episode, a few-shot task whose answer the support defines: a training case and
a *target* (a label value, or a union of values such as ``1+2``, e.g. the whole cell = nucleus +
cytoplasm), a run of consecutive slices (a 2D image is a one-slice run) in a random direction,
augmented alike; the support pool shows that target on the *other* cases. Because one image can
be asked for different targets, only the support tells the network which one is meant.

A share of episodes (``absent_share``) has an empty answer: in a volume, a run where the target
is absent (the support still shows it, so the network must find that it is not there); where the
target is in every slice (most 2D sets), support whose masks are all empty ("nothing of this
here"), so that an empty support set gives an empty prediction.

A share of the volume episodes whose first slice is drawn (``prior_share``) has its last slice
drawn too, and PMA gets, on the slices between, the interpolation of those two drawn slices
(Fill between slices, as ``--interpolation-prior prompt`` gives it at inference), so a trained
PMA learns how far to trust it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from SlicerSGP.data import preprocess
from SlicerSGP.data.targets import (
    BankItem,
    TargetKey,
    parse_target,
    slices_with,
    target_mask,
    target_name,
)
from SlicerSGP.errors import SGPInputError


def resolve_targets(cfg, cases: list) -> tuple[list[int], list[TargetKey]]:
    """The label values and the targets a run trains on, checked against the cases.

    ``cfg.targets`` (e.g. ``["2", "1+2"]``) or else each of ``cfg.structures`` (else every
    labeled value) alone; ``cfg.hold_out`` targets are never asked for (their voxels still count
    inside a union that names them). A single value is kept as a plain int."""
    present = sorted({int(v) for c in cases for v in c.values()})
    if cfg.targets:
        targets = [parse_target(t) for t in cfg.targets]
    else:
        targets = [(int(v),) for v in (cfg.structures or present)]
    held = [parse_target(t) for t in (cfg.hold_out or [])]
    missing = sorted({v for t in targets + held for v in t} - set(present))
    if missing:
        raise SGPInputError(f"Label value(s) {missing} appear in no training case "
                            f"(present: {present or 'none'}).")
    clash = [target_name(t) for t in held if t in targets and cfg.targets]
    if clash:
        raise SGPInputError(f"Target(s) {clash} are both trained (--target) and held out "
                            "(--hold-out): drop one of the two.")
    targets = list(dict.fromkeys(t for t in targets if t not in held))
    if not targets:
        raise SGPInputError("No target left to train: the training cases hold no labeled voxels"
                            " or every structure is held out.")
    values = sorted({v for t in targets for v in t})
    return values, [t[0] if len(t) == 1 else t for t in targets]


View = tuple[bool, bool, bool]
"""An augmentation: flip columns, flip rows, swap rows and columns (with the flips, the eight
flips and 90-degree rotations)."""


def draw_view(rng: np.random.Generator) -> View:
    return (bool(rng.random() < 0.5), bool(rng.random() < 0.5), bool(rng.random() < 0.5))


def apply_view(view: View, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same flips / swap on each stack of slices (N, H, W[, 3])."""
    out = []
    for a in arrays:
        if view[0]:
            a = a[:, :, ::-1]
        if view[1]:
            a = a[:, ::-1]
        if view[2]:
            a = np.swapaxes(a, 1, 2)
        out.append(np.ascontiguousarray(a))
    return tuple(out)


def augment(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator):
    """Same random flips / 90-degree rotation for every slice of a run: (N, H, W[, 3])."""
    return apply_view(draw_view(rng), img, lab)


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
class Partner:
    """The same query run asked for another target present in it (paired episodes)."""

    value: TargetKey
    masks: np.ndarray
    """(T, H, W) bool, augmented as the episode's images."""
    pool: list[BankItem]


@dataclass
class Episode:
    """One step's query run and the support pool it may draw from."""

    case: int
    value: TargetKey
    window: list[int]
    reverse: bool
    images: np.ndarray
    """(T, H, W[, 3]) slices in [0, 1], augmented."""
    masks: np.ndarray
    """(T, H, W) bool: the answer (all empty when ``empty_support``)."""
    pool: list[BankItem]
    empty_support: bool = False
    """The support shows its images with empty masks: the target is nowhere, answer empty."""
    absent: bool = False
    """An episode whose answer is empty or mostly empty (``absent_share``)."""
    partner: Partner | None = None
    """With ``paired``: the same run asked for another target, trained in the same step, so
    a model that ignores its support cannot score on both."""
    support_view: View | None = None
    """The query run's augmentation, to apply to the support too: set for volumes, whose
    anatomy has a handedness (a mirrored query beside upright support makes the left and the
    right kidney one question with two answers). 2D image sets keep upright support."""


def draw_episode(cases: list, bank: dict[TargetKey, list[BankItem]],
                 episodes: list[tuple[int, TargetKey]], seq_len: int, augmented: bool,
                 rng: np.random.Generator, absent_share: float = 0.0,
                 paired: bool = False) -> Episode:
    """Pick a (case, target) pair and a run of ``seq_len`` slices around one showing it, or,
    with probability ``absent_share``, an episode whose answer is empty (module docstring).
    ``paired``: also ask the same run for another target shown in it (:class:`Partner`)."""
    ci, v = episodes[int(rng.integers(len(episodes)))]
    case = cases[ci]
    n = case.num_slices
    T = min(seq_len, n)
    absent = bool(absent_share > 0 and rng.random() < absent_share)
    with_v = slices_with(case, v)
    without = sorted(set(range(n)) - set(with_v))
    empty_support = absent and not without
    if n > 1:
        around = without if absent and without else with_v
        centre = int(around[int(rng.integers(len(around)))])
        start = int(np.clip(centre - int(rng.integers(T)), 0, n - T))
        window = list(range(start, start + T))
    else:
        window = [0]
    reverse = bool(rng.random() < 0.5) if T > 1 else False
    img = case.slices01[window]
    lab = target_mask(case.labels[window], v)
    if empty_support:
        lab = np.zeros_like(lab)
    # Another target this run shows, and distinct from this one's answer (a union equal to
    # its part here would ask the same question twice).
    other_targets = {} if absent or not paired else {
        t: target_mask(case.labels[window], t) for c, t in episodes if c == ci and t != v}
    partners = [t for t, m in other_targets.items() if m.any() and not np.array_equal(m, lab)]
    v2 = partners[int(rng.integers(len(partners)))] if partners else None
    lab2 = None if v2 is None else other_targets[v2]
    view = None
    if augmented:
        # One draw for both answers, so they stay aligned with the image.
        view = draw_view(rng)
        img, both = apply_view(view, img, lab if lab2 is None else np.concatenate([lab, lab2]))
        lab, lab2 = both[:len(window)], (None if lab2 is None else both[len(window):])
    partner = None if v2 is None else Partner(v2, lab2, support_pool(bank, v2, ci, window))
    return Episode(ci, v, window, reverse, img, lab, support_pool(bank, v, ci, window),
                   empty_support, absent, partner, view if n > 1 else None)


def support_pool(bank: dict[TargetKey, list[BankItem]], value: TargetKey, case: int,
                 window: list[int]) -> list[BankItem]:
    """The bank items a query run of ``case`` may take support from: other cases' slices."""
    others = [b for b in bank[value] if b.case != case]
    if not others:  # a one-case dataset: slices of the same case outside the run
        others = [b for b in bank[value] if b.case == case and b.slice not in window]
    if not others:
        raise SGPInputError("The support bank holds no slice outside the query: training "
                            "needs at least two labeled cases (or slices).")
    return others


@dataclass
class Run:
    """One step's query run as the network sees it (shared by the episode's questions)."""

    episode: Episode
    feats: Any
    """The run's encoded slices (``EncodedSlices``)."""
    images: torch.Tensor
    order: list[int]
    own: bool
    """The run's first slice is labeled support, as at inference."""
    valid: torch.Tensor
    ends: list[int] = field(default_factory=list)
    """With the interpolation prior: the run's first and last slices, both drawn."""


@dataclass
class Question:
    """A target asked of the run: its answer (image and model space) and its support pool."""

    value: TargetKey
    answer: np.ndarray
    masks: torch.Tensor
    pool: list[BankItem]


def prior_ends(order: list[int], own: bool, share: float, rng: np.random.Generator) -> list[int]:
    """The drawn ends of an interpolation-prior episode (module docstring), else []. No draw
    from ``rng`` when ``share`` is 0, so runs without the prior draw the episodes they did."""
    if share <= 0 or not own or len(order) < 3:
        return []
    return [order[0], order[-1]] if rng.random() < share else []


def episode_prior(worker, answer: np.ndarray, ends: list[int],
                  size: int) -> Callable[[int], torch.Tensor | None] | None:
    """The interpolation of the answer's two drawn ``ends`` as PMA's prompt on the slices
    between (model space), or None when an end does not show the target (nothing to fill)."""
    if not ends or not all(answer[k].any() for k in ends):
        return None
    a, b = sorted(ends)
    sparse = np.zeros(answer[a:b + 1].shape, np.uint8)
    sparse[0], sparse[-1] = answer[a], answer[b]
    filled = worker.interpolate(sparse) > 0
    tf = preprocess.LetterboxTransform(filled.shape[1], filled.shape[2], size)
    masks = tf.mask_to_model(torch.from_numpy(filled[:, None].astype(np.float32)))
    return lambda j: masks[j - a:j - a + 1] if a < j < b else None
