"""Packaging of the SGPSegment module: CMake lists, the .ui (compiled with a real uic), metadata.

* Every Python file the module uses (its own and the engine's, found by following imports,
  lazy ones inside functions included) and every resource it loads is listed in
  ``SGPSegment/CMakeLists.txt``, and every listed file exists.
* ``SGPSegment.ui`` compiles with Qt's uic (``pyside6-uic``); every ``self.ui.<name>`` the
  Widget uses exists in it; every parameter-node binding names a real parameter and sits on a
  widget type the parameter node wrapper can connect to that parameter's type.
* The extension's CMake metadata and the Extensions-catalog entry agree.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import slicer_i18n

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "SGPSegment"
MODULE_FILE = MODULE_DIR / "SGPSegment.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SGPSegment.ui"
LOCAL_PACKAGES = {"SGPSegmentLib": MODULE_DIR, "SlicerSGP": ROOT}
"""Top-level import names that are this repository's code -> folder holding the package."""


# ---------------------------------------------------------------------------------- CMake


def cmakeSets(path: Path) -> dict[str, list[str]]:
    """``set(NAME value ...)`` blocks of a CMake file, with ``${VAR}`` expanded."""
    text = re.sub(r'("[^"]*")|#[^\n]*', lambda m: m.group(1) or "", path.read_text())
    values: dict[str, list[str]] = {}
    token = r'"[^"]*"|[^\s")]+'
    for name, body in re.findall(rf"\bset\(\s*(\w+)((?:\s+(?:{token}))*)\s*\)", text):
        items = re.findall(token, body)
        expanded = []
        for item in items:
            item = item.strip('"')
            item = re.sub(
                r"\$\{(\w+)\}", lambda m: " ".join(values.get(m.group(1), [m.group(0)])), item
            )
            expanded.append(item)
        values[name] = expanded
    return values


@pytest.fixture(scope="module")
def lists():
    sets = cmakeSets(MODULE_DIR / "CMakeLists.txt")
    return {
        "scripts": sets["MODULE_PYTHON_SCRIPTS"],
        "resources": sets["MODULE_PYTHON_RESOURCES"],
        "engine": sets["ENGINE_PYTHON_SCRIPTS"],
    }


def listedFiles(lists) -> set[Path]:
    files = {(MODULE_DIR / p).resolve() for p in lists["scripts"] + lists["resources"]}
    files |= {(ROOT / p).resolve() for p in lists["engine"]}
    return files


def test_every_listed_file_exists(lists):
    missing = [str(p) for p in sorted(listedFiles(lists)) if not p.is_file()]
    assert not missing, f"Listed in SGPSegment/CMakeLists.txt but not found: {missing}"
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert (
        "SOURCE_DIR ${ENGINE_SOURCE_DIR}" in cmake
        and "ENGINE_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/.." in cmake
    )


