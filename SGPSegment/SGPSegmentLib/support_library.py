"""The support library from Slicer: save a segmentation's drawn slices as a named support set,
and turn a saved set into support for a run (numpy and the engine's torch-free library; no Qt).

A set holds, per segment, only the slices drawn for that segment (:mod:`labeled_slices`), so
a slice drawn for one segment never tells another segment "absent here" on a new case. The
library folder is the engine's (``SlicerSGP.data.support_library.default_root``), so sets
saved here are listed by ``sgp support list`` and usable as ``sgp segment --support-bank``.
"""

from __future__ import annotations

import os

from slicer.i18n import tr as _

from SGPSegmentLib import mrml_io
from SGPSegmentLib.edit_watch import labeledSegments
from SlicerSGP.data.support_library import (
    SupportLibrary,
    SupportSetSummary,
    read_support_set,
    resolve_support_bank,
)
from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import SupportItem, axis_label


def _drawn(volumeNode, segmentationNode, ids: list[str], axis: int, drawnSlices, records=None):
    """``[(segmentId, name, slices, mask), ...]``: the given slices, else the recorded ones."""
    if drawnSlices is None:
        pairs = labeledSegments(volumeNode, segmentationNode, ids, axis, records)
        return [(item.segmentId, item.name, list(item.slices), mask) for item, mask in pairs]
    segmentation = segmentationNode.GetSegmentation()
    missing = [s for s in ids if s not in drawnSlices]
    if missing:
        raise SGPInputError(_(
            "No drawn slices given for segment(s) {missing}."
        ).format(missing=missing))
    return [
        (s, segmentation.GetSegment(s).GetName(), sorted(int(k) for k in drawnSlices[s]),
         mrml_io.segmentArray(segmentationNode, s, volumeNode))
        for s in ids
    ]  # fmt: skip


def saveSupportSet(
    name: str,
    volumeNode,
    segmentationNode,
    segmentIds=None,
    *,
    axis=0,
    drawnSlices: dict[str, list[int]] | None = None,
    intensity: str = "auto",
    description: str = "",
    library: str | os.PathLike | None = None,
    overwrite: bool = False,
    records=None,
) -> SupportSetSummary:
    """Save the selected segments' drawn slices (``drawnSlices``: ``{segmentId: [slice, ...]}``
    along ``axis``; default: the slices recorded as drawn) as support set ``name``.

    ``segmentIds`` None: every segment drawn along ``axis``. The segmentation is not changed
    (``records``: the Logic's drawn-slice records, kept in memory)."""
    mrml_io.checkVolume(volumeNode)
    if segmentationNode is None:
        raise SGPInputError(_("Select the segmentation whose drawn slices to save."))
    axis = mrml_io.checkAxis(axis)
    segmentation = segmentationNode.GetSegmentation()
    explicit = segmentIds is not None
    ids = [str(s) for s in segmentIds] if explicit else list(segmentation.GetSegmentIDs())
    for segmentId in ids:
        if segmentation.GetSegment(segmentId) is None:
            raise SGPInputError(
                _(
                    "Segment '{segmentId}' is not in segmentation '{segmentationName}'."
                ).format(segmentId=segmentId, segmentationName=segmentationNode.GetName())
            )
    mrml_io.checkSameGrid(volumeNode, segmentationNode, ids)
    found = _drawn(volumeNode, segmentationNode, ids, axis, drawnSlices, records)
    undrawn = [segName for _, segName, slices, mask in found if not slices]
    if explicit and undrawn:
        raise SGPInputError(
            _(
                "Segment(s) {segments} have no slice drawn along {axis}: draw them on a "
                "slice first, or leave them out of the set."
            ).format(segments=", ".join(repr(n) for n in undrawn), axis=axis_label(axis))
        )
    found = [f for f in found if f[2]]
    if not found:
        raise SGPInputError(
            _(
                "No segment of '{segmentationName}' has a slice drawn along {axis}; draw "
                "some slices first."
            ).format(segmentationName=segmentationNode.GetName(), axis=axis_label(axis))
        )
    values = {segmentId: value for value, (segmentId, *_) in enumerate(found, start=1)}
    return SupportLibrary(library).save(
        name,
        mrml_io.volumeArray(volumeNode),
        {values[s]: mask for s, _, _, mask in found},
        {values[s]: slices for s, _, slices, _ in found},
        axis=axis,
        geometry=mrml_io.volumeGeometry(volumeNode),
        names={values[s]: segName for s, segName, _, _ in found},
        colors={values[s]: tuple(segmentation.GetSegment(s).GetColor()) for s, *_ in found},
        intensity=intensity,
        source=volumeNode.GetName(),
        description=description,
        overwrite=overwrite,
    )


