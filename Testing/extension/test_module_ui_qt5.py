"""The module's .ui files as Slicer's Qt 5.15 loads them (PyQt5 5.15 from PyPI, offscreen).

Slicer's official builds use Qt 5.15. Its .ui loader (``QFormBuilder``'s
``domPropertyToVariant``) turns ``<enum>Scope::Key</enum>`` into a value through the
property's own ``QMetaEnum``; a property declared ``int`` in C++ has none, so it becomes -1
(``qMRMLSegmentsTableView::selectionMode`` then selects nothing and Run never enables). Qt 6's
uic does not show this, so the check needs Qt 5.15.

Each ctk/qMRML class the .ui uses gets a stand-in QWidget subclass that declares the same
property names and types as Slicer's and CTK's C++ headers (named per class below). The .ui is
loaded with ``PyQt5.uic.loadUi``; then every property the .ui sets is compared with the value
the widget ends up with, where ``<enum>``/``<set>`` values are converted the way Qt 5.15's
loader does (through the property's metadata), because PyQt's own loader converts them in
Python and would hide the -1.
"""

from __future__ import annotations

import os
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtCore = pytest.importorskip(
    "PyQt5.QtCore", reason="PyQt5 5.15 is needed: pip install 'PyQt5==5.15.*'"
)
from PyQt5 import QtWidgets, uic  # noqa: E402
from PyQt5.QtCore import pyqtProperty, pyqtSignal  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
UI_FILES = sorted(ROOT.glob("SGPSegment*/Resources/UI/*.ui")) + sorted(
    ROOT.glob("SegmentEditor*/Resources/UI/*.ui")
)

QStringList = "QStringList"
MIN_PROPERTIES = {"SGPSegment.ui": 50, "SegmentEditorSGP.ui": 40}
"""Properties each .ui sets at least (a check that sees only part of a panel fails)."""

# ------------------------------------------------------------------------------ stand-ins
# class -> (base, header the declarations come from, {property: (type, default)}).
# Types follow the Q_PROPERTY lines of each header: int stays int (even where the values come
# from a Qt enum, as qMRMLSegmentsTableView's selectionMode), real enums use the enum type.
STANDINS: dict[str, tuple[str, str, dict[str, tuple[object, object]]]] = {
    "qMRMLWidget": ("QWidget", "Slicer Libs/MRML/Widgets/qMRMLWidget.h", {}),
    "qMRMLNodeComboBox": (
        "QWidget",
        "Slicer Libs/MRML/Widgets/qMRMLNodeComboBox.h",
        {
            "currentNodeID": (str, ""),
            "nodeTypes": (QStringList, []),
            "showHidden": (bool, False),
            "showChildNodeTypes": (bool, True),
            "hideChildNodeTypes": (QStringList, []),
            "baseName": (str, ""),
            "noneEnabled": (bool, False),
            "addEnabled": (bool, True),
            "removeEnabled": (bool, True),
            "editEnabled": (bool, False),
            "renameEnabled": (bool, False),
            "interactionNodeSingletonTag": (str, ""),
            "selectNodeUponCreation": (bool, True),
            "noneDisplay": (str, "None"),
            "sizeAdjustPolicy": (
                QtWidgets.QComboBox.SizeAdjustPolicy,
                QtWidgets.QComboBox.AdjustToContentsOnFirstShow,
            ),
        },
    ),
    # Declares no property of its own (Slicer Libs/MRML/Widgets/qMRMLCheckableNodeComboBox.h).
    "qMRMLCheckableNodeComboBox": (
        "qMRMLNodeComboBox",
        "Slicer Libs/MRML/Widgets/qMRMLCheckableNodeComboBox.h",
        {},
    ),
    "qMRMLSegmentsTableView": (
        "qMRMLWidget",
        "Slicer Modules/Loadable/Segmentations/Widgets/qMRMLSegmentsTableView.h",
        {
            "selectionMode": (int, 3),  # Q_PROPERTY(int selectionMode ...): an int, not the enum
            "headerVisible": (bool, True),
            "visibilityColumnVisible": (bool, True),
            "colorColumnVisible": (bool, True),
            "opacityColumnVisible": (bool, True),
            "statusColumnVisible": (bool, False),
            "layerColumnVisible": (bool, False),
            "readOnly": (bool, False),
            "filterBarVisible": (bool, False),
            "textFilter": (str, ""),
            "jumpToSelectedSegmentEnabled": (bool, False),
            "useTerminologySelectorSettingsKey": (str, ""),
            "useTerminologySelector": (bool, False),
            "terminologySelectorOptionVisible": (bool, False),
            "terminologySelectorAutoDisable": (bool, True),
        },
    ),
    "qMRMLTableView": (
        "QTableView",
        "Slicer Libs/MRML/Widgets/qMRMLTableView.h",
        {
            "transposed": (bool, False),
            "firstRowLocked": (bool, False),
            "firstColumnLocked": (bool, False),
        },
    ),
    "ctkCollapsibleButton": (
        "QAbstractButton",
        "CTK Libs/Widgets/ctkCollapsibleButton.h",
        {
            "collapsed": (bool, False),
            "collapsedHeight": (int, 14),
            "contentsFrameShape": (QtWidgets.QFrame.Shape, QtWidgets.QFrame.NoFrame),
            "contentsFrameShadow": (QtWidgets.QFrame.Shadow, QtWidgets.QFrame.Plain),
            "contentsLineWidth": (int, 1),
            "contentsMidLineWidth": (int, 0),
        },
    ),
    "ctkPathLineEdit": (
        "QWidget",
        "CTK Libs/Widgets/ctkPathLineEdit.h",
        {
            "label": (str, ""),
            "currentPath": (str, ""),
            "settingKey": (str, ""),
            "showBrowseButton": (bool, True),
            "showHistoryButton": (bool, True),
            "minimumContentsLength": (int, 0),
            "nameFilters": (QStringList, []),
        },
    ),
}


