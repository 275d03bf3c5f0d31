"""The support library from Slicer (real MRML via slicer-core): a segmentation's drawn slices
saved as a set keep each segment's own slices, the volume's voxels, geometry and colours; the
segmentation is not changed; a saved, exported and imported set used as support by the Logic
on another case (real `sgp serve`) gives the same result as the original set.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from module_fixtures import (  # noqa: F401  (mrml, engineLogic: fixtures)
    LABELED,
    RUN,
    allSegments,
    engineLogic,
    makeScene,
    mrml,
    segmentArray,
)

from SlicerSGP.data import io
from SlicerSGP.data.intensity import intensity_range, normalize_intensity
from SlicerSGP.data.support_library import SupportLibrary
from SlicerSGP.errors import SGPInputError


def spleenOnOneSlice(env, noiseSeed=0):
    """The module scene with spleen drawn on the second labeled slice only."""
    import slicer

    volume, segmentation, ids = makeScene(env, noiseSeed=noiseSeed)
    spleen = segmentArray(segmentation, ids[1], volume).astype(np.uint8)
    spleen[LABELED[0]] = 0
    slicer.util.updateSegmentBinaryLabelmapFromArray(spleen, segmentation, ids[1], volume)
    return volume, segmentation, ids


def test_saved_set_holds_each_segments_own_drawn_slices(mrml, tmp_path):  # noqa: F811
    from SGPSegmentLib import mrml_io
    from SGPSegmentLib.support_library import saveSupportSet

    volume, segmentation, ids = spleenOnOneSlice(mrml)
    before = allSegments(segmentation, volume)
    summary = saveSupportSet("case A", volume, segmentation, ids, library=tmp_path / "lib",
                             description="from Slicer")  # fmt: skip
    assert summary.structures == {1: "liver", 2: "spleen"}
    lib = SupportLibrary(tmp_path / "lib")
    manifest = lib.show("case A")
    assert [s["slices"] for s in manifest["structures"]] == [list(LABELED), [LABELED[1]]]
    assert manifest["source"] == "patient" and manifest["description"] == "from Slicer"
    geometry = mrml_io.volumeGeometry(volume)
    np.testing.assert_allclose(manifest["geometry"]["spacing"], geometry.spacing)
    np.testing.assert_allclose(manifest["geometry"]["direction"], geometry.direction)
    for entry, segmentId in zip(manifest["structures"], ids, strict=True):
        color = segmentation.GetSegmentation().GetSegment(segmentId).GetColor()
        np.testing.assert_allclose(entry["color"], color)

    image = mrml_io.volumeArray(volume)
    drawn = np.zeros(image.shape, bool)
    for mask in before.values():
        drawn[list(LABELED)] |= mask[list(LABELED)]
    window = intensity_range(image, "auto", drawn=image[drawn])
    bank = io.load_support_sets(lib.path("case A"))
    for value, segmentId in zip((1, 2), ids, strict=True):
        slices = list(LABELED) if value == 1 else [LABELED[1]]
        assert len(bank[value]) == len(slices)  # spleen: nothing from the liver-only slice
        for item, k in zip(bank[value], slices, strict=True):
            np.testing.assert_array_equal(item.image, normalize_intensity(image[k], *window))
            np.testing.assert_array_equal(item.mask, before[segmentId][k])
    after = allSegments(segmentation, volume)
    for segmentId, mask in before.items():
        np.testing.assert_array_equal(after[segmentId], mask)


def test_given_slices_undrawn_segments_and_clashes(mrml, tmp_path):  # noqa: F811
    from SGPSegmentLib.support_library import saveSupportSet

    volume, segmentation, ids = makeScene(mrml)
    kidney = segmentation.GetSegmentation().AddEmptySegment("", "kidney")
    library = tmp_path / "lib"
    with pytest.raises(SGPInputError, match="'kidney' have no slice drawn"):
        saveSupportSet("s", volume, segmentation, [ids[0], kidney], library=library)
    saved = saveSupportSet("s", volume, segmentation, None, library=library)  # kidney skipped
    assert saved.structures == {1: "liver", 2: "spleen"}
    with pytest.raises(SGPInputError, match="already exists"):
        saveSupportSet("S", volume, segmentation, None, library=library)
    given = saveSupportSet("given", volume, segmentation, ids, library=library,
                           drawnSlices={ids[0]: [LABELED[1]], ids[1]: [LABELED[0]]})  # fmt: skip
    assert given.slices == {1: 1, 2: 1}
    with pytest.raises(SGPInputError, match="not in segmentation"):
        saveSupportSet("t", volume, segmentation, ["nope"], library=library)
    with pytest.raises(SGPInputError, match="Select an input volume"):
        saveSupportSet("t", None, segmentation, ids, library=library)
    assert SupportLibrary(library).names() == ["given", "s"]


def test_support_bank_from_library_matches_segments_by_name(mrml, tmp_path):  # noqa: F811
    from SGPSegmentLib.support_library import saveSupportSet, supportBankFromLibrary

    volume, segmentation, ids = spleenOnOneSlice(mrml)
    saveSupportSet("case A", volume, segmentation, ids, library=tmp_path)
    bank = supportBankFromLibrary("CASE a", {3: " Spleen", 4: "aorta"}, library=tmp_path)
    assert list(bank) == [3]
    expected = io.load_support_sets(SupportLibrary(tmp_path).path("case A"))[2]
    for got, want in zip(bank[3], expected, strict=True):
        np.testing.assert_array_equal(got.image, want.image)
        np.testing.assert_array_equal(got.mask, want.mask)
    with pytest.raises(SGPInputError, match="none named 'aorta'"):
        supportBankFromLibrary("case A", {1: "aorta"}, library=tmp_path)


def test_exported_and_imported_set_gives_the_logic_the_same_result(mrml, engineLogic, tmp_path):  # noqa: F811
    from SGPSegmentLib.support_library import saveSupportSet, supportBankFromLibrary

    logic = engineLogic
    logic.engine.configure("local")
    volume, segmentation, ids = spleenOnOneSlice(mrml)
    original = SupportLibrary(tmp_path / "original")
    saveSupportSet("case A", volume, segmentation, ids, library=original.root)
    imported = SupportLibrary(tmp_path / "imported")
    imported.import_zip(original.export_zip("case A", tmp_path / "caseA.zip"))

    newVolume, newSegmentation, newIds = makeScene(mrml, labeled=(3,), noiseSeed=9, name="new")
    before = allSegments(newSegmentation, newVolume)
    results = {}
    for key, library in (("original", original), ("imported", imported), ("none", None)):
        # Random weights: masks past the drawn slice need not overlap it; without the stop by
        # continuity they are written, and show whether the set was used.
        request = logic.prepareRun(newVolume, newSegmentation, newIds, min_continuity=0)
        if library is not None:
            request.supportBank = supportBankFromLibrary(
                "case A", request.structures, library=library.root
            )
        run = logic.startRun(request, logic.modelSettings(**RUN))
        logic.runs.wait(run)
        assert run.state == "done", run.error
        results[key] = logic.lastResult
        logic.undoLastRun(newSegmentation, newVolume)
        for segmentId, mask in allSegments(newSegmentation, newVolume).items():
            np.testing.assert_array_equal(mask, before[segmentId])
    a, b, alone = results["original"], results["imported"], results["none"]
    np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))
    for value in (1, 2):
        np.testing.assert_array_equal(a.slice_scores[value]["confidence"],
                                      b.slice_scores[value]["confidence"])  # fmt: skip
    # and the set was used: without it the run differs
    assert any(not np.array_equal(a.slice_scores[v]["confidence"],
                                  alone.slice_scores[v]["confidence"]) for v in (1, 2))  # fmt: skip


def test_saving_and_loading_in_slicers_process_imports_no_torch_or_simpleitk(tmp_path):
    """A fresh process: build a scene, save a set, load it back as a run's support bank."""
    script = tmp_path / "light.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
        "from module_fixtures import MRMLEnvironment, makeScene\n"
        "from SGPSegmentLib.support_library import saveSupportSet, supportBankFromLibrary\n"
        "env = MRMLEnvironment()\n"
        "volume, segmentation, ids = makeScene(env)\n"
        f"saveSupportSet('s', volume, segmentation, ids, library={str(tmp_path)!r})\n"
        f"bank = supportBankFromLibrary('s', {{1: 'liver'}}, library={str(tmp_path)!r})\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('torch', 'sam2', 'SimpleITK', 'slicerio'))\n"
        "print('RESULT', len(bank[1]), heavy)\n"
        "env.close()\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"RESULT {len(LABELED)} []" in proc.stdout, proc.stdout[-2000:]
