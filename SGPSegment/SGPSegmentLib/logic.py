"""All of SGPSegment's behaviour, without Qt: usable from the Python console and from tests.

A run has three steps, so that the slow middle one can run in a worker thread:

1. :meth:`SGPSegmentCoreLogic.prepareRun` (main thread, reads MRML): checks the inputs, finds
   the slices the user labeled, exports the volume, the selected segments and any reference
   cases to numpy arrays on the volume's voxel grid, and converts the geometry to LPS.
2. :meth:`SGPSegmentCoreLogic.compute` (any thread, no MRML): runs the SlicerSGP engine.
3. :meth:`SGPSegmentCoreLogic.applyResult` (main thread, writes MRML): writes the segments,
   keeping the user-drawn slices exactly as drawn, saves an undo state first, and optionally
   writes pseudo-masks into a hidden segmentation and per-slice scores into a table and plot.

Nothing touches the segmentation before step 3, so a failed or cancelled run writes nothing.
:class:`RunJob` runs step 2 in a ``threading.Thread``; the Widget polls it from a Qt timer on
the main thread and calls step 3 there. :meth:`SGPSegmentCoreLogic.run` does all three in a row.

Heavy dependencies (torch, sam2, the engine) are imported only inside the methods that need them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk

# The engine's boundary types and errors are plain dataclasses/exceptions (numpy only).
from SlicerSGP.errors import Cancelled, SGPDeviceError, SGPError, SGPInputError
from SlicerSGP.types import Geometry, SegmentationResult, SegmentOptions, SupportItem

AXIS_NAMES = ("K", "J", "I")
"""Array axes of ``slicer.util.arrayFromVolume``: 0 = K (slice), 1 = J (row), 2 = I (column)."""

MODEL_SIZES = ("tiny", "small", "base_plus", "large")
"""SAM2.1 sizes the engine knows; anything else is taken as a trained SGP checkpoint path."""

IMAGE_SIZES = (1024, 768, 512, 256)
"""Model input sizes offered (SAM2's native size is 1024)."""

INTENSITY_MODES = (
    "auto",
    "percentile",
    "none",
    "ct_abdomen",
    "ct_lung",
    "ct_bone",
    "ct_brain",
    "ct_soft_tissue",
)

UNDO_TOKEN_ATTRIBUTE = "SGPSegment.undoToken"
PSEUDO_MASKS_REFERENCE_ROLE = "SGPPseudoMasks"
SCORES_TABLE_REFERENCE_ROLE = "SGPSliceScores"
SCORES_CHART_REFERENCE_ROLE = "SGPSliceScoresChart"

MAX_REFERENCE_SLICES_PER_STRUCTURE = 64
"""Reference-case support items kept per structure (evenly spaced beyond this)."""

# Python modules the engine imports, with the pip requirement that provides each.
# torch is installed through the PyTorch extension (CUDA-matched wheel), sam2 without its
# optional CUDA extension and without pulling its pinned dependencies (see DESIGN.md).
DEPENDENCIES: tuple[tuple[str, str], ...] = (
    ("torch", "torch>=2.3"),
    ("hydra", "hydra-core>=1.3.2"),
    ("iopath", "iopath>=0.1.10"),
    ("peft", "peft>=0.11"),
    ("safetensors", "safetensors>=0.4"),
    ("SimpleITK", "SimpleITK>=2.3"),
    ("slicerio", "slicerio>=1.0"),
    ("tqdm", "tqdm>=4.66"),
    ("PIL", "pillow>=10"),
    ("sam2", "sam2==1.1.0"),
)

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------------------
# Data passed between the steps
# ------------------------------------------------------------------------------------------


@dataclass
class LabeledSegment:
    """One selected segment: which slices along the axis the user drew it on."""

    segmentId: str
    name: str
    value: int
    slices: list[int]
    voxelCounts: list[int]

    @property
    def totalVoxels(self) -> int:
        return int(sum(self.voxelCounts))

    def describe(self) -> str:
        if not self.slices:
            return f"{self.name}: no labeled slice"
        parts = ", ".join(f"{s} ({c} vx)" for s, c in zip(self.slices, self.voxelCounts, strict=True))
        return f"{self.name}: {len(self.slices)} labeled slice(s): {parts}"


@dataclass
class RunRequest:
    """Everything the engine needs, as numpy, plus the node IDs to write back to."""

    volumeNodeID: str
    segmentationNodeID: str
    volume: np.ndarray
    labels: np.ndarray
    """Label map for the engine: the selected segments on the labeled slices only."""
    before: dict[int, np.ndarray]
    """Each selected segment as it was (bool arrays), to keep labeled slices and detect edits."""
    structures: dict[int, str]
    segmentIds: dict[int, str]
    labeledSegments: list[LabeledSegment]
    geometry: Geometry
    options: SegmentOptions
    supportSlices: list[int] = field(default_factory=list)
    """Slices (along the axis) counted as labeled: what the user drew, never predictions."""
    supportBank: dict[int, list[SupportItem]] | None = None
    model: str = "tiny"
    weights: str | None = None
    device: str = "auto"
    imageSize: int = 1024
    seed: int = 0
    keepPseudoMasks: bool = False

    @property
    def axis(self) -> int:
        return self.options.axis


@dataclass
class WriteReport:
    """What :meth:`SGPSegmentCoreLogic.applyResult` wrote."""

    segmentIds: list[str]
    voxelCounts: dict[str, int]
    labeledSlices: list[int]
    pseudoMaskNodeID: str | None = None
    tableNodeID: str | None = None
    chartNodeID: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Worker thread
# ------------------------------------------------------------------------------------------


class RunJob:
    """Runs :meth:`SGPSegmentCoreLogic.compute` in a worker thread.

    The owner (main thread) polls :attr:`stage`/:attr:`fraction`/:meth:`done`, may call
    :meth:`cancel`, and once done reads :attr:`result` or :attr:`error`. The job never touches
    MRML, so results are applied by the owner on the main thread.
    """

    def __init__(self, logic: SGPSegmentCoreLogic, request: RunRequest) -> None:
        self.logic = logic
        self.request = request
        self.stage = "waiting"
        self.fraction = 0.0
        self.result: SegmentationResult | None = None
        self.error: BaseException | None = None
        self.startTime: float | None = None
        self.endTime: float | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="SGPSegment-run", daemon=True)

    def start(self) -> RunJob:
        self.startTime = time.monotonic()
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelRequested(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        return self.endTime is not None

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.done()

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, Cancelled)

    def _progress(self, stage: str, fraction: float) -> None:
        with self._lock:
            self.stage = str(stage)
            self.fraction = float(min(max(fraction, 0.0), 1.0))

    def _work(self) -> None:
        try:
            self.result = self.logic.compute(
                self.request, progress=self._progress, cancel=self._cancel.is_set
            )
        except BaseException as exc:  # reported to the owner, never raised in the thread
            self.error = exc
        finally:
            self.endTime = time.monotonic()