class PointerSignal:
    """A signal with a C++ pointer argument (``mrmlSceneChanged(vtkMRMLScene*)``): PyQt5 cannot
    declare that type, so the pointer travels as a Python object; indexing with the C++
    signature (as uic does for .ui connections) gives the bound signal."""

    def __init__(self, cppSignature: str) -> None:
        self.cppSignature = cppSignature

    def __set_name__(self, owner, name) -> None:
        self.attribute = f"_{name}_signal"

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        bound = getattr(obj, self.attribute)
        signature = self.cppSignature

        class Indexable:
            def __getitem__(self, key):
                assert key == signature, (
                    f"connection asks for {key}, the class declares {signature}"
                )
                return bound

            def connect(self, slot):
                return bound.connect(slot)

            def emit(self, *args):
                return bound.emit(*args)

        return Indexable()


def _property(name: str, type_, default):
    def getter(self):
        return self._values.get(name, default)

    def setter(self, value):
        self._values[name] = value

    return pyqtProperty(type_, getter, setter), getter, setter


def _makeStandIn(className: str, classes: dict) -> type:
    baseName, header, properties = STANDINS[className]
    base = classes.get(baseName) or getattr(QtWidgets, baseName)
    namespace = {"__module__": className, "__doc__": f"Stand-in for {className} ({header})."}
    for name, (type_, default) in properties.items():
        prop, getter, setter = _property(name, type_, default)
        namespace[name] = prop
        namespace["set" + name[0].upper() + name[1:]] = setter

    def __init__(self, parent=None):
        base.__init__(self, parent)
        self._values = {}
        self.scenes = []  # what setMRMLScene received

    namespace["__init__"] = __init__
    namespace["setMRMLScene"] = lambda self, scene: self.scenes.append(scene)
    if className == "qMRMLWidget" or className == "qMRMLTableView":
        namespace["_mrmlSceneChanged_signal"] = pyqtSignal(object)
        namespace["mrmlSceneChanged"] = PointerSignal("vtkMRMLScene*")
    if baseName == "QAbstractButton":
        namespace["paintEvent"] = lambda self, event: None
    return type(className, (base,), namespace)


@pytest.fixture(scope="module")
def standIns():
    """The stand-in classes, importable the way uic imports a custom widget (by header)."""
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    classes: dict[str, type] = {}
    for className in STANDINS:  # bases are listed before their subclasses
        classes[className] = _makeStandIn(className, classes)
        module = types.ModuleType(className)
        setattr(module, className, classes[className])
        sys.modules[className] = module
    yield classes
    for className in STANDINS:
        sys.modules.pop(className, None)
    del app


