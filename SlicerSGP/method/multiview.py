"""Optional multi-view fusion: propagate along the other two axes as well and average.

Along another axis the drawn slices are only lines, so each other view takes its support from
the main view's result: for each structure, three slices across its extent along that axis
(at 10 %, 50 % and 90 %), marked complete. The views' probabilities are averaged and the
user's drawn voxels kept exactly. About three times the cost of one view (each view encodes
its own slices); off by default.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from SlicerSGP.method.assembly import label_map_from_probabilities
from SlicerSGP.types import SegmentationResult, SegmentOptions

VIEW_SUPPORT_FRACTIONS = (0.1, 0.5, 0.9)


def view_support(labels: np.ndarray, value: int, axis: int) -> list[int]:
    """Slices along ``axis`` at 10/50/90 % of the structure's extent in ``labels``."""
    moved = np.moveaxis(labels == value, axis, 0)
    present = np.flatnonzero(moved.reshape(moved.shape[0], -1).any(axis=1))
    if not len(present):
        return []
    return sorted({int(present[int(round(q * (len(present) - 1)))])
                   for q in VIEW_SUPPORT_FRACTIONS})


def fuse_views(segmenter: Any, volume: np.ndarray, labels: np.ndarray | None,
               main: SegmentationResult, opts: SegmentOptions) -> SegmentationResult:
    """Add the other two axes' propagation to ``main`` (the result along ``opts.axis``).

    ``segmenter`` is the calling Segmenter (not imported here: it imports this module)."""
    probabilities = {v: p.copy() for v, p in main.probabilities.items()}
    views = {v: 1 for v in probabilities}
    for axis in (a for a in (0, 1, 2) if a != opts.axis):
        for value, name in main.structures.items():
            slices = view_support(main.labels, value, axis)
            if not slices:
                continue
            view_opts = replace(opts, axis=axis, multi_view=False, complete_slices=slices,
                                slice_limits=None)
            pseudo_labels = np.where(main.labels == value, value, 0).astype(main.labels.dtype)
            if opts.exclude and labels is not None:  # "not here" along every axis
                excluded = np.isin(labels, opts.exclude)
                pseudo_labels = pseudo_labels.astype(np.result_type(pseudo_labels, labels))
                pseudo_labels[excluded] = labels[excluded]
            res = segmenter.segment(volume, pseudo_labels, {value: name}, view_opts,
                                    support_slices=slices)
            probabilities[value] += res.probabilities[value]
            views[value] += 1
    for value in probabilities:
        probabilities[value] /= views[value]
        # A structure's own drawn slices keep the drawing (probability 0 or 1), as in one view.
        fused_view = np.moveaxis(probabilities[value], opts.axis, 0)
        main_view = np.moveaxis(main.probabilities[value], opts.axis, 0)
        for k in main.labeled_by_structure.get(value, []):
            fused_view[k] = main_view[k]
    fused = label_map_from_probabilities(probabilities, opts.threshold, main.labels.shape)
    if labels is not None:
        drawn = np.isin(labels, list(main.structures))
        fused[drawn] = labels[drawn]  # the user's strokes stay exactly as drawn
    main.labels = fused
    main.probabilities = probabilities
    main.notes.append("Multi-view fusion: probabilities averaged over propagation along "
                      f"{', '.join('kji'[a] for a in (0, 1, 2))}.")
    return main
