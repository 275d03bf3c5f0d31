"""The engine's Python from the module: its environment, and long jobs that never block Slicer.

* Installing packages and starting the local engine return at once; progress and the last
  output line come through polling; Cancel kills the process tree and claims nothing done
  (a fake slow installer and a fake slow engine: small scripts that print and sleep).
* Another engine Python (a second virtual environment) runs with a clean environment: a
  polluting ``PYTHONPATH`` and a bogus ``PYTHONHOME`` in the caller's environment (as in
  Slicer's process) change neither the engine, nor the package check, nor the weights status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest
from module_fixtures import RUN, makeScene, mrml  # noqa: F401  (mrml: fixture)
from SGPSegmentLib import SGPSegmentCoreLogic, dependencies, engine_weights, processes

POSIX = os.name == "posix"
SLOW_STEP_S = 0.4
"""Each progress line of the fake installer; it prints ten: about 4 s per pip call."""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # A zombie (ended, not reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return False


def _deepest(pid: int) -> int:
    """The last process of ``pid``'s chain of children (Linux; elsewhere ``pid``), not counting
    the engine's own helper children (its Fill between slices worker), which hold no model."""
    proc = Path("/proc")
    while proc.is_dir():
        children = []
        for entry in proc.iterdir():
            try:
                if entry.name.isdigit():
                    fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
                    helper = b"SlicerSGP.method.interpolation" in (entry / "cmdline").read_bytes()
                    if int(fields[1]) == pid and not helper:
                        children.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
        if not children:
            break
        pid = children[0]
    return pid


