"""What the subcommands share: axis names, model options, progress output, output planning."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from SlicerSGP.errors import Cancelled, SGPError, SGPInputError
from SlicerSGP.filesystem import new_token, publish, temp_path

AXIS_NAMES = {"k": 0, "axial": 0, "j": 1, "coronal": 1, "i": 2, "sagittal": 2,
              "0": 0, "1": 1, "2": 2}

def parse_axis(text: str | int) -> int:
    """'k'/'axial', 'j'/'coronal', 'i'/'sagittal' (or 0/1/2) -> array axis of (K, J, I)."""
    axis = AXIS_NAMES.get(str(text).lower())
    if axis is None:
        raise SGPInputError(f"Unknown --axis {text!r}: use k/axial, j/coronal or i/sagittal.")
    return axis


def int_list(text: str) -> list[int]:
    """argparse type: '3,10,17' -> [3, 10, 17]."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated slice indices like 3,10,17, got {text!r}") from None


# --------------------------------------------------------------------------- model options

def add_model_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                      *, model_help: str | None = None, model_default: str | None = "tiny",
                      with_model: bool = True) -> None:
    """--model, --weights, --device, --image-size, --dtype, --feature-dtype, --seed."""
    if with_model:
        parser.add_argument("--model", default=model_default, help=model_help or (
            "SAM2.1 size (tiny, small, base_plus, large) or an SGP checkpoint "
            "(.safetensors from `sgp train`); default tiny"))
    parser.add_argument("--weights", default=None,
                        help="'random' (seeded, for tests), a registry name, or a .pt file; "
                             "default: the cached pretrained checkpoint (`sgp weights fetch NAME`)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA, else Apple MPS, else CPU), cpu, mps, cuda or cuda:N "
                             "(default auto)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="model input size, multiple of 64 in 256..1024 (default 1024)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 autocast on CUDA, float32 on CPU), float32 or bfloat16 "
                             "(on CPUs with AMX/AVX512-BF16 about twice as fast as float32)")
    parser.add_argument("--feature-dtype", default="auto",
                        help="cached slice features: auto (bf16, half the memory) or float32 "
                             "(exact)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    parser.add_argument("--features-on", default="auto", choices=("auto", "device", "host"),
                        help="where slice features are kept: on the GPU (device), in RAM and "
                             "moved to the GPU a batch at a time (host), or auto: host when a "
                             "volume's features would not fit the device budget (default)")
    parser.add_argument("--device-budget-mb", type=float, default=None,
                        help="GPU memory slice features may take (default: the GPU's free "
                             "memory less 2 GB for the model's work; no limit on CPU)")


FEATURE_CACHE_MB = 4096
"""Default disk space for --feature-cache (the engine's DEFAULT_FEATURE_CACHE_MB; here so that
`--help` needs no torch)."""


def add_feature_cache_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--feature-cache DIR, --feature-cache-mb N (sgp segment, sgp serve)."""
    parser.add_argument("--feature-cache", type=Path, metavar="DIR", default=None,
                        help="keep encoded slice features in DIR too, so a volume opened again "
                             "(a later run, another process, a restarted server) loads them "
                             "instead of running the image encoder; keyed by the volume's "
                             "content, a hash of the model's weights and the preprocessing, "
                             "so other weights or settings never reuse them (default: memory "
                             "only)")
    parser.add_argument("--feature-cache-mb", type=float, default=None, metavar="N",
                        help="disk space for --feature-cache, in MB; least recently used "
                             f"batches deleted first (default {FEATURE_CACHE_MB})")


def model_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The Segmenter keyword arguments the model options give."""
    spec = {"weights": args.weights, "device": args.device, "image_size": args.image_size,
            "seed": args.seed, "dtype": args.dtype,
            "feature_dtype": getattr(args, "feature_dtype", "auto"),
            "features_on": getattr(args, "features_on", "auto"),
            "device_budget_mb": getattr(args, "device_budget_mb", None)}
    folder, cap = getattr(args, "feature_cache", None), getattr(args, "feature_cache_mb", None)
    if cap is not None and folder is None:
        raise SGPInputError("--feature-cache-mb is the size of --feature-cache DIR: give the "
                            "folder too, or leave both out.")
    if folder is not None:
        spec["feature_cache"] = folder
        spec["feature_cache_mb"] = FEATURE_CACHE_MB if cap is None else cap
    return spec


