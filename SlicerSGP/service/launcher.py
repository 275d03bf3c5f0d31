"""Run `sgp serve` on this computer for the Slicer module: standard library only.

The server listens on 127.0.0.1, on a free port, with a fresh random token in a file only this
user can read. It is started with a pipe on its standard input and exits when that pipe closes,
so even a crashed parent leaves no server behind. Its stderr goes to a bounded log file; the
last lines are kept to explain a death (out of memory, a missing package).
"""

from __future__ import annotations

import atexit
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from SlicerSGP.errors import SGPServiceError
from SlicerSGP.service.client import EngineClient

LOG_LIMIT = 2 * 2**20
"""Bytes of stderr kept in the log file (the previous part is kept as ``.1``)."""
TAIL_LINES = 12


class LocalEngine:
    """A `sgp serve` subprocess on loopback, restarted when it dies, stopped at exit."""

    def __init__(self, python: str = sys.executable, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, log_dir: str | os.PathLike | None = None):
        self.python = python
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        self._dir = Path(tempfile.mkdtemp(prefix="sgp-engine-", dir=log_dir))
        self.log_path = self._dir / "engine.log"
        self.token_path = self._dir / "token"
        self.exit_reason: str | None = None
        """Why the last server ended (None while none has ended on its own)."""
        self.restarts = 0
        self.client: EngineClient | None = None
        self._proc: subprocess.Popen | None = None
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._lock = threading.Lock()
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

    def log_tail(self) -> list[str]:
        return list(self._tail)

    # ------------------------------------------------------------------ start / stop

    def command(self) -> list[str]:
        return [self.python, "-m", "SlicerSGP.service", "--host", "127.0.0.1", "--port", "0",
                "--token-file", str(self.token_path), "--watch-stdin", *self.extra_args]

    def start(self, timeout: float = 300.0) -> EngineClient:
        """Start the server and wait for its ``ready URL`` line; returns a client for it."""
        with self._lock:
            if self.alive and self.client is not None:
                return self.client
            self._write_token()
            env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
            if os.path.realpath(self.python) != os.path.realpath(sys.executable):
                # Another Python (e.g. a CUDA environment) must not inherit the host's Python
                # paths, e.g. Slicer's PYTHONHOME, unless the caller sets them.
                for key in ("PYTHONHOME", "PYTHONPATH"):
                    if key not in self.env:
                        env.pop(key, None)
            self._tail.clear()
            try:
                proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                        start_new_session=True)
            except OSError as e:
                raise SGPServiceError(f"Cannot start the engine with {self.python}: "
                                      f"{e.strerror}. Check the Python path in the settings.") \
                    from None
            self._proc = proc
            lines: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=self._pump_stdout, args=(proc, lines), daemon=True).start()
            threading.Thread(target=self._pump_stderr, args=(proc,), daemon=True).start()
            url = self._wait_ready(proc, lines, timeout)
            token = self.token_path.read_text().strip()
            self.client = EngineClient(url, token)
            return self.client

    def ensure_running(self, timeout: float = 300.0) -> EngineClient:
        """The running server's client; a dead one is restarted (``exit_reason`` says why it
        died)."""
        if self.alive and self.client is not None:
            return self.client
        if self._proc is not None:
            self.exit_reason = self._describe_exit(self._proc)
            self.restarts += 1
        return self.start(timeout)

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
        for stream in (proc.stdin, proc.stdout, proc.stderr) if proc is not None else ():
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

    def _wait_ready(self, proc: subprocess.Popen, lines: queue.Queue, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise SGPServiceError(f"The engine did not become ready within {timeout:g} s "
                                      f"(log: {self.log_path}).")
            try:
                line = lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the process is ending
                proc.wait(10)
                self.exit_reason = self._describe_exit(proc)
                raise SGPServiceError(f"The engine stopped while starting: {self.exit_reason}")
            if line.startswith("ready "):
                return line.split(None, 1)[1].strip()

    def _pump_stdout(self, proc: subprocess.Popen, lines: queue.Queue) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:  # drained to the end so the server never blocks on it
            lines.put(raw.decode(errors="replace"))
        lines.put(None)

    def _pump_stderr(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        log = open(self.log_path, "ab")  # noqa: SIM115 (rotated below, closed at the end)
        try:
            for raw in proc.stderr:
                self._tail.append(raw.decode(errors="replace").rstrip())
                log.write(raw)
                log.flush()
                if log.tell() > LOG_LIMIT:
                    log.close()
                    os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
                    log = open(self.log_path, "ab")  # noqa: SIM115
        except (OSError, ValueError):
            pass
        finally:
            log.close()

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
        time.sleep(0.05)  # let the stderr reader take the last lines
        tail = [ln for ln in self._tail if ln.strip()][-5:]
        return why + ("; last messages: " + " | ".join(tail) if tail else "")