# ------------------------------------------------------------------------------------------
# The logic
# ------------------------------------------------------------------------------------------


class SGPSegmentCoreLogic:
    """Behaviour of the SGPSegment module. The module's ``SGPSegmentLogic`` adds the parameter
    node on top; everything here works on explicit nodes and values."""

    def __init__(self) -> None:
        super().__init__()
        self._segmenter = None
        self._segmenterKey: tuple | None = None
        self._segmenterLock = threading.Lock()
        self._histories: dict[str, tuple[str, Any]] = {}
        self.lastResult: SegmentationResult | None = None
        self.lastRequest: RunRequest | None = None

    # -------------------------------------------------------------------------- scene helpers

    @staticmethod
    def _scene():
        return slicer.mrmlScene

    @staticmethod
    def _ijkToRAS(volumeNode) -> np.ndarray:
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])

    @classmethod
    def volumeGeometry(cls, volumeNode) -> Geometry:
        """The volume's voxel grid in ITK (LPS) terms, for the ``(K, J, I)`` array."""
        ijkToRAS = cls._ijkToRAS(volumeNode)
        columns = ijkToRAS[:3, :3]
        spacing = np.linalg.norm(columns, axis=0)
        directionRAS = columns / spacing
        directionLPS = _LPS_FROM_RAS @ directionRAS
        originLPS = _LPS_FROM_RAS @ ijkToRAS[:3, 3]
        return Geometry(
            origin=tuple(float(v) for v in originLPS),
            spacing=tuple(float(v) for v in spacing),
            direction=tuple(float(v) for v in directionLPS.reshape(-1)),
        )

    @staticmethod
    def axisDescription(volumeNode, axis: int) -> str:
        """'K (axial)'-style label of an array axis, from the volume's orientation."""
        ijkToRAS = SGPSegmentCoreLogic._ijkToRAS(volumeNode)
        ijkColumn = {0: 2, 1: 1, 2: 0}[axis]
        direction = ijkToRAS[:3, ijkColumn]
        dominant = int(np.argmax(np.abs(direction)))
        plane = ("sagittal", "coronal", "axial")[dominant]
        return f"{AXIS_NAMES[axis]} ({plane} slices)"

    @staticmethod
    def _checkVolume(volumeNode) -> None:
        if volumeNode is None:
            raise SGPInputError("Select an input volume.")
        if volumeNode.GetImageData() is None:
            raise SGPInputError(f"Volume '{volumeNode.GetName()}' has no image data; load it first.")
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise SGPInputError(
                f"'{volumeNode.GetName()}' is a label map; select the image volume to segment."
            )

    def _checkSameGrid(self, volumeNode, segmentationNode, segmentIds: list[str]) -> None:
        """The segments must be drawn on the volume's voxel lattice (possibly a sub-extent)."""
        if volumeNode.GetParentTransformNode() is not segmentationNode.GetParentTransformNode():
            raise SGPInputError(
                f"Volume '{volumeNode.GetName()}' and segmentation '{segmentationNode.GetName()}' "
                "are under different transforms; harden the transforms (Data module) or move both "
                "under the same one."
            )
        volumeToIJK = np.linalg.inv(self._ijkToRAS(volumeNode))
        for segmentId in segmentIds:
            labelmap = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
            if labelmap is None:
                continue
            extent = labelmap.GetExtent()
            if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
                continue  # empty: no grid to compare
            m = vtk.vtkMatrix4x4()
            labelmap.GetImageToWorldMatrix(m)
            imageToWorld = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
            relation = volumeToIJK @ imageToWorld
            rotationScale, offset = relation[:3, :3], relation[:3, 3]
            if not (
                np.allclose(rotationScale, np.eye(3), atol=1e-3)
                and np.allclose(offset, np.round(offset), atol=1e-3)
            ):
                name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
                raise SGPInputError(
                    f"Segment '{name}' of '{segmentationNode.GetName()}' was drawn on a different "
                    f"voxel grid than volume '{volumeNode.GetName()}' (spacing, orientation or "
                    "origin differ), so its slices do not line up with the volume's. Select the "
                    "volume the segmentation was drawn on, or set the segmentation's geometry to "
                    "this volume (Segment Editor > Specify geometry) and redraw the labeled slices."
                )

    @staticmethod
    def segmentValue(index: int) -> int:
        return index + 1

    @staticmethod
    def referenceVolumeForSegmentation(segmentationNode):
        """The volume a segmentation was made on (its reference geometry volume), if known."""
        if segmentationNode is None:
            return None
        return segmentationNode.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        )

    @staticmethod
    def _referenceImage(volumeNode):
        """An empty oriented image with the volume's voxel grid (extent and IJK-to-RAS)."""
        reference = slicer.vtkOrientedImageData()
        reference.SetExtent(volumeNode.GetImageData().GetExtent())
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        reference.SetImageToWorldMatrix(ijkToRAS)
        return reference

    @classmethod
    def _segmentArray(cls, segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
        """A segment as a bool ``(K, J, I)`` array on the volume's grid.

        Done with the segmentation logic's own functions instead of
        ``slicer.util.arrayFromSegmentBinaryLabelmap``, which goes through a temporary labelmap
        node and leaves a display node behind in the scene on every call.
        """
        from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

        shape = tuple(reversed(volumeNode.GetImageData().GetDimensions()))
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        layer = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
        if segment is None or layer is None or layer.GetPointData().GetScalars() is None:
            return np.zeros(shape, dtype=bool)
        extent = layer.GetExtent()
        if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
            return np.zeros(shape, dtype=bool)
        # Segments may share one labelmap layer, each with its own label value.
        values = vtk_to_numpy(layer.GetPointData().GetScalars())
        labelmap = slicer.vtkOrientedImageData()
        labelmap.ShallowCopy(layer)
        labelmap.CopyDirections(layer)
        mask = numpy_to_vtk((values == segment.GetLabelValue()).astype(np.uint8), deep=True)
        labelmap.GetPointData().SetScalars(mask)
        resampled = slicer.vtkOrientedImageData()
        if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, cls._referenceImage(volumeNode), resampled, False, True
        ):
            raise SGPError(f"Could not resample segment '{segmentId}' onto '{volumeNode.GetName()}'.")
        array = vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(shape)
        return array > 0

    @classmethod
    def _writeSegmentArray(cls, mask: np.ndarray, segmentationNode, segmentId: str, volumeNode) -> None:
        """Replace a segment's content with ``mask`` (``(K, J, I)`` on the volume's grid)."""
        from vtk.util.numpy_support import numpy_to_vtk

        labelmap = cls._referenceImage(volumeNode)
        scalars = numpy_to_vtk(np.ascontiguousarray(mask, dtype=np.uint8).reshape(-1), deep=True)
        labelmap.GetPointData().SetScalars(scalars)
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, segmentationNode, segmentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
        ):
            raise SGPError(f"Could not write segment '{segmentId}' of '{segmentationNode.GetName()}'.")

    # ----------------------------------------------------------------------- labeled slices

    def labeledSlices(self, volumeNode, segmentationNode, segmentIds, axis: int = 0):
        """Per selected segment, the slices along ``axis`` the user labeled, with voxel counts.

        Before the first run these are the slices the segment has voxels on. After a run the
        segment holds predictions too, so the slices that count as labeled are the ones labeled
        before plus every slice the user changed since the result was written (a correction),
        as remembered in the segment's tags (saved with the segmentation).
        """
        return [item for item, _ in self._labeledSegments(volumeNode, segmentationNode, segmentIds, axis)]

    def _labeledSegments(self, volumeNode, segmentationNode, segmentIds, axis):
        self._checkVolume(volumeNode)
        if segmentationNode is None:
            raise SGPInputError("Select a segmentation.")
        axis = self._checkAxis(axis)
        segmentation = segmentationNode.GetSegmentation()
        result = []
        for index, segmentId in enumerate(segmentIds):
            segment = segmentation.GetSegment(segmentId)
            if segment is None:
                raise SGPInputError(
                    f"Segment '{segmentId}' is not in segmentation '{segmentationNode.GetName()}'."
                )
            mask = self._segmentArray(segmentationNode, segmentId, volumeNode)
            slicesFirst = np.moveaxis(mask, axis, 0)
            counts = slicesFirst.reshape(slicesFirst.shape[0], -1).sum(axis=1)
            memory = _readRunTags(segment, axis, slicesFirst.shape)
            if memory is None:
                slices = [int(s) for s in np.flatnonzero(counts)]
            else:
                previous, hashes = memory
                changed = {k for k in range(len(hashes)) if _sliceHash(slicesFirst[k]) != hashes[k]}
                slices = sorted(set(previous) | changed)
            result.append(
                (
                    LabeledSegment(
                        segmentId=segmentId,
                        name=segment.GetName(),
                        value=self.segmentValue(index),
                        slices=slices,
                        voxelCounts=[int(counts[s]) for s in slices],
                    ),
                    mask,
                )
            )
        return result

    @staticmethod
    def _checkAxis(axis) -> int:
        if isinstance(axis, str):
            if axis.upper() not in AXIS_NAMES:
                raise SGPInputError(f"Slice axis must be one of K, J, I (or 0, 1, 2); got {axis!r}.")
            return AXIS_NAMES.index(axis.upper())
        if int(axis) not in (0, 1, 2):
            raise SGPInputError(f"Slice axis must be 0, 1 or 2 (K, J, I); got {axis!r}.")
        return int(axis)

    # ------------------------------------------------------------------------ prepare (main)

    def prepareRun(
        self,
        volumeNode,
        segmentationNode,
        segmentIds=None,
        *,
        axis=0,
        referenceCases=(),
        supportSlices=None,
        model: str = "tiny",
        weights: str | None = None,
        device: str = "auto",
        imageSize: int = 1024,
        seed: int = 0,
        keepPseudoMasks: bool = False,
        options: SegmentOptions | None = None,
        **optionValues,
    ) -> RunRequest:
        """Check the inputs and turn the nodes into a :class:`RunRequest` (main thread).

        ``segmentIds``: the segments to segment (None = all). ``referenceCases``: iterable of
        ``(volumeNode, segmentationNode)`` pairs already segmented; their segments are matched to
        the selected ones by name. ``optionValues`` are :class:`SegmentOptions` fields.
        Raises :class:`SGPInputError` with a message for the user on bad input.
        """
        self._checkVolume(volumeNode)
        if segmentationNode is None:
            raise SGPInputError("Select a segmentation that holds the labeled slices.")
        axis = self._checkAxis(axis)
        segmentation = segmentationNode.GetSegmentation()
        if segmentIds is None:
            segmentIds = list(segmentation.GetSegmentIDs())
        segmentIds = [str(s) for s in segmentIds]
        if not segmentIds:
            raise SGPInputError(
                f"Segmentation '{segmentationNode.GetName()}' has no segment selected; add a "
                "segment in the Segment Editor, draw it on a few slices, and select it."
            )
        if len(set(segmentIds)) != len(segmentIds):
            raise SGPInputError("A segment is selected twice.")
        for segmentId in segmentIds:
            if segmentation.GetSegment(segmentId) is None:
                raise SGPInputError(
                    f"Segment '{segmentId}' is not in segmentation '{segmentationNode.GetName()}'."
                )
        self._checkSameGrid(volumeNode, segmentationNode, segmentIds)

        volume = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
        if volume.ndim == 4 and volume.shape[-1] == 4:
            volume = volume[..., :3]
        pairs = self._labeledSegments(volumeNode, segmentationNode, segmentIds, axis)
        labeledSegments = [item for item, _ in pairs]
        supportSet = sorted({s for item in labeledSegments for s in item.slices})
        if supportSlices is not None:
            supportSet = sorted({int(s) for s in supportSlices})
        before: dict[int, np.ndarray] = {}
        labels = np.zeros(volume.shape[:3], dtype=np.int16)
        labelsFirst = np.moveaxis(labels, axis, 0)
        for item, mask in pairs:
            before[item.value] = mask
            maskFirst = np.moveaxis(mask, axis, 0)
            for k in supportSet:
                labelsFirst[k][maskFirst[k] & (labelsFirst[k] == 0)] = item.value
        structures = {item.value: item.name for item in labeledSegments}

        supportBank = None
        if referenceCases:
            supportBank = self.supportBankFromScene(
                referenceCases, structures, axis=axis, intensity=optionValues.get("intensity", "auto")
            )

        if not supportSet and not supportBank:
            raise SGPInputError(
                f"No labeled slice: none of the selected segments "
                f"({', '.join(repr(s.name) for s in labeledSegments)}) has any voxel in "
                f"'{segmentationNode.GetName()}'. Draw each structure on at least one slice of "
                f"'{volumeNode.GetName()}' (Segment Editor), or add a reference case."
            )
        for item in labeledSegments:
            if not item.slices and not (supportBank and supportBank.get(item.value)):
                raise SGPInputError(
                    f"Segment '{item.name}' is empty: it has no voxel on any slice and no "
                    "reference case provides it. Draw it on at least one slice where it is "
                    "visible, add a reference case that contains it, or deselect it."
                )

        if options is None:
            options = SegmentOptions(axis=axis, **optionValues)
        else:
            options.axis = axis
        options.keep_pseudo_masks = bool(keepPseudoMasks)

        return RunRequest(
            volumeNodeID=volumeNode.GetID(),
            segmentationNodeID=segmentationNode.GetID(),
            volume=volume,
            labels=labels,
            before=before,
            structures=structures,
            segmentIds={item.value: item.segmentId for item in labeledSegments},
            labeledSegments=labeledSegments,
            geometry=self.volumeGeometry(volumeNode),
            options=options,
            supportSlices=supportSet,
            supportBank=supportBank,
            model=str(model),
            weights=weights,
            device=str(device),
            imageSize=int(imageSize),
            seed=int(seed),
            keepPseudoMasks=bool(keepPseudoMasks),
        )

    def supportBankFromScene(self, referenceCases, structures: dict[int, str], *, axis=0, intensity="auto"):
        """Support items from already-segmented ``(volumeNode, segmentationNode)`` pairs.

        Segments are matched to ``structures`` by name (case-insensitive). Per structure: every
        slice along ``axis`` that contains it plus as many evenly spaced slices without it (they
        teach "absent here"), at most :data:`MAX_REFERENCE_SLICES_PER_STRUCTURE` in all. Each
        volume gets one intensity mapping, as the engine does for the query volume.
        """
        from SlicerSGP.data.preprocess import evenly_spaced, intensity_range, normalize_intensity

        bank: dict[int, list[SupportItem]] = {v: [] for v in structures}
        for pair in referenceCases:
            refVolume, refSegmentation = pair
            self._checkVolume(refVolume)
            if refSegmentation is None:
                raise SGPInputError(f"Reference case '{refVolume.GetName()}' has no segmentation.")
            refSegments = refSegmentation.GetSegmentation()
            byName = {}
            for segmentId in refSegments.GetSegmentIDs():
                byName.setdefault(refSegments.GetSegment(segmentId).GetName().strip().lower(), segmentId)
            matched = {v: byName.get(n.strip().lower()) for v, n in structures.items()}
            if not any(matched.values()):
                raise SGPInputError(
                    f"Reference case '{refSegmentation.GetName()}' has no segment named "
                    f"{' or '.join(repr(n) for n in structures.values())}; rename its segments to "
                    "match, or remove it from the reference cases."
                )
            self._checkSameGrid(refVolume, refSegmentation, [s for s in matched.values() if s])
            image = np.asarray(slicer.util.arrayFromVolume(refVolume))
            if image.ndim == 4 and image.shape[-1] == 4:
                image = image[..., :3]
            lo, hi = intensity_range(image, intensity)
            image01 = np.moveaxis(normalize_intensity(image, lo, hi), axis, 0)
            for value, segmentId in matched.items():
                if not segmentId:
                    continue
                mask = np.moveaxis(self._segmentArray(refSegmentation, segmentId, refVolume), axis, 0)
                perSlice = mask.reshape(mask.shape[0], -1).any(axis=1)
                present = [int(k) for k in np.flatnonzero(perSlice)]
                absent = [int(k) for k in np.flatnonzero(~perSlice)]
                chosen = present + evenly_spaced(absent, len(present))
                chosen = sorted(evenly_spaced(sorted(chosen), MAX_REFERENCE_SLICES_PER_STRUCTURE))
                for k in chosen:
                    bank[value].append(
                        SupportItem(
                            image=np.ascontiguousarray(image01[k]),
                            mask=np.ascontiguousarray(mask[k]),
                            source=f"{refVolume.GetName()} {AXIS_NAMES[axis]}={k}",
                        )
                    )
        return {v: items for v, items in bank.items() if items}

    # --------------------------------------------------------------------- compute (thread)

    def getSegmenter(self, model="tiny", weights=None, device="auto", imageSize=1024, seed=0):
        """The engine's Segmenter, loaded once and kept while the settings stay the same."""
        key = (str(model), None if weights is None else str(weights), str(device), int(imageSize), int(seed))
        with self._segmenterLock:
            if self._segmenter is None or self._segmenterKey != key:
                from SlicerSGP.method.segmenter import Segmenter

                self._segmenter = None
                self._segmenterKey = None
                self._segmenter = Segmenter(
                    model=key[0], weights=key[1], device=key[2], image_size=key[3], seed=key[4]
                )
                self._segmenterKey = key
            return self._segmenter

    def releaseModel(self) -> None:
        """Drop the loaded model (frees GPU memory)."""
        with self._segmenterLock:
            self._segmenter = None
            self._segmenterKey = None
        _emptyCudaCache()

    def compute(self, request: RunRequest, progress=None, cancel=None) -> SegmentationResult:
        """Run the engine on a prepared request. No MRML access: safe in a worker thread.

        Raises :class:`Cancelled` if ``cancel()`` returns True, :class:`SGPDeviceError` with a
        concrete suggestion when the GPU runs out of memory, other :class:`SGPError` as the
        engine raises them.
        """
        progress = progress or (lambda stage, fraction: None)
        cancel = cancel or (lambda: False)
        try:
            if cancel():
                raise Cancelled("Cancelled before the run started; nothing was written.")
            progress("loading model", 0.0)
            segmenter = self.getSegmenter(
                request.model, request.weights, request.device, request.imageSize, request.seed
            )
            progress("loading model", 1.0)
            return segmenter.segment(
                request.volume,
                labels=request.labels,
                structures=dict(request.structures),
                options=request.options,
                support_slices=request.supportSlices,
                support_bank=request.supportBank,
                geometry=request.geometry,
                progress=progress,
                cancel=cancel,
            )
        except BaseException as exc:
            translated = self.translateError(exc, request)
            if translated is exc:
                raise
            raise translated from exc

    @staticmethod
    def translateError(exc: BaseException, request: RunRequest | None = None) -> BaseException:
        """Turn a CUDA out-of-memory error into an :class:`SGPDeviceError` that says what to do."""
        text = str(exc)
        isOOM = type(exc).__name__ == "OutOfMemoryError" or (
            isinstance(exc, RuntimeError) and "out of memory" in text.lower()
        )
        if not isOOM:
            return exc
        _emptyCudaCache()
        size = request.imageSize if request else None
        smaller = [s for s in IMAGE_SIZES if size and s < size]
        hints = []
        if smaller:
            hints.append(f"a smaller input size ({smaller[0]} instead of {size})")
        if request and request.model in MODEL_SIZES and request.model != "tiny":
            hints.append("a smaller model (tiny)")
        # None means the engine's default, which batches 8 slices on CUDA.
        if request and (request.options.encode_batch_size or 8) > 1:
            hints.append("a smaller encoding batch")
        hints.append("the CPU device (slower, but not limited by GPU memory)")
        return SGPDeviceError(
            "The GPU ran out of memory during the run; nothing was written. Try "
            + ", or ".join(hints)
            + ". Closing other programs that use the GPU also helps."
        )

    def startRun(self, request: RunRequest) -> RunJob:
        """Start :meth:`compute` in a worker thread; apply with :meth:`applyResult` when done."""
        return RunJob(self, request).start()

    # -------------------------------------------------------------------------- apply (main)

    def _undoHistory(self, segmentationNode, create: bool = True):
        """Undo states of one segmentation node (a token attribute ties them to that node)."""
        token = segmentationNode.GetAttribute(UNDO_TOKEN_ATTRIBUTE)
        entry = self._histories.get(segmentationNode.GetID())
        if entry is not None and token and entry[0] == token:
            return entry[1]
        if not create:
            return None
        token = uuid.uuid4().hex
        segmentationNode.SetAttribute(UNDO_TOKEN_ATTRIBUTE, token)
        history = slicer.vtkSegmentationHistory()
        history.SetMaximumNumberOfStates(5)
        history.SetSegmentation(segmentationNode.GetSegmentation())
        self._histories[segmentationNode.GetID()] = (token, history)
        return history

    def canUndo(self, segmentationNode) -> bool:
        """True if :meth:`undoLastRun` can restore the state before the last written result."""
        history = self._undoHistory(segmentationNode, create=False) if segmentationNode else None
        return bool(history is not None and history.IsRestorePreviousStateAvailable())

    def undoLastRun(self, segmentationNode) -> bool:
        """Restore the segmentation as it was before the last result was written."""
        if not self.canUndo(segmentationNode):
            return False
        history = self._undoHistory(segmentationNode, create=False)
        ok = bool(history.RestorePreviousState())
        # One level: after undo the state saved for redo is not offered again.
        history.RemoveAllStates()
        return ok

    def applyResult(self, request: RunRequest, result: SegmentationResult, *, writeScores: bool = True) -> WriteReport:
        """Write ``result`` into the request's segmentation (main thread).

        The selected segments get the engine's labels; on every labeled slice each segment is
        exactly what the user drew. The previous state is saved first (:meth:`undoLastRun`).
        """
        start = time.monotonic()
        scene = self._scene()
        volumeNode = scene.GetNodeByID(request.volumeNodeID)
        segmentationNode = scene.GetNodeByID(request.segmentationNodeID)
        if volumeNode is None or segmentationNode is None:
            raise SGPInputError(
                "The volume or segmentation of this run was removed from the scene; nothing was written."
            )
        if tuple(result.labels.shape[:3]) != tuple(request.volume.shape[:3]):
            raise SGPError(
                f"The engine returned labels of shape {result.labels.shape}, expected "
                f"{request.volume.shape[:3]}; nothing was written."
            )
        segmentation = segmentationNode.GetSegmentation()
        for value, segmentId in request.segmentIds.items():
            if segmentation.GetSegment(segmentId) is None:
                raise SGPInputError(
                    f"Segment '{request.structures[value]}' was removed during the run; nothing was written."
                )
            now = self._segmentArray(segmentationNode, segmentId, volumeNode)
            if not np.array_equal(now, request.before[value]):
                raise SGPInputError(
                    f"Segment '{request.structures[value]}' was edited while the run was going on; "
                    "nothing was written. Run again to use the edits."
                )

        axis = request.axis
        labeled = sorted(set(request.supportSlices) | {int(s) for s in result.labeled_slices})
        newMasks: dict[int, np.ndarray] = {}
        for value in request.segmentIds:
            mask = np.asarray(result.labels) == value
            if labeled:
                index = [slice(None)] * 3
                index[axis] = labeled
                mask[tuple(index)] = request.before[value][tuple(index)]
            newMasks[value] = mask.astype(np.uint8)

        history = self._undoHistory(segmentationNode)
        history.SaveState()
        if scene.GetUndoFlag():
            segmentationNode.SetUndoEnabled(True)
            scene.SaveStateForUndo()

        wasModifying = segmentationNode.StartModify()
        try:
            for value, segmentId in request.segmentIds.items():
                self._writeSegmentArray(newMasks[value], segmentationNode, segmentId, volumeNode)
                _writeRunTags(segmentation.GetSegment(segmentId), axis, labeled, newMasks[value])
        except Exception:
            history.RestorePreviousState()
            raise
        finally:
            segmentationNode.EndModify(wasModifying)

        report = WriteReport(
            segmentIds=list(request.segmentIds.values()),
            voxelCounts={request.segmentIds[v]: int(m.sum()) for v, m in newMasks.items()},
            labeledSlices=labeled,
        )
        if request.keepPseudoMasks and result.pseudo_masks:
            report.pseudoMaskNodeID = self.writePseudoMasks(request, result, segmentationNode, volumeNode).GetID()
        if writeScores and result.slice_scores:
            tableNode, chartNode = self.writeSliceScores(request, result, segmentationNode)
            report.tableNodeID = tableNode.GetID()
            report.chartNodeID = chartNode.GetID()
        self.lastRequest, self.lastResult = request, result
        report.timings = dict(result.timings)
        report.timings["write"] = time.monotonic() - start
        return report

    def run(self, volumeNode, segmentationNode, segmentIds=None, *, progress=None, cancel=None, **kwargs):
        """Prepare, compute and apply in the calling thread (console / scripts / tests)."""
        request = self.prepareRun(volumeNode, segmentationNode, segmentIds, **kwargs)
        result = self.compute(request, progress=progress, cancel=cancel)
        return self.applyResult(request, result)

    # ------------------------------------------------------------------ pseudo-masks, scores

    def _outputNode(self, segmentationNode, role: str, className: str, name: str):
        node = segmentationNode.GetNodeReference(role)
        if node is None or not node.IsA(className) or node.GetScene() is None:
            node = self._scene().AddNewNodeByClass(className, name)
            segmentationNode.SetNodeReferenceID(role, node.GetID())
        return node

    def writePseudoMasks(self, request: RunRequest, result: SegmentationResult, segmentationNode, volumeNode):
        """PMG pseudo-masks (threshold 0.5) into a second segmentation, hidden by default."""
        node = self._outputNode(
            segmentationNode,
            PSEUDO_MASKS_REFERENCE_ROLE,
            "vtkMRMLSegmentationNode",
            f"{segmentationNode.GetName()} SGP pseudo-masks",
        )
        created = node.GetDisplayNode() is None
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        if created:
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetVisibility(False)
        source = segmentationNode.GetSegmentation()
        target = node.GetSegmentation()
        for value, name in request.structures.items():
            pseudo = result.pseudo_masks.get(value)
            if pseudo is None or np.asarray(pseudo).size == 0:
                continue
            segmentId = target.GetSegmentIdBySegmentName(name)
            if not segmentId:
                segmentId = target.AddEmptySegment("", name, source.GetSegment(request.segmentIds[value]).GetColor())
            mask = (np.asarray(pseudo) >= request.options.threshold).astype(np.uint8)
            self._writeSegmentArray(mask, node, segmentId, volumeNode)
        return node

    def writeSliceScores(self, request: RunRequest, result: SegmentationResult, segmentationNode):
        """Per-slice scores into a table node and a confidence-per-slice plot chart."""
        scene = self._scene()
        tableNode = self._outputNode(
            segmentationNode,
            SCORES_TABLE_REFERENCE_ROLE,
            "vtkMRMLTableNode",
            f"{segmentationNode.GetName()} SGP slice scores",
        )
        table = vtk.vtkTable()
        nSlices = request.volume.shape[request.axis]
        sliceColumn = vtk.vtkIntArray()
        sliceColumn.SetName("slice")
        for s in range(nSlices):
            sliceColumn.InsertNextValue(s)
        table.AddColumn(sliceColumn)
        confidenceColumns = {}
        for value, name in request.structures.items():
            scores = result.slice_scores.get(value)
            if scores is None:
                continue
            scores = np.asarray(scores)
            rows = {int(r["slice"]): r for r in scores}
            for fieldName in scores.dtype.names:
                if fieldName == "slice":
                    continue
                isText = scores.dtype[fieldName].kind in "USO"
                column = vtk.vtkStringArray() if isText else vtk.vtkDoubleArray()
                column.SetName(f"{name} {fieldName}")
                for s in range(nSlices):
                    row = rows.get(s)
                    if isText:
                        column.InsertNextValue("" if row is None else str(row[fieldName]))
                    else:
                        column.InsertNextValue(math.nan if row is None else float(row[fieldName]))
                table.AddColumn(column)
                if fieldName == "confidence":
                    confidenceColumns[value] = column.GetName()
        tableNode.SetAndObserveTable(table)
        tableNode.SetLocked(True)

        chartNode = self._outputNode(
            segmentationNode,
            SCORES_CHART_REFERENCE_ROLE,
            "vtkMRMLPlotChartNode",
            f"{segmentationNode.GetName()} SGP confidence",
        )
        chartNode.RemoveAllPlotSeriesNodeIDs()
        chartNode.SetTitle("SGP confidence per slice")
        chartNode.SetXAxisTitle(f"slice ({AXIS_NAMES[request.axis]})")
        chartNode.SetYAxisTitle("confidence")
        segmentation = segmentationNode.GetSegmentation()
        for value, columnName in confidenceColumns.items():
            seriesName = f"{segmentationNode.GetName()} {request.structures[value]} confidence"
            series = None
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode")):
                candidate = scene.GetNthNodeByClass(i, "vtkMRMLPlotSeriesNode")
                if candidate.GetName() == seriesName:
                    series = candidate
                    break
            if series is None:
                series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", seriesName)
            series.SetAndObserveTableNodeID(tableNode.GetID())
            series.SetXColumnName("slice")
            series.SetYColumnName(columnName)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            segment = segmentation.GetSegment(request.segmentIds[value])
            if segment is not None:
                series.SetColor(*segment.GetColor())
            chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
        return tableNode, chartNode

    # ----------------------------------------------------------------- least confident slices

    def leastConfidentSlices(self, result: SegmentationResult | None = None, count: int = 5):
        """``[(value, name, slice, confidence), ...]`` of predicted (not labeled) slices where a
        structure was found or expected, least confident first."""
        result = result or self.lastResult
        if result is None:
            return []
        labeled = set(int(s) for s in result.labeled_slices)
        rows = []
        for value, scores in result.slice_scores.items():
            scores = np.asarray(scores)
            for row in scores:
                s = int(row["slice"])
                if s in labeled:
                    continue
                confidence = float(row["confidence"])
                if math.isnan(confidence):
                    continue
                rows.append((value, result.structures.get(value, str(value)), s, confidence))
        rows.sort(key=lambda r: (r[3], r[2], r[0]))
        return rows[: max(0, int(count))]

    def sliceCenterRAS(self, volumeNode, axis: int, sliceIndex: int) -> tuple[float, float, float]:
        """World (RAS) position of the centre of slice ``sliceIndex`` along array ``axis``."""
        axis = self._checkAxis(axis)
        dims = volumeNode.GetImageData().GetDimensions()  # (I, J, K)
        ijk = [(d - 1) / 2.0 for d in dims]
        ijk[{0: 2, 1: 1, 2: 0}[axis]] = float(sliceIndex)
        ras = self._ijkToRAS(volumeNode) @ np.array([*ijk, 1.0])
        point = [float(v) for v in ras[:3]]
        transformNode = volumeNode.GetParentTransformNode()
        if transformNode is not None:
            toWorld = vtk.vtkGeneralTransform()
            transformNode.GetTransformToWorld(toWorld)
            point = list(toWorld.TransformPoint(point))
        return tuple(point)

    def jumpToSlice(self, volumeNode, axis: int, sliceIndex: int) -> tuple[float, float, float]:
        """Centre all slice views on slice ``sliceIndex`` of ``volumeNode``."""
        ras = self.sliceCenterRAS(volumeNode, axis, sliceIndex)
        slicer.vtkMRMLSliceNode.JumpAllSlices(
            self._scene(), *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice
        )
        return ras

    # ------------------------------------------------------------------ devices, dependencies

    @staticmethod
    def availableDevices() -> list[tuple[str, str]]:
        """``[(device, label), ...]``: auto, each CUDA GPU, CPU. Needs torch only if installed."""
        devices = [("auto", "auto (first CUDA GPU, else CPU)")]
        if importlib.util.find_spec("torch") is not None:
            import torch

            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    props = torch.cuda.get_device_properties(i)
                    memory = props.total_memory / 2**30
                    devices.append((f"cuda:{i}", f"cuda:{i} - {props.name} ({memory:.0f} GB)"))
        devices.append(("cpu", "CPU"))
        return devices

    @staticmethod
    def resolvedDevice(device: str) -> str:
        if device != "auto":
            return device
        if importlib.util.find_spec("torch") is not None:
            import torch

            if torch.cuda.is_available():
                return "cuda:0"
        return "cpu"

    def deviceWarning(self, device: str) -> str:
        """A warning to show for the chosen device, or '' if none."""
        if self.resolvedDevice(device) == "cpu":
            return (
                "Running on the CPU: a volume takes minutes instead of seconds. A CUDA GPU "
                "with a CUDA build of PyTorch is strongly recommended."
            )
        return ""

    @staticmethod
    def missingDependencies() -> list[str]:
        """pip requirements whose Python module cannot be imported here."""
        return [req for module, req in DEPENDENCIES if importlib.util.find_spec(module) is None]

    def ensureDependencies(self, confirm=None) -> bool:
        """Make sure the engine's Python packages are installed.

        Nothing is installed without ``confirm(message) -> bool`` returning True. Inside Slicer,
        torch comes from the PyTorch extension (``PyTorchUtils``, CUDA-matched), the rest from
        ``slicer.pydeps``/``slicer.packaging`` or ``slicer.util.pip_install``. Returns True when
        everything is importable.
        """
        missing = self.missingDependencies()
        if not missing:
            return True
        if confirm is None or not confirm(
            "SGPSegment needs these Python packages, which are not installed yet:\n\n  "
            + "\n  ".join(missing)
            + "\n\nDownload and install them now? This can take several minutes "
            "(PyTorch alone is over 1 GB with CUDA)."
        ):
            return False
        if any(req.startswith("torch") for req in missing):
            self._installTorch()
        others = [r for r in missing if not r.startswith(("torch", "sam2"))]
        if others:
            _pipInstall(others)
        if any(req.startswith("sam2") for req in missing):
            # The sdist builds an optional CUDA extension and pins torchvision; neither is needed.
            os.environ["SAM2_BUILD_CUDA"] = "0"
            slicer.util.pip_install("--no-build-isolation --no-deps sam2==1.1.0")
        importlib.invalidate_caches()
        still = self.missingDependencies()
        if still:
            raise SGPError(
                "Some packages could not be installed: " + ", ".join(still)
                + ". See the Python console for pip's output."
            )
        return True

    @staticmethod
    def _installTorch() -> None:
        try:
            import PyTorchUtils
        except ImportError as exc:
            raise SGPError(
                "PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager, "
                "restart Slicer, and run again."
            ) from exc
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=">=2.3")
            if torch is None:
                raise SGPError("PyTorch was not installed; see the Python console for details.")

    # ------------------------------------------------------------------------------ weights

    @staticmethod
    def weightsStatus(model: str) -> str:
        """'random', 'cached', 'missing' or 'checkpoint' (a trained SGP file)."""
        if model not in MODEL_SIZES:
            return "checkpoint"
        from SlicerSGP import weights

        path = weights.cached_checkpoint_path(model)
        return "cached" if path.is_file() else "missing"

    @staticmethod
    def downloadWeights(model: str, progress=None):
        """Fetch the official SAM2.1 checkpoint into the cache (checksum verified)."""
        from SlicerSGP import weights

        info = weights.resolve_model_name(model)
        callback = None
        if progress is not None:

            def callback(done, total):
                progress("downloading weights", done / total if total else 0.0)

        return weights.download_checkpoint(info, progress=False, progress_callback=callback)

    @staticmethod
    def importWeights(model: str, path, progress=None):
        """Copy a local copy of the official checkpoint (offline machines) into the cache."""
        from SlicerSGP import weights

        info = weights.resolve_model_name(model)
        callback = None
        if progress is not None:

            def callback(done, total):
                progress("checking weights", done / total if total else 0.0)

        return weights.import_checkpoint(path, info, progress=False, progress_callback=callback)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


