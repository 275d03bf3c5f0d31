"""Turn the user's nodes into what the engine needs (numpy), checking every input first.

:func:`prepareRun` reads MRML and changes nothing in the scene but the drawn-slice record of
each selected segment, written into its tag when it holds more than the tag (the run uses it;
see :mod:`.edit_watch`). The request it returns keeps the volume and the label slices until they are sent, then :meth:`RunRequest.release`
drops them: afterwards only node IDs, checksums and small metadata stay in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from slicer.i18n import tr as _

from SGPSegmentLib import labeled_slices, mrml_io
from SGPSegmentLib.edit_watch import RecordStore, labeledSegments
from SGPSegmentLib.labeled_slices import LabeledSegment
from SGPSegmentLib.reference_cases import supportBankFromScene
from SGPSegmentLib.support_library import supportBankFromLibrary
from SlicerSGP.data.support_library import MANIFEST, SupportLibrary
from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import Geometry, SegmentOptions, SlicePrompt, SupportItem, axis_label


@dataclass
class RunRequest:
    """Everything the engine needs, as numpy, plus the node IDs to write back to."""

    volumeNodeID: str
    segmentationNodeID: str
    shape: tuple[int, int, int]
    structures: dict[int, str]
    segmentIds: dict[int, str]
    labeledSegments: list[LabeledSegment]
    beforeChecksums: dict[int, int]
    """Checksum of each selected segment when the run started: the result is written only if
    the segment is still exactly so (the user may draw while the engine works)."""
    geometry: Geometry
    options: SegmentOptions
    supportSlices: list[int] = field(default_factory=list)
    """Slices (along the axis) the user drew: never predictions."""
    volume: np.ndarray | None = None
    labels: np.ndarray | None = None
    supportBank: dict[int, list[SupportItem]] | None = None
    supportSet: str = ""
    """Name of the saved support set used as extra support ('' when none)."""
    notes: list[str] = field(default_factory=list)
    """Things the user should know about the inputs (e.g. a segment cropped to the volume)."""
    prompts: list[SlicePrompt] = field(default_factory=list)
    """Boxes and clicks of the effect's preview (each prompted slice becomes a drawn slice)."""
    givenSlices: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    """Per structure value, slices whose mask the preview gives (scribbled; sent as drawn):
    Apply writes them, not the user's voxels there."""
    excluded: dict[int, str] = field(default_factory=dict)
    """Label value -> segment ID of the segments sent as "not here" (never written)."""
    promptVersion: int = 0
    """The preview's prompt version this request was made with (a newer one: stale)."""

    @property
    def axis(self) -> int:
        return self.options.axis

    def release(self) -> None:
        """Drop the arrays once sent: the volume copy can be hundreds of MB."""
        self.volume = None
        self.labels = None
        self.supportBank = None
        for prompt in self.prompts:
            prompt.mask = None


def _segmentIds(segmentationNode, segmentIds) -> list[str]:
    segmentation = segmentationNode.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs()) if segmentIds is None else [str(s) for s in segmentIds]
    if not ids:
        raise SGPInputError(
            _(
                "Segmentation '{segmentationName}' has no segment selected; add a segment in "
                "the Segment Editor, draw it on a few slices, and select it."
            ).format(segmentationName=segmentationNode.GetName())
        )
    if len(set(ids)) != len(ids):
        raise SGPInputError(_("A segment is selected twice."))
    for segmentId in ids:
        if segmentation.GetSegment(segmentId) is None:
            raise SGPInputError(
                _(
                    "Segment '{segmentId}' is not in segmentation '{segmentationName}'."
                ).format(segmentId=segmentId, segmentationName=segmentationNode.GetName())
            )
    return ids


def drawnSlicesAllAxes(
    volumeNode, segmentationNode, segmentIds, preferredAxis=0, records=None
) -> list[dict]:
    """Per segment, the slices the user drew along each axis (``{axis: [slices]}``), records
    brought up to date in ``records`` (``preferredAxis``: where a dot-like edit is recorded)."""
    mrml_io.checkVolume(volumeNode)
    records = RecordStore() if records is None else records
    segmentation = segmentationNode.GetSegmentation()
    found = []
    for segmentId in segmentIds:
        segment = segmentation.GetSegment(segmentId)
        if segment is None:
            raise SGPInputError(
                _(
                    "Segment '{segmentId}' is not in segmentation '{segmentationName}'."
                ).format(segmentId=segmentId, segmentationName=segmentationNode.GetName())
            )
        found.append(
            records.recordedSlices(segmentationNode, volumeNode, segmentId, preferredAxis)
        )
    return found


