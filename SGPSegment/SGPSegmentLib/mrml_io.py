"""MRML <-> numpy: volumes, segments and geometry on the volume's voxel grid.

Arrays are ``(K, J, I)`` as ``slicer.util.arrayFromVolume`` gives them. Geometry goes to the
engine in ITK terms (LPS). Segments are read and written with the segmentation logic's own
functions on the volume's grid, so a segment that reaches outside the volume is cropped to it
(:func:`voxelsOutsideVolume` says how much was cut, for a note to the user).
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from slicer.i18n import tr as _
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

from SGPSegmentLib.constants import AXIS_NAMES
from SlicerSGP.errors import SGPError, SGPInputError
from SlicerSGP.types import Geometry

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_IJK_COLUMN = {0: 2, 1: 1, 2: 0}
"""Array axis (K, J, I) -> column of the IJK-to-RAS matrix (I, J, K)."""


def matrixToNumpy(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijkToRAS(volumeNode) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return matrixToNumpy(m)


def checkAxis(axis) -> int:
    """0, 1, 2 or 'K', 'J', 'I' -> 0, 1, 2."""
    if isinstance(axis, str):
        if axis.upper() not in AXIS_NAMES:
            raise SGPInputError(_(
                "Slice axis must be one of K, J, I (or 0, 1, 2); got {axis!r}."
            ).format(axis=axis))
        return AXIS_NAMES.index(axis.upper())
    if int(axis) not in (0, 1, 2):
        raise SGPInputError(_(
            "Slice axis must be 0, 1 or 2 (K, J, I); got {axis!r}."
        ).format(axis=axis))
    return int(axis)


def volumeGeometry(volumeNode) -> Geometry:
    """The volume's voxel grid in ITK (LPS) terms, for the ``(K, J, I)`` array."""
    matrix = ijkToRAS(volumeNode)
    columns = matrix[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    directionLPS = _LPS_FROM_RAS @ (columns / spacing)
    originLPS = _LPS_FROM_RAS @ matrix[:3, 3]
    return Geometry(
        origin=tuple(float(v) for v in originLPS),
        spacing=tuple(float(v) for v in spacing),
        direction=tuple(float(v) for v in directionLPS.reshape(-1)),
    )


def checkVolume(volumeNode) -> None:
    if volumeNode is None:
        raise SGPInputError(_("Select an input volume."))
    if volumeNode.GetImageData() is None:
        raise SGPInputError(_(
            "Volume '{volumeName}' has no image data; load it first."
        ).format(volumeName=volumeNode.GetName()))
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise SGPInputError(
            _(
                "'{volumeName}' is a label map; select the image volume to segment."
            ).format(volumeName=volumeNode.GetName())
        )


def volumeArray(volumeNode) -> np.ndarray:
    """A copy of the voxels, ``(K, J, I)`` or ``(K, J, I, 3)`` (alpha dropped)."""
    volume = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    if volume.ndim == 4 and volume.shape[-1] == 4:
        volume = volume[..., :3]
    return volume


def volumeShape(volumeNode) -> tuple[int, int, int]:
    return tuple(reversed(volumeNode.GetImageData().GetDimensions()))


def _labelmapOffset(volumeNode, labelmap) -> np.ndarray | None:
    """Integer IJK offset of a labelmap's grid in the volume's grid, or None if the grids differ."""
    relation = np.linalg.inv(ijkToRAS(volumeNode)) @ _imageToWorld(labelmap)
    rotationScale, offset = relation[:3, :3], relation[:3, 3]
    if np.allclose(rotationScale, np.eye(3), atol=1e-3) and np.allclose(
        offset, np.round(offset), atol=1e-3
    ):
        return np.round(offset).astype(int)
    return None


def _imageToWorld(labelmap) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    return matrixToNumpy(m)


def _isEmptyExtent(extent) -> bool:
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def checkSameGrid(volumeNode, segmentationNode, segmentIds) -> None:
    """The segments must be drawn on the volume's voxel lattice (possibly a sub-extent)."""
    if volumeNode.GetParentTransformNode() is not segmentationNode.GetParentTransformNode():
        raise SGPInputError(
            _(
                "Volume '{volumeName}' and segmentation '{segmentationName}' are under "
                "different transforms; harden the transforms (Data module) or move both "
                "under the same one."
            ).format(volumeName=volumeNode.GetName(), segmentationName=segmentationNode.GetName())
        )
    for segmentId in segmentIds:
        labelmap = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
        if labelmap is None or _isEmptyExtent(labelmap.GetExtent()):
            continue
        if _labelmapOffset(volumeNode, labelmap) is None:
            name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
            raise SGPInputError(
                _(
                    "Segment '{name}' of '{segmentationName}' was drawn on a different voxel "
                    "grid than volume '{volumeName}' (spacing, orientation or origin "
                    "differ), so its slices do not line up with the volume's. Select the "
                    "volume the segmentation was drawn on, or set the segmentation's "
                    "geometry to this volume (Segment Editor > Specify geometry) and redraw "
                    "the labeled slices."
                ).format(
                    name=name,
                    segmentationName=segmentationNode.GetName(),
                    volumeName=volumeNode.GetName(),
                )
            )


def _segmentLayerMask(segmentationNode, segmentId):
    """(layer, bool array of this segment's voxels in the layer's own extent) or (None, None)."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    layer = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
    if segment is None or layer is None or layer.GetPointData().GetScalars() is None:
        return None, None
    if _isEmptyExtent(layer.GetExtent()):
        return None, None
    # Segments may share one labelmap layer, each with its own label value.
    values = vtk_to_numpy(layer.GetPointData().GetScalars())
    dims = layer.GetDimensions()
    mask = (values == segment.GetLabelValue()).reshape(dims[2], dims[1], dims[0])
    return layer, mask


def voxelsOutsideVolume(segmentationNode, segmentId, volumeNode) -> int:
    """How many voxels of the segment lie outside the volume's extent (same grid assumed)."""
    layer, mask = _segmentLayerMask(segmentationNode, segmentId)
    if layer is None or not mask.any():
        return 0
    offset = _labelmapOffset(volumeNode, layer)
    if offset is None:
        return 0
    extent = layer.GetExtent()
    volumeExtent = volumeNode.GetImageData().GetExtent()
    inside = mask.copy()
    # Along each array axis, drop the layer indices that fall outside the volume.
    for arrayAxis, ijk in ((0, 2), (1, 1), (2, 0)):
        first = extent[2 * ijk] + offset[ijk]
        index = np.arange(mask.shape[arrayAxis]) + first
        keep = (index >= volumeExtent[2 * ijk]) & (index <= volumeExtent[2 * ijk + 1])
        shape = [1, 1, 1]
        shape[arrayAxis] = -1
        inside &= keep.reshape(shape)
    return int(mask.sum() - inside.sum())


def referenceImage(volumeNode):
    """An empty oriented image with the volume's voxel grid (extent and IJK-to-RAS)."""
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(volumeNode.GetImageData().GetExtent())
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    reference.SetImageToWorldMatrix(m)
    return reference


def segmentArray(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """A segment as a bool ``(K, J, I)`` array on the volume's grid (cropped to the volume).

    Done with the segmentation logic's functions instead of
    ``slicer.util.arrayFromSegmentBinaryLabelmap``, which goes through a temporary labelmap
    node and leaves a display node behind in the scene on every call.
    """
    shape = volumeShape(volumeNode)
    layer, mask = _segmentLayerMask(segmentationNode, segmentId)
    if layer is None:
        return np.zeros(shape, dtype=bool)
    labelmap = slicer.vtkOrientedImageData()
    labelmap.ShallowCopy(layer)
    labelmap.CopyDirections(layer)
    labelmap.GetPointData().SetScalars(numpy_to_vtk(mask.reshape(-1).astype(np.uint8), deep=True))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, referenceImage(volumeNode), resampled, False, False
    ):
        raise SGPError(_(
            "Could not resample segment '{segmentId}' onto '{volumeName}'."
        ).format(segmentId=segmentId, volumeName=volumeNode.GetName()))
    # Not padded: the output has the volume's extent, so voxels outside the volume are cut.
    if tuple(resampled.GetExtent()) != tuple(volumeNode.GetImageData().GetExtent()):
        raise SGPError(
            _(
                "Segment '{segmentId}' could not be put on the grid of '{volumeName}'."
            ).format(segmentId=segmentId, volumeName=volumeNode.GetName())
        )
    return vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(shape) > 0


def writeSegmentArray(mask: np.ndarray, segmentationNode, segmentId: str, volumeNode) -> None:
    """Replace a segment's content with ``mask`` (``(K, J, I)`` on the volume's grid)."""
    labelmap = referenceImage(volumeNode)
    scalars = numpy_to_vtk(np.ascontiguousarray(mask, dtype=np.uint8).reshape(-1), deep=True)
    labelmap.GetPointData().SetScalars(scalars)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(
        labelmap, segmentationNode, segmentId, logic.MODE_REPLACE
    ):
        raise SGPError(_(
            "Could not write segment '{segmentId}' of '{segmentationName}'."
        ).format(segmentId=segmentId, segmentationName=segmentationNode.GetName()))


def referenceVolumeForSegmentation(segmentationNode):
    """The volume a segmentation was made on (its reference geometry volume), if known."""
    if segmentationNode is None:
        return None
    return segmentationNode.GetNodeReference(
        slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    )


def axisDescription(volumeNode, axis: int) -> str:
    """'Axial (K)'-style label of an array axis, from the volume's actual orientation."""
    direction = ijkToRAS(volumeNode)[:3, _IJK_COLUMN[checkAxis(axis)]]
    plane = ("Sagittal", "Coronal", "Axial")[int(np.argmax(np.abs(direction)))]
    return f"{plane} ({AXIS_NAMES[checkAxis(axis)]})"


def sliceCenterRAS(volumeNode, axis: int, sliceIndex: int) -> tuple[float, float, float]:
    """World (RAS) position of the centre of slice ``sliceIndex`` along array ``axis``."""
    dims = volumeNode.GetImageData().GetDimensions()  # (I, J, K)
    ijk = [(d - 1) / 2.0 for d in dims]
    ijk[_IJK_COLUMN[checkAxis(axis)]] = float(sliceIndex)
    ras = ijkToRAS(volumeNode) @ np.array([*ijk, 1.0])
    point = [float(v) for v in ras[:3]]
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None:
        toWorld = vtk.vtkGeneralTransform()
        transformNode.GetTransformToWorld(toWorld)
        point = list(toWorld.TransformPoint(point))
    return tuple(point)


def rasToArrayIndex(volumeNode, ras) -> np.ndarray:
    """Continuous ``(k, j, i)`` array index of a world (RAS) point, through the volume's
    parent transform (the inverse of :func:`sliceCenterRAS`'s mapping)."""
    point = [float(v) for v in ras[:3]]
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None:
        fromWorld = vtk.vtkGeneralTransform()
        transformNode.GetTransformFromWorld(fromWorld)
        point = list(fromWorld.TransformPoint(point))
    ijk = np.linalg.inv(ijkToRAS(volumeNode)) @ np.array([*point, 1.0])
    return ijk[2::-1].copy()  # (i, j, k) -> (k, j, i)


def directionInArrayAxes(volumeNode, ras, directionRAS) -> np.ndarray:
    """A world direction at world point ``ras`` in ``(k, j, i)`` index units."""
    start = rasToArrayIndex(volumeNode, ras)
    end = rasToArrayIndex(
        volumeNode, [a + b for a, b in zip(ras[:3], directionRAS[:3], strict=True)]
    )
    return end - start
