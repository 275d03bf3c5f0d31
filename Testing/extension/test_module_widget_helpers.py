"""The module Widget's error and confirmation helpers, run against stand-ins for Slicer.

The Widget needs Slicer's Qt and does not run here, so its helper methods are taken from
SGPSegment.py's source and run with stand-ins that behave as Slicer 5.10's do:
``slicer.util.tryWithErrorDisplay`` shows the error, restores the wait cursor and raises the
exception again; ``slicer.app.setOverrideCursor`` pushes on a cursor stack that
``restoreOverrideCursor`` pops.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import types
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "SGPSegment" / "SGPSegment.py"
WAIT, ARROW = "wait", "arrow"


class FakeApp:
    def __init__(self):
        self.cursors: list[str] = []

    def setOverrideCursor(self, cursor):
        self.cursors.append(getattr(cursor, "shape", cursor))

    def restoreOverrideCursor(self):
        self.cursors.pop()


def fakeSlicer(app, shown):
    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        if waitCursor:
            app.setOverrideCursor(WAIT)
        try:
            yield
        except Exception as exc:
            if waitCursor:
                app.restoreOverrideCursor()
            shown.append(f"{message}\n\n{exc}")
            raise  # as Slicer's does
        if waitCursor:
            app.restoreOverrideCursor()

    util = types.SimpleNamespace(tryWithErrorDisplay=tryWithErrorDisplay)
    return types.SimpleNamespace(app=app, util=util)


def widgetHelpers(slicer):
    """The Widget class's helper methods, compiled from the module's source."""
    tree = ast.parse(SOURCE.read_text())
    widget = next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SGPSegmentWidget"
    )
    wanted = {"errorsShown", "_asked", "confirmOkCancel", "confirmYesNo"}
    methods = [n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {m.name for m in methods} == wanted
    cls = ast.ClassDef("Helpers", [], [], methods, [])
    module = ast.fix_missing_locations(ast.Module([cls], []))
    qt = types.SimpleNamespace(
        Qt=types.SimpleNamespace(ArrowCursor=ARROW),
        QCursor=lambda shape: types.SimpleNamespace(shape=shape),
    )
    namespace = {"contextlib": contextlib, "logging": logging, "slicer": slicer, "qt": qt}
    exec(compile(module, str(SOURCE), "exec"), namespace)
    return namespace["Helpers"]()


def test_code_after_a_failed_block_still_runs_and_the_error_is_shown():
    app, shown = FakeApp(), []
    helpers = widgetHelpers(fakeSlicer(app, shown))
    after = []
    with helpers.errorsShown("Installing Python packages failed.", waitCursor=True):
        raise RuntimeError("pip: no network")
    after.append("status updated")  # what the Widget does after the block
    assert after == ["status updated"]
    assert shown == ["Installing Python packages failed.\n\npip: no network"]
    assert app.cursors == []  # the wait cursor is gone


def test_confirmation_shows_the_normal_cursor_inside_a_wait_cursor_block():
    app, shown = FakeApp(), []
    slicer = fakeSlicer(app, shown)
    seen = []

    def ask(message):
        seen.append((message, app.cursors[-1]))
        return True

    slicer.util.confirmOkCancelDisplay = ask
    slicer.util.confirmYesNoDisplay = lambda message: seen.append(app.cursors[-1]) or False
    helpers = widgetHelpers(slicer)
    with helpers.errorsShown("The support set was not saved.", waitCursor=True):
        assert app.cursors == [WAIT]
        assert helpers.confirmOkCancel("Install?") is True
        assert app.cursors == [WAIT]  # back to waiting after the question
        assert helpers.confirmYesNo("Replace?") is False
    assert seen == [("Install?", ARROW), ARROW]
    assert app.cursors == [] and shown == []


def test_the_widget_asks_and_shows_errors_only_through_the_helpers():
    """No confirmation dialog is passed to the Logic directly (it would show the wait cursor)
    and no ``tryWithErrorDisplay`` is used outside ``errorsShown`` (code after it would be
    skipped on an error)."""
    source = SOURCE.read_text()
    tree = ast.parse(source)
    widget = next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SGPSegmentWidget"
    )
    for node in ast.walk(widget):
        if isinstance(node, ast.keyword) and node.arg == "confirm":
            assert isinstance(node.value, ast.Attribute) and node.value.attr in (
                "confirmOkCancel",
                "confirmYesNo",
            ), ast.unparse(node)
    uses = [
        f.name
        for f in widget.body
        if isinstance(f, ast.FunctionDef) and "tryWithErrorDisplay(" in ast.unparse(f)
    ]
    assert uses == ["errorsShown"]


@pytest.mark.parametrize("name", ["onInstallDependencies", "onDownloadWeights", "onRunButton"])
def test_long_jobs_are_started_not_waited_for(name):
    """The handlers of installs, downloads and runs start a task or a run and return: none
    of them calls a blocking wait."""
    tree = ast.parse(SOURCE.read_text())
    widget = next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SGPSegmentWidget"
    )
    method = next(f for f in widget.body if isinstance(f, ast.FunctionDef) and f.name == name)
    text = ast.unparse(method)
    assert ".wait(" not in text and "processEvents" not in text
    assert "startTask(" in text or "startRunFromParameterNode(" in text
