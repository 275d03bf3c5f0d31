"""Texts the Slicer side shows people are marked for translation as Slicer's templates do.

Slicer (5.4 on) translates a scripted module's texts with ``slicer.i18n``: ``_("text")``
(``tr``, whose context is the calling file) and ``translate(context, "text")``; Qt's lupdate
finds them in the source, so the argument must be a plain string literal, and a text with
values is ``_("... {name} ...").format(name=...)`` (an f-string cannot be translated).

:func:`untranslated` reads the source of the module, the effect, its panel and the Qt-free Lib
and names every literal text that reaches people without going through one of them: the module's
title, categories, help and acknowledgement, texts given to Qt (``text``, ``toolTip``,
``setText``, ``addItem``, dialogs), messages shown by ``slicer.util`` (``errorDisplay``,
``showStatusMessage``, ``tryWithErrorDisplay`` ...), exception messages, progress stages and
task titles, and texts the Lib returns to the panel. The self-tests' ``delayDisplay`` messages
are left as Slicer's own tests leave them. Mutants of the real files prove it catches each
kind; a run through the Logic proves the texts reach Qt's translator with Slicer's context.
"""

from __future__ import annotations

import ast
import re
import types
from pathlib import Path

import pytest
from module_fixtures import mrml  # noqa: F401  (fixture; also installs slicer.i18n)

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    [*ROOT.glob("SGPSegment/**/*.py"), *ROOT.glob("SegmentEditorSGP/**/*.py")]
)
WORDS = re.compile(r"[A-Za-z]{2}")
PLACEHOLDER = re.compile(r"(?<!\{)\{([^{}!:]+)[^{}]*\}(?!\})")  # {name}, {name!r}, {name:.1f}

SHOWN_ARGUMENTS = {
    # slicer.util and the Widget's own wrappers around it
    "errorDisplay": (0,), "infoDisplay": (0,), "warningDisplay": (0,),
    "confirmOkCancelDisplay": (0,), "confirmYesNoDisplay": (0,), "confirm": (0,),
    "showStatusMessage": (0,), "tryWithErrorDisplay": (0,), "errorsShown": (0,),
    "showProgress": (0,), "endSession": (0,),
    # Qt
    "setText": (0,), "setToolTip": (0,), "setWindowTitle": (0,), "setPlaceholderText": (0,),
    "QLabel": (0,), "QPushButton": (0,), "QCheckBox": (0,), "addItem": (0,),
    "QMessageBox": (1, 2), "setInformativeText": (0,), "setDetailedText": (0,),
    "getText": (1, 2), "getOpenFileName": (1, 3), "getSaveFileName": (1, 3),
    # progress shown in the panels
    "Step": (0,), "Task": (0,),
}  # fmt: skip
"""Calls whose arguments at these positions are shown to people (an ``addItem``'s data, a file
dialog's folder are not)."""
SHOWN_ATTRIBUTES = {"text", "toolTip", "title", "helpText", "acknowledgementText", "windowTitle",
                    "placeholderText", "statusTip", "stage", "categories"}  # fmt: skip
TRANSLATORS = {"_", "translate"}


def _name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")


