"""`sgp segment-batch` on the shared data, in one process and under `torchrun` with two: every
case written once, a failing case reported while the others go on, a second run skips what is
done, the results equal one process's; `sgp eval` shared the same way; bad case lists refused."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SlicerSGP.cli import main
from SlicerSGP.data import io

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["--weights", "random", "--image-size", "256", "--device", "cpu"]
LESIONS = ("CT_Lesion_000001_02_01_008-023", "CT_Lesion_000002_03_01_035-047",
           "CT_Lesion_000009_03_01_036-048")


@pytest.fixture(scope="module")
def case_list(sgp_data, tmp_path_factory) -> Path:
    """Three CT lesion cases (drawn slices), a 2D blood-cell image segmented from a support
    bank with its label names given, and a row whose image does not exist."""
    root = tmp_path_factory.mktemp("cohort")
    bank = root / "wbc_bank"
    for sub in ("images", "masks"):
        (bank / sub).mkdir(parents=True)
        for name in ("002.png", "003.png"):
            shutil.copy(sgp_data / "wbc" / sub / name, bank / sub / name)
    shutil.copy(sgp_data / "wbc" / "labels.json", root / "wbc_names.json")
    rows = [{"image": str(sgp_data / "ct_lesions" / c / "image.nrrd"),
             "labels": str(sgp_data / "ct_lesions" / c / "labels.nrrd")} for c in LESIONS]
    rows.insert(2, {"case": "missing", "image": "nowhere/image.nrrd",
                    "labels": "nowhere/labels.nrrd"})
    rows.append({"case": "wbc_001", "image": str(sgp_data / "wbc" / "images" / "001.png"),
                 "support_bank": "wbc_bank", "label": "2", "label_names": "wbc_names.json"})
    path = root / "cases.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["case", "image", "labels", "support_bank", "label",
                                    "label_names"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "SlicerSGP.cli", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=600)


def summary(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def written_by(stderr: str) -> dict[str, list[int]]:
    """case -> the processes that wrote it, from the per-case lines on stderr."""
    by: dict[str, list[int]] = {}
    for rank, case in re.findall(r"\[process (\d)/2\] case (\S+): written", stderr):
        by.setdefault(case, []).append(int(rank))
    return by


def in_one_process(argv: list[str], capsys) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs: the same float path
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_processes_share_the_cases_resume_and_match_one_process(case_list, tmp_path,
                                                                    capsys, monkeypatch):
    out = tmp_path / "two"
    args = ["segment-batch", str(case_list), "--out", str(out), "--scores", *MODEL]
    first = torchrun(2, args)
    assert first.returncode == 1, first.stderr[-3000:]  # one case failed
    table = summary(out / "summary.csv")
    done = [*LESIONS, "wbc_001"]
    assert list(table) == [*LESIONS[:2], "missing", LESIONS[2], "wbc_001"]  # the list's order
    assert all(table[c]["status"] == "written" and int(table[c]["slices"]) > 0 for c in done)
    assert table["missing"]["status"] == "failed"
    assert "nowhere/image.nrrd" in table["missing"]["message"]
    assert "not found" in table["missing"]["message"]
    by = written_by(first.stderr)
    assert sorted(by) == sorted(done) and all(len(r) == 1 for r in by.values()), by
    assert {r for rs in by.values() for r in rs} == {0, 1}, "both processes took cases"
    assert "4 written, 0 skipped (outputs exist), 1 failed" in first.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([f"{c}{s}" for c in done for s in (".seg.nrrd", "_scores.csv")]
                           + ["summary.csv"]), files  # no temporary, nothing for the failure
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    _, names, _ = read_seg(out / "wbc_001.seg.nrrd")
    assert names == {2: "nucleus"}  # from the label names file of its row

    second = torchrun(2, args)
    assert second.returncode == 1, second.stderr[-3000:]
    again = summary(out / "summary.csv")
    assert [again[c]["status"] for c in done] == ["skipped"] * 4
    assert again["missing"]["status"] == "failed"
    assert "0 written, 4 skipped (outputs exist), 1 failed" in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()
            if p.name != "summary.csv"} == {k: v for k, v in stamps.items()
                                            if k != "summary.csv"}

    def no_model(_args):
        raise AssertionError("a run with nothing left to do loaded the model")

    monkeypatch.setattr("SlicerSGP.cli.segment_batch.engine_from_args", no_model)
    assert main([*args, "--quiet"]) == 1
    assert [summary(out / "summary.csv")[c]["status"] for c in done] == ["skipped"] * 4
    monkeypatch.undo()

    one = tmp_path / "one"
    rc = in_one_process(["segment-batch", str(case_list), "--out", str(one), "--scores",
                         "--quiet", *MODEL], capsys)
    assert rc == 1
    for case in done:
        a, names_a, geo_a = read_seg(out / f"{case}.seg.nrrd")
        b, names_b, geo_b = read_seg(one / f"{case}.seg.nrrd")
        np.testing.assert_array_equal(a, b)
        assert names_a == names_b and np.allclose(geo_a, geo_b)
        assert (out / f"{case}_scores.csv").read_text() == \
            (one / f"{case}_scores.csv").read_text()
    for case in LESIONS:  # the drawn slices come back as drawn, on the image's grid
        drawn, _, _ = io.read_labels(_lesion_labels(case_list, case))
        got, _, _ = read_seg(out / f"{case}.seg.nrrd")
        assert got.shape == drawn.shape
        k = np.flatnonzero(drawn.reshape(drawn.shape[0], -1).any(axis=1))
        np.testing.assert_array_equal(got[k], drawn[k])


def _lesion_labels(case_list: Path, case: str) -> Path:
    with case_list.open(newline="") as f:
        return next(Path(r["labels"]) for r in csv.DictReader(f) if case in r["image"])


def read_seg(path: Path) -> tuple[np.ndarray, dict[int, str], np.ndarray]:
    labels, geometry, names = io.read_labels(path)
    return labels, names, io.ijk_to_lps(geometry)


# ----------------------------------------------------------------------------- sgp eval


@pytest.fixture(scope="module")
def small_2d(tmp_path_factory) -> Path:
    """Six 64x64 images with a bright disk (label 1)."""
    root = tmp_path_factory.mktemp("eval2d")
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:64, :64]
    for sub in ("images", "masks"):
        (root / sub).mkdir()
    for i in range(6):
        disk = (yy - 22 - 3 * i) ** 2 + (xx - 38 + 2 * i) ** 2 < (8 + i) ** 2
        img = rng.integers(20, 90, (64, 64)).astype(np.uint8)
        img[disk] = 200
        sitk.WriteImage(sitk.GetImageFromArray(img), str(root / "images" / f"{i:03d}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(disk.astype(np.uint8)),
                        str(root / "masks" / f"{i:03d}.png"))
    return root


def test_eval_shared_by_two_processes_equals_one(small_2d, tmp_path, capsys):
    def args(folder: Path) -> list[str]:
        return ["eval", str(small_2d), "--cases", "2:6", "--bank-cases", "0:2", "--model",
                "tiny", *MODEL, "--csv", str(folder / "s.csv"), "--json",
                str(folder / "s.json"), "--montage", str(folder / "m.png"), "--write-pred",
                str(folder / "pred"), "--quiet"]

    two = torchrun(2, args(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert in_one_process(args(tmp_path / "one"), capsys) == 0

    def table(folder: Path) -> list[list[str]]:
        with (folder / "s.csv").open(newline="") as f:
            rows = list(csv.reader(f))
        drop = rows[0].index("seconds")
        return [r[:drop] + r[drop + 1:] for r in rows]

    assert table(tmp_path / "two") == table(tmp_path / "one")
    assert len(table(tmp_path / "one")) == 1 + 4
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "two" / "m.png")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "one" / "m.png")))
    np.testing.assert_array_equal(a, b)
    preds = sorted(p.name for p in (tmp_path / "two" / "pred").iterdir())
    assert preds == [f"{i:03d}.seg.nrrd" for i in range(2, 6)]
    for name in preds:
        np.testing.assert_array_equal(read_seg(tmp_path / "two" / "pred" / name)[0],
                                      read_seg(tmp_path / "one" / "pred" / name)[0])
    assert "scored 4 case(s)" in two.stdout and two.stdout.count("scored") == 1


# ----------------------------------------------------------------------------- bad lists


@pytest.mark.parametrize("header, rows, expected", [
    ("image,labels,colour", ["a.nrrd,b.nrrd,1"], "unknown column(s) colour"),
    ("labels", ["b.nrrd"], "no `image` column"),
    ("image,labels", ["x/image.nrrd,l.nrrd", "x/image.nrrd,m.nrrd"], "both case 'x'"),
    ("image", [], "lists no case"),
])
def test_a_bad_case_list_is_refused_before_anything_runs(tmp_path, capsys, header, rows,
                                                         expected):
    listed = tmp_path / "cases.csv"
    listed.write_text("\n".join([header, *rows]) + "\n")
    rc = main(["segment-batch", str(listed), "--out", str(tmp_path / "out"), *MODEL])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_a_row_sets_its_own_options_over_the_command_line(tmp_path):
    from SlicerSGP.cli import build_parser
    from SlicerSGP.cli.segment_batch import case_args, read_case_list

    (tmp_path / "bank").mkdir()
    listed = tmp_path / "cases.csv"
    listed.write_text("case,image,label,support_bank,support_slices\n"
                      'a,a/img.nrrd,1;3,bank,"2,5"\n'
                      "b,/abs/img.nrrd,,my_saved_set,\n")
    args = build_parser().parse_args(["segment-batch", str(listed), "--out",
                                      str(tmp_path / "o"), "--label", "7", "--top-k", "2"])
    a, b = (case_args(args, c, tmp_path) for c in read_case_list(listed))
    assert a.label_values == [1, 3] and b.label_values == [7]
    assert a.support_slices == [2, 5] and b.support_slices is None
    assert a.image == tmp_path / "a" / "img.nrrd" and b.image == Path("/abs/img.nrrd")
    assert a.support_bank == tmp_path / "bank" and b.support_bank == Path("my_saved_set")
    assert a.out == tmp_path / "o" / "a.seg.nrrd" and a.top_k == b.top_k == 2
