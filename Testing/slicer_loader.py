"""Load the extension the way Slicer 5.10 loads it, without Slicer: run as a script.

``python slicer_loader.py QT_SCRIPTED_MODULES_DIR`` prints one JSON object describing what
happened. It is run in a fresh process (Testing/extension/test_slicer_loading.py) because it fills
``sys.modules`` the way Slicer does, which must not leak into other tests.

What is reproduced exactly (from Slicer's sources):

* The installed layout is one folder, ``lib/Slicer-X.Y/qt-scripted-modules``, that is on
  ``sys.path``; the source tree is not.
* A scripted module is each top-level ``*.py`` of that folder, loaded by
  ``qSlicerScriptedLoadableModule::setPythonSource``: module name = file stem, the file run with
  ``importlib.util.spec_from_file_location`` and stored in ``sys.modules`` under that name, the
  class of the same name instantiated with the module's C++ object as ``parent``.
  ``startupCompleted()`` is emitted once every module is loaded.
* A Segment Editor effect is loaded by ``qSlicerSegmentEditorScriptedEffect::setPythonSource``:
  Python module name = the file's *parent folder* name (``PyImport_AddModule``: an existing
  ``sys.modules`` entry is reused if it already has the class), class name = file stem
  (+ "Effect" unless it ends so), loaded by ``qSlicerScriptedUtils::loadSourceAsModule`` as
  above; the instance is set as ``slicer.<moduleName>``. An exception in a method the C++ side
  calls (``setupOptionsFrame`` ...) is printed and swallowed, as ``qSlicerPythonCppAPI`` does:
  here it is recorded in ``errors``.
* The Segment Editor widget uses a clone of the registered effect (``clone()``), then calls
  ``setMRMLDefaults`` and ``setupOptionsFrame``.

Stand-ins, minimal, only for what is compiled C++ in Slicer (``qt``, ``ctk``, ``slicer.app``,
the effect adaptor, ``SegmentEditorEffects``' abstract base) and for Slicer's pure-Python
``slicer.ScriptedLoadableModule``/``parameterNodeWrapper`` and ``slicer.i18n`` (as
:mod:`slicer_i18n` reproduces it; not in the slicer-core wheel).
``slicer`` itself is the real slicer-core package (MRML, ``slicer.util``), so ``loadUI``,
``childWidgetVariables`` and ``getModuleLogic`` run Slicer's own code. ``loadUI`` builds its
widget tree from the .ui file's XML, so a widget name the panel uses must exist there.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import traceback
import types
import xml.etree.ElementTree as ET
from pathlib import Path

ERRORS: list[str] = []
"""Exceptions raised in Python methods called from 'C++' (Slicer prints and swallows them)."""


def callFromCpp(method, *args):
    """``qSlicerPythonCppAPI::callMethod``: a Python error is printed, the call returns None."""
    try:
        return method(*args)
    except Exception:
        ERRORS.append(traceback.format_exc())
        return None


# ---------------------------------------------------------------------------------- qt


class Signal:
    def __init__(self):
        self.slots = []


class QObject:
    """PythonQt's view of a QObject: properties as attributes, string-signature connect."""

    def __init__(self, *args, **kwargs):
        self._signals: dict[str, list] = {}
        self._children: list[QObject] = []
        self.name = ""
        self.args = args

    def connect(self, signal, slot=None):
        self._signals.setdefault(signal, []).append(slot)
        return True

    def disconnect(self, signal, slot=None):
        slots = self._signals.get(signal, [])
        if slot in slots:
            slots.remove(slot)
        return True

    def emit(self, signal, *args):
        for slot in list(self._signals.get(signal, [])):
            callFromCpp(slot, *args)

    def children(self):
        return list(self._children)

    def className(self):
        return getattr(self, "_className", type(self).__name__)

    def blockSignals(self, block):
        return False

    def __getattr__(self, name):
        # Any other Qt method: accepted and recorded (these stand-ins check loading, not Qt).
        if name.startswith("_"):
            raise AttributeError(name)

        def method(*args, **kwargs):
            self.__dict__.setdefault("_calls", []).append((name, args))
            return None

        return method


class QTimer(QObject):
    def __init__(self, *args):
        super().__init__(*args)
        self.active = False

    def start(self, *args):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active


class QWidget(QObject):
    pass


class QIcon(QObject):
    pass


class QFile(QObject):
    ReadOnly = 1

    def __init__(self, path):
        super().__init__(path)
        self.path = str(path)

    def exists(self):
        return Path(self.path).is_file()

    def open(self, mode):
        return self.exists()


class QUiLoader(QObject):
    """Builds the widget tree a .ui file declares (class and object name of each widget)."""

    def load(self, qfile):
        root = ET.parse(qfile.path).getroot().find("widget")
        return self._build(root) if root is not None else None

    def _build(self, element):
        widget = QWidget()
        widget.name = element.get("name") or ""
        widget._className = element.get("class") or "QWidget"
        for child in element.iter("widget"):
            if child is element:
                continue
            leaf = QWidget()
            leaf.name = child.get("name") or ""
            leaf._className = child.get("class") or "QWidget"
            widget._children.append(leaf)
        return widget


