"""Where the engine runs and how the module reaches it.

* Local (default): the module starts ``sgp serve`` itself through
  :class:`SlicerSGP.service.launcher.LocalEngine`, with Slicer's Python or one the user names
  (e.g. an environment with a CUDA build of torch), bound to 127.0.0.1 on a free port with a
  fresh random token. A server that died (out of memory, killed) is restarted on the next
  run, and the reason it died is kept for the message. A change of model settings restarts it
  with the new ones.
* Remote: a ``sgp serve`` the user runs elsewhere, reached with its URL and token. The
  version handshake and the model check name what differs.

Starting a local engine never blocks Slicer: :meth:`EngineConnection.ready` launches it and
answers None until it is ready (the Widget's timer, a run's poll and the effect's poll call it
again); :meth:`EngineConnection.client` waits in a loop (console, scripts).

Only the service client (stdlib + numpy) is imported: Slicer's process never imports torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from slicer.i18n import tr as _

from SGPSegmentLib import processes
from SlicerSGP.errors import SGPError, SGPServiceError
from SlicerSGP.service.client import connect_engine
from SlicerSGP.service.launcher import LocalEngine

START_TIMEOUT_S = 180.0
"""Time for a local engine to import torch and load the model (a cold start of a large model
from a slow disk can take a minute)."""


FEATURE_CACHE_MB = 4096
"""Disk space for the local engine's encoded slice features (least recently used dropped)."""


DEATH_GRACE_S = 2.0
"""How long a lost connection waits for the local engine's exit to show (to say why)."""


@dataclass(frozen=True)
class ModelSettings:
    """The model a run needs; a local engine is started with these, a remote one is checked."""

    model: str = "tiny"
    weights: str | None = None
    device: str = "auto"
    imageSize: int = 1024
    seed: int = 0

    def serveArguments(self) -> list[str]:
        args = ["--model", self.model, "--device", self.device, "--image-size", str(self.imageSize)]
        args += ["--seed", str(self.seed)]
        if self.weights:
            args += ["--weights", self.weights]
        # Slice features also on disk, beside the weights: a volume opened again (another
        # session, an engine restart) is not encoded again. Keyed by content and weights.
        from SlicerSGP.weights_registry import cache_dir  # stdlib only, no torch

        try:
            folder = cache_dir() / "features"
        except SGPError:  # no writable cache folder: features stay in the engine's memory
            return args
        return args + ["--feature-cache", str(folder), "--feature-cache-mb",
                       str(FEATURE_CACHE_MB)]

    def expected(self) -> dict:
        """What the server's model must match (keys of ``Segmenter.describe()``)."""
        expected = {"model": self.model, "image_size": self.imageSize, "seed": self.seed}
        if self.device != "auto":
            expected["device"] = self.device
        if self.weights == "random":
            expected["weights"] = "random"
        return expected


defaultPython = processes.defaultPython


def engineEnvironment(python: str | None = None) -> dict[str, str]:
    """The local engine's whole environment for ``python`` (None: Slicer's own): see
    :func:`SGPSegmentLib.processes.pythonEnvironment`. The SlicerSGP package this module
    ships comes first on the path, so that client and server are the same version."""
    return processes.pythonEnvironment(python)