def segmenter_from_args(args: argparse.Namespace):
    """Build the Segmenter the model options describe (loads the model: call after every
    input and output has been checked)."""
    from SlicerSGP.method.segmenter import Segmenter  # torch + sam2: only when a model runs

    return Segmenter(args.model or "tiny", **model_spec(args))


# --------------------------------------------------------------------------- progress

def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _PlainCounter:
    """A counter for logs: one line at about every tenth of the total and at the end."""

    def __init__(self, stream: TextIO, desc: str, total: int, initial: int, unit: str):
        self.stream, self.desc, self.total, self.n, self.unit = stream, desc, total, initial, unit
        self.every = max(1, total // 10)
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n >= self.total:
            tail = f" ({self.postfix})" if self.postfix else ""
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}{tail}", file=self.stream,
                  flush=True)

    def close(self) -> None:
        pass


class Progress:
    """Progress on stderr: tqdm bars on a terminal; plain one-line messages otherwise, so logs
    get no escape codes; nothing at all with ``quiet``."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = not quiet
        self.tty = self.enabled and is_terminal(self.stream)
        self._bars: dict[str, Any] = {}
        self._stage_key: str | None = None

    def stage(self, stage: str, fraction: float) -> None:
        """The engine's ``progress(stage, fraction)`` callback."""
        if not self.enabled:
            return
        key = stage.split()[0] if stage.split() else stage
        if not self.tty:
            if key != self._stage_key:
                print(f"{stage} ...", file=self.stream, flush=True)
            self._stage_key = key
            return
        from tqdm import tqdm

        bar = self._bars.get(key)
        if bar is None:
            bar = self._bars[key] = tqdm(
                total=100, desc=stage, unit="%", leave=False, file=self.stream,
                bar_format="{desc:<22} {percentage:3.0f}%|{bar}| {elapsed}")
        bar.set_description_str(stage)
        bar.n = int(round(100 * fraction))
        bar.refresh()

    def counter(self, desc: str, total: int, *, initial: int = 0, unit: str = "it"):
        """A counter with ``update(n)``, ``set_postfix(**kw)`` and ``close()``, or None if quiet."""
        if not self.enabled:
            return None
        if not self.tty:
            return _PlainCounter(self.stream, desc, total, initial, unit)
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                    dynamic_ncols=True, leave=False)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


# --------------------------------------------------------------------------- cancel

