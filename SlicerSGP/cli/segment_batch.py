"""``sgp segment-batch``: ``sgp segment`` over a list of cases, in one process or shared by the
processes of a ``torchrun`` job; resumable, each case all-or-nothing, one summary at the end."""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from SlicerSGP.cli.common import OutputPlan
from SlicerSGP.cli.segment import (
    add_case_options,
    add_run_options,
    engine_from_args,
    plan_outputs,
    segment_case,
)
from SlicerSGP.cli.shards import Shard, join_shards, run_share
from SlicerSGP.data.files import file_stem
from SlicerSGP.errors import Cancelled, SGPError, SGPInputError

SUMMARY_COLUMNS = ("case", "status", "seconds", "slices", "message")
COLUMN_ALIASES = {"support": "support_bank", "names": "label_names"}
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "segment-batch",
        help="segment every case of a case list (.csv), in one process or under torchrun",
        description="Run `sgp segment` on every row of CASES (a .csv with a header: an `image` "
                    "column, an optional `case` name, and any of the per-case options below as "
                    "columns, e.g. labels, label, support_bank, support_slices, label_names; "
                    "several values in one cell are separated by ';'; relative paths are "
                    "relative to the case list's folder). Writes OUT/CASE.seg.nrrd per case and "
                    "OUT/summary.csv (case, status, seconds, slices, message). Under `torchrun "
                    "--nproc_per_node N` each process takes every N-th case, on its own GPU, with "
                    "the model loaded once per process. A case whose outputs exist is skipped, so "
                    "a run that stopped continues where it was; each case is all-or-nothing; a "
                    "failing case is reported and the others go on (exit code 1 at the end).",
    )
    p.add_argument("cases", type=Path, metavar="CASES.csv", help="the case list")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder for the results (created if missing)")
    c = p.add_argument_group("per-case options (as command-line options: every case's "
                             "default; as a column: that case's value)")
    add_case_options(c)
    add_run_options(p)
    o = p.add_argument_group("outputs per case, beside CASE.seg.nrrd")
    o.add_argument("--scores", dest="with_scores", action="store_true",
                   help="also CASE_scores.csv, the per-slice confidence table")
    o.add_argument("--pseudo-masks", dest="with_pseudo_masks", action="store_true",
                   help="also CASE_pseudo.seg.nrrd, the PMG pseudo-masks")
    o.add_argument("--overlay", dest="with_overlay", action="store_true",
                   help="also CASE_overlay.png, the montage of `sgp segment --overlay`")
    o.add_argument("--summary", type=Path, default=None,
                   help="the summary table (.csv; default OUT/summary.csv)")
    o.add_argument("--quiet", action="store_true", help="no line per case on stderr")
    p.set_defaults(func=cmd_segment_batch)
    return p


# --------------------------------------------------------------------------- the case list

class _RowError(argparse.ArgumentParser):
    """The per-case options' parser: a bad value is that case's error, not an exit."""

    def error(self, message: str):  # type: ignore[override]
        raise SGPInputError(message)


def row_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.Action]]:
    """A parser of `sgp segment`'s per-case options, setting only what a row gives, and the
    case-list column each option answers to (``--support-bank`` -> ``support_bank``)."""
    parser = _RowError(prog="case list", add_help=False, argument_default=argparse.SUPPRESS)
    add_case_options(parser)
    columns = {opt[2:].replace("-", "_"): action for action in parser._actions
               for opt in action.option_strings if opt.startswith("--")}
    return parser, columns


@dataclass
class Case:
    index: int
    name: str
    row: dict[str, str]


def read_case_list(path: Path) -> list[Case]:
    """The rows of the case list, named; refuses an unknown column, a row without an image and
    two cases of one name before anything runs."""
    if not path.is_file():
        raise SGPInputError(f"Case list not found: {path}. Give a .csv with a header row and "
                            "one row per case (at least an `image` column).")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [_column(h) for h in reader.fieldnames or []]
        rows = [{_column(k): (v or "").strip() for k, v in r.items() if k is not None}
                for r in reader]
    _, columns = row_parser()
    known = {"case", "image", *columns}
    unknown = [h for h in header if h not in known]
    if "image" not in header or unknown:
        raise SGPInputError(
            f"{path}: " + (f"unknown column(s) {', '.join(unknown)}; " if unknown else
                           "no `image` column; ")
            + f"the columns are image, case and the per-case options: {', '.join(columns)}.")
    rows = [r for r in rows if any(r.values())]  # blank lines
    if not rows:
        raise SGPInputError(f"{path} lists no case.")
    names = _case_names(rows)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise SGPInputError(f"{path}: rows {seen[name] + 2} and {i + 2} are both case "
                                f"{name!r}; give each row its own name in a `case` column.")
        seen[name] = i
    return [Case(i, name, row) for i, (name, row) in enumerate(zip(names, rows, strict=True))]


def _column(name: str) -> str:
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return COLUMN_ALIASES.get(key, key)


def _case_names(rows: list[dict[str, str]]) -> list[str]:
    """The `case` column, else the image's file name, else (several images share a name, as in
    case1/image.nrrd, case2/image.nrrd) its folder's name; made safe as a file name."""
    stems = [file_stem(r["image"]) if r.get("image") else "" for r in rows]
    folders = [Path(r["image"]).parent.name if r.get("image") else "" for r in rows]
    by = stems if len(set(stems)) == len(stems) else folders
    names = []
    for i, row in enumerate(rows):
        name = row.get("case") or by[i] or f"row{i + 2}"
        names.append(SAFE_NAME.sub("_", name).strip("._") or f"row{i + 2}")
    return names


