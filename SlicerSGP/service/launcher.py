"""Run `sgp serve` on this computer for the Slicer module: standard library only.

The server listens on 127.0.0.1, on a free port, with a fresh random token in a file only this
user can read. It is started with a pipe on its standard input and exits when that pipe closes,
so even a crashed parent leaves no server behind. Its stdout (the ``ready URL`` line) and stderr
(a bounded log) go to files: :meth:`LocalEngine.launch` returns at once and
:meth:`LocalEngine.poll_ready` reads them (no threads: inside Slicer a Python thread barely runs
while Qt idles), so Slicer keeps responding while the engine starts; :meth:`LocalEngine.start`
waits (console, scripts). The log's last lines explain a death (out of memory, a missing
package).
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from SlicerSGP.errors import SGPServiceError
from SlicerSGP.service.client import EngineClient

LOG_LIMIT = 2 * 2**20
"""Bytes of stderr kept in the log file (the previous part is kept as ``.1``)."""
TAIL_LINES = 12
CREATE_NO_WINDOW = 0x08000000
"""Windows: start the server without a console window."""


def read_appended(path: str | os.PathLike, offset: int) -> tuple[bytes | None, int]:
    """What a child process appended to its output file since ``offset``, and the new offset
    (None and the same offset when the file cannot be read): output is polled from files, not
    pipes, since reader threads barely run inside Slicer."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
            return data, f.tell()
    except OSError:
        return None, offset