# ------------------------------------------------------------------------------- checker


def _enumKey(text: str) -> str:
    return text.split("::")[-1]  # Qt's fixEnum: the loader drops the scope


def _pythonEnum(text: str) -> int:
    """The value the .ui author meant for ``Scope::Key`` (looked up in PyQt5's Qt classes)."""
    scope, _, key = text.rpartition("::")
    holder = (
        QtCore.Qt
        if scope in ("", "Qt")
        else (getattr(QtWidgets, scope, None) or getattr(QtCore, scope))
    )
    return int(getattr(holder, key))


def expectedValue(kind: str, element: ET.Element):
    text = element.text or ""
    if kind == "string":
        return text
    if kind == "bool":
        return text == "true"
    if kind == "number":
        return int(text)
    if kind == "double":
        return float(text)
    if kind == "stringlist":
        return [s.text or "" for s in element.findall("string")]
    if kind == "enum":
        return _pythonEnum(text)
    if kind == "set":
        value = 0
        for part in text.split("|"):
            value |= _pythonEnum(part.strip())
        return value
    if kind == "rect":
        return QtCore.QRect(*(int(element.findtext(k)) for k in ("x", "y", "width", "height")))
    raise AssertionError(f"the checker does not know .ui property kind <{kind}> yet; add it")


def qt515LoaderValue(widget, name: str, kind: str, text: str):
    """What Qt 5.15's QFormBuilder makes of <enum>/<set> for this widget's property."""
    meta = widget.metaObject()
    prop = meta.property(meta.indexOfProperty(name))
    enumerator = prop.enumerator()
    if not prop.isEnumType() or not enumerator.isValid():
        return -1  # keyToValue on an invalid QMetaEnum
    if kind == "enum":
        value, ok = enumerator.keyToValue(_enumKey(text).encode())
    else:
        value, ok = enumerator.keysToValue(
            "|".join(_enumKey(p.strip()) for p in text.split("|")).encode()
        )
    return value if ok else -1


def uiProperties(uiFile: Path):
    """``(objectName, className, property, kind, element, stdset)`` for every widget property."""
    tree = ET.parse(uiFile)
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            value = next(iter(prop))
            yield (
                widget.get("name"),
                widget.get("class"),
                prop.get("name"),
                value.tag,
                value,
                prop.get("stdset", "1") != "0",
            )


def checkUi(uiFile: Path, classes: dict) -> list[str]:
    """Every property set in the .ui, as it arrives in Qt 5.15; returns the problems."""
    top = uic.loadUi(str(uiFile))
    problems = []
    for objectName, className, name, kind, element, stdset in uiProperties(uiFile):
        widget = (
            top if top.objectName() == objectName else top.findChild(QtCore.QObject, objectName)
        )
        if widget is None:
            problems.append(f"{objectName}: not created")
            continue
        header = STANDINS.get(className, (None, f"Qt's {className}", None))[1]
        if not stdset:  # dynamic property, e.g. SlicerParameterName
            if widget.property(name) != expectedValue(kind, element):
                problems.append(
                    f"{objectName}.{name}: dynamic property is {widget.property(name)!r}"
                )
            continue
        meta = widget.metaObject()
        if meta.indexOfProperty(name) < 0:
            problems.append(f"{objectName} ({className}) has no property {name!r} ({header})")
            continue
        expected = expectedValue(kind, element)
        if kind in ("enum", "set"):
            actual = qt515LoaderValue(widget, name, kind, element.text or "")
        else:
            actual = widget.property(name)
        if kind == "double":
            ok = abs(float(actual) - expected) < 1e-9
        else:
            ok = actual == expected
        if not ok:
            typeName = meta.property(meta.indexOfProperty(name)).typeName()
            hint = ""
            if kind in ("enum", "set") and actual == -1:
                hint = (
                    f"; {className}::{name} is declared {typeName} ({header}), so Qt 5.15's "
                    "loader sets -1: set this property in code instead"
                )
            problems.append(
                f"{objectName}.{name}: the .ui sets {expected!r}, Qt 5.15 gives {actual!r}{hint}"
            )
    top.deleteLater()
    return problems


