"""Fill between slices (ITK's morphological contour interpolation) in a long-lived child
process, for the interpolation prior (:mod:`~SlicerSGP.method.prior`) and training episodes.

ITK runs in a child process for the reason :func:`SlicerSGP.evaluation.baselines.
fill_between_slices` gives (its wheels corrupt the heap of a process that has SimpleITK loaded
too); the child is kept for later calls because loading ITK's interpolation module takes
10-15 s of CPU and interpolating a structure then takes milliseconds. Requests travel as .npy
files named on the child's stdin; the child answers ``ok`` or ``error: ...`` on its stdout.
"""

from __future__ import annotations

import atexit
import importlib.util
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from SlicerSGP.errors import SGPInputError

MISSING_ITK = ("The interpolation prior needs ITK's morphological contour interpolation "
               "(Segment Editor's Fill between slices): pip install "
               "itk-morphologicalcontourinterpolation, or run with --interpolation-prior off.")


class InterpolationWorker:
    """One child process doing ITK's morphological contour interpolation on request."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._folder: tempfile.TemporaryDirectory | None = None
        self._lock = threading.Lock()
        self._count = 0
        self.calls = 0
        """Interpolations done (the re-run test checks that unchanged drawings do none)."""

    def start(self) -> None:
        """Start the child now, without waiting: it loads ITK while the caller goes on (the
        engine starts it when it starts, so the first run does not wait 10-15 s for ITK).
        Without ITK installed this does nothing; the first interpolation then says what is
        missing."""
        if importlib.util.find_spec("itk") is None:
            return
        with self._lock:
            self._start()

    def _start(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        if importlib.util.find_spec("itk") is None:
            raise SGPInputError(MISSING_ITK)
        self._folder = tempfile.TemporaryDirectory(prefix="sgp-interp-")
        self._process = subprocess.Popen([sys.executable, "-m", __name__], text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, bufsize=1)
        atexit.register(self.close)
        return self._process

    def interpolate(self, sparse: np.ndarray) -> np.ndarray:
        """``sparse`` (N, H, W) label map holding each structure on its drawn slices ->
        interpolated label map along axis 0 (nothing beyond each structure's outermost
        drawn slices)."""
        if not sparse.any():
            return np.zeros_like(sparse)
        with self._lock:
            process = self._start()
            self._count += 1
            folder = Path(self._folder.name)
            src, dst = folder / f"in{self._count}.npy", folder / f"out{self._count}.npy"
            np.save(src, np.ascontiguousarray(sparse))
            try:
                process.stdin.write(f"{src}\t{dst}\n")
                process.stdin.flush()
                answer = process.stdout.readline().strip()
            except (BrokenPipeError, OSError):
                answer = "error: the interpolation process ended"
            if answer != "ok":
                self.close()
                raise SGPInputError(f"Fill between slices (ITK) failed: {answer or 'no answer'}")
            out = np.load(dst).astype(sparse.dtype)
            src.unlink(missing_ok=True)
            dst.unlink(missing_ok=True)
            self.calls += 1
        return out

    def close(self) -> None:
        """End the child process (it also ends when its stdin closes with this process)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            try:
                process.stdin.close()
                process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


_SHARED: InterpolationWorker | None = None


def shared_worker() -> InterpolationWorker:
    """The process's one worker (ITK loads once per process, whoever asks first)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = InterpolationWorker()
    return _SHARED


def _serve() -> None:
    """The child's loop: one ``src<TAB>dst`` request per line until stdin closes."""
    import itk

    # ITK loads its modules on first use: load the interpolation filter now, before the
    # first request, so a child started early has it ready.
    _ = itk.MorphologicalContourInterpolator
    for line in sys.stdin:
        try:
            src, dst = line.rstrip("\n").split("\t")
            image = itk.image_from_array(np.load(src))
            interpolator = itk.MorphologicalContourInterpolator.New(image)
            interpolator.SetAxis(2)  # ITK counts x, y, z: numpy axis 0 is z
            interpolator.Update()
            np.save(dst, itk.array_from_image(interpolator.GetOutput()))
            print("ok", flush=True)
        except Exception as exc:  # noqa: BLE001 - the parent reports it
            print(f"error: {type(exc).__name__}: {exc}".replace("\n", " "), flush=True)


if __name__ == "__main__":
    _serve()
