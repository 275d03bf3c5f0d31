"""The engine's Python packages: which are missing or too old, and installing them on request.

Checks read installed distributions' metadata (``importlib.metadata``), so nothing heavy is
imported: Slicer's process never imports torch. The local engine may run in another Python the
user names; then the check runs there, in a short subprocess.

Installing never happens without the user's confirmation (the module's self-test never
installs). ``sam2`` is a third-party source distribution: it is downloaded, its sha256 checked
against the pinned value, and only then installed, without build isolation and dependencies and
without its optional CUDA extension (DESIGN.md, "Facts about the dependencies"). ``peft`` is
needed only by trained SGP checkpoints (LoRA adapters) and is installed only for them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from SlicerSGP.errors import SGPError

BASE_REQUIREMENTS = (
    "torch>=2.3",
    "numpy>=1.24",
    "hydra-core>=1.3.2",
    "iopath>=0.1.10",
    "safetensors>=0.4",
    "SimpleITK>=2.3",
    "slicerio>=1.0",
    "tqdm>=4.66",
    "pillow>=10",
    "scipy>=1.10",
    "fastapi>=0.110",
    "uvicorn>=0.29",
)
"""What ``sgp serve`` needs besides sam2 (the engine's pyproject dependencies plus the server)."""

SGP_CHECKPOINT_REQUIREMENTS = ("peft>=0.11",)
"""Extra packages for a trained SGP checkpoint (its LoRA adapters)."""

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


def requirements(sgpCheckpoint: bool = False) -> list[str]:
    """Every requirement of the engine for a model choice (peft only for SGP checkpoints)."""
    reqs = list(BASE_REQUIREMENTS)
    if sgpCheckpoint:
        reqs += SGP_CHECKPOINT_REQUIREMENTS
    return [*reqs, SAM2_REQUIREMENT]


def installedVersions(names, python: str | None = None) -> dict[str, str | None]:
    """``{distribution: version or None}`` in this Python, or in ``python`` (a subprocess)."""
    if not python or Path(python).resolve() == Path(sys.executable).resolve():
        out = {}
        for name in names:
            try:
                out[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                out[name] = None
        return out
    proc = subprocess.run(
        [python, "-c", _VERSIONS_SCRIPT, *names], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise SGPError(
            f"Could not run the engine's Python {python!r} ({proc.stderr.strip()[-300:]}); "
            "choose a working Python executable or leave the setting empty for Slicer's own."
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def problems(reqs, versions: dict[str, str | None]) -> list[str]:
    """One line per requirement that is missing or whose installed version does not satisfy it."""
    out = []
    for text in reqs:
        req = Requirement(text)
        version = versions.get(req.name)
        if version is None:
            out.append(f"{req.name}: not installed (needs {text})")
            continue
        try:
            ok = req.specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            out.append(f"{req.name}: {version} installed, needs {req.specifier}")
    return out


def missing(sgpCheckpoint: bool = False, python: str | None = None) -> list[str]:
    """Problems with the engine's packages ([] when it can run)."""
    reqs = requirements(sgpCheckpoint)
    names = [Requirement(r).name for r in reqs]
    return problems(reqs, installedVersions(names, python))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verifySam2(path: Path) -> None:
    """Raise unless ``path`` is exactly the pinned sam2 source distribution."""
    actual = sha256(path)
    if actual != SAM2_SHA256:
        raise SGPError(
            f"The downloaded {path.name} has sha256 {actual}, not the pinned {SAM2_SHA256}; "
            "it was not installed. The package index may serve a different file: report this "
            "and do not install it by hand."
        )


def runPip(python: str, args: list[str], env: dict[str, str] | None = None) -> str:
    """``python -m pip ARGS``; raises SGPError with pip's last lines when it fails."""
    proc = subprocess.run(
        [python, "-m", "pip", *args], capture_output=True, text=True, env=env, timeout=3600
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SGPError(f"pip {args[0]} failed:\n{tail}")
    return proc.stdout


def installSam2(python: str, pip=runPip) -> None:
    """Download the sam2 sdist, check its sha256, then install it (no deps, no CUDA build)."""
    env = dict(os.environ, SAM2_BUILD_CUDA="0")
    with tempfile.TemporaryDirectory(prefix="sgp-sam2-") as tmp:
        pip(
            python,
            [
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--no-build-isolation",
                "-d",
                tmp,
                SAM2_REQUIREMENT,
            ],
            env,
        )
        sdist = Path(tmp) / SAM2_SDIST
        if not sdist.is_file():
            raise SGPError(f"pip did not download {SAM2_SDIST}; nothing was installed.")
        verifySam2(sdist)
        pip(python, ["install", "--no-build-isolation", "--no-deps", str(sdist)], env)


def installTorch(python: str, pip=runPip) -> None:
    """torch with the CUDA build that fits this computer's driver, through light-the-torch (as
    Slicer's PyTorch extension does), in a subprocess: this process never imports torch."""
    pip(python, ["install", "light-the-torch>=0.7"])
    proc = subprocess.run(
        [python, "-m", "light_the_torch", "install", "torch>=2.3"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SGPError(f"Installing PyTorch failed:\n{tail}")


def install(problemLines: list[str], python: str, sgpCheckpoint: bool = False, pip=runPip) -> None:
    """Install what :func:`missing` reported, into ``python``'s environment."""
    names = {line.split(":", 1)[0] for line in problemLines}
    reqs = [r for r in requirements(sgpCheckpoint) if Requirement(r).name in names]
    if "torch" in names:
        installTorch(python, pip)
    others = [r for r in reqs if Requirement(r).name not in ("torch", "sam2")]
    if others:
        pip(python, ["install", *others])
    if "sam2" in names:
        installSam2(python, pip)
    still = missing(sgpCheckpoint, python)
    if still:
        raise SGPError("Some packages are still missing or too old: " + "; ".join(still))