def prepareRun(
    volumeNode,
    segmentationNode,
    segmentIds=None,
    *,
    axis=0,
    referenceCases=(),
    supportSet: str | None = None,
    library=None,
    options: SegmentOptions | None = None,
    records: RecordStore | None = None,
    prompts: dict | None = None,
    exclude=None,
    **optionValues,
) -> RunRequest:
    """Check the inputs and turn the nodes into a :class:`RunRequest`.

    ``referenceCases``: ``(volumeNode, segmentationNode)`` pairs already segmented; their
    segments are matched to the selected ones by name. ``supportSet``: the name of a saved
    support set in ``library`` (default: the engine's library folder), its structures matched
    to the selected segments by name; a segment with no slice drawn is then segmented from
    the set alone. ``records``: the Logic's drawn-slice records (None: read from the tags);
    each selected segment's record is written into its tag (the run uses it). ``prompts``:
    ``{segmentId: {slice: PromptedSlice}}`` (see :mod:`.prompting`), the effect's boxes, clicks
    and scribbles; a segment with a prompt needs no drawn slice. ``exclude``: IDs of other
    segments whose voxels are "not here" for the selected ones (sent with their own label
    values, listed in the options' ``exclude``). ``optionValues``: SegmentOptions fields.
    """
    mrml_io.checkVolume(volumeNode)
    if segmentationNode is None:
        raise SGPInputError(_("Select a segmentation that holds the labeled slices."))
    axis = mrml_io.checkAxis(axis)
    ids = _segmentIds(segmentationNode, segmentIds)
    mrml_io.checkSameGrid(volumeNode, segmentationNode, ids)
    notes = []
    for segmentId in ids:
        outside = mrml_io.voxelsOutsideVolume(segmentationNode, segmentId, volumeNode)
        if outside:
            name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
            notes.append(
                _(
                    "Segment '{name}' reaches outside volume '{volumeName}' ({count} voxels); "
                    "only the part inside the volume is used, and the written result covers "
                    "the volume only."
                ).format(name=name, volumeName=volumeNode.GetName(), count=outside)
            )

    records = RecordStore() if records is None else records
    pairs = labeledSegments(volumeNode, segmentationNode, ids, axis, records)
    items = [item for item, _ in pairs]
    drawnUnion = sorted({s for item in items for s in item.slices})
    volume = mrml_io.volumeArray(volumeNode)
    labels = np.zeros(volume.shape[:3], dtype=np.int16)
    labelsFirst = np.moveaxis(labels, axis, 0)
    for item, mask in pairs:
        maskFirst = np.moveaxis(mask, axis, 0)
        for k in item.slices:
            labelsFirst[k][maskFirst[k] & (labelsFirst[k] == 0)] = item.value
    structures = {item.value: item.name for item in items}
    intensity = optionValues.get("intensity", options.intensity if options else "auto")
    bank = (
        supportBankFromScene(referenceCases, structures, axis=axis, intensity=intensity)
        if referenceCases
        else None
    )
    setName = ""
    if supportSet:
        # Before the "nothing drawn" check: a segment the set holds needs no drawing.
        folder = supportSetFolder(supportSet, library)
        setName = folder.name
        extra = supportBankFromLibrary(folder, structures, intensity=intensity)
        bank = {v: (bank or {}).get(v, []) + extra.get(v, []) for v in structures
                if (bank or {}).get(v) or extra.get(v)}  # fmt: skip
        notes.extend(_supportSetNotes(setName, items, extra))

    prompted = {item.value: (prompts or {}).get(item.segmentId, {}) for item in items}
    slicePrompts, given = _placePrompts(labelsFirst, prompted)
    excluded = _placeExcluded(
        labels, volumeNode, segmentationNode, [s for s in exclude or [] if s not in ids],
        firstValue=len(items) + 1,
    )  # fmt: skip
    for item in items:
        if not item.slices and not prompted[item.value] and not (bank and bank.get(item.value)):
            raise SGPInputError(
                _(
                    "Segment '{name}' has no slice drawn along {axis} and no reference "
                    "case or support set provides it. Draw it on at least one {axisLetter} "
                    "slice where it is visible (or choose the axis you drew on), add a "
                    "reference case or choose a support set that contains it, or deselect it."
                ).format(
                    name=item.name,
                    axis=axis_label(axis),
                    axisLetter=axis_label(axis).split("(")[-1].rstrip(")"),
                )
            )
    if options is None:
        options = SegmentOptions(axis=axis, **optionValues)
    else:
        options.axis = axis
    options.exclude = sorted(excluded) or None
    # The run sends these records' slices: save them with the segments (saved with the
    # scene, restored by undo) now, and only now.
    for item, mask in pairs:
        records.flush(segmentationNode, volumeNode, item.segmentId, mask)
    return RunRequest(
        volumeNodeID=volumeNode.GetID(),
        segmentationNodeID=segmentationNode.GetID(),
        shape=tuple(int(n) for n in volume.shape[:3]),
        structures=structures,
        segmentIds={item.value: item.segmentId for item in items},
        labeledSegments=items,
        beforeChecksums={item.value: labeled_slices.checksum(mask) for item, mask in pairs},
        geometry=mrml_io.volumeGeometry(volumeNode),
        options=options,
        supportSlices=drawnUnion,
        volume=volume,
        labels=labels,
        supportBank=bank,
        supportSet=setName,
        notes=notes,
        prompts=slicePrompts,
        givenSlices=given,
        excluded=excluded,
    )


