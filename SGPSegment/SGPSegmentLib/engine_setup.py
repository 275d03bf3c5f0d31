"""The local engine's set-up: its Python packages and SAM2.1 weights, checked, installed and
downloaded for the Python the engine runs in (the Logic's ``setup`` role).

Nothing here waits: installs and downloads are :class:`~SGPSegmentLib.processes.Task` s that
the Widget's timer polls (``.wait()`` in the console).
"""

from __future__ import annotations

from SGPSegmentLib import dependencies, engine_weights
from SGPSegmentLib.constants import MODEL_SIZES
from SGPSegmentLib.engine_connection import EngineConnection, defaultPython
from SGPSegmentLib.processes import Task


class EngineSetup:
    """Packages and weights of the engine's Python (``engine.python``; '' = Slicer's own)."""

    def __init__(self, engine: EngineConnection) -> None:
        self.engine = engine
        self._weightsStatus: dict[tuple[str, str], str] = {}

    def dependencyProblems(self, model: str = "tiny") -> list[str]:
        """What the engine's Python lacks for ``model`` (checked in that Python)."""
        return dependencies.missing(model not in MODEL_SIZES, self.engine.python or None)

    def installDependencies(self, model: str, problemLines: list[str]) -> Task:
        """Start installing into the engine's Python: a :class:`Task` to poll from a timer
        (:meth:`pollTask`), or to ``.wait()`` for in the console."""
        python = self.engine.python or defaultPython()
        return dependencies.installTask(problemLines, python, model not in MODEL_SIZES)

    def weightsStatus(self, model: str) -> str:
        """'cached', 'missing', 'checkpoint' (a trained SGP file) or 'unknown', as the engine's
        Python sees its cache (remembered per Python and model until :meth:`refreshSetup`)."""
        if model not in MODEL_SIZES:
            return "checkpoint"
        key = (self.engine.python or defaultPython(), model)
        if key not in self._weightsStatus:
            self._weightsStatus[key] = engine_weights.status(model, self.engine.python or None)
        return self._weightsStatus[key]

    def refreshSetup(self) -> None:
        """Forget what was seen of the weights cache (after a download, on entering)."""
        self._weightsStatus.clear()

    def downloadWeights(self, model: str) -> Task:
        """Start fetching the official SAM2.1 checkpoint into the engine's cache (checksum
        verified), in the engine's Python: a :class:`Task` (``.wait()`` in the console)."""
        self.refreshSetup()
        return engine_weights.fetchTask(model, self.engine.python or None)

    def importWeights(self, model: str, path) -> Task:
        """Start checking and copying a local copy of the official checkpoint (offline
        machines) into the engine's cache: a :class:`Task`."""
        self.refreshSetup()
        return engine_weights.fetchTask(model, self.engine.python or None, file=path)

    def pollTask(self, task: Task) -> Task:
        """Advance an install or download (call from a timer); never waits."""
        task.poll()
        if task.done():
            self.refreshSetup()
        return task

    def cancelTask(self, task: Task) -> None:
        """Stop an install or download: its processes are killed, nothing more runs."""
        task.cancel()
        self.refreshSetup()
