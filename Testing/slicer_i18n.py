"""``slicer.i18n`` for processes without the Slicer application (the ``slicer-core`` wheel has
no such module): :func:`install` puts one in place that follows Slicer's own rules
(``Base/Python/slicer/i18n.py``, Slicer 5.4 to 5.10), so the module's strings go through the
same calls as in Slicer and a mistake there fails here as it would there.

* ``translate(context, text)``: ``slicer.app.translate(context, text)`` (Qt's
  ``QCoreApplication::translate``: the text itself when no translator is loaded); without a
  ``slicer.app`` the text unchanged.
* ``tr(text)``: ``translate`` with the context of the *calling* file: ``Folder.stem`` when that
  file's folder holds an ``__init__.py`` (a package), else the file's stem; a translation whose
  ``{placeholders}`` differ from the source text's is refused (the source text is returned).

Installed only where ``import slicer.i18n`` fails: Slicer's own module wins when present.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import types

_CONTEXTS: dict[str, str] = {}
_PLACEHOLDER = re.compile(r"(?<!\{)\{([^\{\}]+)\}(?!\})")


def translate(context: str, text: str) -> str:
    try:
        from slicer import app
    except ImportError:  # no application: nothing to translate with
        return text
    return app.translate(context, text)


def getContext(sourceFile: str) -> str:
    """The translation context of a source file (see the module docstring)."""
    if sourceFile in _CONTEXTS:
        return _CONTEXTS[sourceFile]
    stem = os.path.basename(sourceFile).replace(".py", "")
    if os.path.isfile(sourceFile):
        folder = os.path.dirname(sourceFile)
        isPackage = os.path.isfile(folder + os.path.sep + "__init__.py")
        context = f"{os.path.basename(folder)}.{stem}" if isPackage else stem
    else:
        context = os.path.basename(sourceFile)
    _CONTEXTS[sourceFile] = context
    return context


def tr(text: str) -> str:
    caller = inspect.currentframe().f_back
    contextName = getContext(inspect.getsourcefile(caller) or inspect.getfile(caller))
    translated = translate(contextName, text)
    if set(_PLACEHOLDER.findall(text)) != set(_PLACEHOLDER.findall(translated)):
        logging.warning(
            f"In context '{contextName}', translation of '{text}' to '{translated}' is "
            "incorrect: placeholders do not match"
        )
        return text
    return translated


def install() -> None:
    """Make ``from slicer.i18n import tr, translate`` work in this process (once)."""
    import slicer

    try:
        import slicer.i18n  # noqa: F401  (Slicer's own, when there is one)
        return
    except ImportError:
        pass
    module = types.ModuleType("slicer.i18n")
    module.__doc__ = __doc__
    for function in (translate, getContext, tr):
        setattr(module, function.__name__, function)
    sys.modules["slicer.i18n"] = module
    slicer.i18n = module
