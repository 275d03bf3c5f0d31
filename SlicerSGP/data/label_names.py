"""Structure names and colours of a label map: ``labels.json``, ITK-SNAP label description files
(``.label``, or ``.txt`` in that format) and the segments of a Slicer ``.seg.nrrd``.

Where they are looked for (:func:`read_label_info`): a label map ``<stem>.<ext>`` takes
``<stem>.json``, ``<stem>.label``, ``<stem>.txt``, then ``labels.json``, ``labels.label``,
``labels.txt`` beside it, then the same ``labels.*`` one folder up (``images/`` + ``masks/``
layouts keep them there), then the only ``*.label`` file beside it, or else one folder up.
The first file found gives names and colours; a ``.txt`` found this way counts only when it is
in ITK-SNAP's format. A ``.seg.nrrd`` carries its own segment names and colours.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import slicerio

from SlicerSGP.data.files import SEGMENTATION_EXTENSION, file_kind, file_stem
from SlicerSGP.errors import SGPInputError

Color = tuple[float, float, float]
"""RGB, each component in [0, 1] (as Slicer and slicerio store segment colours)."""

DEFAULT_COLORS: tuple[Color, ...] = (
    (0.945, 0.839, 0.569), (0.694, 0.478, 0.396), (0.435, 0.722, 0.824),
    (0.847, 0.396, 0.310), (0.867, 0.510, 0.396), (0.565, 0.933, 0.565),
    (0.753, 0.408, 0.345), (0.863, 0.961, 0.078), (0.306, 0.247, 0.000),
    (1.000, 0.980, 0.863), (0.902, 0.863, 0.275), (0.784, 0.784, 0.922),
)  # fmt: skip
"""Segment colours used when none are given, cycled by label value."""

DESCRIPTION_FILES = ("labels.json", "labels.label", "labels.txt")
"""Names of a folder's label description file, in the order they are looked for."""

# ITK-SNAP: "IDX -R- -G- -B- -A-- VIS MSH LABEL", e.g. '    1   255    0    0   1  1  1  "Liver"'
_ITKSNAP_ROW = re.compile(
    r"^\s*(?P<idx>\d+)\s+(?P<r>\d+)\s+(?P<g>\d+)\s+(?P<b>\d+)\s+(?P<a>[-+0-9.eE]+)"
    r"\s+(?P<vis>\d+)\s+(?P<msh>\d+)\s+(?:\"(?P<quoted>[^\"]*)\"|(?P<bare>\S.*?))\s*$"
)


@dataclass(frozen=True)
class LabelInfo:
    """Names and colours by label value, and the file they came from (None: none found)."""

    names: dict[int, str] = field(default_factory=dict)
    colors: dict[int, Color] = field(default_factory=dict)
    source: Path | None = None

    def fill_from(self, other: LabelInfo) -> LabelInfo:
        """This info, with the values it lacks taken from ``other``."""
        return LabelInfo(
            dict(sorted({**other.names, **self.names}.items())),
            dict(sorted({**other.colors, **self.colors}.items())),
            self.source or other.source,
        )


