"""The module's Logic driving a REAL `sgp serve` (tiny model, random weights, CPU, 256 px) on
loopback, against real MRML (slicer-core): what the engine service must do for Slicer.

* a full run writes exactly what the in-process engine (``Segmenter``) computes,
* cancel mid-run, and a SIGKILL of the server mid-run, leave the segmentation unchanged; after
  the kill the message says why and the next run restarts the engine,
* a wrong token and a protocol-version mismatch give clear messages,
* a re-run on the same volume uploads no volume and encodes no slice again,
* importing the Logic and running a job does not import torch into the calling process.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from module_fixtures import (  # noqa: F401  (mrml, engineLogic: fixtures)
    LABELED,
    RUN,
    allSegments,
    engineLogic,
    makeScene,
    mrml,
    segmentArray,
)

from SlicerSGP.errors import SGPServiceError

LONG = (30, 64, 64)
"""A volume long enough for a run to be caught in the middle (cancel, kill)."""


@pytest.fixture
def logic(engineLogic):  # noqa: F811
    engineLogic.engine.configure("local")
    return engineLogic


@pytest.fixture(scope="module")
def server():
    """A second real `sgp serve` on loopback, used as a 'remote' engine (URL + token)."""
    from SGPSegmentLib.engine_connection import engineEnvironment

    from SlicerSGP.service.launcher import LocalEngine

    args = [
        "--model",
        "tiny",
        "--weights",
        "random",
        "--device",
        "cpu",
        "--image-size",
        "256",
        "--seed",
        "0",
    ]
    engine = LocalEngine(extra_args=args, env=engineEnvironment())
    client = engine.start(timeout=300)
    try:
        yield client
    finally:
        engine.stop()


def _startMidRun(logic, volume, segmentation, ids):
    """Start a run and poll until the engine is propagating (past loading and encoding)."""
    run = logic.startRun(logic.prepareRun(volume, segmentation, ids), logic.modelSettings(**RUN))
    deadline = time.monotonic() + 120
    while not run.stage.startswith("propagat") and not run.done():
        assert time.monotonic() < deadline, (
            f"the run never started propagating (stage {run.stage!r})"
        )
        logic.poll(run)
        time.sleep(0.02)
    assert not run.done(), "the run finished before it could be interrupted; make LONG longer"
    return run


def _recordingRequests(client) -> list[tuple[str, str]]:
    """Record the method and path of every request the client sends from now on."""
    seen: list[tuple[str, str]] = []
    original = client._request

    def request(method, path, *args, **kwargs):
        seen.append((method, path))
        return original(method, path, *args, **kwargs)

    client._request = request
    return seen


def test_segments_drawn_on_different_slices_keep_their_own_support(mrml, logic):  # noqa: F811
    """Support semantics in the module: a slice drawn for one segment is support for that one
    only; another segment is predicted there, not reset to its (empty) state before the run."""
    import slicer

    volume, segmentation, ids = makeScene(mrml, noiseSeed=5)
    spleen = segmentArray(segmentation, ids[1], volume).astype(np.uint8)
    spleen[LABELED[0]] = 0  # spleen drawn on the second labeled slice only
    slicer.util.updateSegmentBinaryLabelmapFromArray(spleen, segmentation, ids[1], volume)
    run = logic.startRun(logic.prepareRun(volume, segmentation, ids), logic.modelSettings(**RUN))
    logic.runs.wait(run)
    assert run.state == "done", run.error
    result = logic.lastResult
    assert result.labeled_by_structure == {1: list(LABELED), 2: [LABELED[1]]}
    written = segmentArray(segmentation, ids[1], volume)
    k = LABELED[0]
    np.testing.assert_array_equal(written[k], np.asarray(result.labels)[k] == 2)


def test_full_run_equals_the_in_process_engine(mrml, logic):  # noqa: F811
    from SlicerSGP.method.segmenter import Segmenter  # the test process may import torch

    volume, segmentation, ids = makeScene(mrml, noiseSeed=11)
    before = allSegments(segmentation, volume)
    request = logic.prepareRun(volume, segmentation, ids)
    arrays = (request.volume.copy(), request.labels.copy(), dict(request.structures))
    run = logic.startRun(request, logic.modelSettings(**RUN))
    logic.runs.wait(run)
    assert run.state == "done", run.error

    segmenter = Segmenter("tiny", weights="random", device="cpu", image_size=256, seed=0)
    expected = segmenter.segment(
        arrays[0], labels=arrays[1], structures=arrays[2], options=request.options,
        geometry=request.geometry,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(logic.lastResult.labels), expected.labels)
    after = allSegments(segmentation, volume)
    for value, segmentId in zip((1, 2), ids, strict=True):
        mask = expected.labels == value
        mask[list(LABELED)] = before[segmentId][list(LABELED)]
        np.testing.assert_array_equal(after[segmentId], mask)
    for value in (1, 2):
        np.testing.assert_allclose(
            logic.lastResult.slice_scores[value]["confidence"],
            expected.slice_scores[value]["confidence"],
            rtol=1e-6,
        )


def test_cancel_mid_run_leaves_the_segmentation_unchanged(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml, shape=LONG, name="long")
    before = allSegments(segmentation, volume)
    outputs = (
        "vtkMRMLSegmentationNode",
        "vtkMRMLTableNode",
        "vtkMRMLPlotChartNode",
        "vtkMRMLPlotSeriesNode",
    )
    nodes = [mrml.scene.GetNumberOfNodesByClass(c) for c in outputs]
    run = _startMidRun(logic, volume, segmentation, ids)
    logic.cancel(run)
    assert run.state == "cancelled" and run.report is None
    # The engine really stops that run (it reports it cancelled) and nothing is written.
    client = run.client
    deadline = time.monotonic() + 60
    while client.run_status(run.runId)["state"] not in ("cancelled", "canceled"):
        assert time.monotonic() < deadline, client.run_status(run.runId)
        time.sleep(0.05)
    logic.poll(run)  # a later timer tick does nothing
    after = allSegments(segmentation, volume)
    assert all(np.array_equal(before[s], after[s]) for s in before)
    assert [mrml.scene.GetNumberOfNodesByClass(c) for c in outputs] == nodes  # no output nodes
    assert not logic.canUndo(segmentation)


def test_killed_engine_is_explained_and_restarted(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml, shape=LONG, name="long")
    before = allSegments(segmentation, volume)
    run = _startMidRun(logic, volume, segmentation, ids)
    pid = logic.engine._local.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(SGPServiceError) as caught:
        deadline = time.monotonic() + 30
        while not run.done() and time.monotonic() < deadline:
            logic.poll(run)
            time.sleep(0.05)
    message = str(caught.value)
    assert "The local engine stopped during the run" in message and "SIGKILL" in message
    assert "nothing was written" in message and "The next run restarts it" in message
    assert run.state == "failed"
    after = allSegments(segmentation, volume)
    assert all(np.array_equal(before[s], after[s]) for s in before)

    small, smallSegmentation, smallIds = makeScene(mrml, name="after the kill")
    report = logic.run(small, smallSegmentation, smallIds, **RUN)
    assert report.segmentIds == smallIds
    assert logic.engine._local.pid != pid and "SIGKILL" in logic.engine.lastRestartReason


def test_wrong_token_is_a_clear_message(mrml, logic, server):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml)
    before = allSegments(segmentation, volume)
    try:
        logic.engine.configure("remote", server.url, "not-the-token")
        with pytest.raises(SGPServiceError, match="(?i)token") as caught:
            logic.run(volume, segmentation, ids, **RUN)
        assert "Cannot reach" not in str(caught.value)
        after = allSegments(segmentation, volume)
        assert all(np.array_equal(before[s], after[s]) for s in before)  # nothing written
        # The right token works: Connect shows the server's version.
        logic.engine.configure("remote", server.url, server.token)
        text, devices = logic.testConnection(None)
        assert text.startswith("Connected: SlicerSGP") and "protocol" in text
        assert "model tiny at 256 px on cpu" in text and "no CUDA GPU" in text and devices
        report = logic.run(volume, segmentation, ids, **RUN)
        assert report.segmentIds == ids
    finally:
        logic.engine.configure("local")


class _OldServer(http.server.BaseHTTPRequestHandler):
    """Answers /v1/info like a server of another protocol version."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = json.dumps({"version": "0.0.1", "protocol": 999, "model": {}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_protocol_version_mismatch_names_both_versions(mrml, logic):  # noqa: F811
    from SlicerSGP.service import protocol

    server = http.server.HTTPServer(("127.0.0.1", 0), _OldServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        logic.engine.configure("remote", f"http://127.0.0.1:{server.server_port}", "t")
        with pytest.raises(SGPServiceError) as caught:
            logic.testConnection(None)
        message = str(caught.value)
        assert f"protocol {protocol.PROTOCOL_VERSION}" in message and "protocol 999" in message
        assert "0.0.1" in message
    finally:
        logic.engine.configure("local")
        server.shutdown()
        server.server_close()


def test_remote_model_mismatch_names_the_option(logic, server):
    try:
        logic.engine.configure("remote", server.url, server.token)
        with pytest.raises(SGPServiceError, match="image_size: server 256, requested 512"):
            logic.engine.client(logic.modelSettings(**{**RUN, "imageSize": 512}))
    finally:
        logic.engine.configure("local")


def test_rerun_sends_no_volume_and_reuses_every_embedding(mrml, logic):  # noqa: F811
    volume, segmentation, ids = makeScene(mrml, noiseSeed=5, name="re-run")
    logic.run(volume, segmentation, ids, **RUN)
    client = logic.engine.client(logic.modelSettings(**RUN))
    seen = _recordingRequests(client)
    sentBefore = client.bytes_sent
    try:
        report = logic.run(volume, segmentation, ids, **RUN)
    finally:
        del client._request
    assert not any(method == "PUT" for method, _ in seen), seen
    assert (
        client.bytes_sent - sentBefore < volume.GetImageData().GetNumberOfPoints()
    )  # < 1 byte/voxel
    assert logic.lastResult.stats["slices_encoded_this_run"] == 0
    assert report.segmentIds == ids


def test_logic_never_imports_torch(tmp_path):
    """A fresh process: import the Logic, build a scene, run a job on a local engine."""
    script = tmp_path / "no_torch.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
        "from module_fixtures import MRMLEnvironment, makeScene, RUN\n"
        "from SGPSegmentLib import SGPSegmentCoreLogic\n"
        "env = MRMLEnvironment()\n"
        "logic = SGPSegmentCoreLogic()\n"
        "volume, segmentation, ids = makeScene(env)\n"
        "report = logic.run(volume, segmentation, ids, **RUN)\n"
        "logic.shutdown()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sam2', 'SimpleITK'))\n"
        "print('RESULT', len(report.segmentIds), heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT 2 []" in proc.stdout, proc.stdout[-2000:]