def _placePrompts(labelsFirst, prompted) -> tuple[list[SlicePrompt], dict]:
    """SlicePrompts of the boxes and clicks; scribbled slices go into the label map as drawn
    (replacing the structure's drawing there)."""
    slicePrompts: list[SlicePrompt] = []
    given: dict[int, dict[int, np.ndarray]] = {}
    for value, slices in prompted.items():
        for k, prompt in sorted(slices.items()):
            if prompt.fixed is None:
                slicePrompts.append(prompt.toSlicePrompt(value, k))
                continue
            plane = labelsFirst[k]
            if prompt.fixed.shape != plane.shape:
                raise SGPInputError(
                    _(
                        "A scribbled slice ({shape}) does not fit the volume's slices "
                        "{shape2}; Cancel the preview and scribble again."
                    ).format(shape=prompt.fixed.shape, shape2=plane.shape)
                )
            plane[plane == value] = 0
            plane[prompt.fixed & (plane == 0)] = value
            given.setdefault(value, {})[int(k)] = np.asarray(prompt.fixed, dtype=bool)
    return slicePrompts, given


def _placeExcluded(labels, volumeNode, segmentationNode, segmentIds, firstValue) -> dict[int, str]:
    """The "not here" segments into the label map with their own values (where no selected
    segment is drawn); returns value -> segment ID."""
    if not segmentIds:
        return {}
    ids = _segmentIds(segmentationNode, segmentIds)
    mrml_io.checkSameGrid(volumeNode, segmentationNode, ids)
    excluded = {}
    for value, segmentId in enumerate(ids, start=firstValue):
        mask = mrml_io.segmentArray(segmentationNode, segmentId, volumeNode)
        labels[mask & (labels == 0)] = value
        excluded[value] = segmentId
    return excluded


def supportSetFolder(name, library=None):
    """The folder of saved support set ``name`` (letter case ignored) in ``library`` (a folder;
    default: the engine's library). A set's name wins over a folder of that name in the
    working directory; a path to a set's folder is taken as is."""
    lib = SupportLibrary(library)
    text = str(name).strip()
    known = lib.names()
    match = next((n for n in known if n.lower() == text.lower()), None)
    if match is not None:
        return lib.path(match)
    path = Path(text).expanduser()
    if path.is_absolute() and (path / MANIFEST).is_file():
        return path
    raise SGPInputError(
        _(
            "Support set {text!r} is not in the support library {root} (sets there: "
            "{sets}). Choose one listed in the SGP Segment module's Support library "
            "section (the same list as `sgp support list`), save one there first, or choose "
            "None."
        ).format(text=text, root=lib.root, sets=", ".join(repr(n) for n in known) or _("none yet"))
    )


def _supportSetNotes(setName: str, items, extra) -> list[str]:
    """What the set gives each selected segment, and which segments it does not hold."""
    used = [_("{name} ({count} slice(s))").format(name=item.name, count=len(extra[item.value]))
            for item in items if item.value in extra]  # fmt: skip
    notes = [_("Support set '{name}' adds support for {used}.").format(
        name=setName, used=", ".join(used))]
    missing = [item.name for item in items if item.value not in extra]
    if missing:
        notes.append(
            _(
                "Support set '{name}' holds no structure named {missing}: only the slices "
                "drawn here are used for it."
            ).format(name=setName, missing=", ".join(repr(n) for n in missing))
        )
    return notes