def color01(color, where: str = "") -> Color:
    """An RGB colour as three floats in [0, 1]: accepts ``[r, g, b]`` in [0, 1], 0-255 values
    (any component above 1) or ``'#rrggbb'``."""
    if isinstance(color, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", color.strip()):
        text = color.strip()
        r, g, b = (int(text[i : i + 2], 16) / 255.0 for i in (1, 3, 5))
        return (r, g, b)
    try:
        c = [float(v) for v in color][:3]
    except (TypeError, ValueError):
        c = []
    if len(c) != 3 or any(v < 0 or v != v for v in c):
        raise SGPInputError(
            f"A colour{' in ' + where if where else ''} needs 3 components R, G, B "
            f"(each 0-1 or 0-255) or '#rrggbb'; got {color!r}."
        )
    if any(v > 1.0 for v in c):
        c = [v / 255.0 for v in c]
    r, g, b = (min(v, 1.0) for v in c)
    return (r, g, b)


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


def is_int(text) -> bool:
    try:
        int(text)
    except (TypeError, ValueError):
        return False
    return True


def parse_label_json(path: Path) -> LabelInfo:
    """``{"1": "liver"}``, ``{"liver": 1}``, ``{"1": {"name": "liver", "color": [r, g, b]}}`` or
    ``[{"value": 1, "name": "liver", "color": [r, g, b]}, ...]`` (optionally under ``"labels"``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SGPInputError(
            f"Cannot read label names from {path}: {exc}. Fix or remove the file."
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("labels"), (dict, list)):
        data = data["labels"]
    names: dict[int, str] = {}
    colors: dict[int, Color] = {}

    def entry(value, record: dict) -> None:
        names[int(value)] = str(record["name"])
        if record.get("color") is not None:
            colors[int(value)] = color01(record["color"], str(path))

    try:
        if isinstance(data, list):
            for record in data:
                entry(record["value"], record)
        elif isinstance(data, dict):
            for key, value in data.items():
                if isinstance(value, dict):
                    entry(key, value)
                elif (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and not is_int(key)
                ):
                    names[int(value)] = str(key)  # {"liver": 1}
                else:
                    names[int(key)] = str(value)  # {"1": "liver"}
        else:
            raise TypeError(type(data).__name__)
    except (KeyError, TypeError, ValueError) as exc:
        raise SGPInputError(
            f'Label names in {path} are not in the expected form {{"1": "liver", ...}} ({exc}).'
        ) from exc
    return LabelInfo(dict(sorted(names.items())), dict(sorted(colors.items())), path)


def _itksnap_rows(text: str) -> tuple[list[re.Match], list[tuple[int, str]]]:
    """(rows that parse, (line number, line) of the others), comments and blank lines skipped."""
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ITKSNAP_ROW.match(line)
        if match:
            rows.append(match)
        else:
            bad.append((number, stripped))
    return rows, bad


def looks_like_itksnap(path: Path) -> bool:
    """True when ``path`` is readable text whose every data line is an ITK-SNAP label row."""
    try:
        rows, bad = _itksnap_rows(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return False
    return bool(rows) and not bad


def parse_itksnap_labels(path: Path) -> LabelInfo:
    """An ITK-SNAP label description file: ``IDX -R- -G- -B- -A-- VIS MSH "LABEL"`` per line,
    ``#`` comments; colours 0-255. Index 0 (ITK-SNAP's "Clear Label") is background: skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SGPInputError(f"Cannot read label descriptions from {path}: {exc}.") from exc
    rows, bad = _itksnap_rows(text)
    if bad:
        number, line = bad[0]
        raise SGPInputError(
            f"Line {number} of {path} is not an ITK-SNAP label description ({line!r}). Expected "
            'lines "IDX R G B A VIS MSH \\"name\\"", e.g. 1 255 0 0 1 1 1 "liver", and # comments; '
            "export the file again from ITK-SNAP (Segmentation > Export Label Descriptions)."
        )
    names: dict[int, str] = {}
    colors: dict[int, Color] = {}
    for row in rows:
        value = int(row["idx"])
        if value == 0:
            continue
        rgb = [int(row[c]) for c in ("r", "g", "b")]
        if any(c > 255 for c in rgb):
            raise SGPInputError(
                f"Label {value} in {path} has colour {tuple(rgb)}; components must be 0-255."
            )
        names[value] = row["quoted"] if row["quoted"] is not None else row["bare"]
        colors[value] = (rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0)
    return LabelInfo(dict(sorted(names.items())), dict(sorted(colors.items())), path)


def seg_nrrd_label_values(segments: list[dict], n_layers: int) -> list[int]:
    """The label value :func:`~SlicerSGP.data.readers.read_labels` gives each segment of a
    ``.seg.nrrd``: its own labelValue when there is one layer with distinct positive values,
    else 1..n in file order (overlapping segments in several layers)."""
    values = [int(s.get("labelValue", 1)) for s in segments]
    single = n_layers <= 1 and all(int(s.get("layer", 0)) == 0 for s in segments)
    if single and len(set(values)) == len(values) and all(v > 0 for v in values):
        return values
    return list(range(1, len(segments) + 1))


def read_seg_nrrd_info(path: Path) -> LabelInfo:
    """Segment names and colours of a ``.seg.nrrd`` (its header only; voxels are not read)."""
    try:
        seg = slicerio.read_segmentation(str(path), skip_voxels=True)
    except Exception as exc:  # slicerio/pynrrd raise a variety of errors
        raise SGPInputError(f"Cannot read segmentation {path}: {exc}.") from exc
    segments = list(seg.get("segments", []))
    n_layers = 1 + max((int(s.get("layer", 0)) for s in segments), default=0)
    names: dict[int, str] = {}
    colors: dict[int, Color] = {}
    for value, s in zip(seg_nrrd_label_values(segments, n_layers), segments, strict=True):
        names[value] = str(s.get("name", f"Segment_{value}"))
        if s.get("color") is not None:
            colors[value] = color01(s["color"], str(path))
    return LabelInfo(dict(sorted(names.items())), dict(sorted(colors.items())), path)


# --------------------------------------------------------------------------------------------
# Finding and reading
# --------------------------------------------------------------------------------------------


def _usable(candidate: Path) -> bool:
    if not candidate.is_file():
        return False
    # a .txt found by name may be any text: only ITK-SNAP's format counts
    return candidate.suffix.lower() != ".txt" or looks_like_itksnap(candidate)


def _only_label_file(folder: Path, *, strict: bool = True) -> Path | None:
    """The one ``*.label`` file in ``folder``; several are an error when ``strict`` (beside the
    label map), else ignored (one folder up, where unrelated files may lie)."""
    found = sorted(p for p in folder.glob("*.label") if p.is_file()) if folder.is_dir() else []
    if len(found) > 1 and strict:
        raise SGPInputError(
            f"{folder} holds several ITK-SNAP label files ({', '.join(p.name for p in found)}) "
            "and it is unclear which describes the label map; name the right one labels.label."
        )
    return found[0] if len(found) == 1 else None


def find_label_description(path: str | os.PathLike) -> Path | None:
    """The description file for a label map or folder (search order in the module docstring)."""
    path = Path(path)
    if path.is_dir():
        for name in DESCRIPTION_FILES:
            if _usable(path / name):
                return path / name
        return _only_label_file(path)
    stem = file_stem(path)
    candidates = [path.with_name(stem + ext) for ext in (".json", ".label", ".txt")]
    candidates += [path.with_name(name) for name in DESCRIPTION_FILES]
    candidates += [path.parent.parent / name for name in DESCRIPTION_FILES]
    for candidate in dict.fromkeys(candidates):  # ordered, without repeats
        if candidate != path and _usable(candidate):
            return candidate
    return _only_label_file(path.parent) or _only_label_file(path.parent.parent, strict=False)


def parse_label_description(path: Path) -> LabelInfo:
    """Read a description file by its ending: ``.json``, else ITK-SNAP (``.label``, ``.txt``)."""
    if path.suffix.lower() == ".json":
        return parse_label_json(path)
    return parse_itksnap_labels(path)


def read_label_info(path: str | os.PathLike) -> LabelInfo:
    """Names and colours for ``path``: a description file (``.json``, ``.label``, ``.txt``), a
    ``.seg.nrrd`` (its segments), another label map (its description file, found as the module
    docstring says) or a folder. Nothing found -> an empty :class:`LabelInfo`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        found = find_label_description(path)
    elif suffix in (".json", ".label", ".txt"):
        found = path if path.is_file() else None
    elif file_kind(path) == SEGMENTATION_EXTENSION:
        return read_seg_nrrd_info(path) if path.is_file() else LabelInfo()
    else:
        found = find_label_description(path)
    return parse_label_description(found) if found is not None else LabelInfo()


def read_label_names(path: str | os.PathLike) -> dict[int, str]:
    """Label value -> structure name for ``path`` (see :func:`read_label_info`); ``{}`` if none.

    JSON forms: ``{"1": "liver", ...}``, ``{"liver": 1, ...}``, or entries with a ``"color"``.
    """
    return read_label_info(path).names


def read_label_colors(path: str | os.PathLike) -> dict[int, Color]:
    """Label value -> RGB colour in [0, 1] for ``path`` (see :func:`read_label_info`)."""
    return read_label_info(path).colors


def names_and_colors(path: Path, names: dict[int, str]) -> tuple[dict[int, str], dict]:
    """Names and colours from the --label-names file (its names win over those found)."""
    if not path.is_file():
        raise SGPInputError(f"--label-names {path}: no such file. Give a labels.json or an "
                            "ITK-SNAP .label/.txt file.")
    info = read_label_info(path)
    if not info.names:
        raise SGPInputError(f"--label-names {path} names no label value; write it as "
                            '{"1": "liver"} (JSON) or in ITK-SNAP\'s label format.')
    return {**names, **info.names}, info.colors
