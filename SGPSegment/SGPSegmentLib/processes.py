"""The engine's Python and the long jobs it runs (installs, downloads), without blocking Slicer.

*Which Python, with which environment.* Slicer's process runs with ``PYTHONHOME`` and a
``PYTHONPATH`` of Slicer's own Python (set by its launcher). Slicer's own Python gets exactly
that environment: inside Slicer :func:`defaultPython` is ``python-real`` beside the
``PythonSlicer`` launcher, as Slicer runs its Python CLI modules (so that the engine's exit
code, e.g. a kill for lack of memory, reaches us instead of the launcher's 1). *Another* Python
(a conda or venv environment the user names) starts from the environment Slicer was started
with (``slicer.util.startupEnvironment()``; outside Slicer: this environment without
``PYTHONHOME`` and ``PYTHONPATH``), with only the folder holding the ``SlicerSGP`` package on
``PYTHONPATH``. :func:`pythonEnvironment` is the one place that decides.

*Long jobs.* A :class:`Task` runs a sequence of steps, each a process whose output goes to a
file; :meth:`Task.poll` (called from the Widget's timer) reads the new lines, starts the next
step, and says the stage, the fraction done (when the output tells it) and the last line.
Nothing waits: Slicer's event loop keeps running (a worker thread inside Slicer would barely
run while Qt idles). :meth:`Task.cancel` kills the whole process tree.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from slicer.i18n import tr as _

from SlicerSGP.errors import SGPError
from SlicerSGP.service.launcher import read_appended

TAIL_LINES = 15

CREATE_NO_WINDOW = 0x08000000
"""Windows: start a console program without opening a console window."""
CREATE_NEW_PROCESS_GROUP = 0x00000200
"""Windows: the child heads a process group of its own (``subprocess`` has it on Windows only)."""


# ------------------------------------------------------------------------ which Python


def packageFolder() -> str:
    """The folder holding the ``SlicerSGP`` package this module ships (in Slicer: the
    qt-scripted-modules folder, which a plain Python does not see)."""
    import SlicerSGP

    return str(Path(SlicerSGP.__file__).resolve().parents[1])


def _samePath(a: str, b: str) -> bool:
    # Not resolved: a venv's python is a link to its base interpreter, yet another environment.
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def slicerPython() -> str:
    """This process's own Python as a plain interpreter: inside Slicer ``sys.executable`` is the
    ``PythonSlicer`` launcher; ``python-real`` beside it is the interpreter it starts."""
    exe = Path(sys.executable)
    if exe.name.lower().startswith("pythonslicer"):
        real = exe.with_name("python-real" + exe.suffix)
        if real.is_file():
            return str(real)
        found = shutil.which("python-real")
        if found:
            return found
    return str(exe)


def defaultPython() -> str:
    """The engine's Python when the user names none: Slicer's own."""
    return slicerPython()


def isOwnPython(python: str | None) -> bool:
    """Whether ``python`` is this process's Python (which gets this environment)."""
    return not python or any(_samePath(python, p) for p in (sys.executable, slicerPython()))


def startupEnvironment() -> dict[str, str]:
    """The environment Slicer was started with, without its launcher's settings; outside
    Slicer (tests, slicer-core) this environment without ``PYTHONHOME`` and ``PYTHONPATH``."""
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            return dict(slicer.util.startupEnvironment())
    except Exception:  # no Slicer application: the fallback below
        pass
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}


