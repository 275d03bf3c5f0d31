"""The extension as Slicer 5.10 loads it: installed layout, module names from files and folders.

The files the CMake lists install (both modules and the engine package) are laid out in a
temporary ``lib/Slicer-5.10/qt-scripted-modules`` folder, as an installed extension holds
them, and loaded in a fresh Python by ``slicer_loader.py``, which follows Slicer's own loading
rules (its docstring names them). Then the SGP effect is registered at start-up, cloned as the
Segment Editor does, and its options panel must be built from the installed files; keys pressed
over a slice view reach it as the editor passes them (the mode keys).

An effect that imports ``SegmentEditorSGPLib.<anything>`` fails here as it does in Slicer:
Slicer loads the effect's file itself as the module ``SegmentEditorSGPLib``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from extension.test_module_packaging import cmakeSets

ROOT = Path(__file__).resolve().parents[2]
LOADER = Path(__file__).parents[1] / "slicer_loader.py"
MODULE_FOLDERS = ("SGPSegment", "SegmentEditorSGP")


def installedFiles() -> dict[Path, Path]:
    """{path under qt-scripted-modules: source file} for everything the CMake lists install.

    ``slicerMacroBuildScriptedModule`` installs SCRIPTS and RESOURCES relative to the module's
    folder (sub-folders kept, resources under ``Resources/``); the engine's list is relative
    to the repository root (``SOURCE_DIR ${ENGINE_SOURCE_DIR}``)."""
    files: dict[Path, Path] = {}
    for folder in MODULE_FOLDERS:
        sets = cmakeSets(ROOT / folder / "CMakeLists.txt")
        for item in sets["MODULE_PYTHON_SCRIPTS"] + sets["MODULE_PYTHON_RESOURCES"]:
            target = Path(item)
            assert target not in files, f"{item} is installed by two modules"
            files[target] = ROOT / folder / item
        for item in sets.get("ENGINE_PYTHON_SCRIPTS", []):
            files[Path(item)] = ROOT / item
    return files


def layOut(base: Path) -> Path:
    folder = base / "lib" / "Slicer-5.10" / "qt-scripted-modules"
    for target, source in installedFiles().items():
        assert source.is_file(), f"listed in CMake but missing: {source}"
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, folder / target)
    return folder


def load(folder: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, str(LOADER), str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=folder,  # not the repository: only the installed folder is on sys.path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    folder = layOut(tmp_path_factory.mktemp("slicer"))
    return folder, load(folder)


def test_both_modules_load_from_the_installed_folder(installed):
    folder, report = installed
    assert set(report["modules"]) == set(MODULE_FOLDERS), report["errors"]
    assert report["modules"]["SegmentEditorSGP"]["hidden"] is True
    assert not report["modules"]["SGPSegment"]["hidden"]
    for name, path in report["sysModules"].items():
        assert Path(path).resolve().is_relative_to(folder), f"{name} came from {path}"
    assert not report["torchImported"], "Slicer's process must never import torch"


def test_the_effect_registers_and_builds_its_panel_from_installed_files(installed):
    folder, report = installed
    assert not report["errors"], "\n".join(report["errors"])
    [effect] = report["effects"]
    assert effect["name"] == "SGP"
    assert Path(effect["source"]) == folder / "SegmentEditorSGPLib" / "SegmentEditorEffect.py"
    # The effect module is the file itself, named after its folder, as in Slicer.
    assert Path(report["sysModules"]["SegmentEditorSGPLib"]) == Path(effect["source"])
    panel = effect["panel"]
    assert panel is not None, "the effect's setupOptionsFrame built no panel"
    assert panel["class"] == "SegmentEditorSGPWidgets.panel.PreviewPanel"
    assert Path(panel["file"]).resolve().is_relative_to(folder)
    assert (panel["logic"], panel["moduleLogic"]) == ("PreviewLogic", "SGPSegmentLogic")
    assert effect["optionsWidgets"], "no options widget was added to the effect"
    for name in ("previewButton", "applyButton", "cancelButton", "segmentsList", "progressBar"):
        assert name in panel["uiWidgets"], name
    assert effect["parameters"].get("SGPAutoUpdate") == "1"
    assert effect["parameters"].get("SGPPromptMode") == "box"
    # Mode keys over a slice view: S scribble, X box; a key the slice view uses (B: previous
    # slice) goes on to the view.
    assert panel["keys"] == {"s": [True, "scribble"], "x": [True, "box"], "b": [False, "box"]}


def test_a_package_import_from_the_effect_folder_fails_as_in_slicer(tmp_path):
    """The loader's rule has teeth: an effect that imports ``<its folder>.panel`` (how the
    effect once did it) builds no panel and the error names the missing module."""
    folder = layOut(tmp_path)
    effectFile = folder / "SegmentEditorSGPLib" / "SegmentEditorEffect.py"
    (folder / "SegmentEditorSGPLib" / "panel.py").write_bytes(
        (folder / "SegmentEditorSGPWidgets" / "panel.py").read_bytes()
    )
    (folder / "SegmentEditorSGPLib" / "__init__.py").write_text("")
    source = effectFile.read_text()
    mutated = source.replace(
        "from SegmentEditorSGPWidgets.panel import", "from SegmentEditorSGPLib.panel import"
    )
    assert mutated != source
    effectFile.write_text(mutated)
    report = load(folder)
    [effect] = report["effects"]
    assert effect["panel"] is None
    assert any("SegmentEditorSGPLib.panel" in e for e in report["errors"]), report["errors"]


def test_the_effect_folder_holds_only_the_effect_file():
    """Inside Slicer the folder is the effect's module, never a package: anything else put
    there cannot be imported (the panel lives in ``SegmentEditorSGPWidgets``)."""
    folder = ROOT / "SegmentEditorSGP" / "SegmentEditorSGPLib"
    present = sorted(p.name for p in folder.iterdir() if p.name != "__pycache__")
    assert present == ["SegmentEditorEffect.py"], present
