"""What the panel asks of the Logic, in terms of the parameter node (``pn``: any object with
the fields of ``SGPSegmentParameterNode``; its MRML node is ``pn.parameterNode``): the Logic's
``actions`` role.

Kept apart from the Widget so that it is Qt-free and tested with slicer-core.
"""

from __future__ import annotations

import logging
from pathlib import Path

from slicer.i18n import tr as _

from SGPSegmentLib import outputs, reference_cases
from SGPSegmentLib.constants import AXIS_NAMES, MODEL_SIZES, axisDisplay
from SGPSegmentLib.engine_connection import ModelSettings, describeServer
from SlicerSGP.errors import SGPError, SGPInputError


def _ids(text: str) -> list[str]:
    return [s for s in (text or "").split(",") if s]


class ParameterNodeActions:
    """The panel's requests, answered with the Logic's other roles (``logic``: the
    ``SGPSegmentCoreLogic`` that holds this one: its engine, runs, drawing, support sets and
    set-up)."""

    def __init__(self, logic) -> None:
        self.logic = logic

    def modelArgument(self, pn) -> str:
        return str(pn.checkpointPath) if pn.model == "SGP checkpoint" else pn.model

    def canRun(self, pn) -> tuple[bool, str]:
        if not pn.inputVolume:
            return False, _("Select an input volume.")
        if not pn.segmentation:
            return False, _("Select a segmentation.")
        if not _ids(pn.segmentIds):
            return False, _("Select at least one segment.")
        if pn.model == "SGP checkpoint" and not Path(pn.checkpointPath).is_file():
            return False, _("Choose the trained SGP checkpoint (.safetensors) file.")
        return True, ""

    def labeledSlicesSummary(self, pn) -> list[str]:
        if not (pn.inputVolume and pn.segmentation and _ids(pn.segmentIds)):
            return []
        try:
            found = self.logic.drawing.labeledSlices(
                pn.inputVolume, pn.segmentation, _ids(pn.segmentIds), pn.axis
            )
        except Exception as exc:  # shown in the list, not raised, while the user is choosing
            return [str(exc)]
        return [item.describe(axisDisplay(pn.axis)) for item in found]

    def deviceChoices(self, devices) -> list[tuple[str, str]]:
        """``[(device, label)]``: auto, the engine's GPUs (once connected: CUDA, Apple MPS),
        CPU."""
        choices = [("auto", _("auto (first CUDA GPU, else Apple GPU, else CPU)"))]
        for device in devices:
            name = str(device.get("device", "")) if isinstance(device, dict) else ""
            if name.startswith("cuda") or name == "mps":
                choices.append((name, f"{name} - {device.get('name', 'GPU')}"))
        choices.append(("cpu", _("CPU (slow: minutes per volume)")))
        return choices

    def settingsFromParameterNode(self, pn):
        return self.logic.modelSettings(self.modelArgument(pn), None, pn.device, pn.imageSize, 0)

    def pollConnection(self, pn) -> tuple[str, list] | None:
        """The Connect button, from a timer: None while the local engine starts (never
        waits), then what :meth:`testConnection` says."""
        settings = self.settingsFromParameterNode(pn) if pn is not None else None
        engine = self.logic.engine
        if engine.mode == "local" and engine.ready(settings or ModelSettings()) is None:
            return None
        return self.testConnection(pn)

    def testConnection(self, pn) -> tuple[str, list]:
        """(description for people, the server's devices) for the Connect button (waits for a
        local engine to start: console; the Widget uses :meth:`pollConnection`)."""
        engine = self.logic.engine
        info = engine.connect(self.settingsFromParameterNode(pn) if pn is not None else None)
        text = _("Connected: {server}").format(server=describeServer(info))
        if engine.lastRestartReason:
            text += "\n" + _("The local engine had stopped ({reason}); it was restarted.").format(
                reason=engine.lastRestartReason
            )
        return text, list(info.get("devices") or [])

    # ------------------------------------------------------------------------- run

    def startRunFromParameterNode(self, pn):
        request = self.logic.prepareRun(
            pn.inputVolume,
            pn.segmentation,
            _ids(pn.segmentIds),
            axis=pn.axis,
            referenceCases=reference_cases.referenceCases(
                reference_cases.referenceCaseNodes(pn.parameterNode), exclude=pn.segmentation
            ),
            supportSet=self.logic.supportSets.chosen(pn.parameterNode) or None,
            library=self.logic.supportSets.root,
            top_k=pn.topK,
            intensity=pn.intensity,
            interpolation_prior=str(pn.interpolationPrior),
        )
        return self.logic.startRun(
            request, self.settingsFromParameterNode(pn), keepPseudoMasks=pn.keepPseudoMasks
        )

    def previewArguments(self, pn, segmentationNode) -> dict:
        """What a Segment Editor preview takes from the module's settings (the one place for
        engine, model, device, top-K, intensity, reference cases and support set): keyword
        arguments of ``PreviewLogic.start``."""
        return {
            "settings": self.settingsFromParameterNode(pn),
            "referenceCases": reference_cases.referenceCases(
                reference_cases.referenceCaseNodes(pn.parameterNode), exclude=segmentationNode
            ),
            "supportSet": self.logic.supportSets.chosen(pn.parameterNode),
            "top_k": int(pn.topK),
            "intensity": str(pn.intensity),
            "interpolation_prior": str(pn.interpolationPrior),
            # Each interval takes its support from the drawn slices bounding it, so that after a
            # correction only the two intervals beside it are propagated again (a re-run costs a
            # fraction of the first; with support from every drawn slice nearly all change).
            "local_support": True,
        }

    def engineSummary(self, pn) -> str:
        """One line for the effect's panel: where and with what model previews run."""
        engine = self.logic.engine
        where = _("this computer") if engine.mode == "local" else engine.url or "?"
        model = self.modelArgument(pn)
        return _(
            "Engine: {where}; model {model} at {imageSize} px on {device}."
        ).format(where=where, model=model, imageSize=pn.imageSize, device=pn.device)

    # ------------------------------------------------------------------ support library

    def saveSupportSetFromParameterNode(self, pn, name, description="", confirm=None):
        """Save the selected segments' slices drawn along the chosen axis (every drawn segment
        when none is selected) as support set ``name``, with the chosen intensity mapping. A
        set of that name is replaced only after ``confirm(message)`` says yes (returns None
        when it says no)."""
        if not (pn.inputVolume and pn.segmentation):
            raise SGPInputError(
                _("Select the input volume and the segmentation whose drawn slices to save.")
            )
        existing = self.logic.supportSets.existing(name)
        overwrite = False
        if existing is not None and confirm is not None:
            if not confirm(
                _(
                    "A support set named '{existing}' exists. Replace it with the slices "
                    "drawn here? The old set is lost (export it first to keep a copy)."
                ).format(existing=existing)
            ):
                return None
            overwrite = True
        return self.logic.supportSets.save(
            name,
            pn.inputVolume,
            pn.segmentation,
            _ids(pn.segmentIds) or None,
            axis=pn.axis,
            intensity=str(pn.intensity),
            description=description,
            overwrite=overwrite,
        )

    def supportLibraryTitle(self, pn) -> str:
        """The panel section's title: says which set runs use, even when it is collapsed."""
        name = self.logic.supportSets.chosen(pn.parameterNode) if pn is not None else ""
        if not name:
            return _("Support library")
        return _("Support library (runs use '{name}')").format(name=name)

    def finishMessage(self, run) -> str:
        if run.state == "cancelled":
            return _("SGP segmentation cancelled; nothing was written.")
        seconds = run.report.timings.get("total", 0.0) if run.report else 0.0
        logging.info(
            f"SGPSegment: wrote {len(run.report.segmentIds)} segment(s) in {seconds:.1f} s"
        )
        notes = " ".join(run.report.notes)
        return _("SGP segmentation done in {seconds} s. {notes}").format(
            seconds=f"{seconds:.1f}", notes=notes
        ).strip()

    def scoresTableNode(self, segmentationNode):
        return (
            segmentationNode.GetNodeReference(outputs.SCORES_TABLE_REFERENCE_ROLE)
            if segmentationNode
            else None
        )

    def jumpToLeastConfident(self, pn, index: int) -> str:
        worst = self.logic.leastConfidentSlices(count=index + 1)
        if not worst:
            return _("No predicted slice to review.")
        value, name, sliceIndex, confidence = worst[min(index, len(worst) - 1)]
        self.logic.jumpToSlice(pn.inputVolume, self.logic.runs.lastRequest.axis, sliceIndex)
        axis = AXIS_NAMES[self.logic.runs.lastRequest.axis]
        return _(
            "{name}: {orientation} slice {sliceIndex} (confidence {confidence:.2f})"
        ).format(
            name=name, orientation=axisDisplay(axis), sliceIndex=sliceIndex, confidence=confidence
        )

    # ------------------------------------------------------- dependencies and weights

    def dependencyStatus(self, pn) -> str:
        if self.logic.engine.mode == "remote":
            return _("Remote engine: its packages are the server's.")
        try:
            problems = self.logic.setup.dependencyProblems(self.modelArgument(pn))
        except SGPError as exc:
            return str(exc)
        return (
            _("All Python packages installed.")
            if not problems
            else _("Missing or too old: {problems}").format(problems="; ".join(problems))
        )

    def ensureDependencies(self, pn, confirm):
        """Packages of the local engine: True when all are there, False when ``confirm(message)``
        said no, else the started :class:`~SGPSegmentLib.processes.Task` installing them (poll
        it with :meth:`pollTask`; ask again once it is done)."""
        if self.logic.engine.mode == "remote":
            return True
        problems = self.logic.setup.dependencyProblems(self.modelArgument(pn))
        if not problems:
            return True
        if not confirm(
            _(
                "The local engine needs these Python packages:\n\n  {packages}\n\nDownload "
                "and install them now? This can take several minutes (PyTorch with CUDA is over "
                "1 GB); Slicer stays usable and Cancel stops it. sam2 is checked against its "
                "pinned sha256 before installing."
            ).format(packages="\n  ".join(problems))
        ):
            return False
        return self.logic.setup.installDependencies(self.modelArgument(pn), problems)

    def weightsStatusText(self, pn) -> str:
        status = self.logic.setup.weightsStatus(self.modelArgument(pn))
        return {
            "checkpoint": _(
                "Trained SGP checkpoint (its base SAM2.1 weights must be in the cache)."
            ),
            "cached": _("Weights: in the cache."),
            "missing": _("Weights: not downloaded yet."),
            "unknown": _("Weights: unknown until the Python packages are installed."),
        }[status]

    def ensureReady(self, pn, confirm):
        """Packages and weights for a local run, each installed only after ``confirm``: True
        when ready, False when declined, else the started task that installs or downloads
        what is missing (nothing waits: poll it with :meth:`pollTask`, then ask again)."""
        ready = self.ensureDependencies(pn, confirm)
        if ready is not True:
            return ready
        if self.logic.engine.mode == "remote" or pn.model not in MODEL_SIZES:
            return True
        status = self.logic.setup.weightsStatus(pn.model)
        if status in ("cached", "unknown"):  # unknown: the engine says what is wrong, if any
            return True
        if not confirm(
            _(
                "The SAM2.1 '{model}' weights are not downloaded yet. Download them now into "
                "the cache (checksum verified)? On an offline machine use 'Use local "
                "file...' instead."
            ).format(model=pn.model)
        ):
            return False
        return self.logic.setup.downloadWeights(pn.model)

    def taskMessage(self, task) -> str:
        """What became of an install or download, for people."""
        if task.state == "done":
            return _("{title}: done.").format(title=task.title)
        if task.state == "cancelled":
            return (
                _(
                    "{title}: cancelled. Packages or files may be partly there; the status "
                    "shown is checked again (nothing is taken as installed)."
                ).format(title=task.title)
            )
        if task.state == "failed":
            return _("{title} failed:\n{error}").format(title=task.title, error=task.error)
        return task.describe()

    def progressOf(self, item) -> tuple[str, float | None, str]:
        """(stage, fraction done or None for a busy bar, last output line) of a run or a task,
        for the panel's progress bar and the line under it."""
        if hasattr(item, "steps"):  # a Task
            return item.stage, item.fraction, item.lastLine
        if not item.runId and not item.done():  # the local engine is starting
            return item.stage, None, self.logic.engine.lastLogLine()
        return item.stage, item.fraction, ""