def _moduleFile(dotted: str) -> Path | None:
    top = dotted.split(".")[0]
    base = LOCAL_PACKAGES.get(top)
    if base is None:
        return None
    path = base.joinpath(*dotted.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    raise AssertionError(f"import of {dotted!r} does not resolve to a file in this repository")


def _importsOf(path: Path) -> set[str]:
    """Every module a file imports (anywhere in it), as dotted names; relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = None
    for top, base in LOCAL_PACKAGES.items():
        try:
            rel = path.relative_to(base / top)
            package = ".".join([top, *rel.parent.parts])
        except ValueError:
            continue
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*parts, module] if module else parts)
            names.add(module)
            for alias in node.names:  # "from pkg import submodule"
                names.add(f"{module}.{alias.name}")
    return names


def importClosure(start: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _importsOf(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # packages on the way are imported too
                try:
                    found = _moduleFile(".".join(parts[:i]))
                except AssertionError:
                    if i == len(parts) and i > 1:
                        continue  # "from pkg import name" where name is not a module
                    raise
                if found is not None:
                    todo.append(found.resolve())
    return seen


ENGINE_ENTRY = ROOT / "SlicerSGP" / "service" / "__main__.py"
"""What the local engine runs (``python -m SlicerSGP.service``) from the installed package."""


def test_every_python_file_the_module_uses_is_listed(lists):
    listed = listedFiles(lists)
    moduleUses = importClosure(MODULE_FILE.resolve())
    for name in ("client.py", "launcher.py"):
        assert (ROOT / "SlicerSGP" / "service" / name).resolve() in moduleUses, name
    engineUses = importClosure(ENGINE_ENTRY.resolve())
    assert (ROOT / "SlicerSGP" / "method" / "segmenter.py").resolve() in engineUses
    missing = sorted(str(p.relative_to(ROOT)) for p in (moduleUses | engineUses) - listed)
    assert not missing, (
        "Python files the module or its local engine imports but SGPSegment/CMakeLists.txt "
        f"does not list: {missing}"
    )


def test_all_module_python_files_are_listed(lists):
    listed = listedFiles(lists)
    present = {p.resolve() for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(p.relative_to(ROOT)) for p in present - listed)
    assert not missing, f"Python files not installed by SGPSegment/CMakeLists.txt: {missing}"


def test_every_resource_is_listed(lists):
    listed = {str(Path(p)) for p in lists["resources"]}
    present = {
        str(p.relative_to(MODULE_DIR))
        for p in (MODULE_DIR / "Resources").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert present <= listed, f"Resources not listed: {sorted(present - listed)}"
    source = MODULE_FILE.read_text()
    used = {f"Resources/{name}" for name in re.findall(r'resourcePath\(\s*"([^"]+)"', source)}
    used.add("Resources/Icons/SGPSegment.png")  # ScriptedLoadableModule loads the icon by name
    assert used <= listed, f"Resources the module loads but does not list: {sorted(used - listed)}"


def _allImports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
    return names


def test_module_never_imports_the_engine_or_torch():
    """Slicer's process talks to the engine over HTTP: no torch, sam2 or engine internals, not
    even lazily (Testing/extension/test_module_service.py checks the running process too)."""
    heavy = (
        "torch",
        "sam2",
        "SimpleITK",
        "SlicerSGP.method",
        "SlicerSGP.data",
        "SlicerSGP.training",
        "SlicerSGP.evaluation",
        "SlicerSGP.cli",
        "SlicerSGP.service.server",
        "SlicerSGP.service.jobs",
        "qt",
        "ctk",
    )
    # numpy-only engine modules: the intensity mapping and the support library
    numpy_only = ("SlicerSGP.data.intensity", "SlicerSGP.data.support_library")
    for path in sorted((MODULE_DIR / "SGPSegmentLib").glob("*.py")):
        for name in _allImports(path):
            if name in numpy_only:
                continue
            assert not (name == "qt" or name.startswith(tuple(h for h in heavy if h != "qt"))), (
                f"{path.name} imports {name}"
            )
    for name in _allImports(MODULE_FILE):
        assert not name.startswith(heavy[:-2]), f"SGPSegment.py imports {name}"


def test_module_file_loads_on_old_slicer_python_to_show_the_version_message():
    """Slicer 5.8 (Python 3.9) must reach the 'needs Slicer 5.10' message: the module file and
    what it imports before the version check parse as Python 3.9 and use nothing newer."""
    for path in (MODULE_FILE, MODULE_DIR / "SGPSegmentLib" / "constants.py"):
        source = path.read_text()
        tree = ast.parse(source, feature_version=(3, 9))
        assert not any(isinstance(n, ast.Match) for n in ast.walk(tree)), path.name
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            assert not any(k.arg == "strict" for k in call.keywords), f"{path.name}: zip(strict=)"
        for node in ast.walk(tree):  # X | Y in an annotation is evaluated at class/def time
            annotation = getattr(node, "annotation", None) or getattr(node, "returns", None)
            if annotation is not None:
                assert not any(isinstance(n, ast.BinOp) for n in ast.walk(annotation)), (
                    f"{path.name}: {ast.unparse(annotation)}"
                )
    tree = ast.parse(MODULE_FILE.read_text())
    checkLine = next(
        n.lineno
        for n in tree.body
        if isinstance(n, ast.Assign) and "VERSION_PROBLEM" in ast.unparse(n.targets[0])
    )
    for node in tree.body:
        if (
            isinstance(node, ast.ImportFrom)
            and node.lineno < checkLine
            and (node.module or "").startswith("SGPSegmentLib")
        ):
            assert node.module == "SGPSegmentLib.constants", (
                f"{node.module} is imported before the version check"
            )
    slicer_i18n.install()  # the message is translated: slicer.i18n, as in Slicer
    spec = importlib.util.spec_from_file_location(
        "sgp_constants", MODULE_DIR / "SGPSegmentLib" / "constants.py"
    )
    constants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(constants)
    slicerVersionProblem = constants.slicerVersionProblem
    assert "5.10" in slicerVersionProblem(5, 8) and "5.8" in slicerVersionProblem(5, 8)
    assert slicerVersionProblem(5, 10) == "" and slicerVersionProblem(6, 0) == ""
    source = MODULE_FILE.read_text()
    assert "Needs 3D Slicer 5.10 or later" in source and "README_URL" in source
    assert "getDefaultModuleDocumentationLink" not in source


def moduleHelpText() -> str:
    """The literal text of ``self.parent.helpText`` in class ``SGPSegment``, whitespace joined."""
    tree = ast.parse(MODULE_FILE.read_text())
    module = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SGPSegment")
    for node in ast.walk(module):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Attribute) and t.attr == "helpText" for t in node.targets
        ):
            parts = [
                c.value
                for c in ast.walk(node.value)
                if isinstance(c, ast.Constant) and isinstance(c.value, str)
            ]
            return " ".join(" ".join(parts).split())
    raise AssertionError("SGPSegment sets no self.parent.helpText")


def test_help_text_states_the_per_structure_support_rule():
    """A drawn slice is support only for the structure drawn there; it teaches "absent here"
    for the others only when marked complete (the rule before was: every drawn slice is fully
    labeled, and structures not drawn there are absent)."""
    text = moduleHelpText()
    assert "fully labeled" not in text and "taken as absent" not in text, text
    assert "slices where you drew that structure" in text, text
    assert "says nothing about the others" in text and "marked complete" in text, text


def test_module_follows_the_scripted_module_template():
    tree = ast.parse(MODULE_FILE.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for name in (
        "SGPSegment",
        "SGPSegmentWidget",
        "SGPSegmentLogic",
        "SGPSegmentTest",
        "SGPSegmentParameterNode",
    ):
        assert name in classes, name
    bases = {n: [ast.unparse(b) for b in c.bases] for n, c in classes.items()}
    assert "ScriptedLoadableModule" in bases["SGPSegment"]
    assert "ScriptedLoadableModuleWidget" in bases["SGPSegmentWidget"]
    assert bases["SGPSegmentLogic"][:2] == ["ScriptedLoadableModuleLogic", "SGPSegmentCoreLogic"]
    # Qt 5.15's .ui loader sets int properties given as <enum> to -1: set in code instead.
    assert (
        "self.ui.segmentsTableView.selectionMode = qt.QAbstractItemView.MultiSelection"
        in ast.unparse(classes["SGPSegmentWidget"]).replace("'", '"')
        or "selectionMode = qt.QAbstractItemView.MultiSelection" in MODULE_FILE.read_text()
    )
    assert "selectionMode" not in UI_FILE.read_text()
    assert "ScriptedLoadableModuleTest" in bases["SGPSegmentTest"]
    assert [ast.unparse(d) for d in classes["SGPSegmentParameterNode"].decorator_list] == [
        "parameterNodeWrapper"
    ]
    source = MODULE_FILE.read_text()
    assert (
        'self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]'
        in source
    )
    # Thin widget: no MRML node creation or numpy work in it.
    widget = ast.unparse(classes["SGPSegmentWidget"])
    for forbidden in ("AddNewNodeByClass", "numpy", "arrayFrom", "updateSegment"):
        assert forbidden not in widget, forbidden


# ------------------------------------------------------------------------------------ .ui


def _uic() -> str:
    exe = shutil.which("pyside6-uic") or str(Path(sys.executable).with_name("pyside6-uic"))
    if not Path(exe).exists():
        pytest.fail(
            "pyside6-uic (Qt's uic, from pyside6-essentials) is needed: pip install pyside6-essentials"
        )
    return exe


@pytest.fixture(scope="module")
def compiledUi(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("uic") / "ui_SGPSegment.py"
    proc = subprocess.run([_uic(), str(UI_FILE), "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, f"uic failed on {UI_FILE}:\n{proc.stderr}"
    return out.read_text()


def _uiObjects(compiled: str) -> dict[str, str]:
    """objectName -> class, from uic's generated code."""
    objects = {}
    for var, cls in re.findall(r"self\.(\w+) = (\w+)\(", compiled):
        objects[var] = cls
    names = set(re.findall(r'setObjectName\(u"(\w+)"\)', compiled))
    return {n: objects.get(n, "?") for n in names}


def test_ui_compiles_and_has_every_widget_the_widget_code_uses(compiledUi):
    objects = _uiObjects(compiledUi)
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used, "the Widget uses no ui widgets?"
    missing = sorted(used - set(objects))
    assert not missing, f"SGPSegment.py uses widgets that SGPSegment.ui does not have: {missing}"


def _parameterFields() -> dict[str, str]:
    tree = ast.parse(MODULE_FILE.read_text())
    cls = next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SGPSegmentParameterNode"
    )
    return {
        n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)
    }


