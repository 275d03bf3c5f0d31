"""The engine's Python packages: which are missing or too old, and installing them on request.

Checks read installed distributions' metadata (``importlib.metadata``), so nothing heavy is
imported: Slicer's process never imports torch. The local engine may run in another Python the
user names; then the check runs there, in a short subprocess.

Every process of the engine's Python runs in the environment :mod:`.processes` gives it
(another Python never sees Slicer's ``PYTHONHOME``/``PYTHONPATH``). Installing never happens
without the user's confirmation (the module's self-test never installs) and never blocks Slicer:
:func:`installTask` is a :class:`~SGPSegmentLib.processes.Task` the Widget's timer polls.
``sam2`` is a third-party source distribution: it is downloaded, its sha256 checked against the
pinned value, and only then installed, without build isolation and dependencies and without its
optional CUDA extension (SAM2 runs without it; only its hole filling is skipped). ``peft`` is
needed only by trained SGP checkpoints (LoRA adapters) and is installed only for them.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version
from slicer.i18n import tr as _

from SGPSegmentLib.processes import (
    Step,
    Task,
    isOwnPython,
    popenOptions,
    pythonEnvironment,
    runPython,
)
from SlicerSGP.errors import SGPError
from SlicerSGP.filesystem import file_sha256

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
"""The engine's packages, one requirement a line: the file pyproject.toml reads for the package's
dependencies, installed by CMake beside the module's other resources."""

SGP_CHECKPOINT_ONLY = ("peft",)
"""Needed only by a trained SGP checkpoint (its LoRA adapters), so installed only for one."""

SAM2_REQUIREMENT = "sam2==1.1.0"
SAM2_SDIST = "sam2-1.1.0.tar.gz"
SAM2_SHA256 = "7e0ea252d43c10d853e3acfce0b5770ac683c30481bd6de311300e9d44f45b74"

_VERSIONS_SCRIPT = (
    "import importlib.metadata as m, json, sys\n"
    "out = {}\n"
    "for name in sys.argv[1:]:\n"
    "    try: out[name] = m.version(name)\n"
    "    except m.PackageNotFoundError: out[name] = None\n"
    "print(json.dumps(out))\n"
)


def packageRequirements() -> list[str]:
    """The requirements in :data:`REQUIREMENTS_FILE` (comments and blank lines left out)."""
    lines = REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines()
    return [text for text in (line.split("#", 1)[0].strip() for line in lines) if text]


def torchRequirement() -> str:
    """torch's line of :data:`REQUIREMENTS_FILE` (its floor is sam2's own: a lower one lets pip
    keep a torch sam2 cannot run with)."""
    return next(r for r in packageRequirements() if Requirement(r).name == "torch")


def requirements(sgpCheckpoint: bool = False) -> list[str]:
    """Every requirement of the engine for a model choice (peft only for SGP checkpoints)."""
    reqs = [r for r in packageRequirements()
            if sgpCheckpoint or Requirement(r).name not in SGP_CHECKPOINT_ONLY]
    return [*reqs, SAM2_REQUIREMENT]