def pythonEnvironment(python: str | None) -> dict[str, str]:
    """The full environment for a process of the engine's Python ``python`` (None or '':
    Slicer's own): this environment for our own Python, the clean start-up environment for
    another one; either way the ``SlicerSGP`` package folder first on ``PYTHONPATH``."""
    own = isOwnPython(python)
    env = dict(os.environ) if own else startupEnvironment()
    paths = [packageFolder()]
    if own and env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def popenOptions() -> dict:
    """``subprocess.Popen`` options: no console window on Windows (as
    ``slicer.util.launchConsoleProcess`` does), a process group of its own elsewhere (so that
    cancel can end the whole tree)."""
    if sys.platform == "win32":
        return {"creationflags": CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def runPython(python: str | None, args: list[str], timeout: float = 60.0):
    """A short ``python ARGS`` in the engine's environment (checks: a second or two)."""
    python = python or defaultPython()
    try:
        return subprocess.run(
            [python, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=pythonEnvironment(python),
            stdin=subprocess.DEVNULL,
            **popenOptions(),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SGPError(
            _(
                "Could not run the engine's Python {python!r} ({exc}); choose a working "
                "Python executable or leave the setting empty for Slicer's own."
            ).format(python=python, exc=exc)
        ) from None


def killTree(proc: subprocess.Popen) -> None:
    """End ``proc`` and every process it started (pip's build steps, light-the-torch's pip)."""
    if proc.poll() is not None:
        return
    try:
        if sys.platform == "win32":
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(proc.pid)],
                capture_output=True,
                timeout=30,
                creationflags=CREATE_NO_WINDOW,
            )
        else:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: pid == process group id
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        proc.kill()
        proc.wait(5)
    except (OSError, subprocess.SubprocessError):
        pass


# ---------------------------------------------------------------------------- progress

_OURS = re.compile(r"^progress (\d+) (\d+)\s*$")
_PIP_RAW = re.compile(r"Progress (\d+) of (\d+)")
_PERCENT = re.compile(r"(\d{1,3}(?:\.\d+)?)\s*%")


def fractionOf(line: str) -> float | None:
    """The fraction done a progress line tells (ours ``progress DONE TOTAL``, pip's
    ``--progress-bar raw`` ``Progress DONE of TOTAL``, or ``NN%``), else None."""
    match = _OURS.match(line) or _PIP_RAW.search(line)
    if match:
        total = int(match.group(2))
        return min(int(match.group(1)) / total, 1.0) if total > 0 else None
    match = _PERCENT.search(line)
    if match and float(match.group(1)) <= 100:
        return float(match.group(1)) / 100.0
    return None


# ---------------------------------------------------------------------------- tasks


@dataclass
class Step:
    """One step of a :class:`Task`: a command (its output goes to the log), or a quick
    in-process ``action`` (e.g. a checksum) between commands. ``after(output)`` runs when the
    command succeeded; it may raise to fail the task."""

    label: str
    command: list[str] | None = None
    action: Callable[[], None] | None = None
    after: Callable[[str], None] | None = None
    env: dict[str, str] | None = None


@dataclass
class Task:
    """Steps run one after the other as processes, advanced by :meth:`poll`."""

    title: str
    steps: list[Step]
    env: dict[str, str] = field(default_factory=dict)
    state: str = "running"
    """'running', 'done', 'failed' or 'cancelled'."""
    stage: str = ""
    fraction: float | None = None
    """Fraction done of the current step when its output tells, else None (busy)."""
    lastLine: str = ""
    error: str = ""
    onDone: Callable[[Task], None] | None = None
    """Called once when the task ends (whatever the state)."""
    _index: int = -1
    _proc: subprocess.Popen | None = None
    _log: Path | None = None
    _offset: int = 0
    _partial: str = ""
    _output: list[str] = field(default_factory=list)
    tail: deque = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    logDir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sgp-task-")))

    # --------------------------------------------------------------------- state

    def done(self) -> bool:
        return self.state != "running"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def logPath(self) -> Path | None:
        return self._log

    def describe(self) -> str:
        """One line for the panel: the stage and the last line of output."""
        return f"{self.stage}: {self.lastLine}" if self.lastLine else self.stage

    # ------------------------------------------------------------------- running

    def start(self) -> Task:
        self._next()
        return self

    def poll(self) -> Task:
        """Read new output; when the step's process ended, go on (or fail). Never waits."""
        while self.state == "running":
            if self._proc is None:
                self._next()
                continue
            code = self._proc.poll()
            self._read()
            if code is None:
                return self
            self._read(final=True)
            self._proc = None
            step = self.steps[self._index]
            if code != 0:
                self._fail(
                    _("{step} failed (exit code {code}):\n{output}").format(
                        step=step.label, code=code, output="\n".join(self.tail)
                    )
                )
                return self
            try:
                if step.after is not None:
                    step.after("\n".join(self._output))
            except Exception as exc:
                self._fail(str(exc))
                return self
        return self

    def cancel(self) -> None:
        """Kill the running step's process tree; nothing after it runs."""
        if self.done():
            return
        if self._proc is not None:
            killTree(self._proc)
            self._read(final=True)
            self._proc = None
        self._end("cancelled")

    def wait(self, timeout: float = 3600.0, interval: float = 0.1) -> Task:
        """Poll until the task ends (console, scripts, tests; the Widget uses its timer)."""
        deadline = time.monotonic() + timeout
        while not self.poll().done():
            if time.monotonic() > deadline:
                self.cancel()
                raise SGPError(_(
                    "{title} did not finish within {timeout:.0f} s; cancelled."
                ).format(title=self.title, timeout=timeout))
            time.sleep(interval)
        return self

    # ------------------------------------------------------------------- helpers

    def _next(self) -> None:
        self._index += 1
        if self._index >= len(self.steps):
            self.fraction = 1.0
            self._end("done")
            return
        step = self.steps[self._index]
        self.stage, self.fraction = step.label, None
        self._output = []
        if step.command is None:
            try:
                if step.action is not None:
                    step.action()
            except Exception as exc:
                self._fail(str(exc))
            return
        self._log = self.logDir / f"step{self._index}.log"
        self._offset, self._partial = 0, ""
        with open(self._log, "wb") as out:  # the child keeps its own handle
            try:
                self._proc = subprocess.Popen(
                    step.command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=step.env if step.env is not None else (self.env or None),
                    **popenOptions(),
                )
            except OSError as exc:
                self._fail(
                    _("{step}: could not start {command!r} ({exc}).").format(
                        step=step.label, command=step.command[0], exc=exc
                    )
                )

    def _read(self, final: bool = False) -> None:
        if self._log is None:
            return
        data, self._offset = read_appended(self._log, self._offset)
        if data is None:
            return
        text = self._partial + data.decode("utf-8", errors="replace")
        # Progress bars rewrite their line with '\r': each is a line of its own here.
        parts = re.split(r"\r\n|\r|\n", text)
        self._partial = "" if final else parts.pop()
        for line in (p.rstrip() for p in parts):
            if not line:
                continue
            self._output.append(line)
            fraction = fractionOf(line)
            if fraction is not None:
                self.fraction = fraction
                if _OURS.match(line):
                    continue  # ours is for the bar only
            self.tail.append(line)
            self.lastLine = line[-200:]

    def _fail(self, message: str) -> None:
        self.error = message
        self._end("failed")

    def _end(self, state: str) -> None:
        self.state = state
        if self.onDone is not None:
            callback, self.onDone = self.onDone, None
            callback(self)


__all__ = [
    "Step",
    "Task",
    "defaultPython",
    "fractionOf",
    "isOwnPython",
    "killTree",
    "packageFolder",
    "popenOptions",
    "pythonEnvironment",
    "runPython",
    "slicerPython",
    "startupEnvironment",
]