def test_ui_parameter_bindings_match_the_parameter_node(compiledUi):
    fields = _parameterFields()
    objects = _uiObjects(compiledUi)
    bindings = dict(
        (obj, param)
        for obj, param in re.findall(
            r'self\.(\w+)\.setProperty\(u"SlicerParameterName", u"(\w+)"\)', compiledUi
        )
    )
    assert bindings, "no SlicerParameterName bindings found in the .ui"
    for obj, param in bindings.items():
        assert param in fields, f"{obj} is bound to unknown parameter {param!r}"
        annotation, cls = fields[param], objects[obj]
        if annotation.startswith("vtkMRML"):
            expected = {"qMRMLNodeComboBox"}
        elif "Choice(" in annotation:
            expected = {"QComboBox"}
        elif annotation == "bool":
            expected = {"QCheckBox", "QPushButton"}
        elif annotation.startswith("Annotated[int") or annotation == "int":
            expected = {"QSpinBox", "QSlider"}
        elif "Path" in annotation:
            expected = {"ctkPathLineEdit", "ctkDirectoryButton"}
        else:
            expected = {"QLineEdit", "QTextEdit"}
        assert cls in expected, f"{obj} ({cls}) cannot be connected to {param}: {annotation}"
    # Every parameter with a widget connector type is bound (the others are synced by hand).
    unbound = {"segmentIds", "axis", "device"}
    assert set(fields) - set(bindings.values()) == unbound


