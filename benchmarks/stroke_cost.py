"""GUI-thread cost of one Segment Editor stroke while the SGP Segment module watches edits.

A real MRML scene (the ``slicer-core`` wheel, set up as Testing/module_fixtures.py does) with a
512 x 512 x 300 volume and a segmentation on its grid: segment "liver" drawn on three axial
slices (its labelmap spans the whole volume) and "spleen" in the same shared layer. The Logic
watches it (``watchEdits``); each stroke is what the Paint effect does: a disk on one axial
slice merged into the segment with ``SetBinaryLabelmapToSegment(..., MODE_MERGE_MASK, extent)``
(as ``qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap`` does for "Add"), which
changes the shared labelmap in place and fires SourceRepresentationModified, and so the Logic's
observer. The figure is the time spent in that
observer (the module's share of the stroke; Slicer's own merge is printed apart).

* new: the observer now (``edit_watch``: layer copy compared as 64-bit words, nothing written);
* old: the observer before (resample the segment onto the volume, one CRC32 per slice along the
  three axes, compare, write the tag), rebuilt here from that code for the comparison. It
  observed SegmentModified only, which an in-place stroke does not fire (so it saw Paint strokes
  only when the record was next read); here it is run on the event the new observer uses, for
  the stroked segment only (it looked at every segment when the event named none).

Target: new < 30 ms per stroke (median and max) on 512 x 512 x 300.

    python benchmarks/stroke_cost.py
    python benchmarks/stroke_cost.py --strokes 30 --old-strokes 5 --shape 300 512 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "Testing"), str(ROOT / "SGPSegment"), str(ROOT)]

from SlicerSGP.host import processor_name  # noqa: E402 (after the path above)


def oldSliceHashes(mask, axis):
    """labeled_slices.sliceHashes as it was (one packbits per slice)."""
    slicesFirst = np.moveaxis(np.asarray(mask, dtype=bool), axis, 0)
    return [zlib.crc32(np.packbits(np.ascontiguousarray(s)).tobytes()) for s in slicesFirst]


def oldObserver(segmentationNode, volumeNode, segmentId, preferredAxis=0):
    """The observer before: resample, hash every slice along each axis, compare, write."""
    from SGPSegmentLib import labeled_slices, mrml_io
    from SGPSegmentLib.labeled_slices import LabeledSliceRecord, classifyEdit

    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    mask = mrml_io.segmentArray(segmentationNode, segmentId, volumeNode)
    record = LabeledSliceRecord.read(segment, mask.shape)
    if record is None:
        record = labeled_slices.seedRecord(mask, baseline=False)
        record.hashes = [oldSliceHashes(mask, a) for a in range(3)]
        record.write(segment)
        return
    now = [oldSliceHashes(mask, a) for a in range(3)]
    changed = [
        {i for i, (h, n) in enumerate(zip(o, w, strict=True)) if h != n}
        for o, w in zip(record.hashes, now, strict=True)
    ]
    if any(changed):
        drawn = classifyEdit(changed, preferredAxis)
        if drawn is not None:
            record.slices[drawn[0]] |= drawn[1]
        record.hashes = [oldSliceHashes(mask, a) for a in range(3)]  # setBaseline hashed again
        record.write(segment)


def makeScene(env, shape):
    import slicer

    volume = slicer.util.addVolumeFromArray(np.zeros(shape, np.int16), name="ct")
    segmentation = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    seg = segmentation.GetSegmentation()
    liver = seg.AddEmptySegment("", "liver")
    spleen = seg.AddEmptySegment("", "spleen")
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    drawn = np.zeros(shape, np.uint8)
    for s in (shape[0] // 4, shape[0] // 2, 3 * shape[0] // 4):
        drawn[s] = ((j - shape[1] // 2) ** 2 + (i - shape[2] // 3) ** 2 < 60**2)[0]
    drawn[0, 0, 0] = drawn[-1, -1, -1] = 1  # the layer spans the whole volume
    slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, liver, volume)
    other = np.zeros(shape, np.uint8)
    other[shape[0] // 2, 40:80, 300:360] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(other, segmentation, spleen, volume)
    seg.CollapseBinaryLabelmaps(False)  # shared layer where segments do not overlap
    return volume, segmentation, liver


def stroke(segmentationNode, volumeNode, segmentId, k, center, radius=10):
    """What the Paint effect does with one dab: a disk on axial slice ``k``, merged (Add)."""
    import slicer
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    cj, ci = center
    size = 2 * radius + 1
    jj, ii = np.ogrid[:size, :size]
    disk = ((jj - radius) ** 2 + (ii - radius) ** 2 <= radius**2).astype(np.uint8)
    modifier = slicer.vtkOrientedImageData()
    modifier.SetExtent(ci - radius, ci + radius, cj - radius, cj + radius, k, k)
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    modifier.SetImageToWorldMatrix(m)
    modifier.GetPointData().SetScalars(numpy_to_vtk(disk.reshape(-1), deep=True))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    ok = logic.SetBinaryLabelmapToSegment(
        modifier, segmentationNode, segmentId, logic.MODE_MERGE_MASK, modifier.GetExtent()
    )
    assert ok


def strokes(count, shape, seed):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        k = int(rng.integers(10, shape[0] - 10))
        yield k, (int(rng.integers(40, shape[1] - 40)), int(rng.integers(40, shape[2] - 40)))


def summary(name, times):
    ms = [t * 1000 for t in times]
    return (
        f"{name:<5} {len(ms):>3} strokes: median {statistics.median(ms):8.1f} ms, "
        f"max {max(ms):8.1f} ms, min {min(ms):8.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], help="K J I")
    parser.add_argument("--strokes", type=int, default=30)
    parser.add_argument("--old-strokes", type=int, default=5, help="0: skip the old path")
    parser.add_argument(
        "--growth-strokes", type=int, default=10,
        help="strokes on a new segment, each outside the layer's extent so far (0: skip)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = tuple(args.shape)

    from module_fixtures import MRMLEnvironment
    from SGPSegmentLib import SGPSegmentCoreLogic
    from SGPSegmentLib.edit_watch import RecordStore

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU: {processor_name()} ({os.cpu_count()} logical cores, load average {load:.1f})")
    print(f"volume and segmentation {shape[2]} x {shape[1]} x {shape[0]} (I x J x K), uint8 layer")
    env = MRMLEnvironment()
    try:
        volume, segmentation, liver = makeScene(env, shape)
        layer = segmentation.GetBinaryLabelmapInternalRepresentation(liver)
        print(f"liver's layer extent {layer.GetExtent()}, shared by "
              f"{segmentation.GetSegmentation().GetNumberOfSegments()} segments")

        logic = SGPSegmentCoreLogic()
        start = time.perf_counter()
        mtime = segmentation.GetMTime()
        logic.watchEdits(segmentation, volume)
        opened = time.perf_counter() - start
        unchanged = segmentation.GetMTime() == mtime
        print(f"module open (watchEdits): {opened * 1000:.0f} ms, segmentation unchanged: "
              f"{unchanged}")

        observed = []
        original = logic._onSegmentModified

        def timed(*a):
            t = time.perf_counter()
            original(*a)
            observed.append(time.perf_counter() - t)

        logic._onSegmentModified = timed
        merge, newTimes, calls = [], [], 0
        for k, center in strokes(args.strokes, shape, args.seed):
            observed.clear()
            t = time.perf_counter()
            stroke(segmentation, volume, liver, k, center)
            merge.append(time.perf_counter() - t - sum(observed))
            newTimes.append(sum(observed))  # every observer call of this stroke
            calls += len(observed)
        if not calls:
            raise SystemExit("the observer never ran: the strokes were not seen")
        recorded = set(logic.records.recordedSlices(segmentation, volume, liver)[0])
        stroked = {k for k, _ in strokes(args.strokes, shape, args.seed)}
        print(f"every stroked axial slice recorded as drawn: {stroked <= recorded}; "
              f"segmentation unchanged: {segmentation.GetMTime() == mtime}")
        logic.stopWatching()
        print(summary("new", newTimes) + f" ({calls} observer calls)")
        print(f"      Slicer's own merge per stroke: median {statistics.median(merge) * 1000:.1f} ms")
        copyMiB = layer.GetPointData().GetScalars().GetDataSize() / 2**20
        print(f"      memory: one copy of the layer, {copyMiB:.0f} MiB, shared by its segments")
        # The stroke's cost is bound by memory bandwidth (both copies are read once): for
        # scale, one plain copy of the layer on this machine now.
        from vtk.util.numpy_support import vtk_to_numpy

        values = vtk_to_numpy(layer.GetPointData().GetScalars())
        target = np.empty_like(values)
        copies = []
        for _ in range(5):
            t = time.perf_counter()
            np.copyto(target, values)
            copies.append(time.perf_counter() - t)
        print(f"      for scale: one copy of the layer (np.copyto) takes "
              f"{statistics.median(copies) * 1000:.1f} ms here now")

        if args.growth_strokes:
            # A new segmentation: its layer starts empty and grows with each stroke.
            import slicer

            grown = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "new segmentation")
            grown.CreateDefaultDisplayNodes()
            grown.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            kidney = grown.GetSegmentation().AddEmptySegment("", "kidney")
            logic.watchEdits(grown, volume)
            logic._onSegmentModified = timed
            growTimes = []
            count = args.growth_strokes
            for n in range(count):
                observed.clear()
                k = int(10 + n * (shape[0] - 20) / max(count - 1, 1))
                center = (int(40 + n * (shape[1] - 80) / max(count - 1, 1)),
                          int(40 + n * (shape[2] - 80) / max(count - 1, 1)))  # fmt: skip
                stroke(grown, volume, kidney, k, center)
                growTimes.append(sum(observed))
            extent = grown.GetBinaryLabelmapInternalRepresentation(kidney).GetExtent()
            logic.stopWatching()
            print(summary("grow", growTimes) + f" (layer extent at the end {extent})")

        if args.old_strokes:
            logic.records = RecordStore()
            oldTimes = []

            def onModified(caller, event, callData=None):
                t = time.perf_counter()
                oldObserver(segmentation, volume, liver)
                oldTimes.append(time.perf_counter() - t)

            import slicer

            oldObserver(segmentation, volume, liver)  # the old first sight (writes the tag)
            tag = segmentation.AddObserver(
                slicer.vtkSegmentation.SourceRepresentationModified, onModified
            )
            try:
                for k, center in strokes(args.old_strokes, shape, args.seed + 1):
                    stroke(segmentation, volume, liver, k, center)
            finally:
                segmentation.RemoveObserver(tag)
            print(summary("old", oldTimes))
            ratio = statistics.median(oldTimes) / statistics.median(newTimes)
            print(f"      old / new (median): {ratio:.0f}x")
    finally:
        env.close()


if __name__ == "__main__":
    main()