class LocalEngine:
    """A `sgp serve` subprocess on loopback, restarted when it dies, stopped at exit."""

    def __init__(self, python: str = sys.executable, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, log_dir: str | os.PathLike | None = None,
                 base_env: dict[str, str] | None = None):
        self.python = python
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        """Added to the server's environment."""
        self.base_env = None if base_env is None else dict(base_env)
        """The server's whole environment (before ``env``); None: this one, without
        ``PYTHONHOME``/``PYTHONPATH`` for another Python."""
        self._dir = Path(tempfile.mkdtemp(prefix="sgp-engine-", dir=log_dir))
        self.log_path = self._dir / "engine.log"
        self.stdout_path = self._dir / "stdout.txt"
        self.token_path = self._dir / "token"
        self.exit_reason: str | None = None
        """Why the last server ended (None while none has ended on its own)."""
        self.restarts = 0
        self.client: EngineClient | None = None
        self._proc: subprocess.Popen | None = None
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._log_offset = 0
        self._log_partial = b""
        self._deadline = 0.0
        atexit.register(self.stop)

    # ------------------------------------------------------------------ state

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def url(self) -> str | None:
        return None if self.client is None else self.client.url

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def starting(self) -> bool:
        """Launched, not ready yet, not ended."""
        return self.alive and self.client is None

    def log_tail(self) -> list[str]:
        self._read_log()
        return list(self._tail)

    # ------------------------------------------------------------------ start / stop

    def command(self) -> list[str]:
        return [self.python, "-m", "SlicerSGP.service", "--host", "127.0.0.1", "--port", "0",
                "--token-file", str(self.token_path), "--watch-stdin", *self.extra_args]

    def environment(self) -> dict[str, str]:
        """The server's environment (see ``base_env`` and ``env``)."""
        if self.base_env is not None:
            env = dict(self.base_env)
        else:
            env = dict(os.environ)
            if os.path.normcase(os.path.abspath(self.python)) != os.path.normcase(
                    os.path.abspath(sys.executable)):
                # Another Python (e.g. a CUDA environment) must not inherit the host's Python
                # paths, e.g. Slicer's PYTHONHOME, unless the caller sets them.
                for key in ("PYTHONHOME", "PYTHONPATH"):
                    env.pop(key, None)
        return {**env, **self.env, "PYTHONUNBUFFERED": "1"}

    def launch(self, timeout: float = 300.0) -> None:
        """Start the server and return at once; :meth:`poll_ready` says when it is ready (and
        fails after ``timeout`` seconds). Nothing happens while one runs."""
        if self.alive:
            return
        self._write_token()
        self._tail.clear()
        self._log_offset, self._log_partial = 0, b""
        if sys.platform == "win32":
            options = {"creationflags": CREATE_NO_WINDOW}
        else:
            options = {"start_new_session": True}
        try:
            self.log_path.write_bytes(b"")  # appended to (O_APPEND): see _read_log
            with open(self.stdout_path, "wb") as out, open(self.log_path, "ab") as err:
                proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE, stdout=out,
                                        stderr=err, env=self.environment(), **options)
        except OSError as e:
            raise SGPServiceError(f"Cannot start the engine with {self.python}: "
                                  f"{e.strerror}. Check the Python path in the settings.") \
                from None
        self._proc, self.client = proc, None
        self._deadline = time.monotonic() + timeout

    def poll_ready(self) -> EngineClient | None:
        """The client once the server printed its ready line, None while it is starting (never
        waits); raises SGPServiceError when it stopped or did not get ready in time."""
        proc = self._proc
        if proc is None:
            raise SGPServiceError("The engine was not started.")
        if self.client is not None and proc.poll() is None:
            return self.client
        url = self._ready_url() if proc.poll() is None else None
        if url is not None:
            token = self.token_path.read_text().strip()
            self.client = EngineClient(url, token)
            return self.client
        if proc.poll() is not None:
            self.exit_reason = self._describe_exit(proc)
            raise SGPServiceError(f"The engine stopped while starting: {self.exit_reason}")
        if time.monotonic() > self._deadline:
            self.stop()
            raise SGPServiceError("The engine did not become ready in time "
                                  f"(log: {self.log_path}).")
        self._read_log()
        return None

    def start(self, timeout: float = 300.0) -> EngineClient:
        """Start the server and wait for its ``ready URL`` line; returns a client for it."""
        if self.alive and self.client is not None:
            return self.client
        if not self.alive:
            self.launch(timeout)
        while True:
            client = self.poll_ready()
            if client is not None:
                return client
            time.sleep(0.05)

    def ensure_running(self, timeout: float = 300.0) -> EngineClient:
        """The running server's client; a dead one is restarted (``exit_reason`` says why it
        died)."""
        if self.alive and self.client is not None:
            return self.client
        self.relaunch(timeout)
        return self.start(timeout)

    def relaunch(self, timeout: float = 300.0) -> None:
        """Launch a dead server again without waiting (``exit_reason`` says why it died)."""
        if self.alive:
            return
        if self._proc is not None:
            self.exit_reason = self._describe_exit(self._proc)
            self.restarts += 1
        self.launch(timeout)

    def stop(self, grace: float = 5.0) -> None:
        """Terminate the server (then kill it after ``grace`` seconds) and remove its files."""
        proc, self._proc, self.client = self._proc, None, None
        if proc is not None and proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(grace)
            except OSError:
                pass
        for stream in (proc.stdin,) if proc is not None else ():
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            self.token_path.unlink()
        except OSError:
            pass

    def cleanup(self) -> None:
        """``stop()`` and remove the log folder too."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def _write_token(self) -> None:
        try:
            self.token_path.unlink()
        except FileNotFoundError:
            pass
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))

    def _ready_url(self) -> str | None:
        try:
            text = self.stdout_path.read_text(errors="replace")
        except OSError:
            return None
        for line in text.split("\n")[:-1]:  # complete lines only
            if line.startswith("ready "):
                return line.split(None, 1)[1].strip()
        return None

    def _read_log(self) -> None:
        """Take the log's new lines into the tail; keep the file under LOG_LIMIT."""
        data, self._log_offset = read_appended(self.log_path, self._log_offset)
        if data is None:
            return
        lines = (self._log_partial + data).split(b"\n")
        self._log_partial = lines.pop()
        for raw in lines:
            self._tail.append(raw.decode(errors="replace").rstrip())
        if self._log_offset > LOG_LIMIT:
            try:  # the server appends (O_APPEND), so it writes on at the new end
                shutil.copyfile(self.log_path, self.log_path.with_suffix(".log.1"))
                os.truncate(self.log_path, 0)
                self._log_offset = 0
            except OSError:
                pass

    def _describe_exit(self, proc: subprocess.Popen) -> str:
        code = proc.poll()
        if code is None:
            return "still running"
        if code < 0:
            sig = -code
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            why = (f"killed ({name}), e.g. out of memory" if sig == signal.SIGKILL
                   else f"ended by {name}")
        else:
            why = f"exited with code {code}"
        tail = [ln for ln in self.log_tail() if ln.strip()][-5:]
        return why + ("; last messages: " + " | ".join(tail) if tail else "")