def makeQt():
    qt = types.ModuleType("qt")
    for name in ("QLabel", "QListWidgetItem", "QSettings", "QMessageBox", "QPushButton",
                 "QVBoxLayout", "QFormLayout", "QCursor", "QColor", "QCheckBox"):  # fmt: skip
        setattr(qt, name, type(name, (QWidget,), {}))
    qt.QObject, qt.QWidget, qt.QTimer, qt.QIcon = QObject, QWidget, QTimer, QIcon
    qt.QFile, qt.QUiLoader = QFile, QUiLoader
    qt.Qt = types.SimpleNamespace(UserRole=32, Checked=2, Unchecked=0, ItemIsUserCheckable=16)
    qt.QAbstractItemView = types.SimpleNamespace(MultiSelection=2)
    return qt


# ------------------------------------------------------------------------- slicer.app etc.


class ScriptedModuleObject(QObject):
    """``qSlicerScriptedLoadableModule``: the C++ side of a scripted module."""

    def __init__(self, name, path):
        super().__init__()
        self.name = name
        self.path = str(path)
        self.hidden = False
        self.title = name
        self.categories = []
        self.dependencies = []
        self.contributors = []
        self.helpText = ""
        self.acknowledgementText = ""
        self._self = None
        self._widget = None

    def self(self):
        return self._self

    def widgetRepresentation(self):
        """Created on first use, as Slicer does: the module's ``<Name>Widget`` class; its
        ``setup()`` is not run, only the Logic it creates there (the module panel is not
        under test here; test_module_ui_qt5.py loads its .ui)."""
        if self._widget is None:
            module = sys.modules[self.name]
            widgetClass = getattr(module, self.name + "Widget")
            logicClass = getattr(module, self.name + "Logic")
            representation = ScriptedWidgetObject()
            widget = widgetClass(representation)
            widget.logic = logicClass()
            representation._self = widget
            self._widget = representation
        return self._widget

    def logic(self):
        return None


class ScriptedWidgetObject(QObject):
    def self(self):
        return self._self


class ModuleManager:
    def __init__(self):
        self.modules: dict[str, ScriptedModuleObject] = {}

    def module(self, name):
        return self.modules.get(name)


class App(QObject):
    majorVersion = 5
    minorVersion = 10

    def __init__(self):
        super().__init__()
        self.manager = ModuleManager()

    def moduleManager(self):
        return self.manager

    def processEvents(self):
        pass

    def translate(self, context, text):
        return text  # QCoreApplication::translate with no translator loaded


def loadSourceAsModule(moduleName: str, fileName: str):
    """``qSlicerScriptedUtils::loadSourceAsModule``."""
    spec = importlib.util.spec_from_file_location(moduleName, fileName)
    module = importlib.util.module_from_spec(spec)
    sys.modules[moduleName] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------- the effect adaptor

REGISTERED_EFFECTS: list = []


class ScriptedEffect(QObject):
    """``qSlicerSegmentEditorScriptedEffect``."""

    def __init__(self, parent=None):
        super().__init__()
        self.name = "UnnamedScriptedEffect"
        self.perSegment = False
        self.requireSegments = False
        self.optionsWidgets: list = []
        self.parameters: dict[str, str] = {}
        self._self = None
        self.source = ""

    def setPythonSource(self, path: str) -> bool:
        if not path.endswith((".py", ".pyc")):
            return False
        moduleName = Path(path).parent.name  # the parent folder's name, not the file's
        className = Path(path).stem
        if not className.endswith("Effect"):
            className += "Effect"
        module = sys.modules.get(moduleName)
        if module is None:  # PyImport_AddModule creates an empty module
            module = sys.modules[moduleName] = types.ModuleType(moduleName)
        classToInstantiate = getattr(module, className, None)
        if classToInstantiate is None:
            try:
                module = loadSourceAsModule(moduleName, path)
            except Exception:
                ERRORS.append(traceback.format_exc())
                return False
            classToInstantiate = getattr(module, className, None)
        if classToInstantiate is None:
            ERRORS.append(f"class {className} was not found in {path}")
            return False
        self._self = callFromCpp(classToInstantiate, self)
        if self._self is None:
            return False
        self.source = path
        setattr(sys.modules["slicer"], moduleName, self._self)
        return True

    def self(self):
        return self._self

    def addOptionsWidget(self, widget):
        self.optionsWidgets.append(widget)

    def setParameterDefault(self, name, value):
        self.parameters.setdefault(name, str(value))

    def setParameter(self, name, value):
        self.parameters[name] = str(value)

    def parameter(self, name):
        return self.parameters.get(name, "")

    def integerParameter(self, name):
        return int(self.parameters.get(name) or 0)


