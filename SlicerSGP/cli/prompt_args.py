"""``sgp segment``'s prompt options: boxes and clicks on slices, names, "not here" structures."""

from __future__ import annotations

import argparse

from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import SlicePrompt


def add_prompt_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Per-case options (no defaults: a case list's row sets only what it names)."""
    if isinstance(p, argparse._ArgumentGroup):
        g = p
    else:
        g = p.add_argument_group(
            "prompts", "Start a structure from a box or clicks on a slice instead of a drawing: "
            "each prompted slice's mask is made by SAM2 from its prompts and counts as a drawn "
            "slice, then the structure is propagated as usual. K is the slice index along --axis, "
            "X/Y the voxel column/row in that slice, V the label value.")
    g.add_argument("--box", action="append", metavar="V:K:X0,Y0,X1,Y1",
                   help="box around structure V on slice K: columns X0..X1, rows Y0..Y1 "
                        "(corner voxels, inclusive; repeatable, one per structure and slice)")
    g.add_argument("--point", action="append", metavar="V:K:X,Y[,+|-]",
                   help="click on structure V on slice K at column X, row Y; '+' (default) "
                        "adds, '-' says 'not here' (repeatable)")
    g.add_argument("--name", action="append", metavar="V:NAME",
                   help="name of structure V in the output (repeatable)")
    g.add_argument("--exclude", metavar="V[,V...]",
                   help="label values of --labels that are 'not here' for every structure "
                        "segmented: their voxels are kept out of each predicted slice's mask "
                        "before it becomes memory, and out of the output (they are not "
                        "segmented themselves)")


def _split(text: str, option: str, example: str) -> tuple[int, int, list[float], list[str]]:
    """V:K:a,b,... -> (V, K, numbers, trailing words)."""
    try:
        value, k, rest = text.split(":", 2)
        parts = [t.strip() for t in rest.split(",")]
        numbers = [float(t) for t in parts if t not in ("+", "-")]
        signs = [t for t in parts if t in ("+", "-")]
        return int(value), int(k), numbers, signs
    except ValueError:
        raise SGPInputError(f"{option} {text!r}: give {example}.") from None


def prompts_from_args(args: argparse.Namespace) -> list[SlicePrompt]:
    """One prompt per (structure, slice): its box (at most one) and its clicks."""
    prompts: dict[tuple[int, int], SlicePrompt] = {}
    for text in args.box or []:
        example = "V:K:X0,Y0,X1,Y1, e.g. --box 1:40:120,88,164,131"
        value, k, numbers, signs = _split(text, "--box", example)
        if len(numbers) != 4 or signs:
            raise SGPInputError(f"--box {text!r}: give {example}.")
        prompt = prompts.setdefault((value, k), SlicePrompt(value, k))
        if prompt.box is not None:
            raise SGPInputError(f"--box {text!r}: structure {value} already has a box on slice "
                                f"{k}; give one box per structure and slice.")
        prompt.box = (numbers[0], numbers[1], numbers[2], numbers[3])
    for text in args.point or []:
        example = "V:K:X,Y[,+|-], e.g. --point 1:40:140,110 or --point 1:40:150,95,-"
        value, k, numbers, signs = _split(text, "--point", example)
        if len(numbers) != 2 or len(signs) > 1 or (signs and not text.rstrip().endswith(signs[0])):
            raise SGPInputError(f"--point {text!r}: give {example}.")
        prompt = prompts.setdefault((value, k), SlicePrompt(value, k))
        prompt.points.append((numbers[0], numbers[1], signs != ["-"]))
    return list(prompts.values())


def names_from_args(args: argparse.Namespace) -> dict[int, str]:
    names = {}
    for text in args.name or []:
        value, sep, name = text.partition(":")
        try:
            names[int(value)] = name.strip()
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise SGPInputError(f"--name {text!r}: give V:NAME, e.g. --name 1:lesion.")
    return names


def exclude_from_args(args: argparse.Namespace) -> list[int] | None:
    if args.exclude is None:
        return None
    try:
        values = [int(t) for t in args.exclude.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values:
        raise SGPInputError(f"--exclude {args.exclude!r}: give label values, e.g. --exclude 2,3.")
    if args.labels is None:
        raise SGPInputError("--exclude names label values of --labels: give the label map "
                            "holding those structures with --labels.")
    return values
