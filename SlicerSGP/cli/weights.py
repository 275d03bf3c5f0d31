"""``sgp weights list|fetch|verify``: the SAM2.1 checkpoints in the cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from SlicerSGP import weights as W
from SlicerSGP.cli.common import is_terminal
from SlicerSGP.errors import SGPError, SGPWeightsError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``weights list|fetch NAME [--file PATH] [--force]|verify [NAME|PATH]``.

    Each leaf parser sets ``func`` to the ``cli_*`` function to call with the parsed args.
    """
    parser = subparsers.add_parser(
        "weights",
        help="list, download and verify the SAM2.1 checkpoints",
        description="SAM2.1 checkpoints. Cache folder: $SGP_CACHE_DIR, "
        "else $XDG_CACHE_HOME/slicersgp, else ~/.cache/slicersgp.",
    )
    sub = parser.add_subparsers(dest="weights_command", metavar="{list,fetch,verify}")
    sub.required = True

    p_list = sub.add_parser("list", help="show the known checkpoints and which are cached")
    p_list.set_defaults(func=cli_list)

    p_fetch = sub.add_parser(
        "fetch", help="download a checkpoint into the cache (or copy a local file there)"
    )
    p_fetch.add_argument("name", help=f"model name: {', '.join(W.MODEL_NAMES)}")
    p_fetch.add_argument(
        "--file",
        metavar="PATH",
        help="a copy of the official file downloaded elsewhere: check it and copy it to the cache",
    )
    p_fetch.add_argument("--force", action="store_true", help="replace a valid cached file")
    p_fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    p_fetch.set_defaults(func=cli_fetch)

    p_verify = sub.add_parser(
        "verify", help="check cached checkpoints, one model's, or a file, by size and sha256"
    )
    p_verify.add_argument(
        "target", nargs="?", metavar="NAME|PATH", help="a model name or a checkpoint file"
    )
    p_verify.set_defaults(func=cli_verify)
    return parser


def _err(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def cli_list(args: argparse.Namespace) -> int:
    """``sgp weights list``: the registry and what is in the cache."""
    try:
        folder = W.cache_dir()
        print(f"SAM2.1 checkpoints (cache: {folder})")
        print(f"  {'name':<10} {'config':<36} {'size':>9}  {'check':<11} status")
        for info in W.REGISTRY.values():
            check = "sha256" if info.sha256 else "size only"
            print(
                f"  {info.name:<10} {info.config:<36} {W.format_mb(info.size):>9}  {check:<11} "
                f"{W.cache_status(info)}"
            )
        unhashed = [i.name for i in W.REGISTRY.values() if i.sha256 is None]
        if unhashed:
            print(f"No sha256 is published for {', '.join(unhashed)}: only their size is checked.")
        print("Download one with `sgp weights fetch NAME`.")
    except SGPError as exc:
        return _err(exc)
    return 0


def cli_fetch(args: argparse.Namespace) -> int:
    """``sgp weights fetch NAME [--file PATH] [--force]``."""
    try:
        info = W.resolve_model_name(args.name)
        # A byte-count bar only on a terminal: in a log its updates are escape-code noise.
        show = not getattr(args, "quiet", False) and is_terminal(sys.stderr)
        force = bool(getattr(args, "force", False))
        file = getattr(args, "file", None)
        if file:
            path = W.import_checkpoint(file, info, force=force, progress=show)
        else:
            target = W.cached_checkpoint_path(info)
            if not force and target.exists() and W.is_valid_checkpoint(target, info):
                print(f"{target} is already there ({W.check_note(info)}); --force downloads again.")
                return 0
            print(f"Downloading {info.url} ({W.format_mb(info.size)}) to {target}", file=sys.stderr)
            path = W.download_checkpoint(info, force=force, progress=show)
        print(f"OK: {path} ({W.check_note(info)})")
    except SGPError as exc:
        return _err(exc)
    return 0


def cli_verify(args: argparse.Namespace) -> int:
    """``sgp weights verify [NAME|PATH]``; no argument checks every cached checkpoint."""
    target = getattr(args, "target", None)
    try:
        if target and not (W.is_model_name(target) and not Path(target).expanduser().exists()):
            print(W.verify_file(Path(target).expanduser()))
            return 0
        infos = [W.resolve_model_name(target)] if target else list(W.REGISTRY.values())
        failed = 0
        found = 0
        for info in infos:
            path = W.cache_dir() / info.filename
            if not path.is_file():
                if target:
                    raise SGPWeightsError(f"{path} is not there. {W.fetch_hint(info)}")
                continue
            found += 1
            try:
                W.verify_checkpoint(path, info)
                print(f"OK: {path} ({W.check_note(info)})")
            except SGPWeightsError as exc:
                failed += 1
                print(f"FAILED: {exc}", file=sys.stderr)
        if not target and found == 0:
            print(f"No checkpoints in {W.cache_dir()}. Download one with `sgp weights fetch NAME`.")
        return 1 if failed else 0
    except SGPError as exc:
        return _err(exc)
