"""The SGP effect's options panel: its widgets, timers and buttons, wired to the PreviewLogic.

Only wiring: what to preview, when to re-run (a single-shot timer restarted by every edit, so
a burst of modified events makes one run about a second after the last), progress polling,
Apply (after the editor's saveStateForUndo) and Cancel, the slice-view mode (box / click or
scribble) and the "not here" option. Decisions are the Logic's.
"""

import qt
import slicer
from SGPSegmentLib import edit_rules
from SGPSegmentLib.constants import AXIS_NAMES, PROMPT_MODES, axisDisplay
from slicer.i18n import tr as _

DEBOUNCE_MS = 1000
"""Wait after the last edit before re-running (a stroke sends several modified events)."""
POLL_MS = 150
SLICES_TO_CHECK = 8


class PreviewPanel:
    """One effect's panel and its preview session."""

    def __init__(self, scriptedEffect, logic, moduleLogic):
        self.scriptedEffect = scriptedEffect
        self.logic = logic
        self.moduleLogic = moduleLogic
        self.ui = None
        self.session = None
        self.setupTask = None  # packages or weights being installed before a preview
        self.chosenIds = []
        self.items = []  # the slices to check shown in the list
        self.observed = None
        self.pendingPrompt = None  # a first box, click or scribble waiting for its preview
        self.debounceTimer = qt.QTimer()
        self.debounceTimer.setSingleShot(True)
        self.debounceTimer.setInterval(DEBOUNCE_MS)
        self.debounceTimer.connect("timeout()", self.onDebounce)
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_MS)
        self.pollTimer.connect("timeout()", self.onPoll)

    def setup(self, uiPath):
        uiWidget = slicer.util.loadUI(uiPath)
        self.scriptedEffect.addOptionsWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.ui.orientationComboBox.addItem(_("Auto (the orientation you drew in)"), "auto")
        for name in AXIS_NAMES:
            self.ui.orientationComboBox.addItem(axisDisplay(name), name)
        self.ui.segmentsList.connect("itemChanged(QListWidgetItem*)", self.onSegmentChecked)
        self.ui.previewButton.connect("clicked()", self.onPreview)
        self.ui.stopButton.connect("clicked()", self.onStop)
        self.ui.applyButton.connect("clicked()", self.onApply)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.firstFromViewButton.connect("clicked()", lambda: self.onRangeFromView(True))
        self.ui.lastFromViewButton.connect("clicked()", lambda: self.onRangeFromView(False))
        self.ui.slicesToCheckList.connect("itemClicked(QListWidgetItem*)", self.onSliceToCheck)
        self.ui.autoUpdateCheckBox.connect("toggled(bool)", self.updateMRML)
        self.ui.boxModeButton.connect("toggled(bool)", self.updateMRML)
        self.ui.scribbleModeButton.connect("toggled(bool)", self.updateMRML)
        self.ui.notHereCheckBox.connect("toggled(bool)", self.onNotHereToggled)
        self.ui.supportSetComboBox.connect("currentIndexChanged(int)", self.onSupportSetChosen)
        self.ui.openModuleButton.connect(
            "clicked()", lambda: slicer.util.selectModule("SGPSegment")
        )
        self.ui.progressBar.setVisible(False)

    def cleanup(self):
        if self.setupTask is not None:  # nobody would poll it any more
            self.moduleLogic.cancelTask(self.setupTask)
        self.debounceTimer.stop()
        self.pollTimer.stop()
        self.debounceTimer.disconnect("timeout()", self.onDebounce)
        self.pollTimer.disconnect("timeout()", self.onPoll)
        self.observe(None)

    def hasPreview(self):
        return self.session is not None and self.session.result is not None

    # ------------------------------------------------------------------- MRML <-> panel

    def updateMRML(self, *args):
        self.scriptedEffect.setParameter("SGPAutoUpdate", int(self.ui.autoUpdateCheckBox.checked))
        mode = "scribble" if self.ui.scribbleModeButton.checked else "box"
        self.scriptedEffect.setParameter("SGPPromptMode", mode)

    @property
    def mode(self):
        mode = self.scriptedEffect.parameter("SGPPromptMode")
        return mode if mode in PROMPT_MODES else PROMPT_MODES[0]

    def setMode(self, mode):
        """A mode's key was pressed over a slice view."""
        self.scriptedEffect.setParameter("SGPPromptMode", mode)
        self.updateGUI()

    def updateGUI(self):
        editorNode = self.scriptedEffect.parameterSetNode()
        if self.session is not None and not slicer.mrmlScene.GetNodeByID(
            self.session.segmentationNodeID
        ):
            self.endSession(_("The preview's segmentation was removed."))  # e.g. scene closed
            return
        self.refreshSegmentList(editorNode)
        wasBlocked = self.ui.autoUpdateCheckBox.blockSignals(True)
        self.ui.autoUpdateCheckBox.checked = (
            self.scriptedEffect.integerParameter("SGPAutoUpdate") != 0
        )
        self.ui.autoUpdateCheckBox.blockSignals(wasBlocked)
        for button, mode in ((self.ui.boxModeButton, "box"), (self.ui.scribbleModeButton, "scribble")):
            wasBlocked = button.blockSignals(True)
            button.checked = self.mode == mode
            button.blockSignals(wasBlocked)
        self.refreshNotHere(editorNode)
        try:
            self.ui.rulesLabel.text = edit_rules.describe(
                edit_rules.rulesFromEditorNode(editorNode)
            )
        except Exception as exc:  # shown where the rules would be, not raised while drawing
            self.ui.rulesLabel.text = str(exc)
        pn = self.moduleLogic.getParameterNode()
        self.ui.engineLabel.text = self.moduleLogic.engineSummary(pn)
        self.refreshSupportSets(pn)
        running = (self.session is not None and self.session.running) or bool(self.setupTask)
        canApply, reason = self.logic.canApply(self.session)
        self.ui.applyButton.enabled = canApply and not running
        self.ui.applyButton.toolTip = reason or _("Write the preview into the segments.")
        self.ui.cancelButton.enabled = self.session is not None
        self.ui.stopButton.enabled = running
        self.ui.progressBar.setVisible(running)

    def refreshSegmentList(self, editorNode):
        segmentationNode = editorNode.GetSegmentationNode() if editorNode else None
        segmentation = segmentationNode.GetSegmentation() if segmentationNode else None
        ids = list(segmentation.GetSegmentIDs()) if segmentation else []
        self.chosenIds = [s for s in self.chosenIds if s in ids]
        if not self.chosenIds and editorNode and editorNode.GetSelectedSegmentID() in ids:
            self.chosenIds = [editorNode.GetSelectedSegmentID()]  # default: the selected one
        wasBlocked = self.ui.segmentsList.blockSignals(True)
        self.ui.segmentsList.clear()
        for segmentId in ids:
            item = qt.QListWidgetItem(segmentation.GetSegment(segmentId).GetName())
            item.setData(qt.Qt.UserRole, segmentId)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if segmentId in self.chosenIds else qt.Qt.Unchecked)
            self.ui.segmentsList.addItem(item)
        self.ui.segmentsList.blockSignals(wasBlocked)

    def refreshSupportSets(self, pn):
        """None + the saved sets, showing the module's choice (one place: runs and previews)."""
        chosen = self.moduleLogic.supportSetName(pn.parameterNode)
        try:
            choices = self.moduleLogic.supportSetChoices(chosen, details=False)
        except Exception:  # an unreadable library folder must not stop the panel
            choices = [("", "None")] + ([(chosen, chosen)] if chosen else [])
        combo = self.ui.supportSetComboBox
        wasBlocked = combo.blockSignals(True)
        if [combo.itemData(i) or "" for i in range(combo.count)] != [n for n, _ in choices]:
            combo.clear()
            for name, label in choices:
                combo.addItem(label, name)
        for index in range(combo.count):
            if (combo.itemData(index) or "") == chosen:
                combo.currentIndex = index
        combo.blockSignals(wasBlocked)

    def onSupportSetChosen(self, index):
        """A set chosen here is the module's choice too; an open preview updates with it."""
        if index < 0:
            return
        name = self.ui.supportSetComboBox.itemData(index) or ""
        try:
            if self.session is not None:  # the open preview first: a refused set changes nothing
                message = _("SGP preview could not use the support set.")
                with slicer.util.tryWithErrorDisplay(message):
                    if self.logic.setSupportSet(self.session, name) is not None:
                        self.pollTimer.start()
            pn = self.moduleLogic.getParameterNode()
            self.moduleLogic.setSupportSet(pn.parameterNode, name)
        finally:
            self.updateGUI()  # shows the module's choice again if the set was refused

    def notHereEnabled(self, editorNode):
        """The option's state: the user's choice, else on when Masking overwrites."""
        from SGPSegmentLib.preview import notHereDefault

        chosen = self.scriptedEffect.parameter("SGPNotHere")
        if chosen in ("0", "1"):
            return chosen == "1"
        return editorNode is not None and notHereDefault(editorNode)

    def refreshNotHere(self, editorNode):
        enabled = self.notHereEnabled(editorNode)
        wasBlocked = self.ui.notHereCheckBox.blockSignals(True)
        self.ui.notHereCheckBox.checked = enabled
        self.ui.notHereCheckBox.blockSignals(wasBlocked)
        if self.session is not None and editorNode is not None:
            self.applyNotHere(editorNode, enabled)

    def applyNotHere(self, editorNode, enabled):
        from SGPSegmentLib.preview import notHereMode

        with slicer.util.tryWithErrorDisplay(_("SGP preview could not change 'not here'.")):
            if self.logic.setNotHere(self.session, notHereMode(enabled, editorNode)) is not None:
                self.pollTimer.start()

    def onNotHereToggled(self, checked):
        self.scriptedEffect.setParameter("SGPNotHere", "1" if checked else "0")
        self.updateGUI()

    def onSegmentChecked(self, item):
        segmentId = item.data(qt.Qt.UserRole)
        self.chosenIds = [s for s in self.chosenIds if s != segmentId]
        if item.checkState() == qt.Qt.Checked:
            self.chosenIds.append(segmentId)

    # ------------------------------------------------------------------ preview and runs

    def nodes(self):
        editorNode = self.scriptedEffect.parameterSetNode()
        return editorNode.GetSourceVolumeNode(), editorNode.GetSegmentationNode()

    def onPreview(self):
        pn = self.moduleLogic.getParameterNode()
        volumeNode, segmentationNode = self.nodes()
        editorNode = self.scriptedEffect.parameterSetNode()
        with slicer.util.tryWithErrorDisplay(_("SGP preview could not start."), waitCursor=True):
            ready = self.moduleLogic.ensureReady(pn, confirm=slicer.util.confirmOkCancelDisplay)
            if ready is not True:  # False: declined; else an install or download, polled below
                self.setupTask = ready or None
                if self.setupTask is not None:
                    self.pollTimer.start()
                return
            axis = self.ui.orientationComboBox.currentData
            carried = {}
            pending, self.pendingPrompt = self.pendingPrompt, None
            if pending is not None and self.session is not None:  # before the preview goes
                self.logic.promptAxis(volumeNode, pending[2][0], pending[4], self.session.axis)
            if self.session is not None:  # its boxes, clicks and scribbles go on
                carried, axis = dict(self.session.prompts), self.session.axis
                self.logic.cancel(self.session)
                self.session = None
            first, last = self.ui.firstSliceSpinBox.value, self.ui.lastSliceSpinBox.value
            self.ui.statusLabel.text = _("Starting the engine and the run...")
            slicer.app.processEvents()
            from SGPSegmentLib.preview import notHereMode

            arguments = dict(
                sliceRange=(first, last) if self.ui.limitRangeCheckBox.checked else None,
                notHere=notHereMode(self.notHereEnabled(editorNode), editorNode),
                **self.moduleLogic.previewArguments(pn, segmentationNode),
            )
            if pending is not None:
                kind, segmentId, positions, positive, inPlane = pending
                self.session = self.logic.startFromPrompt(
                    kind, volumeNode, segmentationNode, self.chosenIds, segmentId, positions,
                    inPlane, positive, carried=carried, carriedAxis=axis, **arguments,
                )  # fmt: skip
                self.chosenIds = list(self.session.segmentIds)
            else:
                self.session = self.logic.start(
                    volumeNode, segmentationNode, self.chosenIds, axis=axis,
                    prompts=carried, **arguments,
                )  # fmt: skip
            self.observe(segmentationNode)
            self.pollTimer.start()
        self.updateGUI()

    def observe(self, segmentationNode):
        """Watch the user's segments while a preview is open (auto-update)."""
        if self.observed is not None:
            self.observed[0].RemoveObserver(self.observed[1])
            self.observed = None
        if segmentationNode is not None:
            segmentation = segmentationNode.GetSegmentation()
            tag = segmentation.AddObserver(
                slicer.vtkSegmentation.SegmentModified, self.onSegmentEdited
            )
            self.observed = (segmentation, tag)

    def onSegmentEdited(self, caller=None, event=None):
        if self.session is not None and self.ui.autoUpdateCheckBox.checked:
            self.debounceTimer.start()  # restarts: only the last edit of a burst re-runs

    def onDebounce(self):
        if self.session is None:
            return
        with slicer.util.tryWithErrorDisplay(_("SGP preview could not update.")):
            if self.logic.update(self.session, onlyIfChanged=True) is not None:
                self.pollTimer.start()
        self.updateGUI()

    def onPoll(self):
        if self.setupTask is not None:  # then Preview again once it is done
            task = self.moduleLogic.pollTask(self.setupTask)
            self.ui.progressBar.format = f"{task.stage}: %p%"
            self.ui.progressBar.value = int(round(100 * (task.fraction or 0.0)))
            self.ui.statusLabel.text = self.moduleLogic.taskMessage(task)
            if task.done():
                self.setupTask = None
                self.pollTimer.stop()
                if task.state == "done":
                    self.onPreview()
                elif task.state == "failed":
                    slicer.util.errorDisplay(self.moduleLogic.taskMessage(task))
            self.updateGUI()
            return
        session = self.session
        try:
            state = self.logic.poll(session) if session is not None else "idle"
        except Exception as exc:  # shown to the user; the segments were not touched
            self.pollTimer.stop()
            slicer.util.errorDisplay(_(
                "The SGP preview failed; nothing was written.\n\n{exc}"
            ).format(exc=exc))
            state = "failed"
        if session is not None and session.run is not None:
            self.ui.progressBar.format = f"{session.run.stage}: %p%"
            self.ui.progressBar.value = int(round(100 * session.run.fraction))
        if state != "running":
            self.pollTimer.stop()
            self.showSlicesToCheck()
            messages = {"done": _("Preview updated."), "cancelled": _("Stopped.")}
            self.ui.statusLabel.text = messages.get(state, "")
        self.updateGUI()

    def showSlicesToCheck(self):
        self.ui.slicesToCheckList.clear()
        self.items = self.logic.slicesToCheck(self.session, SLICES_TO_CHECK) if self.session else []
        for item in self.items:
            self.ui.slicesToCheckList.addItem(item.describe(self.session.axis))

    def onSliceToCheck(self, listItem):
        row = self.ui.slicesToCheckList.row(listItem)
        if self.session is not None and 0 <= row < len(self.items):
            with slicer.util.tryWithErrorDisplay(_("Could not show the slice.")):
                self.logic.jumpTo(self.session, self.items[row])

    def onStop(self):
        if self.setupTask is not None:
            self.moduleLogic.cancelTask(self.setupTask)  # the next poll says so
        self.logic.stop(self.session)
        self.updateGUI()

    def onApply(self):
        with slicer.util.tryWithErrorDisplay(_("The preview was not applied."), waitCursor=True):
            rules = edit_rules.rulesFromEditorNode(self.scriptedEffect.parameterSetNode())
            canApply, reason = self.logic.canApply(self.session)
            if not canApply:
                raise ValueError(reason)
            self.scriptedEffect.saveStateForUndo()  # the editor's Undo takes the result back
            report = self.logic.apply(self.session, rules)
            self.endSession(
                _("Applied to {count} segment(s).").format(count=len(report.segmentIds))
            )

    def onCancel(self):
        self.logic.cancel(self.session)
        self.endSession(_("Preview removed; the segments are unchanged."))

    def endSession(self, message):
        self.debounceTimer.stop()
        self.pollTimer.stop()
        self.observe(None)
        self.session = None
        self.items = []
        self.ui.slicesToCheckList.clear()
        self.ui.statusLabel.text = message
        self.updateGUI()

    def onRangeFromView(self, first):
        volumeNode, segmentationNode = self.nodes()
        views = slicer.app.layoutManager()
        nodes = [views.sliceWidget(name).mrmlSliceNode() for name in views.sliceViewNames()]
        matrices = [slicer.util.arrayFromVTKMatrix(n.GetSliceToRAS()) for n in nodes]
        axis = self.session.axis if self.session else self.ui.orientationComboBox.currentData
        with slicer.util.tryWithErrorDisplay(_("Could not read the slice from the views.")):
            k = self.logic.sliceFromViews(
                volumeNode, segmentationNode, self.chosenIds, axis, matrices
            )
            (self.ui.firstSliceSpinBox if first else self.ui.lastSliceSpinBox).value = k
            self.ui.limitRangeCheckBox.checked = True

    # ------------------------------------------------------- boxes, clicks and scribbles

    def prompt(self, kind, positions, positive, inPlane):
        """A box ('box': two corners), click or stroke ('scribble': its positions) in a slice
        view, in world coordinates: without a preview it starts one; else the Logic adds it
        and the preview updates after the debounce."""
        editorNode = self.scriptedEffect.parameterSetNode()
        segmentId = editorNode.GetSelectedSegmentID() if editorNode else None
        notUsed = {
            "box": _("The box was not used."),
            "click": _("The click was not used."),
            "scribble": _("The scribble was not used."),
        }[kind]
        with slicer.util.tryWithErrorDisplay(notUsed, waitCursor=True):
            if not segmentId:
                raise ValueError(_("Select the segment to draw (add one in the segment list)."))
            if self.session is None or segmentId not in self.session.segmentIds:
                # A new preview (another segment joins it): after installing the engine if it
                # must, with this prompt and the open preview's ones.
                self.pendingPrompt = (kind, segmentId, positions, positive, inPlane)
                self.onPreview()
                return
            if kind == "box":
                text = self.logic.box(self.session, segmentId, positions[0], positions[1], inPlane)
            elif kind == "click":
                rules = edit_rules.rulesFromEditorNode(editorNode)
                if self.logic.clickWrites(self.session, segmentId, positions[0], inPlane):
                    self.scriptedEffect.saveStateForUndo()  # the editor's Undo takes it back
                text = self.logic.click(self.session, segmentId, positions[0], positive, inPlane,
                                        rules)  # fmt: skip
            else:
                text = self.logic.scribble(self.session, segmentId, positions, positive, inPlane)
            self.ui.statusLabel.text = text
            self.debounceTimer.start()
