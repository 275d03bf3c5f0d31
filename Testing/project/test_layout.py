"""The engine package's shape: no import cycles, small modules and classes, argparse only in the
command line, no Slicer/Qt/VTK, documented packages, and a light ``import SlicerSGP``.

Conventions checked (each checker takes the package folder, so the tests below can prove on a
small synthetic package in ``tmp_path`` that it reports what it should):

* Import cycles (in the engine and in each package of the Slicer module and effect): every ``import SlicerSGP.x`` / ``from SlicerSGP.x import y`` / relative import,
  also lazy ones inside functions, is an edge; imports under ``if TYPE_CHECKING:`` never run and
  are not. A cycle is reported as ``a -> b (line n) -> a``.
* A module has at most :data:`MAX_MODULE_LINES` lines. A class has at most
  :data:`MAX_CLASS_LINES` lines unless its docstring says why it is long, with the words
  "long because" (e.g. "This class is long because the facade mirrors the protocol ...").
* ``argparse`` is imported only under ``SlicerSGP/cli/``.
* Nothing imports ``slicer``, ``qt``, ``ctk``, ``PythonQt``, ``vtk*`` or ``mrml*``: the engine
  runs without Slicer (``slicerio``, a plain file reader, is fine).
* Every package (folder with Python files) has an ``__init__.py`` with a docstring saying what
  lives there and what it may import.
* ``import SlicerSGP`` and ``import SlicerSGP.service.client`` do not import torch (checked in a
  fresh interpreter), so Slicer's process stays light.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "SlicerSGP"
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250
LONG_CLASS_MARK = "long because"
GUI_MODULES = {"slicer", "qt", "ctk", "pythonqt"}
GUI_PREFIXES = ("vtk", "mrml")  # vtk, vtkmodules, vtkSlicer..., MRMLCorePython, ...


# ---------------------------------------------------------------------------------------------
# Checkers (each takes the package folder)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One import statement: the module it names (absolute), where, and whether it is lazy."""

    target: str
    names: tuple[str, ...]
    line: int
    lazy: bool


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (``root.name`` = package)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, module: str) -> list[Import]:
    """The imports a module runs (relative ones made absolute), lazy ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit(ast.Module(body=[sub], type_ignores=[]), lazy)
                continue
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(alias.name, (), child.lineno, lazy))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = module.split(".")
                    keep = len(parts) - child.level + (1 if is_package else 0)
                    base = ".".join(parts[:keep] + ([base] if base else []))
                names = tuple(alias.name for alias in child.names)
                found.append(Import(base, names, child.lineno, lazy))
            visit(child, inner)

    visit(tree, False)
    return found


def import_graph(root: Path) -> dict[str, dict[str, tuple[int, bool]]]:
    """module -> {imported module of the same package: (line, lazy)}."""
    modules = module_files(root)
    graph: dict[str, dict[str, tuple[int, bool]]] = {name: {} for name in modules}

    def known(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    for name, path in modules.items():
        for imp in imports_of(path, name):
            if imp.target.split(".")[0] != root.name:
                continue
            targets = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in modules]
            if len(targets) < len(imp.names) or not imp.names:
                targets.append(imp.target)  # names defined in the module itself
            for target in targets:
                resolved = known(target)
                if resolved and resolved != name:
                    graph[name].setdefault(resolved, (imp.line, imp.lazy))
    return graph


def find_cycles(root: Path) -> list[str]:
    """Each import cycle (one per strongly connected group of modules), as a readable path."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    reports = []
    for group in groups:
        members = set(group)
        start = group[0]
        path, seen = [start], {start}
        while True:  # walk inside the group until a module repeats: that closes a cycle
            nxt = next(w for w in sorted(graph[path[-1]]) if w in members)
            if nxt in seen:
                cycle = path[path.index(nxt) :] + [nxt]
                break
            path.append(nxt)
            seen.add(nxt)
        steps = [cycle[0]]
        for a, b in zip(cycle, cycle[1:], strict=False):
            line, lazy = graph[a][b]
            steps.append(f"{b} ({a} line {line}{', lazy' if lazy else ''})")
        report = " -> ".join(steps)
        others = sorted(members - set(cycle))
        if others:  # more modules take part in cycles through these
            report += f" [same import group: {', '.join(others)}]"
        reports.append(report)
    return reports