class AbstractScriptedSegmentEditorEffect:
    """The part of Slicer's pure-Python base class that loading uses."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def register(self):
        # Slicer: qSlicerSegmentEditorEffectFactory.instance().registerEffect(scriptedEffect)
        REGISTERED_EFFECTS.append(self.scriptedEffect)


# ------------------------------------------------------- pure-Python parts of Slicer


def makeScriptedLoadableModule():
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()

        def getParameterNode(self):
            raise NotImplementedError("parameter nodes are not part of the loader check")

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest:
        pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleWidget, ScriptedLoadableModuleTest):  # fmt: skip
        setattr(slm, cls.__name__, cls)
    return slm


def makeParameterNodeWrapper():
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = lambda *a, **k: ("Choice", a)
    pnw.WithinRange = lambda *a, **k: ("WithinRange", a)
    return pnw


def installStandIns():
    import slicer  # the real slicer-core package: MRML and slicer.util
    import slicer_i18n

    slicer_i18n.install()

    sys.modules["qt"] = makeQt()
    sys.modules["ctk"] = types.ModuleType("ctk")
    slicer.app = App()
    slicer.qSlicerScriptedLoadableModule = ScriptedModuleObject
    slicer.qSlicerScriptedLoadableModuleWidget = ScriptedWidgetObject
    slicer.modules = types.SimpleNamespace()
    slicer.ScriptedLoadableModule = sys.modules["slicer.ScriptedLoadableModule"] = (
        makeScriptedLoadableModule()
    )
    slicer.parameterNodeWrapper = sys.modules["slicer.parameterNodeWrapper"] = (
        makeParameterNodeWrapper()
    )
    effects = types.ModuleType("SegmentEditorEffects")
    effects.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    sys.modules["SegmentEditorEffects"] = effects
    adaptor = types.ModuleType("qSlicerSegmentationsEditorEffectsPythonQt")
    adaptor.qSlicerSegmentEditorScriptedEffect = ScriptedEffect
    sys.modules["qSlicerSegmentationsEditorEffectsPythonQt"] = adaptor
    return slicer


# -------------------------------------------------------------------------------- main


def pressKeys(effect, panel) -> dict:
    """Keys pressed over a slice view, as the editor hands them to the effect: for each, whether
    the effect took it and the mode parameter after it. The panel's refresh is skipped: its
    widgets are stand-ins here."""
    import vtk

    class Interactor:
        def __init__(self, key):
            self.key = key

        def GetKeySym(self):
            return self.key

        def GetControlKey(self):
            return False

        GetAltKey = GetShiftKey = GetControlKey

        def GetEventPosition(self):
            return (0, 0)

    class SliceWidget:
        def className(self):
            return "qMRMLSliceWidget"

    panel.updateGUI = lambda: None
    view = SliceWidget()
    pressed = {}
    for key in ("s", "x", "b"):
        taken = effect.processInteractionEvents(Interactor(key), vtk.vtkCommand.KeyPressEvent, view)
        pressed[key] = [bool(taken), effect.scriptedEffect.parameter("SGPPromptMode")]
    return pressed


def main(folder: Path) -> dict:
    sys.path.insert(0, str(folder))
    slicer = installStandIns()
    report: dict = {"modules": {}, "effects": [], "errors": ERRORS}
    for path in sorted(folder.glob("*.py")):  # scripted modules: top-level files only
        name = path.stem
        moduleObject = ScriptedModuleObject(name, path)
        try:
            module = loadSourceAsModule(name, str(path))
            moduleObject._self = getattr(module, name)(moduleObject)
        except Exception:
            ERRORS.append(traceback.format_exc())
            continue
        slicer.app.manager.modules[name] = moduleObject
        setattr(slicer.modules, name.lower(), moduleObject)
        report["modules"][name] = {"hidden": moduleObject.hidden, "file": module.__file__}
    slicer.app.emit("startupCompleted()")
    for registered in list(REGISTERED_EFFECTS):
        effect = callFromCpp(registered.self().clone)  # what an editor widget holds
        entry = {"name": registered.name, "source": registered.source, "panel": None}
        report["effects"].append(entry)
        if effect is None:
            continue
        callFromCpp(effect.self().setMRMLDefaults)
        callFromCpp(effect.self().setupOptionsFrame)
        panel = getattr(effect.self(), "panel", None)
        entry["parameters"] = dict(effect.parameters)
        entry["optionsWidgets"] = [w.name for w in effect.optionsWidgets]
        if panel is not None:
            panelModule = sys.modules[type(panel).__module__]
            names = sorted(k for k in vars(panel.ui) if not k.startswith("_"))
            entry["panel"] = {
                "class": f"{type(panel).__module__}.{type(panel).__name__}",
                "file": panelModule.__file__,
                "logic": type(panel.logic).__name__,
                "moduleLogic": type(panel.moduleLogic).__name__,
                "uiWidgets": names,
                "keys": callFromCpp(pressKeys, effect.self(), panel),
            }
    report["sysModules"] = {
        name: getattr(sys.modules[name], "__file__", None)
        for name in ("SGPSegment", "SegmentEditorSGP", "SegmentEditorSGPLib", "SGPSegmentLib",
                     "SlicerSGP")  # fmt: skip
        if name in sys.modules
    }
    report["torchImported"] = "torch" in sys.modules
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]).resolve()), default=str))