# ------------------------------------------------------------------------------- metadata


REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"


def fileRequirements(path: Path = REQUIREMENTS_FILE) -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines left out)."""
    lines = path.read_text().splitlines()
    return [t for t in (line.split("#", 1)[0].strip() for line in lines) if t]


def test_the_package_takes_its_requirements_from_the_module_file():
    """pyproject.toml lists no dependency itself: setuptools reads them from the module's
    requirements file (the one file both use), and the torch floor is at least sam2's own."""
    from packaging.requirements import Requirement
    from packaging.version import Version
    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # setuptools calls [tool.setuptools] "beta"
        project = read_configuration(ROOT / "pyproject.toml")["project"]
    reqs = fileRequirements()
    assert len(reqs) >= 10 and project["dependencies"] == reqs, project.get("dependencies")
    assert "dependencies" in project["dynamic"]
    torch = next(Requirement(r) for r in reqs if Requirement(r).name == "torch")
    # sam2 1.1.0 itself requires torch>=2.5.1: a lower floor lets pip keep a torch sam2
    # cannot run with.
    floors = [Version(s.version) for s in torch.specifier if s.operator in (">=", "==", "~=")]
    assert floors and max(floors) >= Version("2.5.1"), str(torch)
    # No second list: no requirement string of these packages anywhere in the module's code.
    names = {Requirement(r).name.lower() for r in reqs}
    for path in MODULE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                match = re.fullmatch(r"([A-Za-z][\w.-]*)\s*(>=|==|~=|<=|<|>|!=)\s*[\w.*]+",
                                     node.value.strip())
                assert not (match and match.group(1).lower() in names), (path, node.value)


def installedTree(root: Path, lists) -> Path:
    """The module laid out as CMake installs it: its scripts and resources under their listed
    paths and the engine package beside them (the qt-scripted-modules folder)."""
    for rel in lists["scripts"] + lists["resources"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MODULE_DIR / rel, root / rel)
    for rel in lists["engine"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, root / rel)
    return root