def case_args(args: argparse.Namespace, case: Case, list_dir: Path) -> argparse.Namespace:
    """The `sgp segment` arguments of one case: the command line's, then its row's."""
    parser, columns = row_parser()
    tokens: list[str] = []
    for column, value in case.row.items():
        if column in ("case", "image") or not value:
            continue
        action = columns[column]
        option = action.option_strings[-1]
        values = [v.strip() for v in value.split(";")] \
            if isinstance(action, argparse._AppendAction) else [value]
        for v in values:
            if action.type is Path:
                v = str(_relative_to(list_dir, v, keep_name=column == "support_bank"))
            tokens.append(f"{option}={v}")
    given = parser.parse_args(tokens, namespace=argparse.Namespace())
    ns = argparse.Namespace(**vars(args))
    vars(ns).update(vars(given))
    if not case.row.get("image"):
        raise SGPInputError("the row has no image.")
    out = args.out
    ns.image = _relative_to(list_dir, case.row["image"])
    ns.out = out / f"{case.name}.seg.nrrd"
    ns.scores = out / f"{case.name}_scores.csv" if args.with_scores else None
    ns.pseudo_masks = out / f"{case.name}_pseudo.seg.nrrd" if args.with_pseudo_masks else None
    ns.overlay = out / f"{case.name}_overlay.png" if args.with_overlay else None
    ns.probabilities = None
    ns.quiet = True
    return ns


def _relative_to(folder: Path, text: str, keep_name: bool = False) -> Path:
    """A relative path is relative to the case list's folder (a support set's name, which is
    no path there, stays a name)."""
    path = Path(text).expanduser()
    if path.is_absolute() or (keep_name and not (folder / path).exists()):
        return path
    return folder / path


def outputs_of(ns: argparse.Namespace) -> list[Path]:
    return [p for p in (ns.out, ns.scores, ns.pseudo_masks, ns.overlay) if p is not None]


# --------------------------------------------------------------------------- running

class EngineOnce:
    """The model (or server connection), made for the first case that needs it and kept."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.engine: Any = None
        self.failed = False

    def __call__(self) -> Any:
        if self.engine is None:
            try:
                self.engine = engine_from_args(self.args)
            except BaseException:
                self.failed = True  # not this case's fault: every case would fail alike
                raise
        return self.engine


def run_cases(args: argparse.Namespace, cases: list[Case], shard: Shard) -> list[dict]:
    """This process's share of the cases, each all-or-nothing; one summary row per case."""
    engine = EngineOnce(args)
    list_dir = args.cases.resolve().parent
    rows = []
    for i in shard.mine(len(cases)):
        case = cases[i]
        t0 = time.perf_counter()
        row = {"index": case.index, "case": case.name, "status": "written", "seconds": "",
               "slices": "", "message": ""}
        try:
            ns = case_args(args, case, list_dir)
            if all(p.is_file() for p in outputs_of(ns)):
                row.update(status="skipped", message="outputs exist")
            else:
                with plan_outputs(ns) as plan:
                    result, _ = segment_case(ns, plan, engine)
                    plan.commit()
                row["slices"] = str(int(result.stats.get("slices", 0)))
        except (Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            if engine.failed:
                raise
            row.update(status="failed", message=_message(exc))
            if not isinstance(exc, (SGPError, OSError)):
                traceback.print_exc(file=sys.stderr)  # not the input's fault: the details
        if row["status"] != "skipped":
            row["seconds"] = f"{time.perf_counter() - t0:.1f}"
        rows.append(row)
        if not args.quiet:
            where = f"[process {shard.rank}/{shard.world}] " if shard.world > 1 else ""
            detail = row["message"] or f"{row['slices']} slices in {row['seconds']} s"
            print(f"{where}case {case.name}: {row['status']} ({detail})", file=sys.stderr,
                  flush=True)
    return rows


def _message(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, (SGPError, OSError)) else \
        f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def cmd_segment_batch(args: argparse.Namespace) -> int:
    cases = read_case_list(args.cases)
    summary = args.summary or args.out / "summary.csv"
    OutputPlan().folder(args.out, "--out")
    OutputPlan().file(summary, "--summary", (".csv",))
    shard = join_shards()
    try:
        args.device = shard.device(args.device)
        args.out.mkdir(parents=True, exist_ok=True)  # up front: no case's plan owns it
        shares = run_share(shard, lambda: run_cases(args, cases, shard))
    finally:
        shard.close()
    if not shard.main:
        return 0  # the first process reports for all
    rows = sorted((r for share in shares for r in share), key=lambda r: r["index"])
    with OutputPlan() as plan:
        plan.file(summary, "--summary", (".csv",))
        with plan.temp(summary).open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, SUMMARY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        plan.commit()
    _print_summary(rows, summary, shard.world)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def _print_summary(rows: list[dict], summary: Path, world: int) -> None:
    width = max([len(r["case"]) for r in rows] + [4])
    print(f"{'case':<{width}}  {'status':<7}  {'seconds':>7}  {'slices':>6}  message")
    for r in rows:
        print(f"{r['case']:<{width}}  {r['status']:<7}  {r['seconds']:>7}  {r['slices']:>6}  "
              f"{r['message']}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("written", "skipped", "failed")}
    print(f"{len(rows)} case(s) in {world} process(es): {counts['written']} written, "
          f"{counts['skipped']} skipped (outputs exist), {counts['failed']} failed; "
          f"wrote {summary}")
