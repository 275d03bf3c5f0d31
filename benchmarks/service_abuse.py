"""Careless and hostile clients against a real `sgp serve` (loopback only, bounded in count and
time): does every bad request get a clear 4xx, does the server's memory stay put, and does a
well-behaved client keep being served?

Starts two servers (tiny model, random weights, CPU): *main* with two tokens (users A and B)
and *open* without a token (for the Host/Origin cases). Each case sends one kind of bad request
and prints the HTTP status, the field its message names, the main server's resident memory
(VmRSS) before and after, and whether a second, well-behaved client (user A: info, and its
uploaded volume still held) was served during and after the case.

Groups: malformed (meta/labels/options/refine fields), junk (volumes that are not images),
ownership (user B against user A's run), web (Origin/Host on the token-less server), upload
(a client that hangs up mid-body), capacity (a refine burst and a compressed bomb: the other
half of the hardening; see CAPACITY below).

    python benchmarks/service_abuse.py             # every case
    python benchmarks/service_abuse.py --fast      # the cases the test suite runs
    python benchmarks/service_abuse.py --group junk --group web

Testing/service/test_service_abuse.py imports this module and runs the fast cases.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from SlicerSGP.service import protocol
from SlicerSGP.service.client import EngineClient
from SlicerSGP.types import SegmentOptions

MODEL_ARGS = ["--model", "tiny", "--weights", "random", "--image-size", "256", "--device", "cpu",
              "--seed", "0"]
MAX_UPLOAD_MB = 4
CASE_TIMEOUT = 60.0
"""Longest one case may take (HTTP timeout of every request it sends)."""
CAPACITY = True
"""Whether the capacity cases (refine burst, compressed bomb) run by default. They test the
other half of the hardening (protocol.unpack's size limits, refines that do not lock clients
out: commit be505c0); False leaves them to ``--group capacity``."""


# --------------------------------------------------------------------------- servers

class Server:
    """`python -m SlicerSGP.service ARGS` on loopback; its stderr goes to ``log``."""

    def __init__(self, args: list[str], log: Path, timeout: float = 300.0):
        self.log = log
        self._err = open(log, "wb")  # noqa: SIM115 (open for the process's life)
        self.proc = subprocess.Popen([sys.executable, "-m", "SlicerSGP.service", *args],
                                     stdout=subprocess.PIPE, stderr=self._err)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        self.url = ""
        while time.monotonic() < deadline and not self.url:
            if sel.select(timeout=1.0):
                line = self.proc.stdout.readline().decode()
                if line.startswith("ready "):
                    self.url = line.split()[1]
                elif not line:
                    break
        if not self.url:
            self.stop()
            raise RuntimeError(f"sgp serve did not get ready: {log.read_text()[-2000:]}")
        self.port = int(self.url.rsplit(":", 1)[1])

    def rss_mb(self) -> float:
        """Resident memory (VmRSS) of the server process, MB."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
            return kb / 1024
        except (OSError, StopIteration):
            return float("nan")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._err.close()


def token_file(folder: Path, name: str, token: str) -> Path:
    path = folder / name
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@dataclass
class Context:
    """What the cases talk to: the servers, the two users' tokens, user A's volume and run."""

    main: Server
    open: Server | None
    token_a: str
    token_b: str
    volume_id: str = ""
    run_id: str = ""
    long_volume_id: str = ""
    notes: list[str] = field(default_factory=list)


def start(folder: Path, with_open: bool = True) -> Context:
    """The two servers of the benchmark (main with users A and B; open without a token)."""
    token_a, token_b = "user-a-" + "a" * 26, "user-b-" + "b" * 26
    main = Server([*MODEL_ARGS, "--max-upload-mb", str(MAX_UPLOAD_MB),
                   "--token-file", str(token_file(folder, "a.token", token_a)),
                   "--token-file", str(token_file(folder, "b.token", token_b))],
                  folder / "main.log")
    try:
        opened = Server(MODEL_ARGS, folder / "open.log") if with_open else None
    except BaseException:
        main.stop()
        raise
    ctx = Context(main, opened, token_a, token_b)
    good = EngineClient(main.url, token_a, timeout=CASE_TIMEOUT)
    vol, _ = small_case()
    ctx.volume_id = good.ensure_volume(vol)
    return ctx