class EngineConnection:
    """The engine the module talks to; :meth:`client` gives a ready ``EngineClient``."""

    def __init__(self) -> None:
        self.mode = "local"
        self.url = ""
        self.token = ""
        self.python = ""
        """Python for the local engine; '' = Slicer's own."""
        self._local: LocalEngine | None = None
        self._localKey: tuple | None = None
        self._client = None
        self.lastRestartReason = ""
        """Why the local engine had to be restarted last time ('' if it never died)."""

    def configure(
        self, mode: str = "local", url: str = "", token: str = "", python: str = ""
    ) -> None:
        mode = (mode or "local").lower()
        if mode not in ("local", "remote"):
            raise SGPError(_(
                "Engine must be 'local' (this computer) or 'remote'; got {mode!r}."
            ).format(mode=mode))
        if (mode, url, token, python) != (self.mode, self.url, self.token, self.python):
            self.mode, self.url, self.token, self.python = (
                mode,
                url.strip(),
                token.strip(),
                python.strip(),
            )
            self._client = None
            if mode != "local":
                self.stop()

    # ------------------------------------------------------------------------------ access

    def client(self, settings: ModelSettings):
        """A client of an engine running ``settings``' model (starting or restarting it)."""
        if self.mode == "remote":
            return self._remote(settings)
        return self._localClient(settings)

    def _remote(self, settings: ModelSettings | None):
        if not self.url:
            raise SGPServiceError(
                _(
                    "No server URL: enter the remote engine's URL (e.g. http://gpu-host:8765) and "
                    "its token, or choose 'this computer'."
                )
            )
        self._client = connect_engine(
            self.url, self.token or None, settings.expected() if settings else None
        )
        return self._client

    def _localClient(self, settings: ModelSettings, timeout: float = START_TIMEOUT_S):
        """Wait for a local engine running ``settings`` (console, scripts, tests)."""
        deadline = time.monotonic() + timeout
        while True:
            client = self.ready(settings)
            if client is not None:
                return client
            if time.monotonic() > deadline:  # the engine's own deadline normally comes first
                raise SGPServiceError(_(
                    "The engine did not become ready within {timeout:g} s."
                ).format(timeout=timeout))
            time.sleep(0.05)

    def ready(self, settings: ModelSettings):
        """A client of an engine running ``settings``' model, or None while a local one is
        starting (it is launched or relaunched here); never waits for a local engine. Raises
        when it cannot start (its reason: the log's last lines)."""
        if self.mode == "remote":
            return self._remote(settings)
        python = self.python or defaultPython()
        key = (python, tuple(settings.serveArguments()))
        if self._local is not None and self._localKey != key:
            self.stop()  # other model settings: a fresh engine with the new ones
        if self._local is None:
            self._local = LocalEngine(
                python=python, extra_args=list(key[1]), base_env=engineEnvironment(python)
            )
            self._localKey = key
            self._local.launch(timeout=START_TIMEOUT_S)
        elif self._local.client is not None and not self._local.alive:
            # It was ready and died (out of memory, killed): a fresh one. One that dies while
            # starting is reported by poll_ready below instead.
            self._local.relaunch(timeout=START_TIMEOUT_S)
            self.lastRestartReason = str(self._local.exit_reason or "")
            self._client = None
        try:
            client = self._local.poll_ready()
        except BaseException:
            self.stop()  # the next call starts afresh
            raise
        if client is not None:
            self._client = client
        return client

    def lastLogLine(self) -> str:
        """The local engine's last log line (what it is doing while it starts), or ''."""
        if self.mode != "local" or self._local is None:
            return ""
        lines = [line for line in self._local.log_tail() if line.strip()]
        return lines[-1][-200:] if lines else ""

    @property
    def starting(self) -> bool:
        """A local engine was launched and is not ready yet."""
        return self.mode == "local" and self._local is not None and self._local.starting

    def deathReason(self) -> str:
        """Why the local engine stopped ('' while it runs or for a remote engine)."""
        if self.mode != "local" or self._local is None or self._local.alive:
            return ""
        # LocalEngine sets exit_reason only when it restarts; describe the death now already.
        if not self._local._proc:
            return _("it stopped")
        return self._local._describe_exit(self._local._proc)

    def describeFailure(self, exc: BaseException, duringRun: bool = True) -> BaseException:
        """Turn a lost connection into a message that says what happened (``exc`` itself when
        there is nothing to add)."""
        if not isinstance(exc, (SGPServiceError, OSError, ConnectionError)):
            return exc
        if self.mode == "local" and self._local is not None:
            # A lost connection usually means the process is dying: give the OS a moment to
            # report its exit, so the message can say why.
            deadline = time.monotonic() + DEATH_GRACE_S
            while self._local.alive and time.monotonic() < deadline:
                time.sleep(0.05)
        reason = self.deathReason()
        if reason:
            message = (
                _(
                    "The local engine stopped during the run ({reason}); nothing was written. "
                    "The next run restarts it. If it ran out of memory, try a smaller input "
                    "size or model, or the CPU device."
                )
                if duringRun
                else _(
                    "The local engine stopped before the run ({reason}); nothing was written. "
                    "The next run restarts it. If it ran out of memory, try a smaller input "
                    "size or model, or the CPU device."
                )
            )
            return SGPServiceError(message.format(reason=reason))
        if self.mode == "remote" and duringRun:
            return SGPServiceError(
                _(
                    "Lost the connection to the engine at {url} ({exc}); nothing was "
                    "written. Check that the server still runs and is reachable, then run "
                    "again."
                ).format(url=self.url, exc=exc)
            )
        return exc

    def connect(self, settings: ModelSettings | None = None) -> dict:
        """Reach the engine (starting a local one with ``settings``) and return its info; a
        remote server's model is shown, not checked (runs check it)."""
        if self.mode == "remote":
            return self._remote(None).info()
        return self._localClient(settings or ModelSettings()).info()

    def stop(self) -> None:
        """Stop a local engine this module started (Slicer exits, settings change)."""
        if self._local is not None:
            self._local.stop()
        self._local = None
        self._localKey = None
        self._client = None


def describeServer(info: dict) -> str:
    """One line for people: SlicerSGP version and protocol, the model and its device, the GPUs."""
    parts = [
        _("SlicerSGP {version} (protocol {protocol})").format(
            version=info.get("version", "?"), protocol=info.get("protocol", "?")
        )
    ]
    model = info.get("model") or {}
    if model:
        parts.append(
            _("model {model} at {imageSize} px on {device}").format(
                model=model.get("model", "?"),
                imageSize=model.get("image_size", "?"),
                device=model.get("device", "?"),
            )
        )
    gpus = [d for d in info.get("devices") or [] if str(d.get("device", "")).startswith("cuda")]
    if gpus:
        parts.append(
            _("GPU: {gpus}").format(gpus=", ".join(
                f"{d['device']} {d.get('name', '')} ({(d.get('memory_total_mb') or 0) / 1024:.0f} GB)"
                for d in gpus
            ))
        )
    else:
        parts.append(_("no CUDA GPU on the server (CPU only: slow)"))
    return "; ".join(parts)
