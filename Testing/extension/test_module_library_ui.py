"""The support library through the module's Logic (real MRML via slicer-core, real local
`sgp serve`: tiny model, random weights, CPU, 256 px), as the module's panel and the SGP
effect's panel use it:

* a set saved from one case through the Logic, exported, imported under another name and
  chosen for a run (``prepareRun(supportSet=...)``) on another case with *no* drawn slice gives
  the same result as the original set, and the engine starts each structure at its own chosen
  slice; a set plus drawn slices works, the drawn slices stay support;
* the set chosen on the parameter node reaches the module's runs and the effect's previews;
* an unknown set is an SGPInputError naming it and where to see the sets;
* rename and delete (with confirmation) through the Logic show in ``list()``, and the
  parameter node follows; save and import ask before replacing a set.

The Widget and the effect's panel need Slicer's Qt and do not run here; the last tests check
that every Logic member they call exists and every widget they use is in their .ui.
"""

from __future__ import annotations

import ast
import re
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from module_fixtures import (  # noqa: F401  (mrml, engineLogic: fixtures)
    LABELED,
    RUN,
    SHAPE,
    allSegments,
    engineLogic,
    makeScene,
    mrml,
    segmentArray,
)

from SlicerSGP.data import io
from SlicerSGP.data.support_library import SupportLibrary
from SlicerSGP.errors import SGPInputError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def logic(engineLogic, tmp_path, monkeypatch):  # noqa: F811
    """The shared Logic with its own library folder (and the default one moved away, so that
    nothing lands in the user's library)."""
    monkeypatch.setenv("SGP_SUPPORT_LIBRARY", str(tmp_path / "default library"))
    engineLogic.engine.configure("local")
    engineLogic.supportLibraryRoot = tmp_path / "library"
    try:
        yield engineLogic
    finally:
        engineLogic.supportLibraryRoot = None
        engineLogic.stopWatching()


def parameterNode(env, volume, segmentation, ids, **values):
    """What the panel's parameter node wrapper gives the Logic (fields + the MRML node)."""
    from SGPSegmentLib.constants import DEFAULT_INTERPOLATION_PRIOR

    fields = dict(
        inputVolume=volume,
        segmentation=segmentation,
        segmentIds=",".join(ids),
        axis="K",
        model="tiny",
        checkpointPath=Path("none"),
        device="cpu",
        imageSize=256,
        topK=4,
        intensity="auto",
        interpolationPrior=DEFAULT_INTERPOLATION_PRIOR,
        keepPseudoMasks=False,
        parameterNode=env.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"),
    )
    fields.update(values)
    return types.SimpleNamespace(**fields)


def runAndUndo(logic, request, volume, segmentation):
    """Run ``request`` on the engine (written), then undo the write; the engine's result."""
    run = logic.startRun(request, logic.modelSettings(**RUN))
    logic.runs.wait(run)
    assert run.state == "done", run.error
    result = logic.lastResult
    logic.undoLastRun(segmentation, volume)
    return result


def sources(result, value) -> set[str]:
    return {str(s) for s in result.slice_scores[value]["source"]}


# --------------------------------------------------------------------- runs with a saved set


