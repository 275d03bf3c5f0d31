"""The ``sgp`` command: one module per subcommand (segment, segment-batch, support, weights, train,
eval, bench, serve), each with ``add_parser(subparsers)``; common.py holds what they share (model
options, axis names, progress output, all-or-nothing output plans), shards.py how a ``torchrun``
job shares a list of cases. argparse lives only here.

May import every other part of SlicerSGP; nothing imports the CLI.

    sgp segment IMAGE --labels LABELS --out OUT.seg.nrrd [options]
    sgp segment-batch CASES.csv --out DIR [options]      (also under torchrun)
    sgp support list | show | save | rename | delete | export | import
    sgp weights list | fetch NAME | verify [NAME|PATH]
    sgp train DATA --out CK.safetensors | sgp eval DATA ... | sgp bench | sgp serve

Exit codes: 0 success, 2 bad input (nothing written), 1 any other failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType

# Before torch is imported (PyTorch reads it then), for `sgp` and `python -m SlicerSGP.service`
# alike: an operator Apple's MPS lacks runs on the CPU instead of failing.
if sys.platform == "darwin":
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")

from SlicerSGP import __version__  # noqa: E402
from SlicerSGP.cli import bench, segment, segment_batch, serve, support, train, weights  # noqa: E402
from SlicerSGP.cli import eval as eval_  # noqa: E402
from SlicerSGP.cli.common import parse_axis, run_command  # noqa: E402

__all__ = ["build_parser", "main", "parse_axis"]


def subcommands() -> list[ModuleType]:
    """The subcommand modules, in the order `sgp --help` lists them."""
    return [segment, segment_batch, support, weights, train, eval_, bench, serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgp",
        description="Few-shot segmentation with SAM2 and support-set guided prompting.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in subcommands():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
