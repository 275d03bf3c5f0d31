"""The user table of a shared engine server (``sgp serve --tokens FILE``): user name -> the
SHA-256 digest of the user's token, so the file lets nobody in who reads it.

The file is either lines ``name:hex`` (``#`` comments and blank lines ignored) or one JSON
object ``{"name": "hex", ...}``; ``hex`` is the 64-digit SHA-256 of the token's text.
``sgp serve --hash-token NAME < TOKEN_FILE`` prints the line for a token. The server reads the
file again on SIGHUP (:func:`reloader`): a user added may connect, a user removed is refused
(401) from the next request on; a file that does not parse is reported in the log and the
previous table stays in force.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from SlicerSGP.errors import SGPInputError

log = logging.getLogger("SlicerSGP.service")

USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
DIGEST = re.compile(r"[0-9a-fA-F]{64}")
TABLE_MAX_BYTES = 1 << 20
LINE_FIX = "Make each line with: sgp serve --hash-token NAME < TOKEN_FILE >> FILE"


def token_digest(token: str) -> bytes:
    """SHA-256 of a token's text (what the table holds, as hex)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def check_user_name(name: str, where: str) -> str:
    if not USER_NAME.fullmatch(name):
        raise SGPInputError(
            f"{where}: user name {name[:70]!r} is not allowed: use 1 to 64 letters, digits and "
            "._@+- (starting with a letter or digit), e.g. alice or j.doe@clinic.")
    return name


def table_line(name: str, token: str) -> str:
    """The ``name:hex`` line of user ``name`` with ``token``."""
    return f"{check_user_name(name, '--hash-token')}:{token_digest(token).hex()}"


def parse_table(text: str, source: str) -> dict[str, bytes]:
    """User name -> token digest from the text of a table file (SGPInputError naming the
    line and the fix for anything else)."""
    entries: list[tuple[str, Any, str]] = []
    if text.lstrip()[:1] in ("{", "["):  # JSON (a list is refused below)
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise SGPInputError(f"--tokens {source} is not valid JSON ({e}). Write one object "
                                '{"name": "sha256 hex", ...}, or lines name:hex.') from None
        if not isinstance(obj, dict):
            raise SGPInputError(f"--tokens {source}: the JSON must be one object "
                                '{"name": "sha256 hex", ...}.')
        entries = [(str(k), v, f"--tokens {source}, user {str(k)[:40]!r}")
                   for k, v in obj.items()]
    else:
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"--tokens {source}, line {number}"
            name, sep, digest = line.partition(":")
            if not sep:
                raise SGPInputError(f"{where} is not 'name:sha256hex'. {LINE_FIX}")
            entries.append((name.strip(), digest.strip(), where))
    table: dict[str, bytes] = {}
    seen: dict[bytes, str] = {}
    for name, digest, where in entries:
        check_user_name(name, where)
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise SGPInputError(f"{where}: the token hash must be 64 hexadecimal digits (the "
                                f"SHA-256 of the token, never the token itself). {LINE_FIX}")
        value = bytes.fromhex(digest)
        if name in table:
            raise SGPInputError(f"{where}: user {name!r} is listed twice; keep one line.")
        if value in seen:
            raise SGPInputError(f"{where}: user {name!r} has the same token as {seen[value]!r}; "
                                "give each user a token of their own.")
        table[name], seen[value] = value, name
    return table


def read_table(path: Path) -> dict[str, bytes]:
    try:
        with open(path, "rb") as f:
            raw = f.read(TABLE_MAX_BYTES + 1)
    except OSError as e:
        raise SGPInputError(f"Cannot read --tokens {path}: {e.strerror}. {LINE_FIX}") from None
    if len(raw) > TABLE_MAX_BYTES:
        raise SGPInputError(f"--tokens {path} is over {TABLE_MAX_BYTES >> 20} MB: it is not a "
                            f"user table. {LINE_FIX}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SGPInputError(f"--tokens {path} is not UTF-8 text: it is not a user table. "
                            f"{LINE_FIX}") from None
    return parse_table(text, str(path))


def merged(table: Mapping[str, bytes], fixed: Mapping[str, bytes], path: Path) -> dict[str, bytes]:
    """The table with the users of --token-file (``fixed``), which no name may shadow."""
    for name in table.keys() & fixed.keys():
        raise SGPInputError(f"--tokens {path}: user {name!r} is also a --token-file; rename it.")
    return {**fixed, **table}


def reloader(path: Path, fixed: Mapping[str, bytes],
             replace: Callable[[dict[str, bytes]], set[str]]) -> Callable[[], None]:
    """What SIGHUP does: read ``path`` again and ``replace`` the table (it answers the names
    in force before); a file that does not parse leaves the table as it was."""

    def reload() -> None:
        try:
            table = merged(read_table(path), fixed, path)
        except SGPInputError as e:
            log.error("SIGHUP: %s The user table in force is kept.", e)
            return
        before = replace(table)
        added, removed = sorted(table.keys() - before), sorted(before - table.keys())
        log.info("SIGHUP: user table reloaded from %s: %d users (added: %s; removed: %s)",
                 path, len(table), ", ".join(added) or "none", ", ".join(removed) or "none")

    return reload