def test_the_module_reads_the_requirements_file_where_cmake_installs_it(lists, tmp_path):
    tree = installedTree(tmp_path / "qt-scripted-modules", lists)
    (tree / "Resources" / "requirements.txt").write_text(
        "# installed copy\ntorch>=2.6\npeft>=0.12  # only for SGP checkpoints\n\nnumpy>=2\n")
    code = (f"import sys; sys.path.append({str(ROOT / 'Testing')!r}); import slicer_i18n; "
            "slicer_i18n.install(); "  # Slicer's slicer.i18n, which slicer-core lacks
            "import json, SGPSegmentLib.dependencies as d; print(json.dumps("
            "[str(d.REQUIREMENTS_FILE), d.requirements(True), d.requirements(False), "
            "d.torchRequirement()]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**env, "PYTHONPATH": str(tree)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    path, withPeft, withoutPeft, torch = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(path) == (tree / "Resources" / "requirements.txt").resolve()
    assert withPeft == ["torch>=2.6", "peft>=0.12", "numpy>=2", "sam2==1.1.0"]
    assert withoutPeft == ["torch>=2.6", "numpy>=2", "sam2==1.1.0"] and torch == "torch>=2.6"


def test_extension_metadata_and_catalog_entry_agree():
    top = cmakeSets(ROOT / "CMakeLists.txt")
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "add_subdirectory(SGPSegment)" in text
    name = re.search(r"\bproject\((\w+)\)", text).group(1)
    # The Extensions Index refuses new names starting with "Slicer".
    assert name == "SGPSegmentation" and not name.lower().startswith("slicer")
    depends = [d for d in top["EXTENSION_DEPENDS"] if d != "NA"]
    assert top["EXTENSION_CATEGORY"] == ["Segmentation"]
    for key in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
    ):
        assert top.get(key), key
    assert "5.10" in " ".join(top["EXTENSION_DESCRIPTION"])
    # Slicer's extension template: cmake_minimum_required(VERSION 3.20.6...3.22.6).
    required = re.search(
        r"^cmake_minimum_required\(VERSION (\d+(?:\.\d+)*)(?:\.\.\.(\d+(?:\.\d+)*))? FATAL_ERROR\)", text, re.M
    )
    assert required, "cmake_minimum_required(VERSION MIN...MAX FATAL_ERROR) comes first"
    low, high = (
        tuple(int(x) for x in (v or required.group(1)).split(".")) for v in required.groups()
    )
    assert low >= (3, 20, 6) and high >= max(low, (3, 22, 6)), required.group(0)
    # The index needs at least one screenshot URL and checks that each exists: a PNG committed
    # in this repository, at a raw URL of the same repository and branch as the icon.
    shots = top.get("EXTENSION_SCREENSHOTURLS", [])
    assert shots, "EXTENSION_SCREENSHOTURLS is required by the Extensions Index check"
    rawBase = top["EXTENSION_ICONURL"][0].split("/main/", 1)[0] + "/main/"
    assert rawBase.startswith("https://raw.githubusercontent.com/"), rawBase
    for url in shots:
        assert url.startswith(rawBase), (url, rawBase)
        shot = ROOT / url[len(rawBase):]
        assert shot.is_file(), f"{url}: {shot} is not committed"
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size < 1024**2
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", str(shot.relative_to(ROOT))],
            cwd=ROOT, capture_output=True,
        )
        assert tracked.returncode == 0 or not (ROOT / ".git").exists(), f"{shot} is not in git"

    catalog = ROOT / f"{name}.json"
    assert catalog.is_file(), f"the catalog entry must be named after the extension: {catalog.name}"
    assert not (ROOT / "SlicerSGP.json").exists()
    entry = json.loads(catalog.read_text())
    allowed = {
        "$schema",
        "build_dependencies",
        "build_subdirectory",
        "category",
        "enabled",
        "scm_revision",
        "scm_type",
        "scm_url",
        "tier",
    }
    assert set(entry) <= allowed, set(entry) - allowed
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert sorted(entry["build_dependencies"]) == sorted(depends)
    assert entry["category"] == "Segmentation"
    assert entry["build_subdirectory"] == top["EXTENSION_BUILD_SUBDIRECTORY"][0]
    # The catalog's repository is the one the icon and screenshot URLs are served from.
    owner_repo = rawBase.removeprefix("https://raw.githubusercontent.com/").removesuffix("/main/")
    assert entry["scm_url"] == f"https://github.com/{owner_repo}.git", entry["scm_url"]
    assert entry.get("scm_revision", "main") == "main"
    assert top["EXTENSION_HOMEPAGE"][0].startswith(f"https://github.com/{owner_repo}")

    iconPath = top["EXTENSION_ICONURL"][0].split("/main/", 1)[1]
    icon = ROOT / iconPath
    assert icon.is_file() and icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    license_ = (ROOT / "LICENSE.txt").read_text()
    assert "Apache License" in license_ and "Version 2.0, January 2004" in license_
