"""File kinds and folder layouts the engine reads: image and label-map endings, names without
them, and where a labeled case keeps its files.

Layouts: a case folder holds ``image.*`` (or a folder ``image/`` of DICOM files, one series)
and ``labels.*`` (or ``label.*``, ``segmentation.*``, ``mask.*``); a 2D data set holds ``images/NAME.*`` and ``masks/NAME.*`` with matching NAMEs.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd",
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff",
)  # fmt: skip
"""File name endings read as images or label maps (plus :data:`SEGMENTATION_EXTENSION`)."""

SEGMENTATION_EXTENSION = ".seg.nrrd"
"""A Slicer segmentation: label map plus segment names and colours in one file."""

LABEL_PREFIXES = ("labels", "label", "segmentation", "mask")
"""Name starts of a case's label map, in the order they are looked for."""


def file_kind(path: str | Path) -> str:
    """The known ending of ``path`` (``'.seg.nrrd'``, ``'.nii.gz'``, ...), lower case; for an
    unknown ending, the plain suffix (``''`` without one)."""
    path = Path(path)
    name = path.name.lower()
    for ext in (SEGMENTATION_EXTENSION, *IMAGE_EXTENSIONS):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def is_volume_file(path: str | Path) -> bool:
    """True for an image or label-map file name (an ending of :data:`IMAGE_EXTENSIONS` or
    ``.seg.nrrd``)."""
    return file_kind(path) in (SEGMENTATION_EXTENSION, *IMAGE_EXTENSIONS)


def file_stem(path: str | Path) -> str:
    """The name without its (possibly double) ending: ``labels.nii.gz`` -> ``labels``."""
    path = Path(path)
    kind = file_kind(path)
    return path.name[: -len(kind)] if kind else path.name


def _prefixed(folder: Path, prefixes: tuple[str, ...]) -> Path | None:
    for prefix in prefixes:
        for candidate in sorted(folder.iterdir()):
            name = candidate.name.lower()
            if candidate.is_file() and name.startswith(prefix + ".") and is_volume_file(candidate):
                return candidate
    return None


def case_files(folder: Path) -> tuple[Path, Path] | None:
    """``(image, labels)`` of a case folder, or None when it lacks either; the image may be
    a sub-folder ``image/`` (a DICOM series, read by readers.read_image)."""
    image = _prefixed(folder, ("image",))
    if image is None and (folder / "image").is_dir():
        image = folder / "image"
    labels = _prefixed(folder, LABEL_PREFIXES)
    return (image, labels) if image and labels else None


def image_mask_pairs(folder: Path) -> list[tuple[str, Path, Path]] | None:
    """``(NAME, images/NAME.*, masks/NAME.*)`` sorted by NAME, or None when ``folder`` has no
    ``images/`` and ``masks/`` sub-folders (an empty list when none of their names match)."""
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not (images_dir.is_dir() and masks_dir.is_dir()):
        return None
    masks: dict[str, Path] = {}
    for m in sorted(masks_dir.iterdir()):
        if m.is_file() and is_volume_file(m):
            masks.setdefault(file_stem(m), m)
    return [
        (file_stem(im), im, masks[file_stem(im)])
        for im in sorted(images_dir.iterdir())
        if im.is_file() and is_volume_file(im) and file_stem(im) in masks
    ]
