"""Client of `sgp serve`: standard library + numpy only (runs inside Slicer, never imports torch).

``EngineClient.segment`` takes exactly ``Segmenter.segment``'s arguments and returns the same
``SegmentationResult``; a GUI uses the non-blocking pieces instead (``ensure_volume``,
``start_run``, ``run_status``, ``cancel_run``, ``run_result``) from a timer. Every failure to
talk to the server is an ``SGPServiceError`` with a message saying what to do.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np

from SlicerSGP.errors import (
    Cancelled,
    SGPDeviceError,
    SGPError,
    SGPInputError,
    SGPServiceError,
    SGPWeightsError,
)
from SlicerSGP.service import protocol
from SlicerSGP.types import (
    CancelCheck,
    Geometry,
    ProgressCallback,
    SegmentationResult,
    SegmentOptions,
    SlicePrompt,
    SupportItem,
)

ENGINE_ERRORS: dict[str, type[SGPError]] = {
    "input": SGPInputError, "weights": SGPWeightsError, "device": SGPDeviceError,
}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class EngineClient:
    """One engine server at ``url`` (``http://host:port``), with its token if it has one."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        parsed = urllib.parse.urlparse(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise SGPServiceError(f"Engine URL {url!r} is not an http(s)://host:port address.")
        self.url = url.strip().rstrip("/")
        self.token = token.strip() if token else None
        self.timeout = float(timeout)
        self.bytes_sent = 0
        """Request bytes sent (bodies and headers), for the service benchmark."""
        self.bytes_received = 0
        self.poll_interval = 0.2
        """Longest wait between two status polls in ``segment``."""
        self._run_volumes: dict[str, str] = {}
        """run id -> its volume's id, sent with the run's requests (protocol.VOLUME_HEADER)."""
        # A proxy from the environment must not see loopback traffic (corporate proxies often
        # lack a no_proxy entry for 127.0.0.1, and the token would travel to them).
        proxies = {} if parsed.hostname in LOOPBACK else None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))

    # ------------------------------------------------------------------ HTTP

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None, *,
                 allow: tuple[int, ...] = ()) -> tuple[int, bytes, str]:
        """Send one request; returns (status, body, content type). Statuses in ``allow`` come
        back as they are; other errors are raised as the engine's or the service's errors."""
        head = {protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION), **(headers or {})}
        if self.token:
            head["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, headers=head, method=method)
        self.bytes_sent += (len(body or b"") + len(method) + len(path) + 12
                            + sum(len(k) + len(v) + 4 for k, v in head.items()))
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                data = resp.read()
                self.bytes_received += len(data)
                return resp.status, data, resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            data = _read_quietly(e)
            if e.code in allow:
                return e.code, data, e.headers.get("Content-Type", "")
            raise http_error(self.url, e.code, data) from None
        except urllib.error.URLError as e:
            raise no_answer_error(self, e.reason, body) from None
        except (OSError, http.client.HTTPException) as e:
            raise no_answer_error(self, e, body) from None

    def _json(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
        return json.loads(self._request(method, path, body, headers)[1].decode())

    # ------------------------------------------------------------------ server

    def info(self) -> dict[str, Any]:
        """Versions, devices, the loaded model, queue length, cache use (GET /v1/info)."""
        return self._json("GET", "/v1/info")

    def check_model(self, expected: dict[str, Any]) -> None:
        """Raise SGPServiceError naming every option in ``expected`` (None = don't care) that
        differs from the server's model."""
        model = self.info()["model"]
        diffs = [f"{k}: server {model.get(k)!r}, requested {v!r}" for k, v in expected.items()
                 if v is not None and str(model.get(k)) != str(v)]
        if diffs:
            raise SGPServiceError(f"The engine server at {self.url} runs another model than "
                                  f"requested ({'; '.join(diffs)}). Drop those options to use "
                                  "the server's model, or start the server with them.")

    # ------------------------------------------------------------------ volumes

    def has_volume(self, volume_id: str) -> bool:
        status = self._request("HEAD", f"/v1/volumes/{volume_id}", None,
                               {protocol.VOLUME_HEADER: volume_id}, allow=(404,))[0]
        return status == 200

    def ensure_volume(self, volume: np.ndarray, geometry: Geometry | None = None, *,
                      force: bool = False) -> str:
        """The volume's id on the server, uploading it only if the server lacks it."""
        volume = np.asarray(volume)
        vid = protocol.volume_id(volume, geometry)
        if force or not self.has_volume(vid):
            body = protocol.volume_to_npy(volume)
            self._request("PUT", f"/v1/volumes/{vid}", body, {
                "Content-Type": protocol.NPY, protocol.VOLUME_HEADER: vid,
                protocol.GEOMETRY_HEADER: json.dumps(protocol.geometry_to_json(geometry))})
        return vid

    # ------------------------------------------------------------------ runs

    def start_run(self, volume_id: str,
                  labels: np.ndarray | dict[int, np.ndarray] | None,
                  structures: dict[int, str] | None = None,
                  options: SegmentOptions | None = None,
                  support_slices: list[int] | None = None, *,
                  support_bank: dict[int, list[SupportItem]] | None = None,
                  prompts: list[SlicePrompt] | None = None) -> str:
        """Queue a run; ``labels`` is the full label map (only its labeled slices are sent) or
        ``{slice index along options.axis: 2D label slice}``. Returns the run id."""
        opts = options or SegmentOptions()
        arrays: dict[str, np.ndarray] = {}
        meta = {
            "volume_id": volume_id, "structures": protocol.structures_to_json(structures),
            "options": protocol.options_to_json(opts),
            "support_slices": None if support_slices is None else [int(k) for k in
                                                                   support_slices],
            "labels": protocol.encode_labels(labels, opts.axis, arrays),
            "bank": protocol.encode_bank(support_bank, arrays),
            "prompts": protocol.encode_prompts(prompts, arrays),
        }
        body = protocol.pack(arrays, meta, compress=True)
        run_id = self._json("POST", "/v1/runs", body, {
            "Content-Type": protocol.NPZ, protocol.VOLUME_HEADER: volume_id})["run_id"]
        self._run_volumes[run_id] = volume_id
        return run_id

    def _routed(self, run_id: str) -> dict[str, str]:
        """The header naming a run's volume, when this client started the run."""
        vid = self._run_volumes.get(run_id)
        return {} if vid is None else {protocol.VOLUME_HEADER: vid}

    def run_status(self, run_id: str) -> dict[str, Any]:
        """{state: queued/running/done/failed/cancelled, stage, fraction, error, ...}."""
        return self._json("GET", f"/v1/runs/{run_id}", None, self._routed(run_id))

    def cancel_run(self, run_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/runs/{run_id}/cancel", None, self._routed(run_id))

    def discard_run(self, run_id: str) -> None:
        """Free a finished run's result on the server without downloading it."""
        self._request("DELETE", f"/v1/runs/{run_id}", None, self._routed(run_id), allow=(404,))
        self._run_volumes.pop(run_id, None)

    def run_result(self, run_id: str, probabilities: bool = False) -> SegmentationResult:
        """Download a finished run's result (the server frees it then). A failed run raises the
        engine's error; a cancelled one raises Cancelled."""
        query = "?probabilities=true" if probabilities else ""
        status, data, _ = self._request("GET", f"/v1/runs/{run_id}/result{query}", None,
                                        self._routed(run_id), allow=(410,))
        self._run_volumes.pop(run_id, None)
        if status == 410:
            raise Cancelled(_detail(data) or "The run was cancelled; nothing was written.")
        return protocol.decode_result(data)

    def segment(
        self,
        volume: np.ndarray,
        labels: np.ndarray | None = None,
        structures: dict[int, str] | None = None,
        options: SegmentOptions | None = None,
        *,
        support_slices: list[int] | None = None,
        support_bank: dict[int, list[SupportItem]] | None = None,
        prompts: list[SlicePrompt] | None = None,
        geometry: Geometry | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
    ) -> SegmentationResult:
        """``Segmenter.segment`` on the server: same arguments, same result (blocking)."""
        vid = self.ensure_volume(volume, geometry)
        try:
            run_id = self.start_run(vid, labels, structures, options, support_slices,
                                    support_bank=support_bank, prompts=prompts)
        except SGPServiceError as e:
            if getattr(e, "error_type", None) != "volume_missing":
                raise
            # Dropped between the check and the run (the server freed memory): send it again.
            vid = self.ensure_volume(volume, geometry, force=True)
            run_id = self.start_run(vid, labels, structures, options, support_slices,
                                    support_bank=support_bank, prompts=prompts)
        return self.wait(run_id, progress, cancel, probabilities=True)

    def wait(self, run_id: str, progress: ProgressCallback | None = None,
             cancel: CancelCheck | None = None,
             probabilities: bool = True) -> SegmentationResult:
        """Poll a run until it ends, reporting progress and passing on a cancel request."""
        delay, last, cancel_sent = 0.01, None, False
        while True:
            try:
                st = self.run_status(run_id)
            except SGPServiceError as e:
                raise SGPServiceError(f"Lost the engine server during run {run_id[:8]}: {e} "
                                      "The run's result is lost; run it again once the server "
                                      "is back.") from None
            if progress is not None and st["state"] == "running" and st["stage"] and \
                    (st["stage"], st["fraction"]) != last:
                last = (st["stage"], st["fraction"])
                progress(st["stage"], float(st["fraction"]))
            if st["state"] == "done":
                return self.run_result(run_id, probabilities=probabilities)
            if st["state"] == "cancelled":
                self.discard_run(run_id)
                raise Cancelled(st["error"] or "Cancelled; nothing was written.")
            if st["state"] == "failed":
                self.discard_run(run_id)
                cls = ENGINE_ERRORS.get(st["error_type"] or "", SGPServiceError)
                raise cls(st["error"] or "The engine run failed.")
            if cancel is not None and not cancel_sent and cancel():
                self.cancel_run(run_id)
                cancel_sent = True
                continue
            time.sleep(delay)
            delay = min(self.poll_interval, delay * 1.5)

    # ------------------------------------------------------------------ refinement

    def refine_slice(self, volume: np.ndarray | str, slice_index: int,
                     points: list[tuple[float, float]], point_labels: list[int],
                     mask: np.ndarray | None, options: SegmentOptions | None = None,
                     ) -> tuple[np.ndarray, float]:
        """``Segmenter.refine_slice`` on the server; ``volume`` may be an array or the id
        ``ensure_volume`` gave."""
        vid = volume if isinstance(volume, str) else self.ensure_volume(volume)
        arrays = {} if mask is None else {"mask": np.asarray(mask, bool)}
        meta = {"volume_id": vid, "slice_index": int(slice_index),
                "points": [[float(r), float(c)] for r, c in points],
                "point_labels": [int(v) for v in point_labels],
                "options": protocol.options_to_json(options)}
        body = protocol.pack(arrays, meta, compress=True)
        data = self._request("POST", "/v1/refine", body, {"Content-Type": protocol.NPZ,
                                                          protocol.VOLUME_HEADER: vid})[1]
        out, info = protocol.unpack(data)
        return out["mask"], float(info["iou"])


def unreachable_error(url: str, timeout: float, reason: object) -> SGPServiceError:
    """The error for a request to the server at ``url`` that got no answer, by its ``reason``."""
    if isinstance(reason, ConnectionRefusedError):
        why = "connection refused: no server is listening there (not started, or it stopped)"
    elif isinstance(reason, (TimeoutError, socket.timeout)):
        why = f"no answer within {timeout:g} s"
    elif isinstance(reason, (ConnectionResetError, BrokenPipeError,
                             http.client.RemoteDisconnected, http.client.IncompleteRead)):
        why = "the server closed the connection (it may have crashed or been killed)"
    elif isinstance(reason, socket.gaierror):
        why = f"unknown host ({reason.strerror})"
    else:
        why = str(reason) or type(reason).__name__
    return SGPServiceError(f"Cannot reach the engine server at {url}: {why}. Check the "
                           "URL and that `sgp serve` is running there.")


def no_answer_error(client: EngineClient, reason: object, body: bytes | None) -> SGPError:
    """The error for a request of ``client`` that got no answer. A server refuses an upload it
    will not take (over --max-upload-mb, or while it receives its limit of others) before
    reading it and closes the connection; a client still sending sees only a reset. So after a
    reset during an upload, ask the server what it holds to say which it was."""
    if not body or not isinstance(reason, (ConnectionResetError, BrokenPipeError)):
        return unreachable_error(client.url, client.timeout, reason)
    try:
        info = client.info()
    except SGPError as e:  # a refused token is the answer; no answer at all is the reset's
        return e if getattr(e, "error_type", None) == "auth" else unreachable_error(
            client.url, client.timeout, reason)
    mb = len(body) / 2**20
    if mb > float(info.get("max_upload_mb", float("inf"))):
        return SGPInputError(
            f"The engine server at {client.url} refused a {mb:.1f} MB upload: over its "
            f"--max-upload-mb ({info['max_upload_mb']:g} MB). Crop the volume or send fewer "
            "support cases, or restart the server with a larger --max-upload-mb.")
    return SGPServiceError(
        f"The engine server at {client.url} refused a {mb:.1f} MB upload before reading it: it "
        f"is receiving other uploads at once (now {info.get('receiving_mb', 0):g} MB). Try "
        "again in a few seconds.")


def http_error(url: str, code: int, data: bytes) -> SGPError:
    """The error for an HTTP error answer of the server at ``url``."""
    try:
        payload = json.loads(data.decode())
        detail, etype = payload.get("detail"), payload.get("error_type")
    except (ValueError, UnicodeDecodeError, AttributeError):
        detail, etype = data[:200].decode(errors="replace"), None
    if not isinstance(detail, str):
        detail = json.dumps(detail)
    if code == 401:
        return _tagged(SGPServiceError(
            f"The engine server at {url} refused the token (401): use the token it was started "
            "with (its --token-file), or the one its administrator gave you (a token taken out "
            "of its --tokens table is refused)."), "auth")
    if code == 413 or etype == "input":
        return _tagged(SGPInputError(detail), etype)
    if etype in ENGINE_ERRORS:
        return _tagged(ENGINE_ERRORS[etype](detail), etype)
    return _tagged(SGPServiceError(f"The engine server at {url} answered {code}: "
                                   f"{detail}"), etype)


def connect_engine(url: str, token: str | None = None,
                   expected_model: dict[str, Any] | None = None,
                   timeout: float = 30.0) -> EngineClient:
    """A client for ``url`` after checking the protocol version (and the model, if given)."""
    client = EngineClient(url, token, timeout)
    info = client.info()
    if info.get("protocol") != protocol.PROTOCOL_VERSION:
        raise SGPServiceError(
            f"Protocol mismatch: this client speaks SlicerSGP protocol "
            f"{protocol.PROTOCOL_VERSION}, the server at {url} (SlicerSGP "
            f"{info.get('version', '?')}) speaks protocol {info.get('protocol', '?')}. Install "
            "the same SlicerSGP version on both sides.")
    if expected_model:
        client.check_model(expected_model)
    return client


def _tagged(err: SGPError, etype: str | None) -> SGPError:
    """The server's error type rides on the exception (``error_type``) for callers that act
    on it (a dropped volume is uploaded again)."""
    err.error_type = etype  # type: ignore[attr-defined]
    return err


def _read_quietly(err: urllib.error.HTTPError) -> bytes:
    try:
        return err.read()
    except (OSError, http.client.HTTPException):
        return b""


def _detail(data: bytes) -> str | None:
    try:
        return json.loads(data.decode()).get("detail")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