def test_exported_set_imported_under_another_name_segments_a_case_with_nothing_drawn(
    mrml,  # noqa: F811
    logic,
    tmp_path,
):
    volume, segmentation, ids = makeScene(mrml)
    summary = logic.saveSupportSet("case A", volume, segmentation, ids)
    assert summary.structures == {1: "liver", 2: "spleen"}
    assert summary.slices == {1: len(LABELED), 2: len(LABELED)}
    zipPath = logic.exportSupportSet("case A", tmp_path / "exported" / "case A.zip")
    imported = logic.importSupportSet(zipPath, "from colleague")
    assert imported.structures == summary.structures
    assert logic.supportLibrary().names() == ["case A", "from colleague"]

    newVolume, newSegmentation, newIds = makeScene(mrml, labeled=(), noiseSeed=9, name="new")
    before = allSegments(newSegmentation, newVolume)
    assert not any(mask.any() for mask in before.values())  # nothing drawn on the new case
    with pytest.raises(SGPInputError, match="no slice drawn .* support set"):
        logic.prepareRun(newVolume, newSegmentation, newIds)

    results = {}
    for name in ("case A", "From Colleague"):  # a set's name in any letter case
        request = logic.prepareRun(
            newVolume, newSegmentation, newIds, supportSet=name, library=logic.supportLibraryRoot
        )
        assert request.supportSlices == [] and not request.labels.any()
        assert request.supportSet == ("case A" if name == "case A" else "from colleague")
        assert any("adds support for liver (2 slice(s)), spleen (2 slice(s))" in n
                   for n in request.notes)  # fmt: skip
        bank = request.supportBank
        expected = io.load_support_sets(logic.supportLibrary().path(request.supportSet))
        for value in (1, 2):
            assert len(bank[value]) == len(LABELED)
            for got, want in zip(bank[value], expected[value], strict=True):
                np.testing.assert_array_equal(got.image, want.image)
                np.testing.assert_array_equal(got.mask, want.mask)
        run = logic.startRun(request, logic.modelSettings(**RUN))
        logic.runs.wait(run)
        assert run.state == "done", run.error
        results[name] = logic.lastResult
        written = allSegments(newSegmentation, newVolume)
        for value, segmentId in zip((1, 2), newIds, strict=True):
            np.testing.assert_array_equal(
                written[segmentId], np.asarray(logic.lastResult.labels) == value
            )
        logic.undoLastRun(newSegmentation, newVolume)
        after = allSegments(newSegmentation, newVolume)
        assert all(np.array_equal(after[s], before[s]) for s in before)

    a, b = results["case A"], results["From Colleague"]
    np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))
    for value in (1, 2):
        np.testing.assert_array_equal(a.slice_scores[value]["confidence"],
                                      b.slice_scores[value]["confidence"])  # fmt: skip
        # No drawn slice: each structure starts at the slice the engine chose from the set.
        assert a.labeled_by_structure.get(value, []) == []
        assert "seed" in sources(a, value) and "labeled" not in sources(a, value)


def test_a_set_plus_drawn_slices_keeps_the_drawn_slices_as_support(mrml, logic):  # noqa: F811
    source, sourceSegmentation, sourceIds = makeScene(mrml)
    logic.saveSupportSet("case A", source, sourceSegmentation, sourceIds)
    volume, segmentation, ids = makeScene(
        mrml, labeled=(3,), segments=("Spleen", "kidney"), noiseSeed=5, name="new"
    )
    drawn = allSegments(segmentation, volume)
    # The random model's masks past slice 3 need not overlap it: without the stop by
    # continuity they are written, and show whether the set was used.
    request = logic.prepareRun(volume, segmentation, ids, supportSet="case A",
                               library=logic.supportLibraryRoot, min_continuity=0)  # fmt: skip
    assert request.supportSlices == [3]
    assert list(request.supportBank) == [1]  # spleen, by name; the set has no kidney
    assert len(request.supportBank[1]) == len(LABELED)
    assert any("no structure named 'kidney'" in n for n in request.notes)
    withSet = runAndUndo(logic, request, volume, segmentation)
    for value in (1, 2):
        assert withSet.labeled_by_structure[value] == [3]
        assert sources(withSet, value) >= {"labeled"}
    labels = np.asarray(withSet.labels)
    for value, segmentId in zip((1, 2), ids, strict=True):
        np.testing.assert_array_equal(labels[3] == value, drawn[segmentId][3])
    alone = runAndUndo(logic, logic.prepareRun(volume, segmentation, ids, min_continuity=0),
                       volume, segmentation)
    # The set was used for the spleen, and only for it.
    assert not np.array_equal(withSet.slice_scores[1]["confidence"],
                              alone.slice_scores[1]["confidence"])  # fmt: skip
    assert allSegments(segmentation, volume).keys() == drawn.keys()
    for segmentId, mask in allSegments(segmentation, volume).items():
        np.testing.assert_array_equal(mask, drawn[segmentId])