def oversize_modules(root: Path, max_lines: int = MAX_MODULE_LINES) -> list[str]:
    out = []
    for path in module_files(root).values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > max_lines:
            out.append(f"{path.relative_to(root.parent)}: {n} lines (max {max_lines})")
    return out


def long_classes(root: Path, max_lines: int = MAX_CLASS_LINES) -> list[str]:
    out = []
    for path in module_files(root).values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            n = node.end_lineno - start + 1
            doc = ast.get_docstring(node) or ""
            if n > max_lines and LONG_CLASS_MARK not in doc.lower():
                out.append(
                    f"{path.relative_to(root.parent)}: class {node.name} is {n} lines (max "
                    f"{max_lines}; or say why in its docstring: '{LONG_CLASS_MARK} ...')"
                )
    return out


def _top_level_imports(root: Path):
    for name, path in module_files(root).items():
        for imp in imports_of(path, name):
            yield name, path, imp


def argparse_outside_cli(root: Path) -> list[str]:
    cli = f"{root.name}.cli"
    return [
        f"{path.relative_to(root.parent)} line {imp.line} imports argparse"
        for name, path, imp in _top_level_imports(root)
        if imp.target.split(".")[0] == "argparse"
        and not (name == cli or name.startswith(cli + "."))
    ]


def gui_imports(root: Path) -> list[str]:
    return [
        f"{path.relative_to(root.parent)} line {imp.line} imports {imp.target}"
        for _, path, imp in _top_level_imports(root)
        if imp.target.split(".")[0].lower() in GUI_MODULES
        or imp.target.split(".")[0].lower().startswith(GUI_PREFIXES)
    ]


def undocumented_packages(root: Path) -> list[str]:
    out = []
    folders = {p.parent for p in root.rglob("*.py") if "__pycache__" not in p.parts}
    for folder in sorted(folders | {root}):
        init = folder / "__init__.py"
        rel = folder.relative_to(root.parent)
        if not init.is_file():
            out.append(f"{rel}/ has no __init__.py")
        elif not (ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or "").strip():
            out.append(f"{rel}/__init__.py has no docstring (say what lives there and what it "
                       "may import)")  # fmt: skip
    return out


def imports_torch(module: str, repo: Path = REPO) -> bool:
    """Whether importing ``module`` in a fresh interpreter loads torch."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"import {module} failed:\n{proc.stderr[-2000:]}"
    return proc.stdout.strip().splitlines()[-1] == "True"


# ---------------------------------------------------------------------------------------------
# The real tree
# ---------------------------------------------------------------------------------------------


def test_no_import_cycles():
    cycles = find_cycles(PACKAGE)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


SLICER_PACKAGES = (
    REPO / "SGPSegment" / "SGPSegmentLib",
    REPO / "SegmentEditorSGP" / "SegmentEditorSGPLib",
    REPO / "SegmentEditorSGP" / "SegmentEditorSGPWidgets",
)
"""The Slicer side's packages: the module's Qt-free Logic, the effect, the effect's panel."""


