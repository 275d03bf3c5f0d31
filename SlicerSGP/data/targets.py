"""Targets and the support bank of labeled cases, shared by training and evaluation.

A *target* is what a question asks for: a label value, or a union of values such as ``1+2``
(e.g. the whole cell = nucleus + cytoplasm). The support bank of a set of labeled cases holds,
per target, every slice showing it plus as many evenly spaced slices without it (the rule
:func:`~SlicerSGP.data.io.load_support_sets` uses for a ``--support-bank`` folder). numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from SlicerSGP.data.intensity import evenly_spaced
from SlicerSGP.errors import SGPInputError

Target = tuple[int, ...]
"""What an episode asks for: the voxels whose label is any of these values."""

TargetKey = int | Target
"""A target as callers name it: a plain label value or a tuple of values."""


def as_target(key: TargetKey) -> Target:
    return tuple(sorted({int(v) for v in key})) if isinstance(key, tuple) else (int(key),)


def parse_target(text: str | int) -> Target:
    """``"2"`` -> (2,), ``"1+2"`` -> (1, 2); anything else is refused with the form to use."""
    parts = str(text).replace(" ", "").split("+")
    try:
        values = tuple(sorted({int(p) for p in parts}))
    except ValueError:
        raise SGPInputError(f"Target {text!r} is not a label value or a union of values: write "
                            "e.g. 2, or 1+2 for the union of labels 1 and 2.") from None
    if any(v <= 0 for v in values):
        raise SGPInputError(f"Target {text!r}: label values are positive integers (0 is "
                            "background).")
    return values


def target_name(key: TargetKey) -> str:
    return "+".join(str(v) for v in as_target(key))


def target_mask(labels: np.ndarray, key: TargetKey) -> np.ndarray:
    t = as_target(key)
    return labels == t[0] if len(t) == 1 else np.isin(labels, t)


def slices_with(case, key: TargetKey) -> list[int]:
    per = target_mask(case.labels, key).reshape(case.num_slices, -1).any(axis=1)
    return [int(k) for k in np.flatnonzero(per)]


@dataclass
class BankItem:
    case: int
    slice: int
    value: TargetKey
    """The target this item shows (its mask is ``target_mask(labels, value)``)."""


def build_support_bank(cases: list, targets: list[TargetKey]) -> dict[TargetKey, list[BankItem]]:
    """Per target: every slice showing it, plus as many evenly spaced slices without it (of
    the same case) - the rule ``io.load_support_sets`` uses for a support bank. For 2D image
    sets (one slice per case) the cases without the target are thinned the same way."""
    bank: dict[TargetKey, list[BankItem]] = {}
    two_d = all(c.num_slices == 1 for c in cases)
    for key in targets:
        items: list[BankItem] = []
        if two_d:
            has = [bool(target_mask(c.labels, key).any()) for c in cases]
            pos = [ci for ci, h in enumerate(has) if h]
            neg = [ci for ci, h in enumerate(has) if not h]
            for ci in sorted(pos + evenly_spaced(neg, len(pos))):
                items.append(BankItem(ci, 0, key))
        else:
            for ci, c in enumerate(cases):
                present = slices_with(c, key)
                absent = sorted(set(range(c.num_slices)) - set(present))
                for k in sorted(present + evenly_spaced(absent, len(present))):
                    items.append(BankItem(ci, k, key))
        bank[key] = items
    return bank
