"""What a run leaves besides the segments: pseudo-masks, per-slice scores, least confident slices.

Each output node is found again through a node reference on the user's segmentation, so a
re-run updates the same nodes instead of adding new ones.
"""

from __future__ import annotations

import math

import numpy as np
import slicer
import vtk

from SGPSegmentLib.constants import AXIS_NAMES
from SGPSegmentLib.mrml_io import writeSegmentArray
from SlicerSGP.types import SegmentationResult

PSEUDO_MASKS_REFERENCE_ROLE = "SGPPseudoMasks"
SCORES_TABLE_REFERENCE_ROLE = "SGPSliceScores"
SCORES_CHART_REFERENCE_ROLE = "SGPSliceScoresChart"


def outputNode(segmentationNode, role: str, className: str, name: str):
    node = segmentationNode.GetNodeReference(role)
    if node is None or not node.IsA(className) or node.GetScene() is None:
        node = slicer.mrmlScene.AddNewNodeByClass(className, name)
        segmentationNode.SetNodeReferenceID(role, node.GetID())
    return node


def writePseudoMasks(run, result: SegmentationResult, segmentationNode, volumeNode):
    """PMG pseudo-masks (at the run's threshold) into a second segmentation, hidden."""
    node = outputNode(
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
    for value, name in run.structures.items():
        pseudo = result.pseudo_masks.get(value)
        if pseudo is None or np.asarray(pseudo).size == 0:
            continue
        segmentId = target.GetSegmentIdBySegmentName(name)
        if not segmentId:
            color = source.GetSegment(run.segmentIds[value]).GetColor()
            segmentId = target.AddEmptySegment("", name, color)
        mask = np.asarray(pseudo) >= run.options.threshold
        writeSegmentArray(mask, node, segmentId, volumeNode)
    return node


def _scoresTable(run, result: SegmentationResult, nSlices: int):
    table = vtk.vtkTable()
    sliceColumn = vtk.vtkIntArray()
    sliceColumn.SetName("slice")
    for s in range(nSlices):
        sliceColumn.InsertNextValue(s)
    table.AddColumn(sliceColumn)
    confidenceColumns = {}
    for value, name in run.structures.items():
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
    return table, confidenceColumns


def writeSliceScores(run, result: SegmentationResult, segmentationNode):
    """Per-slice scores into a table node and a confidence-per-slice plot chart."""
    scene = slicer.mrmlScene
    tableNode = outputNode(
        segmentationNode,
        SCORES_TABLE_REFERENCE_ROLE,
        "vtkMRMLTableNode",
        f"{segmentationNode.GetName()} SGP slice scores",
    )
    table, confidenceColumns = _scoresTable(run, result, run.shape[run.axis])
    tableNode.SetAndObserveTable(table)
    tableNode.SetLocked(True)

    chartNode = outputNode(
        segmentationNode,
        SCORES_CHART_REFERENCE_ROLE,
        "vtkMRMLPlotChartNode",
        f"{segmentationNode.GetName()} SGP confidence",
    )
    chartNode.RemoveAllPlotSeriesNodeIDs()
    chartNode.SetTitle("SGP confidence per slice")
    chartNode.SetXAxisTitle(f"slice ({AXIS_NAMES[run.axis]})")
    chartNode.SetYAxisTitle("confidence")
    segmentation = segmentationNode.GetSegmentation()
    for value, columnName in confidenceColumns.items():
        seriesName = f"{segmentationNode.GetName()} {run.structures[value]} confidence"
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
        segment = segmentation.GetSegment(run.segmentIds[value])
        if segment is not None:
            series.SetColor(*segment.GetColor())
        chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
    return tableNode, chartNode


def leastConfidentSlices(result: SegmentationResult | None, count: int = 5):
    """``[(value, name, slice, confidence), ...]`` of predicted slices, least confident first;
    a structure's own labeled slices are left out (a slice drawn for another structure is
    predicted for this one)."""
    if result is None:
        return []
    union = {int(s) for s in result.labeled_slices}
    byStructure = getattr(result, "labeled_by_structure", None) or {}
    rows = []
    for value, scores in result.slice_scores.items():
        labeled = {int(s) for s in byStructure[value]} if value in byStructure else union
        for row in np.asarray(scores):
            s = int(row["slice"])
            confidence = float(row["confidence"])
            if s in labeled or math.isnan(confidence):
                continue
            rows.append((value, result.structures.get(value, str(value)), s, confidence))
    rows.sort(key=lambda r: (r[3], r[2], r[0]))
    return rows[: max(0, int(count))]