def _pollUntil(poll, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = poll()
        if condition(value):
            return value
        assert time.monotonic() < deadline, f"timed out; last: {value!r}"
        time.sleep(0.05)


# ------------------------------------------------------------------- fake slow processes

FAKE_PYTHON = '''#!{python}
"""A fake engine Python: pip and light-the-torch print progress slowly; the package check
answers from installed.json, which only a finished install writes."""
import json, os, re, sys, time
here = os.path.dirname(os.path.abspath(__file__))
state = os.path.join(here, "installed.json")
with open(os.path.join(here, "calls.txt"), "a") as f:
    f.write(" ".join(sys.argv[1:4] if sys.argv[1] == "-m" else sys.argv[1:2]) + "\\n")
if sys.argv[1:3] in (["-m", "pip"], ["-m", "light_the_torch"]):
    print("Collecting torch", flush=True)
    for i in range(1, 11):
        print(f"Downloading torch-9.9.9-cp3-none-any.whl  {{i * 10}}%", flush=True)
        time.sleep(float(os.environ.get("FAKE_STEP_S", "0.4")))
    names = json.load(open(state)) if os.path.exists(state) else {{}}
    if "download" in sys.argv:  # pip download sam2: an sdist with the wrong hash
        folder = sys.argv[sys.argv.index("-d") + 1]
        open(os.path.join(folder, "sam2-1.1.0.tar.gz"), "wb").write(b"fake")
        sys.exit(0)
    for arg in sys.argv[4:]:  # what was asked for is there now
        name = re.split("[<>=]", os.path.basename(arg))[0]
        if not arg.startswith("-"):
            names["sam2" if name.startswith("sam2") else name] = "1.1.0" if "sam2" in name else "99.0"
    json.dump(names, open(state, "w"))
    print("Successfully installed", flush=True)
    sys.exit(0)
if sys.argv[1] == "-c":
    have = json.load(open(state)) if os.path.exists(state) else {{}}
    print(json.dumps({{n: have.get(n) for n in sys.argv[3:]}}))
    sys.exit(0)
sys.exit("unexpected: " + " ".join(sys.argv))
'''


@pytest.fixture
def fakePython(tmp_path):
    if not POSIX:
        pytest.skip("the fake Python is a script with a #! line")
    path = tmp_path / "fakeenv" / "python"
    path.parent.mkdir()
    path.write_text(FAKE_PYTHON.format(python=sys.executable))
    path.chmod(0o755)
    return path


def _pn(model="tiny"):
    import types

    return types.SimpleNamespace(model=model, checkpointPath="", device="cpu", imageSize=256)


def test_install_returns_at_once_polls_progress_and_cancel_kills_it(fakePython, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", str(SLOW_STEP_S))
    logic = SGPSegmentCoreLogic()
    logic.engine.configure("local", python=str(fakePython))
    problems = logic.dependencyProblems("tiny")
    assert any(p.startswith("torch: not installed") for p in problems), problems

    asked = []
    began = time.monotonic()
    task = logic.ensureReady(_pn(), confirm=lambda message: asked.append(message) or True)
    assert time.monotonic() - began < 2.0  # the first pip call alone takes 4 s
    assert asked and "torch" in asked[0] and isinstance(task, processes.Task)
    assert task.state == "running" and task.stage == "installing light-the-torch"

    task = _pollUntil(lambda: logic.pollTask(task), lambda t: (t.fraction or 0) >= 0.2)
    stage, fraction, line = logic.progressOf(task)
    assert stage == "installing light-the-torch" and 0.2 <= fraction < 1.0
    assert line.startswith("Downloading torch-9.9.9")
    assert task.state == "running"
    pid = task.pid
    assert pid and not _gone(pid)

    began = time.monotonic()
    logic.cancelTask(task)
    assert time.monotonic() - began < 5.0
    assert task.state == "cancelled" and _gone(pid)
    assert "cancelled" in logic.taskMessage(task)
    for _ in range(10):  # nothing else starts later
        logic.pollTask(task)
    calls = (fakePython.parent / "calls.txt").read_text().splitlines()
    assert sum(c.startswith("-m ") for c in calls) == 1, calls
    # Nothing was claimed installed: the engine's Python still lacks everything.
    assert logic.dependencyProblems("tiny") == problems
    assert logic.dependencyStatus(_pn()).startswith("Missing or too old: torch")


def test_finished_install_checks_the_result_and_refuses_a_wrong_sam2(fakePython, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.01")
    logic = SGPSegmentCoreLogic()
    logic.engine.configure("local", python=str(fakePython))
    problems = [p for p in logic.dependencyProblems("tiny") if not p.startswith("sam2")]
    task = logic.installDependencies("tiny", problems).wait(timeout=60)
    assert task.state == "failed", task.error  # sam2 is still missing afterwards
    assert "still missing" in task.error and "sam2" in task.error
    assert logic.dependencyProblems("tiny") == ["sam2: not installed (needs sam2==1.1.0)"]

    # The fake's sam2 sdist does not have the pinned sha256: never installed.
    task = logic.installDependencies("tiny", logic.dependencyProblems("tiny")).wait(timeout=60)
    assert task.state == "failed" and "not the pinned" in task.error
    calls = [c for c in (fakePython.parent / "calls.txt").read_text().splitlines() if c != "-c"]
    assert calls == [
        "-m pip install",  # light-the-torch
        "-m light_the_torch install",
        "-m pip install",  # the others
        "-m pip download",  # sam2: downloaded, refused, never installed
    ]
    assert logic.dependencyProblems("tiny")[0].startswith("sam2: not installed")


FAKE_ENGINE = '''#!{python}
"""A fake slow engine Python: says what it loads on stderr for a while, then runs the real
engine with the same arguments."""
import os, sys, time
for i in range(1, 6):
    print(f"loading the model {{i * 20}}%", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("FAKE_STEP_S", "0.4")))
os.execv({python!r}, [{python!r}, *sys.argv[1:]])
'''


def test_engine_start_never_blocks_a_run_waits_for_it(mrml, tmp_path, monkeypatch):  # noqa: F811
    if not POSIX:
        pytest.skip("the fake engine Python is a script with a #! line")
    monkeypatch.setenv("FAKE_STEP_S", "0.6")  # 3 s before the real engine even starts
    fake = tmp_path / "python"
    fake.write_text(FAKE_ENGINE.format(python=sys.executable))
    fake.chmod(0o755)
    logic = SGPSegmentCoreLogic()
    logic.engine.configure("local", python=str(fake))
    try:
        volume, segmentation, ids = makeScene(mrml)
        began = time.monotonic()
        run = logic.startRun(
            logic.prepareRun(volume, segmentation, ids), logic.modelSettings(**RUN)
        )
        assert time.monotonic() - began < 2.0
        assert run.stage == "starting engine" and not run.runId and not run.done()
        assert logic.engine.starting
        stage, fraction, line = _pollUntil(
            lambda: logic.progressOf(logic.poll(run)), lambda p: p[2].startswith("loading")
        )
        assert stage == "starting engine" and fraction is None  # a busy bar
        assert not run.runId
        logic.runs.wait(run, timeout=300)
        assert run.state == "done", run.error
        assert run.runId and logic.lastResult is not None

        # Cancel of a start: stopping the engine ends its process.
        logic.engine.stop()
        run = logic.startRun(
            logic.prepareRun(volume, segmentation, ids), logic.modelSettings(**RUN)
        )
        assert not run.runId
        pid = logic.engine._local.pid
        logic.cancel(run)
        assert run.state == "cancelled"
        logic.engine.stop()
        _pollUntil(lambda: _gone(pid), bool, timeout=10)
    finally:
        logic.shutdown()


def test_a_failed_engine_start_fails_the_run_with_the_reason(mrml, tmp_path):  # noqa: F811
    if not POSIX:
        pytest.skip("the fake engine Python is a script with a #! line")
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.exit('No module named torch')\n")
    fake.chmod(0o755)
    logic = SGPSegmentCoreLogic()
    logic.engine.configure("local", python=str(fake))
    try:
        volume, segmentation, ids = makeScene(mrml)
        request = logic.prepareRun(volume, segmentation, ids)
        with pytest.raises(Exception, match="stopped while starting.*No module named torch"):
            run = logic.startRun(request, logic.modelSettings(**RUN))
            _pollUntil(lambda: logic.poll(run), lambda r: r.done(), timeout=30)
        assert not logic.engine.starting
    finally:
        logic.shutdown()


# ------------------------------------------------------------- another Python, clean env


@pytest.fixture(scope="module")
def secondPython(tmp_path_factory):
    """A second virtual environment (another interpreter path) that sees this one's packages
    through a .pth file, as a user's conda or venv with torch would have its own."""
    folder = tmp_path_factory.mktemp("venv2")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
    proc = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(folder)],
        capture_output=True, text=True, env=clean, timeout=120,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot create a virtual environment here: {proc.stderr[-300:]}")
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, env=clean, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    lines = [f"import site; site.addsitedir({p!r})" for p in sorted(ours)]
    (Path(purelib) / "sgp_test_parent_env.pth").write_text("\n".join(lines) + "\n")
    assert not processes.isOwnPython(str(python))
    return str(python)


@pytest.fixture
def pollutedEnvironment(tmp_path, monkeypatch):
    """The caller's environment as in Slicer's process: PYTHONHOME of another Python, and a
    PYTHONPATH whose numpy and json break on import and whose metadata lies about numpy."""
    bad = tmp_path / "slicer-site-packages"
    (bad / "numpy").mkdir(parents=True)
    (bad / "numpy" / "__init__.py").write_text("raise ImportError('Slicer numpy imported')\n")
    (bad / "json.py").write_text("raise ImportError('Slicer json imported')\n")
    meta = bad / "numpy-0.0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: numpy\nVersion: 0.0.1\n")
    monkeypatch.setenv("PYTHONPATH", str(bad))
    monkeypatch.setenv("PYTHONHOME", str(tmp_path / "no-such-python-home"))
    return bad


def test_other_python_environment_is_the_clean_one_plus_the_package(pollutedEnvironment):
    env = processes.pythonEnvironment("/opt/conda/envs/gpu/bin/python")
    assert "PYTHONHOME" not in env
    assert env["PYTHONPATH"] == processes.packageFolder()
    assert (Path(env["PYTHONPATH"]) / "SlicerSGP" / "__init__.py").is_file()
    own = processes.pythonEnvironment(sys.executable)  # Slicer's own: its environment is right
    assert own["PYTHONHOME"] == os.environ["PYTHONHOME"]
    assert own["PYTHONPATH"].split(os.pathsep) == [
        processes.packageFolder(),
        str(pollutedEnvironment),
    ]
    if sys.platform != "win32":
        assert processes.popenOptions() == {"start_new_session": True}


def test_package_check_and_weights_status_run_in_the_engine_python(
    secondPython, pollutedEnvironment, tmp_path, monkeypatch
):
    import importlib.metadata

    from SlicerSGP import weights_registry

    cache = tmp_path / "cache"
    cache.mkdir()
    info = weights_registry.resolve_model_name("tiny")
    with open(cache / info.filename, "wb") as f:  # right size (sparse): 'cached' by size
        f.truncate(info.size)
    monkeypatch.setenv("SGP_CACHE_DIR", str(cache))

    versions = dependencies.installedVersions(["numpy", "torch"], python=secondPython)
    assert versions == {n: importlib.metadata.version(n) for n in ("numpy", "torch")}
    assert versions["numpy"] != "0.0.1"  # the polluting PYTHONPATH's metadata was not seen
    assert dependencies.missing(python=secondPython) == []

    found = engine_weights.cacheStatus("tiny", python=secondPython)
    assert found == {"status": "cached", "path": str(cache / info.filename)}
    logic = SGPSegmentCoreLogic()
    logic.engine.configure("local", python=secondPython)
    assert logic.weightsStatusText(_pn()) == "Weights: in the cache."
    assert logic.weightsStatus("small") == "missing"

    # What the polluted environment would have done to that Python (the bug this prevents).
    polluted = {k: v for k, v in os.environ.items() if k != "PYTHONHOME"}
    proc = subprocess.run(
        [secondPython, "-c", "import importlib.metadata as m; print(m.version('numpy'))"],
        capture_output=True, text=True, env=polluted, timeout=60,
    )  # fmt: skip
    assert proc.stdout.strip() == "0.0.1"


def test_local_engine_in_another_python_imports_its_own_packages(secondPython, pollutedEnvironment):
    logic = SGPSegmentCoreLogic()
    logic.engine.configure("local", python=secondPython)
    try:
        client = logic.engine.client(logic.modelSettings(**RUN))
        info = client.info()
        assert info["model"]["model"] == "tiny" and info["model"]["image_size"] == 256
        local = logic.engine._local
        assert local.python == secondPython
        environ = Path(f"/proc/{local.pid}/environ")
        if environ.exists():  # Linux: the server's own environment
            pairs = dict(
                item.split("=", 1) for item in environ.read_text().split("\0") if "=" in item
            )
            assert "PYTHONHOME" not in pairs
            assert pairs["PYTHONPATH"] == processes.packageFolder()
        probe = subprocess.run(
            [secondPython, "-c", "import numpy, json; print(json.dumps(numpy.__file__))"],
            capture_output=True, text=True, env=local.environment(), timeout=60,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        assert str(pollutedEnvironment) not in json.loads(probe.stdout)
    finally:
        logic.shutdown()


def test_inside_slicer_the_engine_runs_python_real_not_the_launcher(tmp_path, monkeypatch):
    """PythonSlicer is a launcher that turns a killed child into exit code 1: Slicer's own
    engine runs python-real beside it (as Slicer runs Python CLI modules), so that a kill
    (e.g. out of memory) is reported as such."""
    suffix = ".exe" if os.name == "nt" else ""
    launcher = tmp_path / f"PythonSlicer{suffix}"
    real = tmp_path / f"python-real{suffix}"
    launcher.write_text("")
    real.write_text("")
    monkeypatch.setattr(sys, "executable", str(launcher))
    assert processes.defaultPython() == str(real)
    assert processes.isOwnPython(str(real)) and processes.isOwnPython(str(launcher))
    assert not processes.isOwnPython(str(tmp_path / "other" / "python"))
    env = processes.pythonEnvironment(str(real))
    assert env["PYTHONPATH"].split(os.pathsep)[0] == processes.packageFolder()


def test_weights_module_imports_without_tqdm(tmp_path):
    blocker = tmp_path / "tqdm"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('no tqdm in Slicer')\n")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from SlicerSGP import weights
        info = weights.resolve_model_name('tiny')
        src = {str(tmp_path / "w.pt")!r}
        open(src, 'wb').write(b'x' * 10)
        try:
            weights.import_checkpoint(src, info, dest_dir={str(tmp_path)!r}, progress=True)
        except weights.SGPWeightsError as exc:
            print('refused:', 'bytes' in str(exc))
        print('ok')
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["refused:", "True", "ok"]


def test_progress_lines_give_fractions():
    assert processes.fractionOf("progress 50 200") == 0.25
    assert processes.fractionOf("Progress 3 of 4") == 0.75
    assert processes.fractionOf("Progress 5 of 10 bytes") == 0.5  # pip >= 25.2
    assert processes.fractionOf("Progress 5 of ? bytes") is None
    assert processes.fractionOf("Downloading torch.whl  42%") == 0.42
    assert processes.fractionOf("Collecting torch") is None


def test_no_console_window_on_windows(monkeypatch, tmp_path):
    """On Windows every process of the engine's Python is started with CREATE_NO_WINDOW (as
    slicer.util.launchConsoleProcess hides its console): the checks, the tasks and the engine."""
    import SlicerSGP.service.launcher as launcher
    from SlicerSGP.errors import SGPServiceError

    seen = []

    def fakePopen(args, **kwargs):
        seen.append(kwargs)
        raise OSError(2, "not really started")

    monkeypatch.setattr(sys, "platform", "win32")
    assert processes.popenOptions()["creationflags"] & processes.CREATE_NO_WINDOW
    monkeypatch.setattr(subprocess, "Popen", fakePopen)
    task = processes.Task("t", [processes.Step("step", ["python", "-V"])]).start()
    assert task.state == "failed"
    with pytest.raises(SGPServiceError, match="Cannot start the engine"):
        launcher.LocalEngine(python="python", log_dir=tmp_path).launch()
    with pytest.raises(Exception, match="Could not run the engine's Python"):
        processes.runPython("python", ["-V"])
    assert len(seen) == 3
    for kwargs in seen:
        assert kwargs["creationflags"] & 0x08000000 and "start_new_session" not in kwargs


def test_pip_prints_its_progress_as_lines_when_it_can():
    problems = ["numpy: not installed", "sam2: not installed", "torch: not installed"]
    new = dependencies.installSteps(problems, "python", pipVersion="25.1.1")
    old = dependencies.installSteps(problems, "python", pipVersion="23.2.1")
    pipCalls = [s.command for s in new if s.command and s.command[1:3] == ["-m", "pip"]]
    assert len(pipCalls) == 4  # light-the-torch, numpy, sam2's download and install
    assert all("raw" in c for c in pipCalls[:3])
    assert not any("raw" in (s.command or []) for s in old)
    assert [s.label for s in new] == [s.label for s in old]


def test_a_killed_engine_of_slicers_own_python_is_reported_as_killed(tmp_path, monkeypatch):
    """Inside Slicer ``sys.executable`` is the PythonSlicer launcher, which would turn a killed
    engine into exit code 1. The engine runs python-real beside it instead, so a kill (the
    kernel's out-of-memory killer sends SIGKILL) is named in the message."""
    if not POSIX:
        pytest.skip("SIGKILL and #! scripts")
    import signal

    from SlicerSGP.errors import SGPServiceError

    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(  # what CTKAppLauncher does with a crashed child
        f"#!{sys.executable}\n"
        "import os, subprocess, sys\n"
        "real = os.path.join(os.path.dirname(__file__), 'python-real')\n"
        "sys.exit(1 if subprocess.call([real, *sys.argv[1:]]) != 0 else 0)\n"
    )
    real = tmp_path / "python-real"  # this Python, under the name Slicer installs it with
    real.write_text(
        f"#!{sys.executable}\nimport os, sys\nos.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    for path in (launcher, real):
        path.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(launcher))
    logic = SGPSegmentCoreLogic()
    try:
        client = logic.engine.client(logic.modelSettings(**RUN))
        assert client.info()["model"]["model"] == "tiny"
        local = logic.engine._local
        assert local.python == str(real)
        os.kill(_deepest(local.pid), signal.SIGKILL)  # the process that holds the model
        _pollUntil(lambda: local.alive, lambda alive: not alive, timeout=10)
        failure = logic.engine.describeFailure(SGPServiceError("connection reset"))
        assert "killed (SIGKILL), e.g. out of memory" in str(failure), failure
    finally:
        logic.shutdown()
