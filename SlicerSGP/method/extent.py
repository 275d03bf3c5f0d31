"""Where a structure ends past its outermost drawn slice: the rules that stop a sweep there.

Between two drawn slices the structure is known to run on; past the outermost one a sweep must
find its end. A slice there is taken to be past the end when:

* **absent**: the combined object score falls under ``SegmentOptions.absent_below``
  (:func:`presence_run`, with hysteresis so a flickering score neither ends nor revives it);
* **or its mask has left the structure** (:func:`breaks_continuity`; not written), by either
  of two signs:

  - *no overlap*: the mask overlaps the last mask the sweep kept (the outermost drawn slice,
    then each kept prediction) by a Dice under ``SegmentOptions.min_continuity``. One
    structure's cross-sections on neighbouring slices overlap, which Fill between slices relies
    on too; a mask that does not overlap its neighbour is on something else (the next vertebra,
    a neighbouring organ).
  - *growing towards a narrowing end*: the drawn slices show the structure narrowing towards the
    end the sweep goes to (the outermost drawn cross-section smaller than the one inside it,
    :func:`tapers`) and the mask outgrows the last kept one. A structure narrowing to its end
    goes on narrowing; a mask growing there has taken in a neighbour.

``stop_after_absent`` such slices in a row end the sweep; ``min_continuity`` 0 turns the
second rule off. The floor of 0.5 means "most of either mask lies in the other"; it is the only
value tried. The taper sign was written after the 3D learning check's per-slice scores showed
masks growing past a structure's narrowing tip (docs/training-and-evaluation.md).
"""

from __future__ import annotations

import numpy as np

PRESENT_ABOVE = 0.5
"""Presence over which a slice resets the run of absent slices (the upper hysteresis level)."""


def presence_run(run: int, presence: float, absent_below: float) -> int:
    """Length of the current run of confidently absent slices after one more slice.

    Hysteresis: under ``absent_below`` extends the run, over ``PRESENT_ABOVE`` resets it, and
    in between leaves it as it is, so a flickering score neither ends nor revives a structure.
    """
    if presence < absent_below:
        return run + 1
    if presence > PRESENT_ABOVE:
        return 0
    return run


def breaks_continuity(mask: np.ndarray, kept: np.ndarray | None, min_dice: float,
                      tapering: bool = False) -> bool:
    """Whether a non-empty ``mask`` past the drawn range has left the structure: it overlaps
    ``kept`` (the last mask the sweep kept, None if there is none yet) by a Dice under
    ``min_dice`` (0: never), or, where the drawn slices show the structure ``tapering`` towards
    this end, it outgrows ``kept``. An empty mask is left to the presence rule."""
    if min_dice <= 0 or kept is None or not mask.any():
        return False
    area, kept_area = int(mask.sum()), int(kept.sum())
    if tapering and area > kept_area:
        return True
    total = area + kept_area
    return 2.0 * float(np.logical_and(mask, kept).sum()) < min_dice * total


def tapers(masks: dict[int, np.ndarray], reverse: bool) -> bool:
    """Whether the drawn slices ``masks`` show the structure shrinking towards the end a sweep
    past them goes to (``reverse``: towards slice 0): the outermost drawn cross-section smaller
    than the one inside it."""
    drawn = [k for k in sorted(masks) if masks[k].any()]
    if len(drawn) < 2:
        return False
    outer, inner = (drawn[0], drawn[1]) if reverse else (drawn[-1], drawn[-2])
    return int(masks[outer].sum()) < int(masks[inner].sum())