class CancelFlag:
    """``cancel()`` check for the engine: True once SIGTERM arrived (see :func:`cancel_on_sigterm`)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


@contextmanager
def cancel_on_sigterm() -> Iterator[CancelFlag]:
    """SIGTERM asks the run to stop at the engine's next check (it raises ``Cancelled``, the
    output plan then removes its temporaries), instead of killing the process mid-write."""
    flag = CancelFlag()
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(
            flag, "requested", True))
    except ValueError:  # not the main thread (e.g. called from a worker): no handler
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- outputs

class OutputPlan:
    """Every file a command writes, checked before the run and published all at once.

    ``file()`` / ``folder()`` check a target before anything runs (a folder where a file is
    expected or the reverse, a missing folder that cannot be created, a folder that is not
    writable, two outputs on one path, a wrong suffix). After the run, ``temp(path)`` gives the
    name to write each file to: hidden, in the target's folder, with the target's suffix
    (writers pick the format by it). ``commit()`` renames all of them into place; leaving the
    ``with`` block without a commit (an exception, Cancelled, KeyboardInterrupt) removes every
    temporary and every folder the plan created, so a failed command leaves no output.
    """

    def __init__(self) -> None:
        self.token = new_token()
        self._claimed: dict[Path, str] = {}
        self._temps: list[tuple[Path, Path]] = []
        self._made_dirs: list[Path] = []
        self.committed: list[Path] = []

    # ---------------------------------------------------------------- checks (before the run)

    def _claim(self, path: Path, option: str) -> Path:
        key = Path(os.path.abspath(path))
        other = self._claimed.get(key)
        if other is not None:
            raise SGPInputError(f"{option} and {other} both name {path}; give each output its "
                                "own path.")
        self._claimed[key] = option
        return key

    @staticmethod
    def _check_parent(folder: Path, option: str, path: Path) -> None:
        """``folder`` exists as a writable folder, or can be created (nearest existing
        ancestor is a writable folder)."""
        probe = Path(os.path.abspath(folder))
        while not probe.exists():
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir():
            raise SGPInputError(f"Cannot write {option} {path}: {probe} is a file, not a folder.")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise SGPInputError(f"Cannot write {option} {path}: folder {probe} is not writable; "
                                "choose another folder or fix its permissions.")

    def file(self, path: str | os.PathLike, option: str,
             suffixes: tuple[str, ...] | None = None) -> Path:
        """Check and claim an output file; returns the path."""
        path = Path(path)
        if suffixes and not path.name.lower().endswith(tuple(s.lower() for s in suffixes)):
            raise SGPInputError(f"{option} {path} must end with {' or '.join(suffixes)}.")
        if path.is_dir():
            raise SGPInputError(f"{option} {path} is a folder; give a file name such as "
                                f"{path / ('result' + (suffixes[0] if suffixes else ''))}.")
        self._check_parent(path.parent, option, path)
        if path.exists() and not os.access(path, os.W_OK):
            raise SGPInputError(f"{option} {path} exists and is not writable.")
        self._claim(path, option)
        return path

    def folder(self, path: str | os.PathLike, option: str) -> Path:
        """Check and claim an output folder (files named later go in it with ``temp``)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise SGPInputError(f"{option} {path} is a file; it must name a folder (existing "
                                "or to be created) for one file per structure.")
        self._check_parent(path, option, path)
        self._claim(path, option)
        return path

    def claimed(self, path: str | os.PathLike) -> bool:
        return Path(os.path.abspath(path)) in self._claimed

    # ---------------------------------------------------------------- writing (after the run)

    def _make_dirs(self, folder: Path) -> None:
        missing = []
        probe = Path(os.path.abspath(folder))
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:  # made meanwhile by someone else (another rank): not ours
                continue
            self._made_dirs.append(d)

    def temp(self, path: str | os.PathLike) -> Path:
        """Where to write ``path`` for now; renamed onto ``path`` by ``commit()``."""
        path = Path(path)
        self._make_dirs(path.parent)
        tmp = temp_path(path, self.token)
        self._temps.append((tmp, path))
        return tmp

    def commit(self) -> list[Path]:
        """Rename every temporary into place (each rename is atomic; all happen only after the
        whole command succeeded). Returns the published paths."""
        for tmp, final in self._temps:
            if not tmp.exists():
                raise RuntimeError(f"internal error: {tmp} was planned for {final} but not "
                                   "written")
        for tmp, final in self._temps:
            publish(tmp, final)
            self.committed.append(final)
        self._temps.clear()
        self._made_dirs.clear()
        return list(self.committed)

    def abort(self) -> None:
        """Remove every temporary (and siblings a writer derived from its name, e.g. the
        ``.json`` beside a checkpoint) and the folders this plan created."""
        for tmp, _ in self._temps:
            stem = tmp.name[: tmp.name.index(f".tmp-{self.token}") + len(self.token) + 5]
            for p in tmp.parent.glob(stem + "*") if tmp.parent.is_dir() else []:
                try:
                    p.unlink()
                except OSError:
                    pass
        self._temps.clear()
        for d in reversed(self._made_dirs):
            try:
                d.rmdir()
            except OSError:  # not empty: something else wrote there
                pass
        self._made_dirs.clear()

    def __enter__(self) -> OutputPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._temps or self._made_dirs:
            self.abort()


def print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; errors the user can act on become a message and an exit code
    (2 bad input, 1 other errors, 130 interrupted or cancelled), never a traceback."""
    try:
        return int(args.func(args) or 0)
    except SGPInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Cancelled as exc:
        print(f"cancelled: {exc} Nothing was written.", file=sys.stderr)
        return 130
    except SGPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a disk that filled up while writing: no traceback needed
        print(f"error: {exc}. Nothing was written.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