def supportBankFromLibrary(
    nameOrPath, structures: dict[int, str], *, intensity: str = "auto", library=None
) -> dict[int, list[SupportItem]]:
    """A run's ``supportBank`` from a saved set: its structures matched to ``structures``
    (``{value: segment name}``) by name, letter case ignored."""
    folder = resolve_support_bank(nameOrPath, SupportLibrary(library))
    items, names = read_support_set(folder, intensity=intensity)
    byName = {n.strip().lower(): v for v, n in names.items()}
    bank = {v: items[byName[n.strip().lower()]] for v, n in structures.items()
            if n.strip().lower() in byName}  # fmt: skip
    if not bank:
        raise SGPInputError(
            _(
                "Support set '{name}' holds {setStructures}, none named {segmentNames}; rename the "
                "segments to match, or pick another set."
            ).format(
                name=folder.name,
                setStructures=", ".join(repr(n) for n in names.values()),
                segmentNames=" or ".join(repr(n) for n in structures.values()),
            )
        )
    return bank


SUPPORT_SET_PARAMETER = "SupportSet"
"""Parameter (on the MRML parameter node) naming the saved support set runs and previews use."""


def describeSupportSet(summary: SupportSetSummary) -> str:
    """'liver (3 slices), spleen (2 slices)' for a saved set."""
    parts = []
    for value, name in sorted(summary.structures.items()):
        n = summary.slices.get(value, 0)
        parts.append(
            _("{name} (1 slice)").format(name=name)
            if n == 1
            else _("{name} ({count} slices)").format(name=name, count=n)
        )
    return ", ".join(parts)


