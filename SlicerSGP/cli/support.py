"""``sgp support list|show|save|rename|delete|export|import``: the support library.

A saved set is used by name (or folder) as ``sgp segment --support-bank NAME``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from SlicerSGP.cli.common import int_list, parse_axis
from SlicerSGP.data import io
from SlicerSGP.data.support_library import ENV_ROOT, SupportLibrary, SupportSetSummary
from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import axis_label


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--library",
        type=Path,
        metavar="DIR",
        help=f"library folder (default: ${ENV_ROOT}, else ~/.local/share/slicersgp/support)",
    )
    p = sub.add_parser(
        "support",
        help="save, list, rename, delete, export and import support sets",
        description="Named support sets: the drawn slices of a case (image + each structure's "
        "mask, spacing and intensity window) saved for reuse as `sgp segment --support-bank "
        "NAME` on new cases. One zip per set to share it.",
    )
    cmds = p.add_subparsers(dest="support_command", required=True, metavar="COMMAND")
    cmds.add_parser("list", parents=[common], help="the sets in the library").set_defaults(
        func=cmd_list
    )
    show = cmds.add_parser("show", parents=[common], help="one set's details, files checked")
    show.add_argument("name")
    show.set_defaults(func=cmd_show)

    save = cmds.add_parser(
        "save",
        parents=[common],
        help="save the drawn slices of a case as a set",
        description="Save IMAGE's drawn slices as set NAME. By default each structure's slices "
        "are those of LABELS where it is drawn (a slice drawn for one structure says nothing "
        "about the others). --slices takes only those slices, as fully labeled: there a "
        "structure without voxels is saved as absent (as `sgp segment --support-slices`).",
    )
    save.add_argument("name", help="set name (letters, digits, spaces, _ . ( ) + -)")
    save.add_argument("image", type=Path, help="the case's volume")
    save.add_argument("--labels", type=Path, required=True, help="its label map (drawn slices)")
    save.add_argument("--axis", default="k", help="slicing axis: k/axial, j/coronal, i/sagittal")
    save.add_argument(
        "--slices", type=int_list, help="fully labeled slices to save, e.g. 3,10,17 (see above)"
    )
    save.add_argument(
        "--structure-slices",
        action="append",
        default=[],
        metavar="V:LIST",
        help="structure V's drawn slices exactly, e.g. 2:5,9 (repeatable; an empty mask on one "
        "of them saves 'absent here' for V only)",
    )
    save.add_argument(
        "--label", dest="label_values", type=int, action="append", help="structure value to save"
    )
    save.add_argument(
        "--intensity", default="auto", help="intensity mode the case is mapped with (default auto)"
    )
    save.add_argument("--description", default="", help="free text stored with the set")
    save.add_argument("--overwrite", action="store_true", help="replace a set of that name")
    save.set_defaults(func=cmd_save)

    rename = cmds.add_parser("rename", parents=[common], help="rename a set")
    rename.add_argument("name")
    rename.add_argument("new_name")
    rename.add_argument("--overwrite", action="store_true", help="replace a set named NEW_NAME")
    rename.set_defaults(func=cmd_rename)
    delete = cmds.add_parser("delete", parents=[common], help="delete a set")
    delete.add_argument("name")
    delete.set_defaults(func=cmd_delete)
    export = cmds.add_parser("export", parents=[common], help="write a set as one .zip")
    export.add_argument("name")
    export.add_argument("zip", type=Path, help="output .zip")
    export.add_argument("--overwrite", action="store_true", help="replace an existing file")
    export.set_defaults(func=cmd_export)
    imp = cmds.add_parser("import", parents=[common], help="add a set from a .zip (checked)")
    imp.add_argument("zip", type=Path)
    imp.add_argument("--name", help="store it under this name (default: its exported name)")
    imp.add_argument("--overwrite", action="store_true", help="replace a set of that name")
    imp.set_defaults(func=cmd_import)
    return p


def _library(args: argparse.Namespace) -> SupportLibrary:
    return SupportLibrary(args.library)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def _line(s: SupportSetSummary) -> str:
    parts = ", ".join(f"{name} ({s.slices[v]})" for v, name in s.structures.items())
    return f"  {s.name:<24} {parts:<40} {_size(s.size):>9}  {s.created}"


def cmd_list(args: argparse.Namespace) -> int:
    lib = _library(args)
    sets = lib.list()
    print(f"Support library {lib.root}: {len(sets)} set(s)")
    if sets:
        print(f"  {'name':<24} {'structures (slices)':<40} {'size':>9}  created")
    for s in sets:
        print(_line(s))
    if not sets:
        print("Save one with `sgp support save NAME IMAGE --labels LABELS`.")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    lib = _library(args)
    m = lib.show(args.name)
    lo, hi = m["intensity"]["window"]
    spacing = " x ".join(f"{v:g}" for v in m["geometry"]["spacing"])
    print(f"{lib.path(args.name).name}: {lib.path(args.name)}")
    print(f"  created {m['created']} by SlicerSGP {m['engine_version']}; source {m['source']!r}")
    if m.get("description"):
        print(f"  {m['description']}")
    print(f"  axis {m['axis_label']}, source shape {m['shape']}, spacing {spacing} mm")
    print(f"  intensity {m['intensity']['mode']}: window {lo:g} .. {hi:g}")
    for s in m["structures"]:
        empty = f" (drawn empty: {s['empty_slices']})" if s["empty_slices"] else ""
        print(f"  {s['value']:>3} {s['name']}: slices {s['slices']}{empty}")
    print(f"  {len(m['files'])} files, sha256 checked")
    return 0


def _structure_slices(texts: list[str]) -> dict[int, list[int]]:
    out = {}
    for text in texts:
        value, sep, rest = text.partition(":")
        try:
            out[int(value)] = int_list(rest)
        except (ValueError, argparse.ArgumentTypeError):
            sep = ""
        if not sep:
            raise SGPInputError(f"--structure-slices {text!r}: give VALUE:LIST, e.g. 2:5,9.")
    return out


def _drawn(lab: np.ndarray, args, axis: int) -> dict[int, list[int]]:
    """Per structure value, the slices saved for it (see the ``save`` description)."""
    first = np.moveaxis(lab, axis, 0)
    per = _structure_slices(args.structure_slices)
    if args.label_values:
        values = sorted(set(args.label_values) | set(per))
    else:
        listed = first[args.slices] if args.slices else first
        values = sorted(({int(v) for v in np.unique(listed)} - {0}) | set(per))
    if not values:
        raise SGPInputError("The labels hold no structure on the chosen slices: draw one, or "
                            "pick slices where one is drawn.")  # fmt: skip
    for v in values:
        if v not in per:
            on = [int(k) for k in np.flatnonzero((first == v).reshape(len(first), -1).any(1))]
            per[v] = sorted(args.slices) if args.slices else on
    return per


def cmd_save(args: argparse.Namespace) -> int:
    axis = parse_axis(args.axis)
    image, geometry = io.read_image(args.image)
    lab, _, names = io.read_labels(args.labels, geometry, reference_shape=image.shape[:3])
    n = image.shape[axis]
    bad = [k for k in args.slices or [] if not 0 <= k < n]
    if bad:
        raise SGPInputError(f"--slices {bad} are outside the volume: along {axis_label(axis)} "
                            f"it has slices 0..{n - 1}.")  # fmt: skip
    slices = _drawn(lab, args, axis)
    colors = io.read_label_info(args.labels).colors
    summary = _library(args).save(
        args.name,
        image,
        {v: lab == v for v in slices},
        slices,
        axis=axis,
        geometry=geometry,
        names={v: names.get(v, f"label_{v}") for v in slices},
        colors={v: c for v, c in colors.items() if v in slices},
        intensity=args.intensity,
        source=str(args.image.name),
        description=args.description,
        overwrite=args.overwrite,
    )
    print(f"saved support set {summary.name!r} in {summary.path}")
    print(_line(summary))
    print(f"use it with: sgp segment IMAGE --support-bank {summary.name!r} --out OUT.seg.nrrd")
    return 0


def cmd_rename(args: argparse.Namespace) -> int:
    path = _library(args).rename(args.name, args.new_name, overwrite=args.overwrite)
    print(f"renamed {args.name!r} to {path.name!r}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    lib = _library(args)
    name = lib.path(args.name).name
    lib.delete(name)
    print(f"deleted support set {name!r} from {lib.root}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = _library(args).export_zip(args.name, args.zip, overwrite=args.overwrite)
    print(f"exported {args.name!r} to {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    summary = _library(args).import_zip(args.zip, args.name, overwrite=args.overwrite)
    print(f"imported support set {summary.name!r} (files checked) into {summary.path}")
    print(_line(summary))
    return 0
