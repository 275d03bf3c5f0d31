"""What a request may cost and how much the server holds: a real `sgp serve` (tiny model, random
weights) started with small limits. Control requests (status, cancel, info, a wrong token) answer
within a second while 40 click refinements wait behind a run; a compressed bomb is refused
before it inflates; the queue, the volume store and the results honour their options."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from synthetic import synthetic_volume

from service.test_service import MODEL_ARGS, start_server
from SlicerSGP.errors import Cancelled, SGPInputError, SGPServiceError
from SlicerSGP.service import protocol
from SlicerSGP.service.client import EngineClient

TOKEN = "l1m1ts-" + "z" * 25
LIMITS = {"--max-upload-mb": 2, "--max-queue": 40, "--max-volumes-mb": 2,
          "--max-results-mb": 4, "--max-voxels": 500_000, "--max-structures": 8,
          "--refine-timeout": 15}
MB = 2**20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("limits")
    token_file = folder / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    args = [*MODEL_ARGS, "--token-file", str(token_file)]
    for k, v in LIMITS.items():
        args += [k, str(v)]
    proc, url = start_server(args, folder / "stderr.log")
    yield proc, url, folder / "stderr.log"
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def client(server) -> EngineClient:
    return EngineClient(server[1], TOKEN, timeout=60)


def long_case(seed: int, n: int = 32):
    """32 slices of 96 x 128 as int16 (786,432 bytes): a run long enough to act during."""
    vol, lab = synthetic_volume(n=n, seed=seed)
    drawn = np.zeros_like(lab)
    drawn[2] = lab[2]
    return vol.astype(np.int16), drawn


def small_volume(seed: int, n: int) -> np.ndarray:
    return synthetic_volume(n=n, seed=seed)[0].astype(np.int16)


def request(url: str, method: str, path: str, token: str | None = TOKEN,
            body: bytes | None = None) -> tuple[int, dict, Any, float]:
    """(status, JSON body, headers, seconds) of one request."""
    head = {} if token is None else {"Authorization": f"Bearer {token}"}
    req = urllib.request.Request(url + path, data=body, headers=head, method=method)
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, data, headers = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        status, data, headers = e.code, e.read(), e.headers
    took = time.perf_counter() - t
    try:
        payload = json.loads(data or b"{}")
    except ValueError:
        payload = {}
    return status, payload, headers, took


def wait_running(client: EngineClient, run_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.run_status(run_id)["state"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.run_status(run_id)["state"] == "running"


def end_run(client: EngineClient, run_id: str) -> None:
    client.cancel_run(run_id)
    with pytest.raises(Cancelled):
        client.wait(run_id)


def refine_body(volume_id: str) -> bytes:
    meta = {"volume_id": volume_id, "slice_index": 1, "points": [[30.0, 40.0]],
            "point_labels": [1], "options": protocol.options_to_json(None)}
    return protocol.pack({}, meta, compress=True)


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_growth_mb(pid: int, send) -> tuple[float, float, object]:
    """(RSS before in MB, peak RSS growth in MB while ``send()`` ran, its answer). The peak is
    the kernel's high-water mark, reset first (clear_refs 5), so nothing transient is missed."""
    before = rss_kb(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    answer = send()
    return before / 1024, (rss_kb(pid, "VmHWM") - before) / 1024, answer


# --------------------------------------------------------------------------- tests

def test_status_cancel_and_auth_answer_within_a_second_behind_40_refinements(server, client):
    """A run is running and 40 click refinements wait for the engine: status, info, cancel
    and a request with a wrong token still answer within 1 s (each waiting refinement is
    awaited, holding no thread); a 41st refinement is refused with 429 and Retry-After; every
    refinement is answered (a mask, or 503 naming --refine-timeout)."""
    _, url, _ = server
    vol, drawn = long_case(seed=11)
    run_id = client.start_run(client.ensure_volume(vol), drawn, {1: "blob"})
    wait_running(client, run_id)
    small = client.ensure_volume(small_volume(seed=12, n=4))
    body = refine_body(small)
    answers: list[tuple[int, dict, float]] = []

    def click() -> None:
        status, payload, _, took = request(url, "POST", "/v1/refine", body=body)
        answers.append((status, payload, took))

    threads = [threading.Thread(target=click, daemon=True) for _ in range(40)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while client.info()["waiting"]["refinements"] < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.info()["waiting"]["refinements"] == 40
    assert client.run_status(run_id)["state"] == "running"

    timings = {}
    status, payload, headers, timings["refine 41"] = request(url, "POST", "/v1/refine",
                                                              body=body)
    assert status == 429 and "--max-queue 40" in payload["detail"], payload
    assert int(headers["Retry-After"]) > 0
    status, payload, _, timings["status"] = request(url, "GET", f"/v1/runs/{run_id}")
    assert status == 200 and payload["state"] == "running"
    status, payload, _, timings["info"] = request(url, "GET", "/v1/info")
    assert status == 200 and payload["waiting"]["refinements"] == 40
    status, _, _, timings["wrong token"] = request(url, "GET", "/v1/info", "x" * 32)
    assert status == 401
    status, payload, _, timings["cancel"] = request(url, "POST", f"/v1/runs/{run_id}/cancel")
    assert status == 200
    print("latency behind 40 refinements:", {k: f"{v * 1000:.0f} ms" for k, v in timings.items()})
    assert max(timings.values()) < 1.0, timings
    with pytest.raises(Cancelled):
        client.wait(run_id)

    for t in threads:
        t.join(60)
    assert len(answers) == 40
    for status, payload, took in answers:
        assert status == 200 or (status == 503 and "--refine-timeout" in payload["detail"]), \
            (status, payload)
        assert took < LIMITS["--refine-timeout"] + 20
    assert client.info()["waiting"] == {"runs": 0, "refinements": 0}


def zip_of(name: str, header: bytes, zeros: int, lie_to: int | None = None) -> bytes:
    """An archive with one .npy member: ``header`` then ``zeros`` zero bytes, deflated. With
    ``lie_to``, its zip directory declares that size instead of the real one."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        if lie_to is None:
            with z.open(name, "w", force_zip64=True) as f:
                f.write(header)
                chunk = bytes(MB)
                for i in range(0, zeros, MB):
                    f.write(chunk[:min(MB, zeros - i)])
        else:
            z.writestr(name, header + bytes(zeros))
    data = buf.getvalue()
    if lie_to is not None:
        at = data.rindex(b"PK\x01\x02")  # the one central directory entry
        size = int.from_bytes(data[at + 24:at + 28], "little")
        assert size == len(header) + zeros
        data = data[:at + 24] + lie_to.to_bytes(4, "little") + data[at + 28:]
    return data


def npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                              "shape": shape})
    return buf.getvalue()


def test_compressed_bomb_is_refused_before_it_inflates(server, client):
    """A 0.3 MB request whose one array inflates to 300 MB: 413 naming --max-upload-mb, and
    the server's peak memory grows by less than 20 MB. An archive whose directory lies about
    the size (declares 1 MB, inflates to 100 MB) is cut at the declared size: refused, same
    bound."""
    proc, url, _ = server
    vol = small_volume(seed=13, n=4)
    vid = client.ensure_volume(vol)
    client.info()  # every route has been used once
    big = 300 * MB
    bomb = zip_of("labels_full.npy", npy_header((big,)), big)
    assert len(bomb) < 0.5 * MB
    meta = np.frombuffer(json.dumps({"volume_id": vid, "labels": {"full": True}}).encode(),
                         np.uint8)
    body = bomb_with_meta(bomb, meta)
    before, growth, (status, payload, _, _) = peak_growth_mb(
        proc.pid, lambda: request(url, "POST", "/v1/runs", body=body))
    print(f"bomb: {len(body) / MB:.2f} MB body declaring {big / MB:.0f} MB: server RSS "
          f"{before:.0f} MB, peak growth {growth:.1f} MB, answer {status}")
    assert status == 413, payload
    assert "300.0 MB" in payload["detail"] and "--max-upload-mb" in payload["detail"]
    assert growth < 20, f"the server's memory grew by {growth:.1f} MB"

    liar = zip_of("labels_full.npy", npy_header((MB - 128,)), 100 * MB, lie_to=MB)
    body = bomb_with_meta(liar, meta)
    assert len(body) < 0.5 * MB
    before, growth, (status, payload, _, _) = peak_growth_mb(
        proc.pid, lambda: request(url, "POST", "/v1/runs", body=body))
    print(f"lying archive: declares 1 MB, inflates to 100 MB: peak growth {growth:.1f} MB, "
          f"answer {status}: {payload.get('detail')}")
    assert 400 <= status < 500 and status != 404, payload
    assert growth < 20, f"the server's memory grew by {growth:.1f} MB"
    # The client's own requests are counted the same way: a mask that inflates past the limit.
    with pytest.raises(SGPInputError, match="--max-upload-mb"):
        client.refine_slice(vid, 1, [(10.0, 10.0)], [1], np.zeros((1500, 1500), bool))
    assert client.info()["waiting"] == {"runs": 0, "refinements": 0}


def bomb_with_meta(archive: bytes, meta: np.ndarray) -> bytes:
    """``archive`` with a ``meta.npy`` member added (the request's JSON)."""
    buf = io.BytesIO(archive)
    with zipfile.ZipFile(buf, "a") as z:
        member = io.BytesIO()
        np.lib.format.write_array(member, meta)
        z.writestr("meta.npy", member.getvalue())
    return buf.getvalue()


def test_queue_limit_answers_429_with_retry_after(server, client):
    """With a run running and --max-queue 40 runs waiting, the next run is refused with 429,
    Retry-After and a message naming --max-queue; nothing of it is kept, and cancelling the
    waiting runs frees the volume they pinned."""
    _, url, _ = server
    vol, drawn = long_case(seed=31)
    running = client.start_run(client.ensure_volume(vol), drawn, {1: "blob"})
    wait_running(client, running)
    small, lab = synthetic_volume(n=4, h=32, w=32, seed=32)
    small_id = client.ensure_volume(small.astype(np.int16))
    waiting = [client.start_run(small_id, lab, {1: "blob"}) for _ in range(40)]
    assert client.info()["waiting"]["runs"] == 40
    arrays: dict[str, np.ndarray] = {}
    meta = {"volume_id": small_id, "labels": protocol.encode_labels(lab, 0, arrays)}
    status, payload, headers, took = request(url, "POST", "/v1/runs",
                                             body=protocol.pack(arrays, meta, compress=True))
    assert status == 429 and payload["error_type"] == "busy", payload
    assert "--max-queue 40" in payload["detail"] and "try again" in payload["detail"]
    assert int(headers.get("Retry-After")) > 0 and took < 1.0
    with pytest.raises(SGPServiceError, match="429.*--max-queue"):
        client.start_run(small_id, lab, {1: "blob"})
    info = client.info()
    assert info["waiting"]["runs"] == 40 and info["volumes"]["pinned"] == 2
    for run_id in waiting:
        client.cancel_run(run_id)
    end_run(client, running)
    info = client.info()
    assert info["waiting"] == {"runs": 0, "refinements": 0} and info["volumes"]["pinned"] == 0


def test_store_never_drops_a_volume_a_run_needs(server, client):
    """--max-volumes-mb 2: an upload drops the least recently used volume no run needs; one
    that cannot fit beside the volumes of the running and the queued run is refused with 503,
    Retry-After and the option's name, and fits once those runs end. A volume over
    --max-voxels is refused with 413."""
    _, url, _ = server
    a_vol, a_drawn = long_case(seed=41)                      # 786,432 bytes
    b_vol, b_drawn = long_case(seed=42)                      # 786,432 bytes
    u_id = client.ensure_volume(small_volume(seed=43, n=8))  # 196,608 bytes, used by nothing
    a_id = client.ensure_volume(a_vol)
    run_a = client.start_run(a_id, a_drawn, {1: "blob"})
    wait_running(client, run_a)
    b_id = client.ensure_volume(b_vol)
    run_b = client.start_run(b_id, b_drawn, {1: "blob"})
    assert client.run_status(run_b)["state"] == "queued"

    # 393,216 more bytes: only the unused volume can make room, and it goes.
    c_id = client.ensure_volume(small_volume(seed=44, n=16))
    assert not client.has_volume(u_id)
    assert client.has_volume(a_id) and client.has_volume(b_id) and client.has_volume(c_id)

    big = small_volume(seed=45, n=24)  # 589,824 bytes: no room beside A and B's 1.5 MB
    big_id = protocol.volume_id(big, None)
    status, payload, headers, _ = request(url, "PUT", f"/v1/volumes/{big_id}",
                                          body=protocol.volume_to_npy(big))
    assert status == 503 and "--max-volumes-mb" in payload["detail"], payload
    assert "queued or running runs" in payload["detail"] and int(headers.get("Retry-After")) > 0
    assert client.has_volume(a_id) and client.has_volume(b_id)

    client.cancel_run(run_b)
    end_run(client, run_a)
    assert client.ensure_volume(big) == big_id and client.has_volume(big_id)
    info = client.info()["volumes"]
    assert info["mb"] <= LIMITS["--max-volumes-mb"] and info["pinned"] == 0, info

    too_many = np.zeros((15, 200, 200), np.uint8)  # 600,000 voxels over --max-voxels 500000
    with pytest.raises(SGPInputError, match="600,000 voxels.*--max-voxels"):
        client.ensure_volume(too_many)


def test_results_are_bounded_by_max_results_mb(server, client):
    """--max-results-mb 4: a run whose result would be larger (two structures: 4.5 MB) is
    refused up front with 413 naming the option, as is one over --max-structures; of two
    finished 2.4 MB results the older is dropped before download, and says why."""
    vol, lab = synthetic_volume(n=16, h=128, w=128, seed=51)  # every slice labeled: no model
    vol_id = client.ensure_volume(vol.astype(np.int16))
    two = lab.copy()
    two[0, 0, 0] = 2
    with pytest.raises(SGPInputError, match=r"result would be 4\.\d MB.*--max-results-mb"):
        client.start_run(vol_id, two, None)
    many = lab.copy()
    many[0, 0, :9] = np.arange(1, 10)
    with pytest.raises(SGPInputError, match="9 structures.*at most 8.*--max-structures"):
        client.start_run(vol_id, many, None)

    first = client.start_run(vol_id, lab, {1: "blob"})
    while client.run_status(first)["state"] != "done":
        time.sleep(0.05)
    second = client.start_run(vol_id, lab, {1: "blob"})
    while client.run_status(second)["state"] not in ("done", "failed"):
        time.sleep(0.05)
    assert client.run_status(second)["state"] == "done"
    status = client.run_status(first)
    assert status["state"] == "failed" and status["error_type"] == "dropped", status
    assert "--max-results-mb" in status["error"]
    with pytest.raises(SGPServiceError, match="dropped before it was downloaded"):
        client.wait(first)
    results = client.info()["results"]
    assert results["count"] == 1 and 2 < results["mb"] <= LIMITS["--max-results-mb"], results
    assert np.array_equal(client.wait(second).labels, lab)
    assert client.info()["results"]["count"] == 0


def test_archive_with_a_huge_directory_is_refused_before_it_is_parsed():
    """12,000 empty members with long names (a 1.2 MB zip directory) would cost a Python object
    each while the archive is opened: refused from the end record alone, with 413."""
    import tracemalloc

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(12_000):
            z.writestr(f"label_{i:040d}.npy", b"")
    data = buf.getvalue()
    tracemalloc.start()
    try:
        with pytest.raises(protocol.LimitExceeded, match="fewer arrays") as err:
            protocol.unpack(data, max_bytes=64 * MB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.status == 413 and peak < MB, peak
    with pytest.raises(SGPInputError):  # without a limit (the client) it is still parsed
        protocol.unpack(data)


def test_bodies_received_at_once_are_bounded(server, client):
    """Two clients stall mid-upload with 1.9 MB bodies declared (--max-upload-mb 2: at most
    4 MB received at once): a third upload is answered 503 with Retry-After before its body is
    read, control requests are still served, and once the stalled clients hang up the upload
    goes through."""
    import socket

    _, url, _ = server
    host, port = url.removeprefix("http://").split(":")

    def declare_upload(volume: str, length: int) -> socket.socket:
        """A connection that has sent an upload's headers, declaring ``length`` body bytes."""
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(f"PUT /v1/volumes/{volume} HTTP/1.1\r\nHost: {host}\r\n"
                     f"Authorization: Bearer {TOKEN}\r\nContent-Length: {length}\r\n\r\n"
                     .encode())
        return sock

    stalled = []
    for _ in range(2):
        sock = declare_upload("0" * 64, 2_000_000)
        sock.sendall(bytes(1000))
        stalled.append(sock)
    vol = small_volume(seed=61, n=40)  # 983,040 bytes
    vid = protocol.volume_id(vol, None)
    body = protocol.volume_to_npy(vol)
    deadline = time.monotonic() + 10
    while client.info()["receiving_mb"] < 3.8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.info()["receiving_mb"] == pytest.approx(2 * 2_000_000 / MB, abs=0.1)
    # The third upload declares its body and waits: the answer comes without any of it (a
    # client still sending a body the server will not read may lose the answer to a reset).
    t = time.perf_counter()
    with declare_upload(vid, len(body)) as sock:
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        status, payload, headers = answer.status, json.loads(answer.read()), answer.headers
    took = time.perf_counter() - t
    assert status == 503 and "--max-upload-mb" in payload["detail"], (status, payload)
    assert int(headers.get("Retry-After")) > 0 and took < 1.0
    assert client.info()["waiting"] == {"runs": 0, "refinements": 0}
    for sock in stalled:
        sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            status = request(url, "PUT", f"/v1/volumes/{vid}", body=body)[0]
        except urllib.error.URLError:  # a 503 answered while the body was still going out
            status = 503
        if status != 503:
            break
        time.sleep(0.1)
    assert status == 201 and client.has_volume(vid)


def test_the_client_says_why_an_upload_was_refused_unread(server, client, monkeypatch):
    """An upload the server will not take is answered before it is read and the connection
    closed; the client, still sending, may see only a reset. It then asks the server and says
    which it was: over --max-upload-mb, or busy receiving others (not "crashed")."""
    big = small_volume(seed=62, n=400)  # 9.4 MiB, --max-upload-mb 2
    # Whether the answer or a reset reaches the client, it names the limit.
    with pytest.raises(SGPInputError, match="--max-upload-mb"):
        client.ensure_volume(big)

    # The reset, on every upload: the client asks the server (answered as the real one did).
    opened = client._opener.open

    def reset(req, *args, **kwargs):
        if req.data:
            raise urllib.error.URLError(BrokenPipeError(32, "Broken pipe"))
        return opened(req, *args, **kwargs)

    real_info = client.info()
    monkeypatch.setattr(client._opener, "open", reset)
    monkeypatch.setattr(EngineClient, "info", lambda self: real_info)
    with pytest.raises(SGPInputError, match=r"refused a 9\.4 MB upload: over its --max-upload-mb"):
        client.ensure_volume(big)
    # An upload the server could take: it was busy receiving others.
    with pytest.raises(SGPServiceError, match="receiving other uploads at once.*Try again"):
        client.ensure_volume(small_volume(seed=63, n=8))
    # Without an answer to the question either, the reset is all there is to say.
    monkeypatch.setattr(EngineClient, "info", lambda self: (_ for _ in ()).throw(
        SGPServiceError("Cannot reach")))
    with pytest.raises(SGPServiceError, match="closed the connection"):
        client.ensure_volume(small_volume(seed=64, n=8))


def test_limit_options_are_documented_and_checked():
    """`sgp serve --help` names every limit; a limit that is not a positive finite number is
    refused with the option's name before anything starts."""
    import argparse

    from SlicerSGP.cli import serve

    parser = argparse.ArgumentParser(prog="sgp")
    sub = parser.add_subparsers()
    cmd = serve.add_parser(sub)
    text = cmd.format_help()
    for option in ("--max-queue", "--max-volumes-mb", "--max-results-mb", "--max-voxels",
                   "--max-structures", "--refine-timeout", "--max-upload-mb"):
        assert option in text, option
    assert "inflates" in text and "Retry-After" in text
    for bad, name in (("--max-queue=0", "--max-queue"), ("--max-voxels=inf", "--max-voxels"),
                      ("--refine-timeout=nan", "--refine-timeout"),
                      ("--max-results-mb=-1", "--max-results-mb")):
        args = parser.parse_args(["serve", bad])
        with pytest.raises(SGPInputError, match=f"{name} must be a positive number"):
            serve.limits_from_args(args)
    limits = serve.limits_from_args(parser.parse_args(["serve", "--max-voxels", "2e6"]))
    assert limits.max_voxels == 2_000_000 and isinstance(limits.max_voxels, int)


def test_an_engine_fault_in_a_run_is_logged_without_its_message(caplog):
    """A run's internal error reaches its client in full; the server log gets its type and
    stack only, since the message may quote the request (here: a structure name)."""
    import logging

    from SlicerSGP.service.jobs import JobQueue, RunRequest, StoredVolume
    from SlicerSGP.types import SegmentOptions

    class Faulty:
        def segment(self, volume, labels, structures, options, **kwargs):
            raise RuntimeError(f"engine fault near {structures[1]}")

    queue = JobQueue(Faulty())
    try:
        with caplog.at_level(logging.ERROR, logger="SlicerSGP.service"):
            run = queue.submit(RunRequest("v", StoredVolume(np.zeros((2, 8, 8), np.float32), None),
                                          None, {1: "patient-name-in-a-label"}, SegmentOptions(),
                                          None, None))
            deadline = time.monotonic() + 30
            while queue.status(run.id)["state"] in ("queued", "running"):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        status = queue.status(run.id)
        assert status["state"] == "failed" and status["error_type"] == "internal"
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "RuntimeError" in logged and "segment" in logged
        assert "patient-name-in-a-label" not in logged
    finally:
        queue.close()
