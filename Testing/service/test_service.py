"""The engine service end to end: a real `sgp serve` subprocess on loopback, driven by the
stdlib client, compared with the in-process engine."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from synthetic import synthetic_volume

from SlicerSGP.cli.serve import read_token
from SlicerSGP.errors import Cancelled, SGPInputError, SGPServiceError
from SlicerSGP.method.segmenter import Segmenter
from SlicerSGP.service import protocol
from SlicerSGP.service.client import EngineClient, connect_engine
from SlicerSGP.service.launcher import LocalEngine
from SlicerSGP.types import Geometry, SegmentationResult, SegmentOptions, SupportItem

ROOT = Path(__file__).resolve().parents[2]
MODEL_ARGS = ["--model", "tiny", "--weights", "random", "--image-size", "256", "--device", "cpu",
              "--seed", "0"]
MAX_UPLOAD_MB = 1
GEOMETRY = Geometry(origin=(1.0, -2.0, 3.5), spacing=(2.5, 0.7, 0.7))


def start_server(args: list[str], stderr_path: Path, timeout: float = 240.0):
    """`python -m SlicerSGP.service ARGS`; returns (process, URL) once it printed `ready URL`."""
    err = open(stderr_path, "wb")  # noqa: SIM115 (kept open for the process's life)
    proc = subprocess.Popen([sys.executable, "-m", "SlicerSGP.service", *args],
                            stdout=subprocess.PIPE, stderr=err)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=1.0):
            line = proc.stdout.readline().decode()
            if line.startswith("ready "):
                return proc, line.split()[1]
            if not line:
                break
    proc.kill()
    raise AssertionError(f"server did not get ready: {stderr_path.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    token = "t0k3n-" + "a" * 26
    token_file = folder / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    proc, url = start_server([*MODEL_ARGS, "--token-file", str(token_file),
                              "--max-upload-mb", str(MAX_UPLOAD_MB)], folder / "stderr.log")
    yield url, token
    proc.terminate()
    proc.wait(30)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught.
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in (folder / "stderr.log").read_text()


@pytest.fixture(scope="module")
def client(server) -> EngineClient:
    return connect_engine(*server)


@pytest.fixture(scope="module")
def local() -> Segmenter:
    return Segmenter("tiny", weights="random", device="cpu", image_size=256, seed=0)


def case(seed: int = 0, n: int = 6, picks: tuple[int, ...] = (1, 4)):
    vol, lab = synthetic_volume(n=n, seed=seed)
    drawn = np.zeros_like(lab)
    drawn[list(picks)] = lab[list(picks)]
    return vol, drawn


def same_array(x: np.ndarray, y: np.ndarray) -> bool:
    """Equal dtype and values, NaN equal to NaN (a slice's quality is NaN where it was not
    scored), field by field for the structured per-slice scores."""
    if x.dtype != y.dtype:
        return False
    if x.dtype.names:
        return all(same_array(x[f], y[f]) for f in x.dtype.names)
    return np.array_equal(x, y, equal_nan=x.dtype.kind == "f")


def assert_same(a: SegmentationResult, b: SegmentationResult) -> None:
    assert a.labels.dtype == b.labels.dtype and np.array_equal(a.labels, b.labels)
    for name in ("probabilities", "pseudo_masks", "slice_scores"):
        da, db = getattr(a, name), getattr(b, name)
        assert list(da) == list(db), name
        for k in da:
            assert same_array(da[k], db[k]), (name, k)
    assert (a.structures, a.axis, a.labeled_slices, a.geometry) == \
        (b.structures, b.axis, b.labeled_slices, b.geometry)
    assert set(a.stats) == set(b.stats) and a.stats["slices"] == b.stats["slices"]
    assert (a.labeled_by_structure, a.notes) == (b.labeled_by_structure, b.notes)
    assert set(a.timings) - {"stage:encode"} == set(b.timings) - {"stage:encode"}


def raw(url: str, method: str, path: str, token: str | None, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict]:
    head = dict(headers or {})
    if token is not None:
        head["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=body, headers=head, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# --------------------------------------------------------------------------- tests

def test_info_reports_versions_devices_and_model(client):
    info = client.info()
    assert info["protocol"] == protocol.PROTOCOL_VERSION and info["version"]
    cpu = [d for d in info["devices"] if d["device"] == "cpu"]
    assert cpu and cpu[0]["name"] and cpu[0]["memory_total_mb"] > 0
    assert info["model"]["model"] == "tiny" and info["model"]["image_size"] == 256
    assert info["model"]["weights"] == "random" and info["model"]["device"] == "cpu"
    assert info["queue_length"] == 0 and info["max_upload_mb"] == MAX_UPLOAD_MB
    assert info["cache"]["budget_mb"] > 0


def test_run_equals_in_process_and_rerun_sends_no_volume(client, local):
    vol, drawn = case()
    opts = SegmentOptions()
    stages: list[str] = []
    res = client.segment(vol, drawn, {1: "blob"}, opts, geometry=GEOMETRY,
                         progress=lambda s, f: stages.append(s))
    ref = local.segment(vol, drawn, {1: "blob"}, opts, geometry=GEOMETRY)
    assert_same(res, ref)
    assert "encode" in stages and any(s.startswith("propagate") for s in stages)

    encoded = client.info()["encode_count"]
    before = client.bytes_sent
    again = client.segment(vol, drawn, {1: "blob"}, opts, geometry=GEOMETRY)
    sent = client.bytes_sent - before
    assert sent < 0.05 * vol.nbytes, f"re-run sent {sent} bytes for a {vol.nbytes}-byte volume"
    assert client.info()["encode_count"] == encoded, "the re-run encoded slices again"
    # Both sides re-run: each reuses its last run's slices (and says so in its notes).
    assert_same(again, local.segment(vol, drawn, {1: "blob"}, opts, geometry=GEOMETRY))
    assert again.slices_predicted == {1: 0} and again.slices_reused == ref.slices_predicted


def test_run_along_another_axis_sends_labeled_slices_only(client, local):
    vol, lab = synthetic_volume(n=16, h=6, w=32, seed=3)  # 6 slices of 16 x 32 along j
    drawn = np.zeros_like(lab)
    drawn[:, 2] = lab[:, 2]
    drawn[:, 4] = lab[:, 4]
    opts = SegmentOptions(axis=1)
    arrays: dict[str, np.ndarray] = {}
    desc = protocol.encode_labels(drawn, 1, arrays)
    assert desc["slices"] == [2, 4] and set(arrays) == {"label_2", "label_4"}
    assert np.array_equal(protocol.decode_labels(desc, arrays, vol.shape), drawn)
    assert_same(client.segment(vol, drawn, None, opts), local.segment(vol, drawn, None, opts))


def test_engine_input_error_comes_back_with_its_message(client, local):
    vol, drawn = case()
    with pytest.raises(SGPInputError) as theirs:
        client.segment(vol, drawn, {5: "absent"})
    with pytest.raises(SGPInputError) as ours:
        local.segment(vol, drawn, {5: "absent"})
    assert str(theirs.value) == str(ours.value)
    with pytest.raises(SGPInputError, match="top_k"):
        client.segment(vol, drawn, {1: "blob"}, SegmentOptions(top_k=0))


def test_wrong_or_missing_token_is_refused_and_nothing_runs(server, client):
    url, token = server
    vol, drawn = case(seed=7)
    before = client.info()
    body = protocol.volume_to_npy(vol)
    vid = protocol.volume_id(vol, None)
    for bad in (None, "wrong-token-" + "b" * 20, token + "x"):
        status, payload = raw(url, "PUT", f"/v1/volumes/{vid}", bad, body)
        assert status == 401 and "token" in payload["detail"]
        status, _ = raw(url, "GET", "/v1/info", bad)
        assert status == 401
    with pytest.raises(SGPServiceError, match="refused the token"):
        EngineClient(url, "nope-" + "c" * 20).segment(vol, drawn, {1: "blob"})
    after = client.info()
    assert after["volumes"] == before["volumes"] and not client.has_volume(vid)
    assert after["runs_completed"] == before["runs_completed"]
    assert after["encode_count"] == before["encode_count"]


def test_protocol_mismatch_names_both_versions(server, monkeypatch):
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", 99)
    with pytest.raises(SGPServiceError) as err:
        connect_engine(*server)
    assert "protocol 99" in str(err.value) and "protocol 1" in str(err.value)


def test_model_mismatch_names_the_options(server):
    with pytest.raises(SGPServiceError, match="image_size: server 256, requested 512"):
        connect_engine(*server, expected_model={"model": "tiny", "image_size": 512})
    connect_engine(*server, expected_model={"model": "tiny", "image_size": 256, "seed": None})


def test_oversize_upload_gets_413_with_a_message(server, client):
    big = np.zeros((40, 128, 128), np.float32)  # 2.5 MB over a 1 MB limit
    vid = protocol.volume_id(big, None)
    status, payload = raw(server[0], "PUT", f"/v1/volumes/{vid}", server[1],
                          protocol.volume_to_npy(big))
    assert status == 413 and "--max-upload-mb" in payload["detail"]
    with pytest.raises(SGPInputError, match="accepts at most 1 MB"):
        client.ensure_volume(big)


def test_two_clients_at_once_both_get_their_own_result(server, local):
    cases = {0: case(seed=1), 1: case(seed=2, picks=(0, 3))}
    results: dict[int, SegmentationResult] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            vol, drawn = cases[i]
            results[i] = EngineClient(*server).segment(vol, drawn, {1: "blob"})
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for i, (vol, drawn) in cases.items():
        assert_same(results[i], local.segment(vol, drawn, {1: "blob"}))


def test_cancel_mid_run(client):
    vol, drawn = case(seed=4, n=24, picks=(2, 20))
    vol = vol.astype(np.int16)  # under the 1 MB upload limit
    vid = client.ensure_volume(vol)
    run_id = client.start_run(vid, drawn, {1: "blob"}, SegmentOptions())
    deadline = time.monotonic() + 120
    while client.run_status(run_id)["state"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.run_status(run_id)["state"] == "running"
    client.cancel_run(run_id)
    with pytest.raises(Cancelled):
        client.wait(run_id)
    # A blocking segment() honours its cancel callable the same way.
    seen: list[str] = []
    with pytest.raises(Cancelled):
        client.segment(vol, drawn, {1: "blob"}, progress=lambda s, f: seen.append(s),
                       cancel=lambda: bool(seen))
    assert client.info()["queue_length"] == 0


def test_refine_slice_equals_in_process(client, local):
    vol, drawn = case()
    mask = drawn[2] == 1
    args = (2, [(40.0, 60.0), (10.0, 10.0)], [1, 0], mask, SegmentOptions())
    got, iou = client.refine_slice(vol, *args)
    want, want_iou = local.refine_slice(vol, *args)
    assert got.dtype == want.dtype and np.array_equal(got, want) and iou == want_iou


def test_killed_server_gives_a_clear_error_and_the_launcher_restarts_it(tmp_path):
    engine = LocalEngine(extra_args=MODEL_ARGS, log_dir=tmp_path)
    try:
        client = engine.start(timeout=240)
        assert engine.alive and os.stat(engine.token_path).st_mode & 0o777 == 0o600
        vol, drawn = case(seed=5, n=24, picks=(2, 20))
        run_id = client.start_run(client.ensure_volume(vol), drawn, {1: "blob"})
        while client.run_status(run_id)["state"] == "queued":
            time.sleep(0.02)
        assert client.run_status(run_id)["state"] == "running"
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(SGPServiceError, match="Lost the engine server") as err:
            client.wait(run_id)
        assert "Traceback" not in str(err.value) and "connection" in str(err.value)
        deadline = time.monotonic() + 10
        while engine.alive and time.monotonic() < deadline:  # the kernel reaps it shortly
            time.sleep(0.05)
        assert not engine.alive
        again = engine.ensure_running(timeout=240)
        assert engine.restarts == 1 and "killed (SIGKILL), e.g. out of memory" in engine.exit_reason
        assert again.info()["runs_completed"] == 0 and again is not client
    finally:
        engine.stop()
    assert not engine.alive and not engine.token_path.exists()


def test_non_loopback_host_without_token_exits_2():
    proc = subprocess.run([sys.executable, "-m", "SlicerSGP.service", "--host", "0.0.0.0",
                           *MODEL_ARGS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "without a token" in proc.stderr and "--token-file" in proc.stderr
    assert proc.stdout == ""


def test_token_file_that_is_not_a_token_exits_2_with_the_fix(tmp_path):
    """`sgp serve --token-file IMAGE` (a real process, the installed `sgp` command): a message
    that names the problem and the fix, exit code 2, no traceback, and nothing served."""
    sgp = Path(sys.executable).with_name("sgp")
    assert sgp.is_file(), f"the sgp command is not installed beside {sys.executable}"
    png = tmp_path / "scan.png"
    png.write_bytes((ROOT / "Resources" / "Icons" / "SGPSegmentation.png").read_bytes())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.chmod(0o600)
    proc = subprocess.run([str(sgp), "serve", "--token-file", str(png), *MODEL_ARGS],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr
    err = proc.stderr
    assert err.startswith("error: ") and str(png) in err and "is not a token file" in err, err
    assert "text file" in err and "printable ASCII" in err and "16" in err, err
    assert "secrets.token_urlsafe" in err, err


@pytest.mark.parametrize("content", [
    bytes(range(256)) * 2,                 # binary
    "t0k3n-\u00e9\u00e8aaaaaaaaaaaaaaaa".encode(),  # not ASCII
    b"first-line-aaaaaaaaaa\nsecond-line-aaaaaaaaaa\n",  # two lines
    b"a" * 5000,                           # far too long for a token
])
def test_read_token_refuses_what_is_not_a_token(tmp_path, content):
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(SGPInputError, match="is not a token file.*printable ASCII"):
        read_token(path)


def test_read_token_keeps_a_text_token_and_ignores_surrounding_whitespace(tmp_path):
    path = tmp_path / "token"
    path.write_bytes(b"  t0k3n-" + b"a" * 26 + b"\r\n")
    path.chmod(0o600)
    assert read_token(path) == "t0k3n-" + "a" * 26
    path.write_bytes(b"short\n")
    with pytest.raises(SGPInputError, match="too short"):
        read_token(path)


def test_dead_server_is_a_clear_service_error():
    with pytest.raises(SGPServiceError, match="connection refused") as err:
        EngineClient("http://127.0.0.1:9", timeout=5).info()
    assert err.value.__suppress_context__


CLIENT_ONLY = """
import sys
import numpy as np
from SlicerSGP.service.client import connect_engine
from SlicerSGP.service.launcher import LocalEngine
rng = np.random.default_rng(0)
vol = rng.normal(100.0, 15.0, (6, 64, 64)).astype(np.float32)
drawn = np.zeros(vol.shape, np.uint8)
drawn[1, 20:40, 25:45] = drawn[4, 22:42, 20:40] = 1
vol[drawn == 1] += 90
res = connect_engine({url!r}, {token!r}).segment(vol, drawn, {{1: "blob"}})
assert res.labels.shape == vol.shape and res.probabilities[1].shape == vol.shape
heavy = sorted(m for m in ("torch", "fastapi", "uvicorn", "SimpleITK", "sam2") if m in sys.modules)
print("heavy:", heavy)
"""


def test_client_process_never_imports_torch(server):
    code = CLIENT_ONLY.format(url=server[0], token=server[1])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "heavy: []" in proc.stdout


def test_protocol_round_trips_labels_bank_and_results():
    vol, lab = synthetic_volume(n=5, h=20, w=24)
    arrays: dict[str, np.ndarray] = {}
    desc = protocol.encode_labels({3: lab[3].astype(np.int16)}, 0, arrays)
    rebuilt = protocol.decode_labels(desc, arrays, vol.shape)
    assert rebuilt.dtype == np.int16 and np.array_equal(rebuilt[3], lab[3])
    assert not rebuilt[[0, 1, 2, 4]].any()
    bank = {2: [SupportItem(vol[0] / 255.0, lab[0] == 1, "case/0")]}
    back = protocol.decode_bank(protocol.encode_bank(bank, arrays), arrays)
    assert back[2][0].source == "case/0" and np.array_equal(back[2][0].mask, lab[0] == 1)
    with pytest.raises(SGPInputError, match="outside the volume"):
        protocol.decode_labels({**desc, "slices": [9]}, {"label_9": lab[0]}, vol.shape)
    scores = np.zeros(5, [("slice", "i4"), ("source", "U8")])
    scores["source"] = "fused"
    result = SegmentationResult(
        labels=lab, probabilities={1: vol}, pseudo_masks={1: vol * 2}, slice_scores={1: scores},
        structures={1: "blob"}, axis=0, labeled_slices=[3], geometry=GEOMETRY,
        timings={"total": 1.5}, stats={"slices": np.int64(5)}, labeled_by_structure={1: [3]},
        notes=["a note"])
    full = protocol.decode_result(protocol.encode_result(result, probabilities=True))
    assert_same(full, result)
    lean = protocol.decode_result(protocol.encode_result(result, probabilities=False))
    assert lean.probabilities == {} and np.array_equal(lean.pseudo_masks[1], vol * 2)


def test_sgp_segment_through_the_server_writes_the_local_file(server, tmp_path, capsys):
    """`sgp segment --server URL --token-file F` gives the same output as the local run with
    the same weights and seed."""
    import SimpleITK as sitk
    import slicerio

    from SlicerSGP import cli
    from SlicerSGP.data import io

    vol, lab = synthetic_volume(n=8, h=48, w=64)
    drawn = np.zeros_like(lab)
    drawn[1], drawn[6] = lab[1], lab[6]
    sitk.WriteImage(io.sitk_from_array(vol, GEOMETRY), str(tmp_path / "image.nrrd"))
    sitk.WriteImage(io.sitk_from_array(drawn, GEOMETRY), str(tmp_path / "labels.nrrd"))
    url, token = server
    token_file = tmp_path / "token"
    token_file.write_text(token)
    common = ["segment", str(tmp_path / "image.nrrd"), "--labels", str(tmp_path / "labels.nrrd"),
              "--quiet"]
    rc = cli.main([*common, "--out", str(tmp_path / "local.seg.nrrd"), *MODEL_ARGS])
    assert rc == 0, capsys.readouterr().err
    rc = cli.main([*common, "--out", str(tmp_path / "remote.seg.nrrd"), "--server", url,
                   "--token-file", str(token_file), "--model", "tiny", "--image-size", "256"])
    assert rc == 0, capsys.readouterr().err
    local = slicerio.read_segmentation(str(tmp_path / "local.seg.nrrd"))
    remote = slicerio.read_segmentation(str(tmp_path / "remote.seg.nrrd"))
    assert np.array_equal(local["voxels"], remote["voxels"]) and local["voxels"].any()
    assert [s["name"] for s in local["segments"]] == [s["name"] for s in remote["segments"]]
