"""A shared engine server: a real `sgp serve --tokens FILE` (tiny model, random weights) with two
users. Each user's runs are their own; a user over --max-queue-per-user gets 429; runs are taken
round robin, so one user's queue does not hold back another's single run by more than one run;
a token taken out of the table is refused (401) at the first request after SIGHUP; the log
names user, run, volume hash and timings, and nothing of the request's content."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from synthetic import synthetic_volume

from service.test_service import MODEL_ARGS, start_server
from service.test_service_limits import long_case, request, wait_running
from SlicerSGP.errors import Cancelled, SGPInputError, SGPServiceError
from SlicerSGP.service import protocol
from SlicerSGP.service.access import Users
from SlicerSGP.service.client import EngineClient
from SlicerSGP.service.fair_queue import FairQueue
from SlicerSGP.service.token_table import parse_table, table_line, token_digest

ROOT = Path(__file__).resolve().parents[2]
SGP = ROOT / ".venv" / "bin" / "sgp"
TOKENS = {"alice": "alice-" + "a" * 30, "bob": "bob-" + "b" * 30, "carol": "carol-" + "c" * 30}
CAP = 3
SECRET_NAME = "do-not-log-this-structure"


def hash_line(name: str) -> str:
    """The table line `sgp serve --hash-token NAME` prints for the user's token on stdin."""
    proc = subprocess.run([str(SGP), "serve", "--hash-token", name], input=TOKENS[name] + "\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("users")
    table = folder / "users.txt"
    table.write_text("# engine users\n" + hash_line("alice") + "\n\n" + hash_line("bob") + "\n")
    log = folder / "stderr.log"
    proc, url = start_server([*MODEL_ARGS, "--tokens", str(table),
                              "--max-queue-per-user", str(CAP)], log)
    yield proc, url, table, log
    proc.terminate()
    proc.wait(30)


def client_of(server, name: str) -> EngineClient:
    return EngineClient(server[1], TOKENS[name], timeout=60)


def wait_for_log(log: Path, pattern: str, after: int, timeout: float = 10.0) -> str:
    """The first line matching ``pattern`` written past byte ``after`` of the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()[after:]
        found = re.search(pattern, text)
        if found:
            return found.group(0)
        time.sleep(0.05)
    raise AssertionError(f"no log line {pattern!r}: {log.read_text()[after:][-2000:]}")


# --------------------------------------------------------------------------- parts

def test_hash_token_prints_the_table_line_of_the_token():
    line = hash_line("alice")
    assert line == "alice:" + hashlib.sha256(TOKENS["alice"].encode()).hexdigest()
    assert parse_table(line, "x") == {"alice": token_digest(TOKENS["alice"])}
    assert table_line("bob", TOKENS["bob"]) == hash_line("bob")
    proc = subprocess.run([str(SGP), "serve", "--hash-token", "alice"], input="short\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "16 or more" in proc.stderr


@pytest.mark.parametrize("text, problem", [
    ("alice", "is not 'name:sha256hex'"),
    ("alice:" + TOKENS["alice"], "64 hexadecimal digits"),
    ("al ice:" + "0" * 64, "is not allowed"),
    ("alice:" + "0" * 64 + "\nalice:" + "1" * 64, "listed twice"),
    ("alice:" + "0" * 64 + "\nbob:" + "0" * 64, "same token"),
    ('{"alice": 5}', "64 hexadecimal digits"),
    ('["alice"]', "one object"),
])
def test_a_table_that_does_not_parse_names_the_problem(text, problem):
    with pytest.raises(SGPInputError, match=re.escape(problem)):
        parse_table(text, "users.txt")


def test_json_table_and_lines_give_the_same_users():
    lines = f"{table_line('alice', 'x' * 20)}\n{table_line('bob', 'y' * 20)}"
    as_json = json.dumps({"alice": token_digest("x" * 20).hex(),
                          "bob": token_digest("y" * 20).hex()})
    assert parse_table(lines, "a") == parse_table(as_json, "b")


def test_an_emptied_table_keeps_the_server_closed():
    """A server with a user table requires a token even when the table is (or becomes) empty:
    it never falls back to the open, loopback-only mode of a server without a token."""
    users = Users(digests={"alice": token_digest("x" * 20)}, required=True)
    assert users and users.identify("x" * 20) == "alice"
    assert users.replace({}) == {"alice"}
    assert users and users.identify("x" * 20) is None
    assert Users(digests={}, required=True) and not Users()


def test_fair_queue_takes_users_round_robin():
    class Item:
        def __init__(self, user: str, n: int):
            self.user, self.n = user, n

    q: FairQueue[Item] = FairQueue()
    a = [Item("a", i) for i in range(4)]
    for item in a[:3]:
        q.append(item)
    b = Item("b", 0)
    q.append(b)
    assert [(x.user, x.n) for x in q] == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]
    assert q.popleft() is a[0] and q.position(b) == 0
    q.append(a[3])
    q.remove(a[1])
    assert [(x.user, x.n) for x in q] == [("b", 0), ("a", 2), ("a", 3)]
    assert q.count("a") == 2 and q.users() == 2 and len(q) == 3
    assert [q.popleft() for _ in range(3)] == [b, a[2], a[3]] and not q


# --------------------------------------------------------------------------- the server

def test_two_users_each_see_only_their_own_runs(server):
    alice, bob = client_of(server, "alice"), client_of(server, "bob")
    vol, lab = synthetic_volume(n=4, h=32, w=32, seed=5)
    drawn = np.zeros_like(lab)
    drawn[1] = lab[1]
    run_id = alice.start_run(alice.ensure_volume(vol), drawn, {1: SECRET_NAME})
    with pytest.raises(SGPServiceError, match="Unknown run"):
        bob.run_status(run_id)
    result = alice.wait(run_id)
    assert result.labels.shape == vol.shape
    info = bob.info()["queue"]
    assert info["user"] == "bob" and info["yours_waiting"] == 0
    assert info["max_queue_per_user"] == CAP
    status, payload, _, _ = request(server[1], "GET", "/v1/info", token="x" * 20)
    assert status == 401 and "revoked" in payload["detail"]


def test_per_user_cap_and_round_robin_order(server):
    """Alice has a run running and CAP runs waiting: her next is refused with 429 naming
    --max-queue-per-user; Bob's single run still queues, second in line (behind one of
    Alice's), and starts before her remaining ones (the server's log gives the order)."""
    _, url, _, log = server
    alice, bob = client_of(server, "alice"), client_of(server, "bob")
    vol, drawn = long_case(seed=21)
    mark = log.stat().st_size
    running = alice.start_run(alice.ensure_volume(vol), drawn, {1: SECRET_NAME})
    wait_running(alice, running)
    small, lab = synthetic_volume(n=4, h=32, w=32, seed=22)
    small_id = alice.ensure_volume(small.astype(np.int16))
    waiting = [alice.start_run(small_id, lab, {1: "blob"}) for _ in range(CAP)]
    arrays: dict[str, np.ndarray] = {}
    meta = {"volume_id": small_id, "labels": protocol.encode_labels(lab, 0, arrays)}
    status, payload, headers, _ = request(url, "POST", "/v1/runs", token=TOKENS["alice"],
                                          body=protocol.pack(arrays, meta, compress=True))
    assert status == 429 and payload["error_type"] == "busy", payload
    assert f"--max-queue-per-user {CAP}" in payload["detail"] and int(headers["Retry-After"]) > 0
    bobs = bob.start_run(bob.ensure_volume(small.astype(np.int16)), lab, {1: "blob"})
    positions = [alice.run_status(r)["queue_position"] for r in waiting]
    assert bob.run_status(bobs)["queue_position"] == 1 and positions == [0, 2, 3]
    queue = alice.info()["queue"]
    assert (queue["yours_waiting"], queue["yours_running"], queue["waiting"],
            queue["users_waiting"]) == (CAP, True, CAP + 1, 2)
    assert not bob.info()["queue"]["yours_running"]
    alice.cancel_run(running)
    bob.wait(bobs)
    for run_id in waiting:
        alice.cancel_run(run_id)
    for run_id in [running, *waiting]:
        try:
            alice.wait(run_id)
        except Cancelled:
            pass
    text = log.read_text()[mark:]
    started = re.findall(r"run ([0-9a-f]{32}) started: user (\w+)", text)
    order = [run for run, _ in started]
    assert order[0] == running and bobs in order, started
    between = order[order.index(running) + 1:order.index(bobs)]
    assert between == waiting[:1], started  # exactly one of Alice's waiting runs went first
    # The log names each run's user, volume hash and timings, never its content.
    assert re.search(rf"run {bobs} queued: user bob, volume {small_id[:16]}", text)
    assert re.search(rf"run {bobs} started: user bob, volume {small_id[:16]}, waited "
                     r"\d+\.\d\d s", text)
    assert re.search(rf"run {bobs} done: user bob, volume {small_id[:16]}, \d+\.\d\d s after "
                     r"it was queued, ran \d+\.\d\d s", text)
    assert SECRET_NAME not in log.read_text()


class RecordingProxy(http.server.BaseHTTPRequestHandler):
    """A reverse proxy that forwards every request to the engine and records its method, path
    and volume header: what a proxy routing by volume sees."""

    target = ""
    seen: list[tuple[str, str, str | None]] = []

    def forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        self.seen.append((self.command, self.path, self.headers.get(protocol.VOLUME_HEADER)))
        head = {k: v for k, v in self.headers.items()
                if k.lower() not in ("host", "content-length", "connection")}
        req = urllib.request.Request(self.target + self.path, data=body, headers=head,
                                     method=self.command)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, data, headers = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as e:
            status, data, headers = e.code, e.read(), e.headers
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "date",
                                 "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

    def log_message(self, *args) -> None:
        pass


def test_every_request_about_a_volume_names_it_for_the_proxy(server):
    """Upload, check, run start, status, result and click refinement all carry the volume's
    id in X-SGP-Volume (the key of the proxy recipe in docs/service.md)."""
    RecordingProxy.target, RecordingProxy.seen = server[1], []
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RecordingProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        client = EngineClient(f"http://127.0.0.1:{proxy.server_address[1]}", TOKENS["alice"],
                              timeout=60)
        vol, lab = synthetic_volume(n=4, h=32, w=32, seed=41)
        drawn = np.zeros_like(lab)
        drawn[1] = lab[1]
        result = client.segment(vol, drawn, {1: "blob"})
        assert result.labels.shape == vol.shape
        client.refine_slice(vol, 2, [(10.0, 12.0)], [1], None)
        client.info()
    finally:
        proxy.shutdown()
    vid = protocol.volume_id(vol, None)
    about_volume = [(m, p, h) for m, p, h in RecordingProxy.seen if p != "/v1/info"]
    kinds = {(m, p.split("/")[2]) for m, p, _ in about_volume}
    assert {("HEAD", "volumes"), ("PUT", "volumes"), ("POST", "runs"), ("GET", "runs"),
            ("POST", "refine")} <= kinds, kinds
    assert any(p.endswith("/result?probabilities=true") for _, p, _ in about_volume)
    assert all(h == vid for _, _, h in about_volume), about_volume


def test_revoked_token_is_refused_at_the_next_request_after_sighup(server):
    proc, url, table, log = server
    bob = client_of(server, "bob")
    assert bob.info()["queue"]["user"] == "bob"
    mark = log.stat().st_size
    table.write_text(f"{hash_line('alice')}\n{hash_line('carol')}\n")
    os.kill(proc.pid, signal.SIGHUP)
    line = wait_for_log(log, r"user table reloaded[^\n]*", mark)
    assert "added: carol" in line and "removed: bob" in line
    status, payload, _, _ = request(url, "GET", "/v1/info", token=TOKENS["bob"])
    assert status == 401 and payload["error_type"] == "auth"
    with pytest.raises(SGPServiceError, match="401"):
        bob.info()
    assert client_of(server, "carol").info()["queue"]["user"] == "carol"
    # A table that does not parse is reported, and the one in force is kept.
    mark = log.stat().st_size
    table.write_text("carol\n")
    os.kill(proc.pid, signal.SIGHUP)
    assert "is not 'name:sha256hex'" in wait_for_log(log, r"SIGHUP: [^\n]*kept", mark)
    assert client_of(server, "carol").info()["queue"]["user"] == "carol"
    assert proc.poll() is None


def test_per_user_cap_option_is_checked():
    import argparse

    from SlicerSGP.cli import serve

    parser = argparse.ArgumentParser(prog="sgp")
    serve.add_parser(parser.add_subparsers())
    assert serve.limits_from_args(parser.parse_args(["serve"])).max_queue_per_user is None
    args = parser.parse_args(["serve", "--max-queue-per-user", "0"])
    with pytest.raises(SGPInputError, match="--max-queue-per-user must be a positive number"):
        serve.limits_from_args(args)