def test_no_import_cycles_in_the_slicer_module_and_effect():
    cycles = [c for root in SLICER_PACKAGES for c in find_cycles(root)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
    # Between the packages imports go one way only (effect -> Logic), so no cycle spans two.
    effect = {root.name for root in SLICER_PACKAGES[1:]}
    upward = [f"{path.relative_to(REPO)} line {imp.line} imports {imp.target}"
              for _, path, imp in _top_level_imports(SLICER_PACKAGES[0])
              if imp.target.split(".")[0] in effect]
    assert not upward, "the Logic imports the effect:\n" + "\n".join(upward)


def test_modules_and_classes_are_small():
    problems = oversize_modules(PACKAGE) + long_classes(PACKAGE)
    assert not problems, "too long:\n" + "\n".join(problems)


def test_argparse_only_in_cli():
    problems = argparse_outside_cli(PACKAGE)
    assert not problems, "argparse outside SlicerSGP/cli/:\n" + "\n".join(problems)


def test_engine_never_imports_slicer_qt_vtk():
    problems = gui_imports(PACKAGE)
    assert not problems, "\n".join(problems)


def test_every_package_is_documented():
    problems = undocumented_packages(PACKAGE)
    assert not problems, "\n".join(problems)


def test_import_slicersgp_does_not_load_torch():
    assert not imports_torch("SlicerSGP"), "import SlicerSGP loads torch"


def test_service_client_does_not_load_torch():
    if not (PACKAGE / "service" / "client.py").is_file():
        pytest.skip("SlicerSGP/service/client.py does not exist yet")
    assert not imports_torch("SlicerSGP.service.client"), "the service client loads torch"


# ---------------------------------------------------------------------------------------------
# Each checker can fail: a synthetic package in tmp_path
# ---------------------------------------------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for folder in {p.parent for p in root.rglob("*.py")}:
        if not (folder / "__init__.py").exists():
            (folder / "__init__.py").write_text('"""A package."""\n')
    return root


def test_checker_reports_cycles_lazy_and_relative(tmp_path):
    root = _package(
        tmp_path,
        {
            "a.py": "from pkg.sub import b\n",
            "sub/b.py": "def f():\n    from ..sub.c import g\n    return g\n",
            "sub/c.py": "import pkg.a\n\ndef g():\n    pass\n",
            "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.e\n",
            "e.py": "import pkg.d\n",
        },
    )
    cycles = find_cycles(root)
    assert len(cycles) == 1, cycles
    assert cycles[0] == (
        "pkg.a -> pkg.sub.b (pkg.a line 1) -> pkg.sub.c (pkg.sub.b line 2, lazy) "
        "-> pkg.a (pkg.sub.c line 1)"
    )
    # breaking the lazy edge breaks the cycle; TYPE_CHECKING imports never counted
    (root / "sub" / "b.py").write_text("def f():\n    return 1\n")
    assert find_cycles(root) == []


def test_checker_reports_oversize_modules_and_long_classes(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(260))
    root = _package(
        tmp_path,
        {
            "big.py": "\n".join(f"v{i} = {i}" for i in range(401)) + "\n",
            "ok.py": "\n".join(f"v{i} = {i}" for i in range(400)) + "\n",
            "long.py": f'class Long:\n    """Plain."""\n{body}\n',
            "explained.py": f'class Explained:\n    """Holds the table; long because it mirrors '
            f'the spec."""\n{body}\n',
        },
    )
    assert oversize_modules(root) == ["pkg/big.py: 401 lines (max 400)"]
    problems = long_classes(root)
    assert len(problems) == 1 and "class Long is 262 lines" in problems[0], problems


def test_checker_reports_argparse_gui_and_undocumented_packages(tmp_path):
    root = _package(
        tmp_path,
        {
            "cli/__init__.py": '"""CLI."""\nimport argparse\n',
            "cli/run.py": "import argparse\n",
            "tool.py": "def main():\n    from argparse import ArgumentParser\n",
            "view.py": "import slicerio\nimport vtk\nfrom qt import QTimer\n",
            "scene.py": "def f():\n    import MRMLCorePython\n",
            "bare/__init__.py": "X = 1\n",
            "bare/m.py": "",
        },
    )
    (root / "nodir").mkdir()
    (root / "nodir" / "m.py").write_text("")
    assert argparse_outside_cli(root) == ["pkg/tool.py line 2 imports argparse"]
    assert gui_imports(root) == [
        "pkg/scene.py line 2 imports MRMLCorePython",
        "pkg/view.py line 2 imports vtk",
        "pkg/view.py line 3 imports qt",
    ]
    assert undocumented_packages(root) == [
        "pkg/bare/__init__.py has no docstring (say what lives there and what it may import)",
        "pkg/nodir/ has no __init__.py",
    ]


def test_torch_check_sees_torch(tmp_path):
    root = _package(tmp_path, {"heavy.py": "import torch\n", "light.py": "import json\n"})
    assert imports_torch("pkg.heavy", root.parent)
    assert not imports_torch("pkg.light", root.parent)
