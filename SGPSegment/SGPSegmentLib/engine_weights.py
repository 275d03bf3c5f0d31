"""The SAM2.1 weights in the cache of the engine's Python: status, download, local copy.

Each runs in the engine's Python (a subprocess in its own environment, see :mod:`.processes`;
the status of Slicer's own Python is read in this process, from the stdlib-only registry):
the cache folder is the one the engine reads, the engine's packages do the work, and Slicer's
process needs none of them (it has no tqdm, for one). Download and import are
:class:`~SGPSegmentLib.processes.Task` s polled from the Widget's timer; their progress comes
as ``progress DONE TOTAL`` lines.
"""

from __future__ import annotations

import json

from slicer.i18n import tr as _

from SGPSegmentLib.processes import (
    Step,
    Task,
    defaultPython,
    isOwnPython,
    pythonEnvironment,
    runPython,
)
from SlicerSGP.errors import SGPError

_STATUS_SCRIPT = (
    "import json, sys\n"
    "from SlicerSGP import weights_registry as R\n"
    "info = R.resolve_model_name(sys.argv[1])\n"
    "print(json.dumps({'status': R.cache_status(info), 'path': str(R.cache_dir() / info.filename)}))\n"
)

_FETCH_SCRIPT = (
    "import sys, signal\n"
    "from SlicerSGP import weights as W\n"
    "from SlicerSGP.errors import SGPError\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))  # let the temporary file go\n"
    "name, file = sys.argv[1], sys.argv[2]\n"
    "last = [-1]\n"
    "def progress(done, total):\n"
    "    step = done * 100 // total if total else 0\n"
    "    if step != last[0]:\n"
    "        last[0] = step\n"
    "        print(f'progress {done} {total}', flush=True)\n"
    "try:\n"
    "    info = W.resolve_model_name(name)\n"
    "    if file:\n"
    "        path = W.import_checkpoint(file, info, progress=False, progress_callback=progress)\n"
    "    else:\n"
    "        print(f'Downloading {info.url}', flush=True)\n"
    "        path = W.download_checkpoint(info, progress=False, progress_callback=progress)\n"
    "except SGPError as exc:\n"
    "    print(f'error: {exc}', flush=True)\n"
    "    sys.exit(1)\n"
    "print(f'OK: {path}', flush=True)\n"
)


def cacheStatus(model: str, python: str | None = None) -> dict:
    """``{'status': 'not downloaded' | 'incomplete (...)' | 'cached[, verified]', 'path': ...}``
    as the engine's Python sees its cache; raises SGPError when that Python cannot tell (e.g.
    its packages are missing). Slicer's own Python reads the registry here (standard library
    only: no tqdm, no torch)."""
    if isOwnPython(python):
        from SlicerSGP import weights_registry as registry

        info = registry.resolve_model_name(model)
        return {
            "status": registry.cache_status(info),
            "path": str(registry.cache_dir() / info.filename),
        }
    proc = runPython(python, ["-c", _STATUS_SCRIPT, model], timeout=60)
    try:
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pass
    raise SGPError(_(
        "The engine's Python could not read its weights cache: {output}"
    ).format(output=proc.stderr[-300:]))


def status(model: str, python: str | None = None) -> str:
    """'cached', 'missing' or 'unknown' (the engine's Python cannot tell yet)."""
    try:
        found = cacheStatus(model, python)["status"]
    except (SGPError, KeyError, TypeError):
        return "unknown"
    return "cached" if str(found).startswith("cached") else "missing"


def fetchTask(model: str, python: str | None = None, file=None) -> Task:
    """A started task that downloads the official checkpoint (``file`` None) or checks and
    copies a local copy of it into the engine's cache (checksum verified either way)."""
    python = python or defaultPython()
    label = _("checking and copying the weights") if file else _("downloading the weights")
    command = [python, "-c", _FETCH_SCRIPT, str(model), str(file or "")]
    title = _("Using the local weights file") if file else _("Downloading weights")
    return Task(title, [Step(label, command)], env=pythonEnvironment(python)).start()


__all__ = ["cacheStatus", "fetchTask", "status"]
