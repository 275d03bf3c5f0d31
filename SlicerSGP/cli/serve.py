"""`sgp serve`: run the engine as an HTTP service (see SlicerSGP/service/)."""

from __future__ import annotations

import argparse
import stat
import sys
from contextlib import redirect_stdout
from pathlib import Path

from SlicerSGP.cli.common import add_model_options, model_spec, run_command
from SlicerSGP.errors import SGPInputError

TOKEN_HELP = ("python -c \"import secrets; print(secrets.token_urlsafe(32))\" > sgp.token && "
              "chmod 600 sgp.token")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="run the engine as a service (for the Slicer module or remote clients)",
        description="Keep one model loaded and serve segmentation runs over HTTP (API under "
                    "/v1, documentation at /docs). Prints 'ready URL' on stdout once it accepts "
                    "requests. Listens on loopback only unless --host says otherwise, which "
                    "needs --token-file. No TLS: for remote use put it behind a reverse proxy "
                    "or an SSH tunnel.")
    add_service_options(p)
    g = p.add_argument_group("model")
    add_model_options(g)
    p.set_defaults(func=run)
    return p


def add_service_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("service")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only); any "
                        "other address needs --token-file")
    g.add_argument("--port", type=int, default=0,
                   help="port (default 0: a free one, shown in the 'ready' line)")
    g.add_argument("--token-file", type=Path, default=None,
                   help="file holding the token clients must send (Authorization: Bearer)")
    g.add_argument("--max-upload-mb", type=float, default=2048,
                   help="largest volume or request accepted, in MB (default 2048)")
    g.add_argument("--cache-mb", type=float, default=None,
                   help="memory for the slice embeddings of recent volumes, in MB "
                        "(default: the engine's)")
    g.add_argument("--watch-stdin", action="store_true",
                   help="exit when standard input closes (how a launcher makes sure the server "
                        "never outlives it)")


TOKEN_MAX_BYTES = 4096
"""A token file larger than this is not a token (e.g. an image named by mistake)."""


def read_token(path: Path) -> str:
    """The token in ``path``: one line of printable ASCII, at least 16 characters;
    surrounding whitespace and a final newline are ignored. Anything else (a binary
    file, an image, non-ASCII text) is refused with what to do, never with a traceback."""
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
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: {path} is readable by other users; run chmod 600 {path}",
              file=sys.stderr)
    return token


def run(args: argparse.Namespace) -> int:
    # Imported here: `sgp --help` and the other subcommands need neither fastapi nor torch.
    from SlicerSGP.service.server import is_loopback, serve, setup_logging

    if args.token_file is None and not is_loopback(args.host):
        raise SGPInputError(
            f"Refusing to listen on {args.host} without a token: anyone who can reach this "
            f"port could run jobs and read the volumes sent. Create a token ({TOKEN_HELP}) and "
            "add --token-file sgp.token, or keep the default --host 127.0.0.1.")
    if not 0 <= args.port <= 65535:
        raise SGPInputError(f"--port {args.port} is out of range (0..65535; 0 = a free port).")
    if args.max_upload_mb <= 0:
        raise SGPInputError("--max-upload-mb must be positive.")
    token = read_token(args.token_file) if args.token_file is not None else None
    setup_logging()
    from SlicerSGP.method.segmenter import Segmenter  # torch + sam2: only when a model runs

    # stdout carries only the `ready` line, whatever model loading prints.
    with redirect_stdout(sys.stderr):
        segmenter = Segmenter(args.model, **model_spec(args), cache_mb=args.cache_mb)
    try:
        serve(segmenter, host=args.host, port=args.port, token=token,
              max_upload_mb=args.max_upload_mb, watch_stdin=args.watch_stdin)
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