def installedVersions(names, python: str | None = None) -> dict[str, str | None]:
    """``{distribution: version or None}`` in this Python, or in another ``python`` (a short
    subprocess in that Python's own, clean environment)."""
    if isOwnPython(python):
        out = {}
        for name in names:
            try:
                out[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                out[name] = None
        return out
    proc = runPython(python, ["-c", _VERSIONS_SCRIPT, *names])
    return _parseVersions(python, proc.returncode, proc.stdout, proc.stderr)


def _parseVersions(python, code: int, stdout: str, stderr: str = "") -> dict[str, str | None]:
    try:
        if code == 0:
            return json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pass
    raise SGPError(
        _(
            "Could not run the engine's Python {python!r} ({output}); choose a working "
            "Python executable or leave the setting empty for Slicer's own."
        ).format(python=python, output=(stderr or stdout).strip()[-300:])
    )


def problems(reqs, versions: dict[str, str | None]) -> list[str]:
    """One line per requirement that is missing or whose installed version does not satisfy it."""
    out = []
    for text in reqs:
        req = Requirement(text)
        version = versions.get(req.name)
        if version is None:
            # The name stays first, untranslated: installSteps reads it back from the line.
            out.append(f"{req.name}: " + _("not installed (needs {requirement})").format(
                requirement=text))
            continue
        try:
            ok = req.specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            out.append(f"{req.name}: " + _("{version} installed, needs {specifier}").format(
                version=version, specifier=req.specifier))
    return out


def missing(sgpCheckpoint: bool = False, python: str | None = None) -> list[str]:
    """Problems with the engine's packages ([] when it can run)."""
    reqs = requirements(sgpCheckpoint)
    names = [Requirement(r).name for r in reqs]
    return problems(reqs, installedVersions(names, python))


def verifySam2(path: Path) -> None:
    """Raise unless ``path`` is exactly the pinned sam2 source distribution."""
    actual = file_sha256(path)
    if actual != SAM2_SHA256:
        raise SGPError(
            _(
                "The downloaded {name} has sha256 {actual}, not the pinned {SAM2_SHA256}; it "
                "was not installed. The package index may serve a different file: report "
                "this and do not install it by hand."
            ).format(name=path.name, actual=actual, SAM2_SHA256=SAM2_SHA256)
        )


def runPip(python: str, args: list[str], env: dict[str, str] | None = None) -> str:
    """``python -m pip ARGS``, waiting (console and scripts; the panel uses
    :func:`installTask`); raises SGPError with pip's last lines when it fails."""
    proc = subprocess.run(
        [python, "-m", "pip", *args],
        capture_output=True,
        text=True,
        env=env or pythonEnvironment(python),
        timeout=3600,
        stdin=subprocess.DEVNULL,
        **popenOptions(),
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SGPError(_("pip {command} failed:\n{tail}").format(command=args[0], tail=tail))
    return proc.stdout


def installSam2(python: str, pip=runPip) -> None:
    """Download the sam2 sdist, check its sha256, then install it (no deps, no CUDA build)."""
    env = dict(pythonEnvironment(python), SAM2_BUILD_CUDA="0")
    with tempfile.TemporaryDirectory(prefix="sgp-sam2-") as tmp:
        pip(python, _sam2DownloadArgs(tmp), env)
        pip(python, _sam2InstallArgs(_checkedSam2(tmp)), env)


def _sam2DownloadArgs(folder) -> list[str]:
    return [
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--no-build-isolation",
        "-d",
        str(folder),
        SAM2_REQUIREMENT,
    ]


def _sam2InstallArgs(sdist: Path) -> list[str]:
    return ["install", "--no-build-isolation", "--no-deps", str(sdist)]


def _checkedSam2(folder) -> Path:
    """The downloaded sdist in ``folder``, after its sha256 matched the pinned one."""
    sdist = Path(folder) / SAM2_SDIST
    if not sdist.is_file():
        raise SGPError(_(
            "pip did not download {SAM2_SDIST}; nothing was installed."
        ).format(SAM2_SDIST=SAM2_SDIST))
    verifySam2(sdist)
    return sdist


def installTorch(python: str, pip=runPip) -> None:
    """torch with the CUDA build that fits this computer's driver, through light-the-torch (as
    Slicer's PyTorch extension does), in a subprocess: this process never imports torch."""
    pip(python, ["install", "light-the-torch>=0.7"])
    proc = subprocess.run(
        [python, "-m", "light_the_torch", "install", torchRequirement()],
        capture_output=True,
        text=True,
        timeout=3600,
        env=pythonEnvironment(python),
        stdin=subprocess.DEVNULL,
        **popenOptions(),
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SGPError(_("Installing PyTorch failed:\n{tail}").format(tail=tail))


RAW_PROGRESS_PIP = Version("24.1")
"""pip's ``--progress-bar raw`` (``Progress DONE of TOTAL`` lines: the panel's fraction)."""


def installSteps(
    problemLines: list[str], python: str, sgpCheckpoint: bool = False, pipVersion=None
) -> list[Step]:
    """The steps that install what :func:`missing` reported into ``python``'s environment:
    torch through light-the-torch, the other packages, sam2 (checked against its pinned sha256
    before it is installed), then a check that nothing is missing any more. A pip of
    ``pipVersion`` >= 24.1 prints its download progress as lines the panel reads."""
    names = {line.split(":", 1)[0] for line in problemLines}
    reqs = [r for r in requirements(sgpCheckpoint) if Requirement(r).name in names]
    env = pythonEnvironment(python)
    try:
        raw = pipVersion is not None and Version(pipVersion) >= RAW_PROGRESS_PIP
    except InvalidVersion:
        raw = False
    pip = [python, "-m", "pip"]
    bar = ["--progress-bar", "raw"] if raw else []
    steps = []
    if "torch" in names:
        steps.append(
            Step(_("installing light-the-torch"), [*pip, "install", *bar, "light-the-torch>=0.7"])
        )
        steps.append(
            Step(
                _("installing PyTorch (over 1 GB with CUDA)"),
                [python, "-m", "light_the_torch", "install", torchRequirement()],
            )
        )
    others = [r for r in reqs if Requirement(r).name not in ("torch", "sam2")]
    if others:
        steps.append(
            Step(
                _("installing {packages}").format(packages=", ".join(others)),
                [*pip, "install", *bar, *others],
            )
        )
    if "sam2" in names:
        folder = Path(tempfile.mkdtemp(prefix="sgp-sam2-"))
        sam2Env = dict(env, SAM2_BUILD_CUDA="0")
        steps += [
            Step(_("downloading sam2"), [*pip, *_sam2DownloadArgs(folder), *bar], env=sam2Env),
            # A failed check ends the task here: the install step never runs.
            Step(_("checking sam2's sha256"), action=lambda: _checkedSam2(folder)),
            Step(_("installing sam2"), [*pip, *_sam2InstallArgs(folder / SAM2_SDIST)], env=sam2Env),
        ]
    allNames = [Requirement(r).name for r in requirements(sgpCheckpoint)]

    def stillMissing(output: str) -> None:
        versions = _parseVersions(python, 0, output)
        still = problems(requirements(sgpCheckpoint), versions)
        if still:
            raise SGPError(
                _("Some packages are still missing or too old: {problems}").format(
                    problems="; ".join(still)
                )
            )

    steps.append(
        Step(
            _("checking the installed packages"),
            [python, "-c", _VERSIONS_SCRIPT, *allNames],
            after=stillMissing,
        )
    )
    return steps


def installTask(problemLines: list[str], python: str, sgpCheckpoint: bool = False) -> Task:
    """A started :class:`Task` installing what :func:`missing` reported (poll it, or
    ``.wait()`` in the console); ends 'done' only when every requirement is met afterwards."""
    try:
        pipVersion = installedVersions(["pip"], python).get("pip")
    except SGPError:
        pipVersion = None  # the first step says what is wrong with that Python
    steps = installSteps(problemLines, python, sgpCheckpoint, pipVersion)
    return Task(_("Installing Python packages"), steps, env=pythonEnvironment(python)).start()


def install(problemLines: list[str], python: str, sgpCheckpoint: bool = False) -> None:
    """Install what :func:`missing` reported, into ``python``'s environment, waiting (console)."""
    task = installTask(problemLines, python, sgpCheckpoint).wait()
    if task.state != "done":
        raise SGPError(task.error or _(
            "Installing Python packages: {state}."
        ).format(state=task.state))