def _isText(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and bool(WORDS.search(node.value))
    if isinstance(node, ast.JoinedStr):  # an f-string: its literal parts
        return any(isinstance(v, ast.Constant) and WORDS.search(v.value) for v in node.values)
    return False


def _bareTexts(node: ast.expr) -> list[ast.expr]:
    """Literal texts in ``node`` that reach the value without a translation call."""
    if _isText(node):
        return [node]
    if isinstance(node, ast.Call):
        if _name(node.func) in TRANSLATORS:
            return []
        if isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            return _bareTexts(node.func.value)  # "text {x}".format(...): the text itself
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("join", "strip"):
            return _bareTexts(node.func.value)
        return []  # another function's result: that function is checked where it returns
    children: list[ast.expr] = []
    if isinstance(node, ast.BinOp):
        children = [node.left, node.right]
    elif isinstance(node, ast.IfExp):
        children = [node.body, node.orelse]
    elif isinstance(node, ast.BoolOp):
        children = list(node.values)
    elif isinstance(node, (ast.Tuple, ast.List)):
        children = list(node.elts)
    elif isinstance(node, ast.Dict):
        children = [v for v in node.values if v is not None]
    elif isinstance(node, ast.Subscript):
        children = [node.value]
    return [text for child in children for text in _bareTexts(child)]


def _isSentence(text: ast.expr) -> bool:
    """Two words or more: what a returned text for people looks like (not a key, a mode or a
    command-line option)."""
    literal = text.value if isinstance(text, ast.Constant) else "".join(
        v.value for v in text.values if isinstance(v, ast.Constant))  # fmt: skip
    return bool(re.search(r"[A-Za-z]{2,}\S* +\S*[A-Za-z]{2,}", literal))


def untranslated(source: str, path: Path) -> list[str]:
    """``'file:line: text'`` for each text shown to people that is not marked for translation,
    and each translation call lupdate could not read (its text not a plain literal), and each
    ``_(...).format(...)`` whose names differ from the text's placeholders."""
    tree = ast.parse(source)
    libraryLike = "SGPSegmentLib" in path.parts or "SegmentEditorSGPWidgets" in path.parts
    found: list[ast.AST] = []
    problems: list[str] = []

    def report(node: ast.AST, why: str) -> None:
        problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {why}: {ast.unparse(node)[:90]}")

    class Visitor(ast.NodeVisitor):
        def visit_ClassDef(self, node: ast.ClassDef) -> None:
            if not node.name.endswith("Test"):  # self-tests: delayDisplay messages stay
                self.generic_visit(node)

        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
            if node.name == "helpText":  # the effect's help, shown in the Segment Editor
                for ret in (n for n in ast.walk(node) if isinstance(n, ast.Return) and n.value):
                    found.extend(_bareTexts(ret.value))
            self.generic_visit(node)

        def visit_Call(self, node: ast.Call) -> None:
            name = _name(node.func)
            if name in TRANSLATORS:
                texts = node.args[1:] if name == "translate" else node.args
                if not texts or any(not (isinstance(a, ast.Constant) and isinstance(a.value, str))
                                     for a in texts):  # fmt: skip
                    report(node, "not a plain string literal (lupdate cannot read it)")
            if isinstance(node.func, ast.Attribute) and node.func.attr == "format":
                inner = node.func.value
                if isinstance(inner, ast.Call) and _name(inner.func) == "_" and inner.args and \
                        isinstance(inner.args[0], ast.Constant):  # fmt: skip
                    wanted = set(PLACEHOLDER.findall(inner.args[0].value))
                    given = {k.arg for k in node.keywords}
                    if node.args or wanted != given:
                        report(node, f"placeholders {sorted(wanted)} but given {sorted(given)}")
            positions = SHOWN_ARGUMENTS.get(name, ())
            if name.endswith("Error"):
                positions = (0,)
            if name in ("information", "warning", "critical", "question") and isinstance(
                node.func, ast.Attribute
            ) and _name(node.func.value) == "QMessageBox":  # QMessageBox.warning(parent, ...)
                positions = (1, 2)
            for index in positions:
                if index < len(node.args):
                    found.extend(_bareTexts(node.args[index]))
            self.generic_visit(node)

        def visit_Assign(self, node: ast.Assign) -> None:
            for target in node.targets:
                pairs = [(target, node.value)]
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(target.elts, node.value.elts, strict=False))  # a.x, a.y = 1, 2
                for name, value in pairs:
                    if isinstance(name, ast.Attribute) and name.attr in SHOWN_ATTRIBUTES:
                        found.extend(_bareTexts(value))
            self.generic_visit(node)

        def visit_Return(self, node: ast.Return) -> None:
            if libraryLike and node.value is not None:
                found.extend(t for t in _bareTexts(node.value) if _isSentence(t))
            self.generic_visit(node)

    Visitor().visit(tree)
    for node in found:
        report(node, "not marked for translation")
    return sorted(set(problems))


def test_every_text_shown_to_people_is_marked_for_translation():
    problems = [p for path in SOURCES for p in untranslated(path.read_text(), path)]
    assert not problems, "\n".join(problems)