class SupportSets:
    """The saved support sets as the module sees them (the Logic's ``supportSets`` role): the
    library folder, saving drawn slices, the set the parameter node names, renaming, deleting,
    export and import with the user's confirmation."""

    def __init__(self, records=None) -> None:
        self.root: str | os.PathLike | None = None
        """Folder of the saved support sets; None: the engine's (``sgp support`` uses it too)."""
        self.records = records
        """The Logic's drawn-slice records: a saved set holds the slices they name."""

    def library(self, root=None) -> SupportLibrary:
        """The saved support sets: ``.list() .names() .show() .rename() .delete()
        .export_zip() .import_zip()`` (``root`` None: :attr:`root`)."""
        return SupportLibrary(root if root is not None else self.root)

    def save(
        self, name, volumeNode, segmentationNode, segmentIds=None, axis=0, **kwargs
    ) -> SupportSetSummary:
        """Save the segments' drawn slices as support set ``name``. ``kwargs``: drawnSlices
        (``{segmentId: [slices]}``), intensity, description, library, overwrite."""
        kwargs.setdefault("library", self.root)
        kwargs.setdefault("records", self.records)
        return saveSupportSet(name, volumeNode, segmentationNode, segmentIds, axis=axis, **kwargs)

    @staticmethod
    def chosen(parameterNode) -> str:
        """The support set runs and previews use ('' = none), from the MRML parameter node (so
        it is saved with the scene and shared by the module and the SGP effect)."""
        return (parameterNode.GetParameter(SUPPORT_SET_PARAMETER) or "") if parameterNode else ""

    @staticmethod
    def choose(parameterNode, name) -> None:
        parameterNode.SetParameter(SUPPORT_SET_PARAMETER, str(name or "").strip())

    def rename(self, name, newName, parameterNode=None) -> str:
        """Rename a saved set; the parameter node follows if it uses it. Returns the new name."""
        newName = self.library().rename(name, newName).name
        if self.chosen(parameterNode).lower() == str(name).strip().lower():
            self.choose(parameterNode, newName)
        return newName

    def delete(self, name, parameterNode=None, confirm=None) -> bool:
        """Delete a saved set after ``confirm(message)`` says yes; a parameter node that uses
        it goes back to none. Returns whether it was deleted."""
        library = self.library()
        path = library.path(name)  # unknown names fail before anything is asked
        summary = next(s for s in library.list() if s.path == path)
        if confirm is not None and not confirm(
            _(
                "Delete support set '{name}' ({structures}) from {root}? This cannot be undone; "
                "export it first to keep a copy."
            ).format(name=path.name, structures=describeSupportSet(summary), root=library.root)
        ):
            return False
        library.delete(path.name)
        if self.chosen(parameterNode).lower() == path.name.lower():
            self.choose(parameterNode, "")
        return True

    def exportZip(self, name, path, overwrite=False):
        """Write a saved set as one zip (``sgp support import`` and Import zip read it)."""
        return self.library().export_zip(name, path, overwrite=overwrite)

    def importZip(self, path, name=None, overwrite=False, confirm=None):
        """Add the set in a zip, as ``name`` (None or '': the name it was exported under). A
        set called ``name`` is replaced only with ``overwrite`` or after ``confirm(message)``
        says yes (returns None when it says no). The zip is checked before anything changes."""
        library = self.library()
        existing = self.existing(name) if name else None
        if existing is not None and not overwrite and confirm is not None:
            if not confirm(
                _(
                    "A support set named '{existing}' exists in {root}. Replace it with the "
                    "imported one? The old set is lost (export it first to keep a copy)."
                ).format(existing=existing, root=library.root)
            ):
                return None
            overwrite = True
        return library.import_zip(path, name or None, overwrite=overwrite)

    def existing(self, name) -> str | None:
        """The saved set called ``name`` (letter case ignored), or None."""
        wanted = str(name).strip().lower()
        return next((n for n in self.library().names() if n.lower() == wanted), None)

    def choices(self, selected: str = "", details=True) -> list[tuple[str, str]]:
        """``[(name, label)]`` for a combo box: None first, then each saved set (``details``:
        with its structures and slice counts); a ``selected`` set no longer in the library is
        kept, marked missing (a run then says so)."""
        choices = [("", _("None"))]
        if details:
            choices += [(s.name, f"{s.name}: {describeSupportSet(s)}")
                        for s in self.library().list()]  # fmt: skip
        else:
            choices += [(n, n) for n in self.library().names()]
        if selected and selected.lower() not in {n.lower() for n, _ in choices}:
            choices.append((selected, _("{name} (not in the library)").format(name=selected)))
        return choices

    def details(self, name: str) -> str:
        """A few lines about saved set ``name`` for the panel ('' for none)."""
        if not name:
            return _("No set chosen.")
        library = self.library()
        found = [s for s in library.list() if s.name.lower() == name.lower()]
        if not found:
            return _(
                "'{name}' is not in the support library ({root})."
            ).format(name=name, root=library.root)
        s = found[0]
        lines = [describeSupportSet(s) + "."]
        when = s.created[:16].replace("T", " ")
        size = f"{s.size / 1e6:.1f}"
        if s.created and s.source:
            line = _("Saved {when} from '{source}', {size} MB.")
        elif s.source:
            line = _("Saved from '{source}', {size} MB.")
        else:
            line = _("Saved {when}.") if s.created else _("Saved.")
        lines.append(line.format(when=when, source=s.source, size=size))
        if s.description:
            lines.append(s.description)
        return "\n".join(lines)