def test_unknown_set_is_a_clear_error_naming_it_and_where_to_see_the_sets(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    before = allSegments(segmentation, volume)
    with pytest.raises(SGPInputError) as info:
        logic.prepareRun(volume, segmentation, ids, supportSet="liver CT",
                         library=logic.supportLibraryRoot)  # fmt: skip
    message = str(info.value)
    assert "'liver CT'" in message and "none yet" in message
    assert "Support library section" in message and "sgp support list" in message
    logic.saveSupportSet("case A", volume, segmentation, ids)
    with pytest.raises(SGPInputError, match=r"'liver CT' .*sets there: 'case A'"):
        logic.prepareRun(volume, segmentation, ids, supportSet="liver CT",
                         library=logic.supportLibraryRoot)  # fmt: skip
    # A set that holds none of the selected segments names both sides.
    other, otherSegmentation, otherIds = makeScene(mrml, segments=("aorta",), name="other")
    with pytest.raises(SGPInputError, match="none named 'aorta'"):
        logic.prepareRun(other, otherSegmentation, otherIds, supportSet="case A",
                         library=logic.supportLibraryRoot)  # fmt: skip
    after = allSegments(segmentation, volume)
    assert all(np.array_equal(after[s], before[s]) for s in before)


# ------------------------------------------------------------ the parameter node's choice


def test_parameter_node_choice_reaches_module_runs_and_effect_previews(mrml, logic, monkeypatch):  # noqa: F811
    from SGPSegmentLib.preview import PreviewLogic

    # The cached SAM2.1 weights are not the subject here: random ones, as in every module test.
    monkeypatch.setattr(logic, "settingsFromParameterNode", lambda pn: logic.modelSettings(**RUN))

    source, sourceSegmentation, sourceIds = makeScene(mrml)
    logic.saveSupportSet("case A", source, sourceSegmentation, sourceIds)
    volume, segmentation, ids = makeScene(mrml, labeled=(), noiseSeed=9, name="new")
    pn = parameterNode(mrml, volume, segmentation, ids)
    assert logic.supportSetName(pn.parameterNode) == ""
    assert logic.supportLibraryTitle(pn) == "Support library"
    logic.setSupportSet(pn.parameterNode, " case A ")
    assert pn.parameterNode.GetParameter("SupportSet") == "case A"
    assert logic.supportLibraryTitle(pn) == "Support library (runs use 'case A')"

    run = logic.startRunFromParameterNode(pn)
    assert run.request.supportSet == "case A"
    logic.runs.wait(run)
    assert run.state == "done", run.error
    moduleLabels = np.asarray(logic.lastResult.labels).copy()
    logic.undoLastRun(segmentation, volume)

    preview = PreviewLogic(logic)
    arguments = logic.previewArguments(pn, segmentation)
    assert arguments["supportSet"] == "case A"
    session = preview.start(volume, segmentation, ids, axis="K", **arguments)
    assert preview.wait(session) == "done", session.run.error
    assert session.supportSet == "case A" and session.request.supportSet == "case A"
    np.testing.assert_array_equal(np.asarray(session.result.labels), moduleLabels)

    # Choosing an unknown set for an open preview is refused; the preview keeps its set.
    with pytest.raises(SGPInputError, match="'gone'"):
        preview.setSupportSet(session, "gone")
    assert session.supportSet == "case A"
    # Choosing none: the case has nothing drawn, so the preview cannot run without a set.
    with pytest.raises(SGPInputError, match="no slice drawn"):
        preview.setSupportSet(session, "")
    assert session.supportSet == "case A" and preview.setSupportSet(session, "case A") is None
    preview.cancel(session)
    assert not any(mask.any() for mask in allSegments(segmentation, volume).values())


# --------------------------------------------------------------------- library management


def test_rename_and_delete_through_the_logic_show_in_the_list(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    pn = parameterNode(mrml, volume, segmentation, ids)
    logic.saveSupportSet("case A", volume, segmentation, ids)
    logic.saveSupportSet("case B", volume, segmentation, [ids[1]])
    assert [s.name for s in logic.supportLibrary().list()] == ["case A", "case B"]
    assert logic.supportSetChoices() == [
        ("", "None"),
        ("case A", "case A: liver (2 slices), spleen (2 slices)"),
        ("case B", "case B: spleen (2 slices)"),
    ]
    logic.setSupportSet(pn.parameterNode, "case A")

    assert logic.renameSupportSet("CASE a", "liver CT", pn.parameterNode) == "liver CT"
    assert [s.name for s in logic.supportLibrary().list()] == ["case B", "liver CT"]
    assert logic.supportSetName(pn.parameterNode) == "liver CT"  # the choice follows
    logic.renameSupportSet("case B", "spleen only", pn.parameterNode)
    assert logic.supportSetName(pn.parameterNode) == "liver CT"  # another set: unchanged
    with pytest.raises(SGPInputError, match="already exists"):
        logic.renameSupportSet("spleen only", "Liver ct", pn.parameterNode)
    with pytest.raises(SGPInputError, match="not allowed"):
        logic.renameSupportSet("spleen only", "../escape", pn.parameterNode)

    asked = []

    def answer(reply):
        return lambda message: asked.append(message) or reply

    assert logic.deleteSupportSet("liver CT", pn.parameterNode, confirm=answer(False)) is False
    assert "'liver CT' (liver (2 slices), spleen (2 slices))" in asked[0]
    assert "cannot be undone" in asked[0]
    assert logic.supportLibrary().names() == ["liver CT", "spleen only"]
    assert logic.deleteSupportSet("liver ct", pn.parameterNode, confirm=answer(True)) is True
    assert logic.supportLibrary().names() == ["spleen only"]
    assert logic.supportSetName(pn.parameterNode) == ""  # a deleted set is no longer used
    with pytest.raises(SGPInputError, match="No support set named 'liver CT'"):
        logic.deleteSupportSet("liver CT", pn.parameterNode, confirm=answer(True))
    assert len(asked) == 2  # an unknown name fails before anything is asked
    # A choice saved with a scene whose set is gone stays visible, marked missing.
    logic.setSupportSet(pn.parameterNode, "liver CT")
    assert logic.supportSetChoices("liver CT", details=False) == [
        ("", "None"),
        ("spleen only", "spleen only"),
        ("liver CT", "liver CT (not in the library)"),
    ]
    assert "not in the support library" in logic.supportSetDetails("liver CT")


def test_save_and_import_from_the_panel_ask_before_replacing(mrml, logic, tmp_path):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    pn = parameterNode(mrml, volume, segmentation, ids[1:])  # spleen selected
    first = logic.saveSupportSetFromParameterNode(pn, "abdomen", description="first try")
    assert first.structures == {1: "spleen"} and first.slices == {1: len(LABELED)}
    details = logic.supportSetDetails("abdomen")
    assert details.startswith("spleen (2 slices).") and "from 'patient'" in details
    assert details.endswith("first try")

    pn.segmentIds = ",".join(ids)
    asked = []
    assert logic.saveSupportSetFromParameterNode(
        pn, "Abdomen", confirm=lambda m: asked.append(m) or False
    ) is None  # fmt: skip
    assert "'abdomen' exists" in asked[0]
    assert logic.supportLibrary().list()[0].structures == {1: "spleen"}  # unchanged
    with pytest.raises(SGPInputError, match="already exists"):
        logic.saveSupportSetFromParameterNode(pn, "abdomen")  # no one to ask: refused
    second = logic.saveSupportSetFromParameterNode(pn, "abdomen", confirm=lambda m: True)
    assert second.structures == {1: "liver", 2: "spleen"}
    assert logic.supportLibrary().names() == ["abdomen"]

    pn.axis = "I"  # nothing drawn along I
    with pytest.raises(SGPInputError, match="no slice drawn along"):
        logic.saveSupportSetFromParameterNode(pn, "sagittal")
    with pytest.raises(SGPInputError, match="Select the input volume"):
        logic.saveSupportSetFromParameterNode(parameterNode(mrml, None, segmentation, ids), "x")

    zipPath = logic.exportSupportSet("abdomen", tmp_path / "abdomen.zip")
    with pytest.raises(SGPInputError, match="exists"):
        logic.exportSupportSet("abdomen", zipPath)
    assert logic.importSupportSet(zipPath, "ABDOMEN", confirm=lambda m: False) is None
    replaced = logic.importSupportSet(zipPath, "ABDOMEN", confirm=lambda m: True)
    assert replaced.name == "ABDOMEN" and logic.supportLibrary().names() == ["ABDOMEN"]
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SGPInputError, match="not a zip"):
        logic.importSupportSet(bad, "other")
    assert logic.supportLibrary().names() == ["ABDOMEN"]
    assert SupportLibrary(logic.supportLibraryRoot).names() == ["ABDOMEN"]
    assert not (tmp_path / "default library").exists()  # nothing went to the default folder


# ------------------------------------------------------------------ panels (no Slicer here)


def _calls(path: Path, owner: str) -> set[str]:
    """Attribute names used as ``self.<owner>.<name>`` in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == owner
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            found.add(node.attr)
    return found


def test_panels_call_only_logic_members_that_exist_and_widgets_their_ui_has():
    from SGPSegmentLib import SGPSegmentCoreLogic
    from SGPSegmentLib.preview import PreviewLogic

    core = SGPSegmentCoreLogic()
    module = ROOT / "SGPSegment" / "SGPSegment.py"
    panel = ROOT / "SegmentEditorSGP" / "SegmentEditorSGPWidgets" / "panel.py"
    library = {"supportSetChoices", "setSupportSet", "supportSetName", "supportSetDetails",
               "saveSupportSetFromParameterNode", "renameSupportSet", "deleteSupportSet",
               "importSupportSet", "exportSupportSet", "supportLibraryTitle"}  # fmt: skip
    assert library <= _calls(module, "logic")
    assert {"supportSetChoices", "setSupportSet", "supportSetName"} <= _calls(panel, "moduleLogic")
    assert "setSupportSet" in _calls(panel, "logic")
    tree = ast.parse(module.read_text())
    moduleLogic = next(n for n in tree.body if getattr(n, "name", "") == "SGPSegmentLogic")
    own = {n.name for n in moduleLogic.body if isinstance(n, ast.FunctionDef)}
    assert "getParameterNode" in own
    for name in (_calls(panel, "moduleLogic") | _calls(module, "logic")) - own:
        assert hasattr(core, name), name
    for name in _calls(panel, "logic"):
        assert hasattr(PreviewLogic, name), name
    for path, ui, widgets in (
        (module, ROOT / "SGPSegment" / "Resources" / "UI" / "SGPSegment.ui",
         {"useSupportSetComboBox", "supportSetComboBox", "saveSupportSetButton",
          "renameSupportSetButton", "deleteSupportSetButton", "importSupportSetButton",
          "exportSupportSetButton", "supportSetDetailsLabel", "supportLibraryFolderLabel",
          "supportLibraryCollapsibleButton"}),
        (panel, ROOT / "SegmentEditorSGP" / "Resources" / "UI" / "SegmentEditorSGP.ui",
         {"supportSetComboBox"}),
    ):  # fmt: skip
        names = {w.get("name") for w in ET.parse(ui).iter("widget")}
        used = set(re.findall(r"self\.ui\.(\w+)", path.read_text()))
        assert widgets <= used and used <= names, sorted(used - names)
