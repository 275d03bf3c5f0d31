"""Who may use the engine server: the token table (:class:`Users`), the Host/Origin checks of a
server without a token (:class:`LocalOnly`), and the per-request authorization dependency.

Who may do what:

* Each accepted token is a *user*: one per ``--token-file``, named by the file, and those of
  the user table ``--tokens FILE`` (user name -> token hash, token_table.py; read again on
  SIGHUP, when :meth:`Users.replace` swaps the table: a removed user's next request gets 401).
  A run belongs to the user who started it: its status, result, cancel
  and delete answer 404 to every other user, exactly as for a run that does not exist, and
  ``/v1/info`` shows another user's running run only as a count. Without a token there is one
  user, ``local``.
* A server without a token answers only programs on this computer: the ``Host`` header must
  name a loopback address (localhost, 127.0.0.1, [::1], any port; a DNS-rebinding page sends
  its own host name) and a request carrying a browser's ``Origin`` header is refused (a web page
  can send simple cross-origin POSTs without reading the answer). 403 with a message.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from SlicerSGP import __version__
from SlicerSGP.service import protocol
from SlicerSGP.service.token_table import token_digest


class ServiceError(Exception):
    """An HTTP error with a message for the user and the protocol's error type."""

    def __init__(self, status: int, message: str, etype: str = "input"):
        super().__init__(message)
        self.status, self.message, self.etype = status, message, etype


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


LOCAL_USER = "local"
"""The one user of a server without a token."""


class Users:
    """Who sent a request: the user whose token it carries. Tokens are kept as SHA-256
    digests and compared in constant time with every known one (the time does not depend on
    which one matches, or how much of one does).

    True when the server requires a token (``required``, by default whether any is given): a
    server with a user table stays closed to requests without a known token even when the
    table is empty or emptied by a reload."""

    def __init__(self, tokens: Mapping[str, str] | None = None, *,
                 digests: Mapping[str, bytes] | None = None, required: bool | None = None):
        table = {name: token_digest(tok) for name, tok in (tokens or {}).items()}
        table.update(digests or {})
        self._digests = table
        self.required = bool(table) if required is None else required

    def __bool__(self) -> bool:
        return self.required

    def names(self) -> set[str]:
        return set(self._digests)

    def replace(self, digests: Mapping[str, bytes]) -> set[str]:
        """Put a new table in force at once (one reference swap: a request being checked
        sees the old table or the new one, never a mix); answers the names of the old one."""
        old, self._digests = self._digests, dict(digests)
        return set(old)

    def identify(self, token: str) -> str | None:
        digest = token_digest(token)
        found = None
        for name, known in self._digests.items():
            if hmac.compare_digest(digest, known):
                found = name
        return found


def host_problem(host: str | None, origin: str | None) -> str | None:
    """Why a request may not reach a server without a token (None: it may)."""
    if origin is not None:
        return ("Refused: this engine server has no token, so it serves only programs on this "
                "computer, and this request comes from a web page (it carries an Origin "
                f"header, {origin[:60]!r}). Use SlicerSGP's client, or start the server with "
                "--token-file.")
    name = (host or "").strip().lower()
    if name.startswith("["):
        name, _, port = name[1:].partition("]")
        port = port[1:] if port.startswith(":") else port
    elif name.count(":") == 1:
        name, port = name.split(":")
    else:
        port = ""
    if not name or not is_loopback(name) or not (port == "" or port.isdigit()):
        return (f"Refused: this engine server has no token, so it answers only requests "
                f"addressed to this computer (Host localhost, 127.0.0.1 or [::1]); this one "
                f"names Host {(host or '')[:80]!r}. Connect to http://127.0.0.1:PORT, or start "
                "the server with --token-file to serve other names.")
    return None


class LocalOnly:
    """ASGI middleware of a server without a token: loopback Host names only, no browser
    Origin (see :func:`host_problem`)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            hosts = [v for k, v in scope["headers"] if k == b"host"]
            origins = [v for k, v in scope["headers"] if k == b"origin"]
            host = hosts[0].decode("latin-1") if len(hosts) == 1 else None
            origin = origins[0].decode("latin-1") if origins else None
            problem = host_problem(host, origin)
            if problem is not None:
                await JSONResponse({"detail": problem, "error_type": "forbidden"}, 403)(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def make_authorize(users: Users) -> Callable[[Request], str]:
    """The FastAPI dependency that every /v1 route runs first: it answers the request's user."""

    def authorize(request: Request) -> str:
        """The user the request comes from (after the token and protocol checks)."""
        user = LOCAL_USER
        if users:
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            found = users.identify(value) if scheme.lower() == "bearer" else None
            if found is None:
                raise ServiceError(401, "Wrong, revoked or missing token: send your token as "
                                   "'Authorization: Bearer <token>' (see --token-file and "
                                   "--tokens).", "auth")
            user = found
        theirs = request.headers.get(protocol.PROTOCOL_HEADER)
        if theirs is not None and theirs != str(protocol.PROTOCOL_VERSION):
            raise ServiceError(409, version_mismatch(theirs), "protocol")
        return user

    return authorize


def version_mismatch(client_version: str) -> str:
    return (f"Protocol mismatch: the client speaks SlicerSGP protocol {client_version}, this "
            f"server (SlicerSGP {__version__}) speaks protocol {protocol.PROTOCOL_VERSION}. "
            "Install the same SlicerSGP version on both sides.")