RUN_TAG = "SGPSegment.run"
"""Segment tag remembering the last written result: axis, shape, labeled slices, slice hashes."""


def _sliceHash(mask2d: np.ndarray) -> int:
    return zlib.crc32(np.packbits(np.ascontiguousarray(mask2d, dtype=bool)).tobytes())


def _writeRunTags(segment, axis: int, labeled: list[int], mask: np.ndarray) -> None:
    slicesFirst = np.moveaxis(mask > 0, axis, 0)
    record = {
        "axis": int(axis),
        "shape": [int(n) for n in slicesFirst.shape],
        "labeled": [int(s) for s in labeled],
        "hashes": [_sliceHash(m) for m in slicesFirst],
    }
    segment.SetTag(RUN_TAG, json.dumps(record, separators=(",", ":")))


def _readRunTags(segment, axis: int, shape) -> tuple[list[int], list[int]] | None:
    """(labeled slices, per-slice hashes of what was written) if the tag matches this grid."""
    holder = vtk.reference("")
    value = str(holder) if segment.HasTag(RUN_TAG) and segment.GetTag(RUN_TAG, holder) else ""
    if not value:
        return None
    try:
        record = json.loads(value)
        if record["axis"] != int(axis) or tuple(record["shape"]) != tuple(shape):
            return None
        return [int(s) for s in record["labeled"]], [int(h) for h in record["hashes"]]
    except (ValueError, KeyError, TypeError):
        return None


def _emptyCudaCache() -> None:
    if importlib.util.find_spec("torch") is None:
        return
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _pipInstall(requirements: list[str]) -> None:
    packaging = None
    for name in ("packaging", "pydeps"):  # Slicer's helpers (newer versions), else pip_install
        try:
            packaging = importlib.import_module(f"slicer.{name}")
            break
        except ImportError:
            continue
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        from packaging.requirements import Requirement

        packaging.pip_ensure([Requirement(r) for r in requirements], requester="SGPSegment")
        return
    slicer.util.pip_install(requirements)

