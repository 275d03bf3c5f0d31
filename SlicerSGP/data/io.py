"""Reading and writing images, label maps, Slicer segmentations and support banks: one import
for callers (``from SlicerSGP.data import io``) over the modules that do the work.

* :mod:`~SlicerSGP.data.readers`: images and label maps (``(K, J, I)`` arrays, ITK/LPS geometry);
* :mod:`~SlicerSGP.data.geometry`: voxel-grid geometry and the label-map-on-image check;
* :mod:`~SlicerSGP.data.label_names`: structure names and colours (``labels.json``, ITK-SNAP
  ``.label``, ``.seg.nrrd`` segments);
* :mod:`~SlicerSGP.data.writers`: all-or-nothing writing of ``.seg.nrrd``, volumes, score tables;
* :mod:`~SlicerSGP.data.support_bank`: external support banks.
"""

from __future__ import annotations

from SlicerSGP.data.files import IMAGE_EXTENSIONS, SEGMENTATION_EXTENSION, file_kind, file_stem
from SlicerSGP.data.geometry import (
    GEOMETRY_TOLERANCE,
    format_numbers,
    geometry_from_ijk_to_lps,
    geometry_from_sitk,
    geometry_mismatch,
    ijk_to_lps,
    sitk_from_array,
)
from SlicerSGP.data.label_names import (
    DEFAULT_COLORS,
    LabelInfo,
    find_label_description,
    read_label_colors,
    read_label_info,
    read_label_names,
)
from SlicerSGP.data.readers import read_image, read_labels
from SlicerSGP.data.support_bank import load_support_sets, support_bank_info, support_bank_names
from SlicerSGP.data.writers import (
    atomic_write,
    write_score_table,
    write_segmentation,
    write_volume,
)

__all__ = [
    "DEFAULT_COLORS",
    "GEOMETRY_TOLERANCE",
    "IMAGE_EXTENSIONS",
    "SEGMENTATION_EXTENSION",
    "LabelInfo",
    "atomic_write",
    "file_kind",
    "file_stem",
    "find_label_description",
    "format_numbers",
    "geometry_from_ijk_to_lps",
    "geometry_from_sitk",
    "geometry_mismatch",
    "ijk_to_lps",
    "load_support_sets",
    "read_image",
    "read_label_colors",
    "read_label_info",
    "read_label_names",
    "read_labels",
    "sitk_from_array",
    "support_bank_info",
    "support_bank_names",
    "write_score_table",
    "write_segmentation",
    "write_volume",
]