def stop(ctx: Context) -> None:
    for server in (ctx.main, ctx.open):
        if server is not None:
            server.stop()


def small_case(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vol = rng.normal(100.0, 15.0, (n, 64, 64)).astype(np.float32)
    drawn = np.zeros(vol.shape, np.uint8)
    drawn[1, 20:40, 25:45] = 1
    drawn[n - 2, 22:42, 20:40] = 1
    vol[drawn == 1] += 90
    return vol, drawn


# --------------------------------------------------------------------------- HTTP

@dataclass
class Answer:
    status: int | None
    """None: no answer (the case hung up on purpose, or the server did)."""
    detail: str = ""


def send(url: str, method: str, path: str, token: str | None, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = CASE_TIMEOUT) -> Answer:
    """One request with exactly these headers (a ``Host`` here replaces the real one)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    head = dict(headers or {})
    if token is not None:
        head["Authorization"] = f"Bearer {token}"
    try:
        conn.putrequest(method, path, skip_host="Host" in head, skip_accept_encoding=True)
        for k, v in head.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as e:
        return Answer(None, f"{type(e).__name__}: {e}")
    finally:
        conn.close()
    try:
        payload = json.loads(data or b"{}")
        detail = payload.get("detail", "") if isinstance(payload, dict) else str(payload)
    except ValueError:
        detail = data[:200].decode(errors="replace")
    return Answer(resp.status, detail if isinstance(detail, str) else json.dumps(detail))


def post_npz(ctx: Context, path: str, meta: object, arrays: dict | None = None,
             token: str | None = None) -> Answer:
    body = protocol.pack(dict(arrays or {}), meta)  # type: ignore[arg-type]
    return send(ctx.main.url, "POST", path, token or ctx.token_a, body,
                {"Content-Type": protocol.NPZ})


def run_meta(ctx: Context, **changes: object) -> dict:
    """A valid run request's meta for user A's volume, with ``changes``."""
    meta = {"volume_id": ctx.volume_id, "structures": {"1": "blob"}, "options": {},
            "support_slices": None, "labels": {"shape": [6, 64, 64], "dtype": "|u1",
                                               "axis": 0, "slices": [1]},
            "bank": None}
    meta.update(changes)
    return meta


def run_arrays() -> dict[str, np.ndarray]:
    return {"label_1": small_case()[1][1]}


def refine_meta(ctx: Context, **changes: object) -> dict:
    meta = {"volume_id": ctx.volume_id, "slice_index": 1, "points": [[30.0, 35.0]],
            "point_labels": [1], "options": {}}
    meta.update(changes)
    return meta


def put_volume(ctx: Context, array: np.ndarray | bytes, geometry: str = "null",
               volume_id: str | None = None) -> Answer:
    if isinstance(array, bytes):
        body, vid = array, volume_id or "0" * 64
    else:
        body = protocol.volume_to_npy(array)
        vid = volume_id or protocol.volume_id(array, None)
    return send(ctx.main.url, "PUT", f"/v1/volumes/{vid}", ctx.token_a, body,
                {"Content-Type": protocol.NPY, protocol.GEOMETRY_HEADER: geometry})


def npy_with_header(shape_text: str, descr: str = "<f4", data: bytes = b"\0" * 64) -> bytes:
    """A .npy whose header says anything (a forged or damaged upload)."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + data


# --------------------------------------------------------------------------- cases

@dataclass
class Case:
    name: str
    group: str
    act: Callable[[Context], Answer]
    expect: tuple[int | None, ...]
    names: str = ""
    """Text the error message must hold (the field it names)."""
    fast: bool = True
    """Runs in the test suite."""
    check: Callable[[Context], str | None] | None = None
    """Run after the case: a problem to report (None: fine)."""


def _malformed() -> list[Case]:
    run, ref = "/v1/runs", "/v1/refine"

    def labels(**kw: object) -> Callable[[Context], Answer]:
        def act(ctx: Context) -> Answer:
            desc = {"shape": [6, 64, 64], "dtype": "|u1", "axis": 0, "slices": [1], **kw}
            return post_npz(ctx, run, run_meta(ctx, labels=desc), run_arrays())
        return act

    def meta(**kw: object) -> Callable[[Context], Answer]:
        return lambda ctx: post_npz(ctx, run, run_meta(ctx, **kw), run_arrays())

    def refine(arrays: dict | None = None, **kw: object) -> Callable[[Context], Answer]:
        return lambda ctx: post_npz(ctx, ref, refine_meta(ctx, **kw), arrays)

    cases = [
        Case("meta is a list", "malformed",
             lambda ctx: post_npz(ctx, run, [ctx.volume_id]), (422,), "meta"),
        Case("meta is a string", "malformed",
             lambda ctx: post_npz(ctx, run, "volume"), (422,), "meta"),
        Case("meta without volume_id", "malformed",
             lambda ctx: post_npz(ctx, run, {"labels": None}), (422,), "volume_id"),
        Case("volume_id is a number", "malformed", meta(volume_id=12), (422,), "meta.volume_id"),
        Case("unknown meta field", "malformed", meta(colour="red"), (422,), "colour"),
        Case("structure key 'abc'", "malformed", meta(structures={"abc": "x"}), (422,),
             "structures key 'abc'"),
        Case("structure name a number", "malformed", meta(structures={"1": 5}), (422,),
             "structures.1"),
        Case("structures a list", "malformed", meta(structures=[1]), (422,), "structures"),
        Case("labels axis 7", "malformed", labels(axis=7), (422,), "labels.axis"),
        Case("labels dtype 'nonsense'", "malformed", labels(dtype="nonsense"), (422,),
             "labels.dtype"),
        Case("labels dtype complex", "malformed", labels(dtype="<c8"), (422,), "labels.dtype"),
        Case("labeled slice array missing", "malformed", labels(slices=[1, 3]), (422,),
             "label_3"),
        Case("labels shape claims 10^15 voxels", "malformed",
             labels(shape=[100000, 100000, 100000]), (422,), "labels.shape"),
        Case("labels slices a string", "malformed", labels(slices="1"), (422,),
             "labels.slices"),
        Case("labels a list", "malformed", meta(labels=[1]), (422,), "labels"),
        Case("top_k 'many'", "malformed", meta(options={"top_k": "many"}), (422,),
             "options.top_k"),
        Case("threshold NaN", "malformed", meta(options={"threshold": float("nan")}), (422,),
             "options.threshold"),
        Case("use_pmg 'yes'", "malformed", meta(options={"use_pmg": "yes"}), (422,),
             "options.use_pmg"),
        Case("slice_limits key 'x'", "malformed", meta(options={"slice_limits": {"x": [0, 1]}}),
             (422,), "options.slice_limits"),
        Case("options a list", "malformed", meta(options=[]), (422,), "options"),
        Case("unknown option", "malformed", meta(options={"turbo": True}), (422,), "turbo"),
        Case("support_slices 'abc'", "malformed", meta(support_slices="abc"), (422,),
             "support_slices"),
        Case("support slice 2**40", "malformed", meta(support_slices=[2**40]), (422,),
             "support_slices[0]"),
        Case("bank key 'abc'", "malformed", meta(bank={"abc": ["x"]}), (422,), "bank key"),
        Case("bank item without arrays", "malformed", meta(bank={"2": ["x"]}), (422,),
             "bank_2_0_image"),
        Case("run body not an archive", "malformed",
             lambda ctx: send(ctx.main.url, "POST", run, ctx.token_a, b"hello",
                              {"Content-Type": protocol.NPZ}), (400, 422), ".npz"),
        Case("refine slice_index 'abc'", "malformed", refine(slice_index="abc"), (422,),
             "slice_index"),
        Case("refine point not a pair", "malformed", refine(points=[[1.0]]), (422,),
             "points[0]"),
        Case("refine point NaN", "malformed", refine(points=[[float("nan"), 1.0]]), (422,),
             "points[0][0]"),
        Case("refine labels mismatch", "malformed", refine(point_labels=[1, 0]), (422,),
             "point_labels"),
        Case("refine label 7", "malformed", refine(point_labels=[7]), (422,),
             "point_labels[0]"),
        Case("refine mask 3D", "malformed",
             refine({"mask": np.zeros((2, 64, 64), bool)}), (422,), "mask"),
        Case("refine mask of strings", "malformed",
             refine({"mask": np.zeros((64, 64), "U2")}), (422,), "mask"),
        Case("geometry origin 'abc'", "malformed",
             lambda ctx: put_volume(ctx, small_case()[0], json.dumps(
                 {"origin": "abc", "spacing": [1, 1, 1], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
             )), (422,), "X-SGP-Geometry.origin"),
        Case("geometry spacing 0", "malformed",
             lambda ctx: put_volume(ctx, small_case()[0], json.dumps(
                 {"origin": [0, 0, 0], "spacing": [1, 0, 1],
                  "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]})), (422,), "X-SGP-Geometry.spacing"),
        Case("geometry not JSON", "malformed",
             lambda ctx: put_volume(ctx, small_case()[0], "{origin"), (422,), "X-SGP-Geometry"),
        Case(".npy header claims 10^15 voxels", "malformed",
             lambda ctx: put_volume(ctx, npy_with_header("(100000, 100000, 100000)")), (422,),
             "header declares"),
        Case(".npy object dtype", "malformed",
             lambda ctx: put_volume(ctx, npy_with_header("(2, 2, 2)", "|O")), (422,),
             "holds no numbers"),
        Case("result ?probabilities=maybe", "malformed",
             lambda ctx: send(ctx.main.url, "GET", "/v1/runs/x/result?probabilities=maybe",
                              ctx.token_a), (422,), "probabilities"),
    ]
    return cases


JUNK: dict[str, Callable[[], np.ndarray]] = {
    "unicode": lambda: np.full((4, 32, 32), "ab", "U2"),
    "structured": lambda: np.zeros((4, 32, 32), [("a", "<i4"), ("b", "<f4")]),
    "complex": lambda: np.ones((4, 32, 32), np.complex64),
    "datetime": lambda: np.zeros((4, 32, 32), "M8[s]"),
    "timedelta": lambda: np.zeros((4, 32, 32), "m8[s]"),
    "0-d": lambda: np.array(5.0, np.float32),
    "1-d": lambda: np.zeros(64, np.float32),
    "2-d": lambda: np.zeros((32, 32), np.float32),
    "5-d": lambda: np.zeros((2, 2, 8, 8, 3), np.float32),
    "4-d not RGB": lambda: np.zeros((2, 4, 32, 32), np.float32),
    "empty": lambda: np.zeros((0, 32, 32), np.float32),
    "NaN": lambda: np.full((4, 32, 32), np.nan, np.float32),
    "inf": lambda: np.full((4, 32, 32), np.inf, np.float32),
}
JUNK_WORDS = {"unicode": "non-numeric", "structured": "structured", "complex": "complex",
              "datetime": "non-numeric", "timedelta": "non-numeric", "0-d": "3D", "1-d": "3D",
              "2-d": "3D", "5-d": "5D", "4-d not RGB": "4D", "empty": "empty", "NaN": "NaN",
              "inf": "infinite"}


def _junk() -> list[Case]:
    def upload(name: str) -> Callable[[Context], Answer]:
        def act(ctx: Context) -> Answer:
            arr = JUNK[name]()
            if arr.dtype.fields is not None or arr.ndim == 0:  # sent as np.save writes them
                buf = io.BytesIO()
                np.save(buf, arr, allow_pickle=False)
                return put_volume(ctx, buf.getvalue(), volume_id="1" * 64)
            return put_volume(ctx, arr)
        return act

    cases = [Case(f"junk volume: {name}", "junk", upload(name), (422,), JUNK_WORDS[name],
                  check=_store_kept) for name in JUNK]
    cases.append(Case("bool volume (a binary image, accepted as 0/1)", "junk",
                      lambda ctx: put_volume(ctx, np.zeros((4, 32, 32), bool)), (201,)))
    return cases


def _store_kept(ctx: Context) -> str | None:
    client = EngineClient(ctx.main.url, ctx.token_a, timeout=CASE_TIMEOUT)
    return None if client.has_volume(ctx.volume_id) else "user A's volume left the store"


def _user_a_run(ctx: Context, fresh: bool = False) -> str:
    """A run of user A that is queued or running for a while (a 24-slice volume). ``fresh``:
    nothing reused from an earlier run of the same labels (which would end in milliseconds)."""
    client = EngineClient(ctx.main.url, ctx.token_a, timeout=CASE_TIMEOUT)
    if not ctx.long_volume_id:
        vol, drawn = small_case(n=24, seed=4)
        ctx.long_volume_id = client.ensure_volume(vol.astype(np.int16))
    drawn = small_case(n=24, seed=4)[1]
    options = SegmentOptions(reuse_results=False) if fresh else None
    return client.start_run(ctx.long_volume_id, drawn, {1: "blob"}, options)


def _ownership() -> list[Case]:
    def as_b(method: str, suffix: str) -> Callable[[Context], Answer]:
        def act(ctx: Context) -> Answer:
            ctx.run_id = ctx.run_id or _user_a_run(ctx)
            return send(ctx.main.url, method, f"/v1/runs/{ctx.run_id}{suffix}", ctx.token_b)
        return act

    def a_still_owns(ctx: Context) -> str | None:
        st = EngineClient(ctx.main.url, ctx.token_a).run_status(ctx.run_id)
        return None if st["state"] in ("queued", "running", "done") else \
            f"user A's run is {st['state']} after user B's request"

    def info_b(ctx: Context) -> Answer:
        ctx.run_id = ctx.run_id or _user_a_run(ctx)
        answer = send(ctx.main.url, "GET", "/v1/info", ctx.token_b)
        body = EngineClient(ctx.main.url, ctx.token_b).info()
        text = json.dumps(body)
        return Answer(answer.status, "run id hidden" if ctx.run_id not in text else
                      f"user B sees {ctx.run_id}")

    def delete_running(ctx: Context) -> Answer:
        client = EngineClient(ctx.main.url, ctx.token_a, timeout=CASE_TIMEOUT)
        run_id = _user_a_run(ctx, fresh=True)
        deadline = time.monotonic() + CASE_TIMEOUT
        while client.run_status(run_id)["state"] == "queued" and time.monotonic() < deadline:
            time.sleep(0.02)
        answer = send(ctx.main.url, "DELETE", f"/v1/runs/{run_id}", ctx.token_a)
        while client.run_status(run_id)["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        state = client.run_status(run_id)["state"]
        return Answer(answer.status, f"run then {state}")

    def finish_a(ctx: Context) -> Answer:
        ctx.run_id = ctx.run_id or _user_a_run(ctx)
        client = EngineClient(ctx.main.url, ctx.token_a, timeout=CASE_TIMEOUT)
        result = client.wait(ctx.run_id)
        return Answer(200, f"user A got its result ({int(result.labels.sum())} voxels)")

    return [
        Case("user B reads A's run status", "ownership", as_b("GET", ""), (404,), "Unknown run",
             check=a_still_owns),
        Case("user B downloads A's result", "ownership", as_b("GET", "/result"), (404,),
             "Unknown run", check=a_still_owns),
        Case("user B cancels A's run", "ownership", as_b("POST", "/cancel"), (404,),
             "Unknown run", check=a_still_owns),
        Case("user B deletes A's run", "ownership", as_b("DELETE", ""), (404,), "Unknown run",
             check=a_still_owns),
        Case("user B's /v1/info hides A's run", "ownership", info_b, (200,), "run id hidden"),
        Case("user A's run still finishes", "ownership", finish_a, (200,), "got its result"),
        Case("user A deletes its running run (cancels it)", "ownership", delete_running, (202,),
             "cancelled"),
        Case("no token", "ownership",
             lambda ctx: send(ctx.main.url, "GET", "/v1/info", None), (401,), "token"),
    ]


def _web() -> list[Case]:
    def to_open(headers: dict[str, str], path: str = "/v1/info") -> Callable[[Context], Answer]:
        def act(ctx: Context) -> Answer:
            assert ctx.open is not None
            head = {k: v.replace("PORT", str(ctx.open.port)) for k, v in headers.items()}
            return send(ctx.open.url, "GET" if path == "/v1/info" else "POST", path, None,
                        b"" if path != "/v1/info" else None, head)
        return act

    def with_token(ctx: Context) -> Answer:
        return send(ctx.main.url, "GET", "/v1/info", ctx.token_a,
                    headers={"Origin": "http://evil.example"})

    return [
        Case("no token: cross-origin GET", "web", to_open({"Origin": "http://evil.example"}),
             (403,), "Origin"),
        Case("no token: cross-origin simple POST", "web",
             to_open({"Origin": "http://evil.example", "Content-Type": "text/plain"},
                     "/v1/runs"), (403,), "Origin"),
        Case("no token: Origin null", "web", to_open({"Origin": "null"}), (403,), "Origin"),
        Case("no token: Origin localhost", "web", to_open({"Origin": "http://localhost:PORT"}),
             (403,), "Origin"),
        Case("no token: DNS-rebound Host", "web", to_open({"Host": "evil.example:PORT"}),
             (403,), "Host"),
        Case("no token: Host 10.0.0.1", "web", to_open({"Host": "10.0.0.1:PORT"}), (403,),
             "Host"),
        Case("no token: docs page, foreign Host", "web",
             lambda ctx: send(ctx.open.url, "GET", "/docs", None,  # type: ignore[union-attr]
                              headers={"Host": "evil.example"}), (403,), "Host"),
        Case("no token: Host localhost (served)", "web", to_open({"Host": "localhost:PORT"}),
             (200,)),
        Case("no token: Host [::1] (served)", "web", to_open({"Host": "[::1]:PORT"}), (200,)),
        Case("no token: Host 127.0.0.1 (served)", "web", to_open({}), (200,)),
        Case("token: Origin header unchanged (served)", "web", with_token, (200,)),
    ]


def aborted_upload(ctx: Context) -> Answer:
    """PUT that announces 2 MB, sends 64 KB and hangs up."""
    vol = np.zeros((32, 128, 128), np.float32)
    body = protocol.volume_to_npy(vol)
    sock = socket.create_connection(("127.0.0.1", ctx.main.port), timeout=CASE_TIMEOUT)
    head = (f"PUT /v1/volumes/{protocol.volume_id(vol, None)} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{ctx.main.port}\r\nAuthorization: Bearer {ctx.token_a}\r\n"
            f"Content-Type: {protocol.NPY}\r\nContent-Length: {len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body[:65536])
    time.sleep(0.3)
    sock.close()
    time.sleep(0.5)  # the server notices
    return Answer(None, "hung up")


def _log_has_no_traceback(ctx: Context) -> str | None:
    return "the server logged a traceback" if "Traceback" in ctx.main.log_text() else None


def _upload() -> list[Case]:
    return [Case("client hangs up mid-upload", "upload", aborted_upload, (None,), "hung up",
                 check=_log_has_no_traceback),
            Case("oversize upload", "upload",
                 lambda ctx: put_volume(ctx, np.zeros((80, 128, 128), np.float32)), (413,),
                 "--max-upload-mb")]


# ---- capacity: the other half of the hardening (limits in protocol.unpack, refines that do not
# lock clients out). More of its cases belong here (see CAPACITY).

def refine_burst(ctx: Context, n: int = 12) -> Answer:
    """``n`` refines at once (concurrent .npz parsing was where Python 3.11.7's AST bug gave a
    500); the answer is the worst status seen."""
    statuses: list[int | None] = []
    lock = threading.Lock()

    def one() -> None:
        a = post_npz(ctx, "/v1/refine", refine_meta(ctx))
        with lock:
            statuses.append(a.status)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CASE_TIMEOUT * 2)
    bad = [s for s in statuses if s != 200]
    return Answer(bad[0] if bad else 200, f"{statuses.count(200)}/{n} refines answered 200")


def compressed_bomb(ctx: Context, mb: int = 512) -> Answer:
    """A .npz of ~0.5 MB whose one member inflates to ``mb`` MB of zeros."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("label_1.npy", "w", force_zip64=True) as f:
            n = mb * 2**20
            f.write(npy_with_header(f"({n},)", "|u1", b""))
            chunk = b"\0" * 2**20
            for _ in range(mb):
                f.write(chunk)
        z.writestr("meta.npy", protocol.volume_to_npy(
            np.frombuffer(json.dumps(run_meta(ctx)).encode(), np.uint8)))
    return send(ctx.main.url, "POST", "/v1/runs", ctx.token_a, buf.getvalue(),
                {"Content-Type": protocol.NPZ})


def _capacity() -> list[Case]:
    return [Case("refine burst (12 at once)", "capacity", refine_burst, (200,), "12/12",
                 check=_log_has_no_traceback),
            Case("compressed bomb (512 MB inflated)", "capacity", compressed_bomb, (413, 422),
                 fast=False)]


def all_cases() -> list[Case]:
    return [*_malformed(), *_junk(), *_ownership(), *_web(), *_upload(), *_capacity()]


# --------------------------------------------------------------------------- running

@dataclass
class Row:
    case: Case
    answer: Answer
    rss_before: float
    rss_after: float
    served: bool
    problem: str | None
    seconds: float
    worst_info: float = 0.0
    """The well-behaved client's slowest /v1/info answer during the case (s)."""

    @property
    def ok(self) -> bool:
        names = not self.case.names or self.case.names in self.answer.detail
        return self.answer.status in self.case.expect and names and self.served and \
            self.problem is None


class GoodClient:
    """User A polling /v1/info every 50 ms in the background: a well-behaved client."""

    def __init__(self, ctx: Context):
        self.client = EngineClient(ctx.main.url, ctx.token_a, timeout=CASE_TIMEOUT)
        self.ok = self.failed = 0
        self.worst = 0.0
        """Longest answer time (s) since the last :meth:`reset_worst`."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                t = time.perf_counter()
                self.client.info()
                self.worst = max(self.worst, time.perf_counter() - t)
                self.ok += 1
            except Exception:  # counted: a refusal of a good client is the finding
                self.failed += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(CASE_TIMEOUT)


def run_case(ctx: Context, case: Case, good: GoodClient) -> Row:
    rss0 = ctx.main.rss_mb()
    failed0 = good.failed
    good.worst = 0.0
    t = time.perf_counter()
    try:
        answer = case.act(ctx)
    except Exception as e:  # the case's own client failed: reported as no answer
        answer = Answer(None, f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - t
    try:
        problem = case.check(ctx) if case.check else None
        served = EngineClient(ctx.main.url, ctx.token_a, timeout=CASE_TIMEOUT).has_volume(
            ctx.volume_id) and good.failed == failed0
    except Exception as e:  # the server stopped serving: the finding
        problem, served = f"{type(e).__name__}: {e}", False
    return Row(case, answer, rss0, ctx.main.rss_mb(), served, problem, seconds, good.worst)


def run_cases(ctx: Context, cases: list[Case]) -> list[Row]:
    good = GoodClient(ctx)
    try:
        return [run_case(ctx, case, good) for case in cases]
    finally:
        good.close()


def report(rows: list[Row], out=sys.stdout) -> None:
    print(f"{'case':46} {'group':9} {'status':>6} {'RSS MB before->after':>21} {'served':>6} "
          f"{'info ms':>7} {'s':>5}  result / message", file=out)
    for r in rows:
        status = "-" if r.answer.status is None else str(r.answer.status)
        verdict = "ok" if r.ok else "FAIL"
        text = r.problem or r.answer.detail.replace("\n", " ")
        print(f"{r.case.name[:46]:46} {r.case.group:9} {status:>6} "
              f"{r.rss_before:9.0f} -> {r.rss_after:7.0f} {'yes' if r.served else 'NO':>6} "
              f"{r.worst_info * 1000:7.0f} {r.seconds:5.2f}  {verdict}: {text[:100]}", file=out)
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} cases as expected", file=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="only the cases the test suite runs")
    p.add_argument("--group", action="append", default=None,
                   help="only these groups (malformed, junk, ownership, web, upload, capacity)")
    args = p.parse_args(argv)
    cases = [c for c in all_cases() if (not args.fast or c.fast)
             and (args.group is None or c.group in args.group)
             and (CAPACITY or args.group or c.group != "capacity")]
    with tempfile.TemporaryDirectory(prefix="sgp-abuse-") as folder:
        t = time.perf_counter()
        ctx = start(Path(folder), with_open=any(c.group == "web" for c in cases))
        print(f"servers ready in {time.perf_counter() - t:.1f} s (main {ctx.main.url}, pid "
              f"{ctx.main.proc.pid}; Python {sys.version.split()[0]}, numpy {np.__version__}, "
              f"{os.cpu_count()} CPUs)", flush=True)
        try:
            rows = run_cases(ctx, cases)
        finally:
            stop(ctx)
        report(rows)
        tracebacks = ctx.main.log_text().count("Traceback")
        print(f"tracebacks in the main server's log: {tracebacks}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
