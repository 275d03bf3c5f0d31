"""`sgp serve`: run the engine as an HTTP service (see SlicerSGP/service/)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import stat
import sys
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING

from SlicerSGP.cli.common import (
    add_feature_cache_options,
    add_model_options,
    model_spec,
    run_command,
)
from SlicerSGP.errors import SGPInputError
from SlicerSGP.service.jobs import ServiceLimits

if TYPE_CHECKING:
    from SlicerSGP.service.access import Users

TOKEN_HELP = ("python -c \"import secrets; print(secrets.token_urlsafe(32))\" > sgp.token && "
              "chmod 600 sgp.token")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="run the engine as a service (for the Slicer module or remote clients)",
        description="Keep one model loaded and serve segmentation runs over HTTP (API under "
                    "/v1, documentation at /docs). Prints 'ready URL' on stdout once it accepts "
                    "requests. Listens on loopback only unless --host says otherwise, which "
                    "needs --token-file or --tokens. No TLS: for remote use put it behind a "
                    "reverse proxy or an SSH tunnel.")
    add_service_options(p)
    g = p.add_argument_group("model")
    add_model_options(g)
    add_feature_cache_options(g)
    p.set_defaults(func=run)
    return p


def add_service_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("service")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only); any "
                        "other address needs --token-file")
    g.add_argument("--port", type=int, default=0,
                   help="port (default 0: a free one, shown in the 'ready' line)")
    g.add_argument("--token-file", type=Path, action="append", default=None,
                   help="file holding a token clients must send (Authorization: Bearer); "
                        "readable by you only (chmod 600). Repeat it to accept several tokens: "
                        "each is its own user, whose runs the others cannot see or cancel")
    g.add_argument("--tokens", type=Path, default=None, metavar="FILE",
                   help="user table of a shared server: one 'name:sha256hex' line per user "
                        "(the SHA-256 of their token; make a line with --hash-token), or a JSON "
                        "object {name: hex}. Read again on SIGHUP (kill -HUP PID): added users "
                        "may connect, removed ones get 401 from their next request")
    g.add_argument("--hash-token", metavar="NAME", default=None,
                   help="print the --tokens line of user NAME for the token read from standard "
                        "input, and exit (sgp serve --hash-token alice < alice.token >> users)")
    g.add_argument("--allow-shared-token-file", action="store_true",
                   help="accept a token file that other users of this computer can read")
    g.add_argument("--max-upload-mb", type=float, default=2048,
                   help="largest volume or request accepted, in MB, counted as the request "
                        "inflates (default 2048)")
    g.add_argument("--cache-mb", type=float, default=None,
                   help="memory for the slice embeddings of recent volumes, in MB "
                        "(default: the engine's)")
    add_limit_options(g)
    g.add_argument("--watch-stdin", action="store_true",
                   help="exit when standard input closes (how a launcher makes sure the server "
                        "never outlives it)")


def add_limit_options(g: argparse._ArgumentGroup) -> None:
    """What requests and the server's memory may cost; a request over a limit is refused (413,
    429 or 503) with a message naming the option that raises it."""
    d = ServiceLimits
    g.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="runs and click refinements that may wait for the engine; more are "
                        f"refused with 429 and Retry-After (default {d.max_queue})")
    g.add_argument("--max-queue-per-user", type=int, default=d.max_queue_per_user,
                   help="runs of one user that may wait for the engine; more are refused with "
                        "429 naming this option (default: only --max-queue bounds them). Runs "
                        "are taken round robin between users whatever this is")
    g.add_argument("--max-volumes-mb", type=float, default=d.max_volumes_mb,
                   help="memory for uploaded volumes, in MB; least recently used dropped first, "
                        "never one a queued or running run needs (default "
                        f"{d.max_volumes_mb:g})")
    g.add_argument("--max-results-mb", type=float, default=d.max_results_mb,
                   help="memory for finished results not yet downloaded, in MB, oldest dropped "
                        "first; a run whose result alone would be larger is refused (default "
                        f"{d.max_results_mb:g})")
    g.add_argument("--max-voxels", type=float, default=d.max_voxels,
                   help=f"voxels of one volume (default {d.max_voxels:.0e})")
    g.add_argument("--max-structures", type=int, default=d.max_structures,
                   help=f"structures segmented by one run (default {d.max_structures})")
    g.add_argument("--refine-timeout", type=float, default=d.refine_timeout,
                   help="seconds a click refinement may wait for and run on the engine before "
                        f"it is answered 503 (default {d.refine_timeout:g})")


def limits_from_args(args: argparse.Namespace) -> ServiceLimits:
    limits = ServiceLimits(
        max_queue=args.max_queue, max_volumes_mb=args.max_volumes_mb,
        max_results_mb=args.max_results_mb, max_voxels=args.max_voxels,
        max_structures=args.max_structures, refine_timeout=args.refine_timeout,
        max_queue_per_user=args.max_queue_per_user)
    limits.check()
    return dataclasses.replace(limits, max_voxels=int(limits.max_voxels))


TOKEN_MAX_BYTES = 4096
"""A token file larger than this is not a token (e.g. an image named by mistake)."""


def read_token(path: Path, allow_shared: bool = False) -> str:
    """The token in ``path``: one line of printable ASCII, at least 16 characters;
    surrounding whitespace and a final newline are ignored. Anything else (a binary
    file, an image, non-ASCII text) is refused with what to do, never with a traceback.
    A file that other users can read (POSIX mode bits) is refused too, unless
    ``allow_shared`` (then a warning)."""
    fix = f"Use a text file holding only the token. Create one with: {TOKEN_HELP}"
    try:
        with open(path, "rb") as f:
            raw = f.read(TOKEN_MAX_BYTES + 1)
        mode = path.stat().st_mode
    except OSError as e:
        raise SGPInputError(f"Cannot read --token-file {path}: {e.strerror}. Create it with: "
                            f"{TOKEN_HELP}") from None
    if len(raw) > TOKEN_MAX_BYTES:
        raise SGPInputError(f"--token-file {path} is not a token file: it is over "
                            f"{TOKEN_MAX_BYTES} bytes (a token is one line of 16 or more "
                            f"printable ASCII characters). {fix}")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = None
    if token is None or any(not (" " <= ch <= "~") for ch in token):
        raise SGPInputError(f"--token-file {path} is not a token file: it holds bytes that are "
                            "not printable ASCII on one line (binary data, an image, non-ASCII "
                            "text or several lines?). A token is one line of 16 or more "
                            f"printable ASCII characters. {fix}")
    if len(token) < 16:
        raise SGPInputError(f"The token in {path} is {'empty' if not token else 'too short'} "
                            f"(at least 16 characters). Create one with: {TOKEN_HELP}")
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        if not allow_shared:
            raise SGPInputError(
                f"--token-file {path} can be read by other users of this computer (mode "
                f"{stat.S_IMODE(mode):o}), who could then use the engine and read the volumes "
                f"sent to it. Run: chmod 600 {path} (or add --allow-shared-token-file if they "
                "may).")
        print(f"warning: {path} is readable by other users; run chmod 600 {path}",
              file=sys.stderr)
    return token


def hash_token(name: str) -> int:
    """`sgp serve --hash-token NAME`: the --tokens line for the token on standard input."""
    from SlicerSGP.service.token_table import table_line

    token = sys.stdin.read(TOKEN_MAX_BYTES + 1).strip()
    if len(token) < 16 or len(token) > TOKEN_MAX_BYTES or \
            any(not (" " <= ch <= "~") for ch in token):
        raise SGPInputError("--hash-token reads one token from standard input: one line of 16 "
                            f"or more printable ASCII characters. Create one with: {TOKEN_HELP}, "
                            f"then: sgp serve --hash-token {name} < sgp.token >> users.txt")
    print(table_line(name, token))
    return 0


def users_from_args(args: argparse.Namespace) -> tuple[Users, Callable[[], None] | None]:
    """The user table (--token-file users and those of --tokens) and what SIGHUP does."""
    from SlicerSGP.service.access import Users
    from SlicerSGP.service.token_table import merged, read_table, reloader, token_digest

    # Each token file is one user, named by its path.
    fixed = {str(path): token_digest(read_token(path, args.allow_shared_token_file))
             for path in args.token_file or []}
    if args.tokens is None:
        return Users(digests=fixed), None
    users = Users(digests=merged(read_table(args.tokens), fixed, args.tokens), required=True)
    if not users.names():
        print(f"warning: --tokens {args.tokens} names no user yet: every request is refused "
              "until users are added and the server gets SIGHUP", file=sys.stderr)
    return users, reloader(args.tokens, fixed, users.replace)


def run(args: argparse.Namespace) -> int:
    if args.hash_token is not None:
        return hash_token(args.hash_token)
    # Imported here: `sgp --help` and the other subcommands need neither fastapi nor torch.
    from SlicerSGP.service.server import bind_socket, is_loopback, serve, setup_logging

    if not args.token_file and args.tokens is None and not is_loopback(args.host):
        raise SGPInputError(
            f"Refusing to listen on {args.host} without a token: anyone who can reach this "
            f"port could run jobs and read the volumes sent. Create a token ({TOKEN_HELP}) and "
            "add --token-file sgp.token (or a user table, --tokens), or keep the default "
            "--host 127.0.0.1.")
    if not 0 <= args.port <= 65535:
        raise SGPInputError(f"--port {args.port} is out of range (0..65535; 0 = a free port).")
    if args.max_upload_mb <= 0:
        raise SGPInputError("--max-upload-mb must be positive.")
    limits = limits_from_args(args)
    users, on_hangup = users_from_args(args)
    try:  # before the model loads: a busy port fails at once
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise SGPInputError(
                f"Port {args.port} on {args.host} is already in use (another sgp serve, or "
                "another program): pick another --port, or --port 0 for any free one.") from None
        raise SGPInputError(f"Cannot listen on {args.host}:{args.port}: "
                            f"{e.strerror or e}. Pick another --port (0 = any free one) or "
                            "--host.") from None
    setup_logging()
    from SlicerSGP.method.segmenter import Segmenter  # torch + sam2: only when a model runs

    # stdout carries only the `ready` line, whatever model loading prints.
    with redirect_stdout(sys.stderr):
        segmenter = Segmenter(args.model, **model_spec(args), cache_mb=args.cache_mb)
    try:
        serve(segmenter, host=args.host, port=args.port, users=users, sock=sock,
              max_upload_mb=args.max_upload_mb, watch_stdin=args.watch_stdin,
              limits=limits, on_hangup=on_hangup)
    except OSError as e:
        raise SGPInputError(f"Cannot listen on {args.host}:{args.port}: {e.strerror}. Pick "
                            "another --port (0 = any free one) or --host.") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m SlicerSGP.service` (what the launcher runs): `sgp serve` without the `sgp`."""
    parser = argparse.ArgumentParser(prog="python -m SlicerSGP.service")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run_command(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]))