MUTANTS = [
    # (file, original, mutant): each kind of sink loses its translation
    ("SGPSegment/SGPSegment.py", 'self.parent.title = _("SGP Segment")',
     'self.parent.title = "SGP Segment"'),
    ("SGPSegment/SGPSegment.py", 'self.parent.helpText = (',
     'self.parent.helpText = "Segment structures." + ('),
    ("SGPSegment/SGPSegment.py",
     'self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]',
     'self.parent.categories = ["Segmentation"]'),
    ("SGPSegment/SGPSegment.py", 'reason or _(\n', 'reason or (\n'),
    ("SGPSegment/SGPSegment.py", 'self.errorsShown(_("Undo was not done."), waitCursor=True)',
     'self.errorsShown("Undo was not done.", waitCursor=True)'),
    ("SGPSegment/SGPSegment.py", '''slicer.util.errorDisplay(_(
                "SGP segmentation failed; nothing was written.\\n\\n{exc}"
            ).format(exc=exc))''', 'slicer.util.errorDisplay(f"SGP segmentation failed: {exc}")'),
    ("SGPSegment/SGPSegment.py", 'addItem(_("Remote server"), "remote")',
     'addItem("Remote server", "remote")'),
    ("SGPSegment/SGPSegment.py", '_("Save support set")', '"Save support set"'),
    ("SGPSegment/SGPSegment.py", "slicer.util.errorDisplay(message)",
     'qt.QMessageBox.critical(None, "SGP Segment", message)'),
    ("SegmentEditorSGP/SegmentEditorSGPLib/SegmentEditorEffect.py", "return _(\n", "return (\n"),
    ("SegmentEditorSGP/SegmentEditorSGPWidgets/panel.py",
     '_("Write the preview into the segments.")', '"Write the preview into the segments."'),
    ("SGPSegment/SGPSegmentLib/parameter_actions.py", 'return False, _("Select an input volume.")',
     'return False, "Select an input volume."'),
    ("SGPSegment/SGPSegmentLib/mrml_io.py", 'raise SGPInputError(_("Select an input volume."))',
     'raise SGPInputError("Select an input volume.")'),
    ("SGPSegment/SGPSegmentLib/runs.py", '_("starting engine")', '"starting engine"'),
    # untranslatable or broken translation calls
    ("SGPSegment/SGPSegmentLib/support_library.py", '_("{name} (not in the library)").format(name=selected)',
     '_(f"{selected} (not in the library)")'),
    ("SGPSegment/SGPSegmentLib/parameter_actions.py", '_("{title}: done.").format(title=task.title)',
     '_("{title}: done.").format(name=task.title)'),
]  # fmt: skip


@pytest.mark.parametrize("file, original, mutant", MUTANTS, ids=[m[2][:40] for m in MUTANTS])
def test_each_kind_of_untranslated_text_is_caught(file, original, mutant):
    path = ROOT / file
    source = path.read_text()
    assert original in source, f"{file} no longer holds {original!r}: update the mutant"
    assert not untranslated(source, path)
    caught = untranslated(source.replace(original, mutant, 1), path)
    assert caught, f"not caught: {mutant!r}"


def test_the_logic_hands_its_texts_to_slicers_translator(mrml, monkeypatch):  # noqa: F811
    """Through Slicer's rules (``slicer_i18n`` reproduces them): the Lib's texts reach
    ``slicer.app.translate`` with their file's context, values are put in after translation,
    and a translation that loses a placeholder is refused (the source text is shown)."""
    import slicer
    from SGPSegmentLib import SGPSegmentCoreLogic

    asked = []

    def translate(context, text):
        asked.append((context, text))
        if text == "Select an input volume.":
            return "Eingabevolumen auswählen."
        if text.startswith("Engine: {where}"):
            return "Rechner: {ort}"  # a bad translation: its placeholder differs
        return text

    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(translate=translate), raising=False)
    logic = SGPSegmentCoreLogic()
    pn = types.SimpleNamespace(inputVolume=None, segmentation=None, segmentIds="", model="tiny",
                               checkpointPath="", imageSize=256, device="cpu")  # fmt: skip
    assert logic.canRun(pn) == (False, "Eingabevolumen auswählen.")
    assert ("SGPSegmentLib.parameter_actions", "Select an input volume.") in asked
    summary = logic.engineSummary(pn)
    assert summary.startswith("Engine: ") and "model tiny at 256 px on cpu" in summary
    assert any(text.startswith("Engine: {where}") for _, text in asked)
