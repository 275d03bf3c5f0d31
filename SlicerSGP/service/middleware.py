"""ASGI middleware and request-body handling of the engine server: one 500 for an unhandled
fault (:class:`Shield`), a cap on bodies received at once (:class:`Receiving`), reading a body
up to a limit (:func:`read_limited`), and engine errors turned into HTTP errors (:func:`guard`)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from SlicerSGP.service import protocol
from SlicerSGP.service.access import ServiceError
from SlicerSGP.service.jobs import RETRY_AFTER, describe_failure, error_type, log_fault

log = logging.getLogger("SlicerSGP.service")

DRAIN_LIMIT = 256 * 2**20
"""How much of an oversize upload is read and dropped so that the client sees the 413 instead of
a reset connection; past this the connection is simply closed."""


class Shield:
    """ASGI middleware: an exception no handler took becomes one 500 JSON answer and one log
    entry (type and stack, not the message, which may quote the request); a client that hung
    up mid-request is one log line, not a traceback."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            log.info("%s %s: the client hung up before sending the whole request",
                     scope.get("method"), scope.get("path"))
        except Exception as e:
            log_fault(f"{scope.get('method')} {scope.get('path')}", e)
            if not started:
                await JSONResponse({"detail": "The server failed unexpectedly; its log has the "
                                    "traceback.", "error_type": "internal"}, 500)(
                    scope, receive, send)


class Receiving:
    """ASGI middleware: request bodies being received and handled at once hold at most
    ``limit`` bytes (twice --max-upload-mb), counted by their declared Content-Length (or
    --max-upload-mb without one) from the first byte until the answer. A request that does not
    fit is answered 503 with Retry-After before any of its body is read, so many clients
    uploading at once cannot take the server's memory."""

    def __init__(self, app: Any, limit: int, each: int, counter: dict[str, int]):
        self.app, self.limit, self.each = app, limit, each
        self.counter = counter
        """``held``: bytes of the requests in hand (read by /v1/info)."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        lengths = [v for k, v in scope["headers"] if k == b"content-length"]
        declared = lengths[0].decode("latin-1") if len(lengths) == 1 else ""
        need = min(int(declared), self.each) if declared.isdigit() else self.each
        held = self.counter["held"]
        if need and held and held + need > self.limit:
            mb = 2**20
            await JSONResponse(
                {"detail": f"The server is receiving {held / mb:.1f} MB of other requests, "
                 f"and this one declares {need / mb:.1f} MB; it takes at most "
                 f"{self.limit / mb:g} MB at once (twice --max-upload-mb). Try again in a few "
                 "seconds.", "error_type": "busy"}, 503,
                headers={"Retry-After": str(RETRY_AFTER)})(scope, receive, send)
            return
        self.counter["held"] += need
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter["held"] -= need



def guard(fn: Any, *args: Any) -> Any:
    """Call ``fn``; engine errors become HTTP errors carrying the engine's message."""
    try:
        return fn(*args)
    except (ServiceError, protocol.LimitExceeded):
        raise
    except Exception as e:
        etype = error_type(e)
        if etype == "internal":
            log_fault(getattr(fn, "__name__", "request"), e)
        raise ServiceError(422 if etype == "input" else 500, describe_failure(e), etype) from e


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, or 413 once it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    size = int(declared) if declared and declared.isdigit() else None
    chunks, total = [], 0
    too_big = size is not None and size > limit
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                too_big = True
            if too_big:
                if total > limit + DRAIN_LIMIT:
                    break
                continue
            chunks.append(chunk)
    except ClientDisconnect:
        log.info("%s %s: the client hung up after %d bytes of the body", request.method,
                 request.url.path, total)
        raise ServiceError(400, "The request body was cut off (the client hung up).") from None
    if too_big:
        got = max(total, size or 0)
        raise ServiceError(413, f"The upload is {got / 2**20:.1f} MB but this server accepts at "
                           f"most {limit / 2**20:g} MB: restart it with a larger "
                           "--max-upload-mb, or crop the volume.", "input")
    return b"".join(chunks)