# ---------------------------------------------------------------------------------- tests


def test_stand_ins_declare_the_header_types(standIns):
    """The stand-ins' metadata says what the C++ headers say (int stays int, enums are enums)."""
    for className, (_, header, properties) in STANDINS.items():
        meta = standIns[className].staticMetaObject
        for name, (type_, _) in properties.items():
            prop = meta.property(meta.indexOfProperty(name))
            assert prop.isValid(), f"{className}.{name}"
            isEnum = isinstance(type_, type) and issubclass(type_, int) and type_ not in (int, bool)
            assert prop.isEnumType() == isEnum, f"{className}.{name} ({header})"
    selection = standIns["qMRMLSegmentsTableView"].staticMetaObject
    assert selection.property(selection.indexOfProperty("selectionMode")).typeName() == "int"


@pytest.mark.parametrize("uiFile", UI_FILES, ids=lambda p: p.name)
def test_every_ui_property_arrives_in_qt515(uiFile, standIns):
    used = {w.get("class") for w in ET.parse(uiFile).iter("widget")}
    custom = {c for c in used if c.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= set(STANDINS), (
        f"add stand-ins (from the headers) for {sorted(custom - set(STANDINS))}"
    )
    problems = checkUi(uiFile, standIns)
    assert not problems, "\n".join(problems)
    # The check saw the whole panel (the module's and the Segment Editor effect's).
    assert len(list(uiProperties(uiFile))) >= MIN_PROPERTIES[uiFile.name]


def test_ui_connections_reach_every_mrml_widget(standIns):
    """The .ui's mrmlSceneChanged(vtkMRMLScene*) connections are made and deliver the scene."""
    uiFile = ROOT / "SGPSegment" / "Resources" / "UI" / "SGPSegment.ui"
    top = uic.loadUi(str(uiFile))
    scene = object()
    top.mrmlSceneChanged.emit(scene)
    receivers = {c.findtext("receiver") for c in ET.parse(uiFile).iter("connection")}
    assert receivers
    for name in receivers:
        assert top.findChild(QtCore.QObject, name).scenes == [scene], name


def test_checker_reports_an_enum_given_to_an_int_property(tmp_path, standIns):
    """The Qt 5.15 failure this file exists for: selectionMode as <enum> arrives as -1."""
    ui = tmp_path / "enum_on_int.ui"
    ui.write_text("""<?xml version="1.0" encoding="UTF-8"?>
<ui version="4.0">
 <class>Probe</class>
 <widget class="qMRMLWidget" name="Probe">
  <layout class="QVBoxLayout" name="layout">
   <item>
    <widget class="qMRMLSegmentsTableView" name="segmentsTableView">
     <property name="selectionMode">
      <enum>QAbstractItemView::MultiSelection</enum>
     </property>
     <property name="headerVisible">
      <bool>false</bool>
     </property>
    </widget>
   </item>
   <item>
    <widget class="ctkCollapsibleButton" name="button">
     <property name="contentsFrameShape">
      <enum>QFrame::StyledPanel</enum>
     </property>
    </widget>
   </item>
  </layout>
 </widget>
 <customwidgets>
  <customwidget><class>qMRMLWidget</class><extends>QWidget</extends><header>qMRMLWidget.h</header><container>1</container></customwidget>
  <customwidget><class>qMRMLSegmentsTableView</class><extends>qMRMLWidget</extends><header>qMRMLSegmentsTableView.h</header></customwidget>
  <customwidget><class>ctkCollapsibleButton</class><extends>QWidget</extends><header>ctkCollapsibleButton.h</header></customwidget>
 </customwidgets>
</ui>
""")
    problems = checkUi(ui, standIns)
    assert len(problems) == 1, problems  # the real enum property (contentsFrameShape) is fine
    assert problems[0].startswith(
        "segmentsTableView.selectionMode: the .ui sets 2, Qt 5.15 gives -1"
    )
    assert "declared int" in problems[0] and "qMRMLSegmentsTableView.h" in problems[0]
    assert "set this property in code" in problems[0]
