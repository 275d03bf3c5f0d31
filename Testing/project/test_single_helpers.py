"""Each small helper is written once: file hashing and atomic file/folder writes in
``SlicerSGP/filesystem.py``, the processor's name in ``SlicerSGP/host.py``, the NRRD codec in
``SlicerSGP/data/nrrd.py``. An AST scan of the engine, the Slicer module, the effect and the
benchmarks fails when a second copy appears; each checker is first shown to find a copy in a
small synthetic file.

What counts as a copy:

* hashing a file in chunks: a loop that both ``.read(...)``s and ``.update(...)``s;
* publishing a file or folder by renaming: ``os.replace``, ``os.rename``, ``shutil.move``, or a
  ``.replace(x)`` / ``.rename(x)`` call with one argument (``Path.replace``; ``str.replace``
  takes two);
* reading the processor's name: the text ``/proc/cpuinfo``;
* an NRRD header: text starting with ``NRRD000``.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("SlicerSGP", "SGPSegment", "SegmentEditorSGP", "benchmarks")
OWNERS = {
    "file hashing": "SlicerSGP/filesystem.py",
    "rename into place": "SlicerSGP/filesystem.py",
    "processor name": "SlicerSGP/host.py",
    "NRRD codec": "SlicerSGP/data/nrrd.py",
}


def _called_name(call: ast.Call) -> str:
    f = call.func
    if isinstance(f, ast.Attribute):
        base = f.value.id if isinstance(f.value, ast.Name) else ""
        return f"{base}.{f.attr}" if base else f".{f.attr}"
    return f.id if isinstance(f, ast.Name) else ""


def _hashes_in_chunks(loop: ast.AST) -> bool:
    names = {_called_name(n) for n in ast.walk(loop) if isinstance(n, ast.Call)}
    return any(n.endswith(".read") for n in names) and any(n.endswith(".update") for n in names)


def _renames(call: ast.Call) -> bool:
    name = _called_name(call)
    if name in ("os.replace", "os.rename", "os.renames", "shutil.move"):
        return True
    return name in (".replace", ".rename") and len(call.args) == 1 and not call.keywords


def helper_copies(path: Path, rel: str) -> list[str]:
    """``'<helper>: <rel> line <n>'`` for each copy of an owned helper in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        kind = None
        if isinstance(node, (ast.For, ast.While)) and _hashes_in_chunks(node):
            kind = "file hashing"
        elif isinstance(node, ast.Call) and _renames(node):
            kind = "rename into place"
        elif isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
            if "/proc/cpuinfo" in text:
                kind = "processor name"
            elif text.startswith("NRRD000"):
                kind = "NRRD codec"
        if kind and OWNERS[kind] != rel:
            found.append(f"{kind}: {rel} line {node.lineno} (use {OWNERS[kind]})")
    return found


def scan(root: Path, folders=SCANNED) -> list[str]:
    out = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out += helper_copies(path, path.relative_to(root).as_posix())
    return out


def test_no_helper_is_written_twice():
    copies = scan(REPO)
    assert not copies, "a helper written again; use its owner:\n" + "\n".join(copies)


def test_the_owners_hold_what_the_scan_looks_for():
    """The scan finds the owners' own implementations (so it is not looking for nothing)."""
    found = [line.split(":")[0] for rel in set(OWNERS.values())
             for line in helper_copies(REPO / rel, "elsewhere.py")]
    assert sorted(set(found)) == sorted(OWNERS), found


def test_the_scan_finds_each_kind_of_copy(tmp_path):
    (tmp_path / "SlicerSGP").mkdir()
    (tmp_path / "SlicerSGP" / "copy.py").write_text(textwrap.dedent('''
        import hashlib, os, shutil
        from pathlib import Path

        def digest(path):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            return h.hexdigest()

        def save(tmp, path):
            os.replace(tmp, path)
            Path(tmp).rename(path)
            shutil.move(tmp, path)
            return "a-b".replace("-", "+")  # two arguments: a string, not a file

        def cpu():
            return open("/proc/cpuinfo").read()

        HEADER = b"NRRD0004\\n"
    '''))
    copies = scan(tmp_path, ("SlicerSGP",))
    kinds = [c.split(":")[0] for c in copies]
    assert kinds.count("file hashing") == 1, copies
    assert kinds.count("rename into place") == 3, copies
    assert kinds.count("processor name") == 1 and kinds.count("NRRD codec") == 1, copies
    assert all("SlicerSGP/copy.py line " in c for c in copies)
