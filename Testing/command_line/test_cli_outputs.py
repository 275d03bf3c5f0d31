"""All-or-nothing outputs of `sgp segment`, `sgp eval` and `sgp train`, and the command line's
messages and progress output.

For every kind of failure (a bad output path found before the run, a write error on a later
output, Cancelled or KeyboardInterrupt during the run) a command leaves no output file and no
temporary behind.
"""

from __future__ import annotations

import io as stdio
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

import SlicerSGP.build_model as checkpoints
import SlicerSGP.cli.eval as cli_eval
import SlicerSGP.cli.segment as cli_segment
import SlicerSGP.cli.train as cli_train
from SlicerSGP.cli import build_parser, main
from SlicerSGP.cli.common import OutputPlan, Progress
from SlicerSGP.data import io
from SlicerSGP.filesystem import split_suffix
from SlicerSGP.training.config import state_path
from SlicerSGP.training.trainer import Trainer
from SlicerSGP.types import Geometry

FAST = ["--weights", "random", "--image-size", "256", "--device", "cpu"]
TRAIN = ["--model", "cpu-mini", "--weights", "random", "--image-size", "256", "--lora-rank", "2",
         "--top-k", "2", "--device", "cpu", "--quiet"]
GEOM = Geometry(spacing=(0.9, 0.9, 2.0))


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def _blob_volume(n: int = 8, h: int = 32, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 20, (n, h, w)).astype(np.float32)
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - h / 2) / 7) ** 2 + ((xx - w / 2) / 9) ** 2 < 1
    vol[:, blob] += 200
    lab = np.zeros(vol.shape, np.int32)
    lab[1][blob] = 1
    lab[5][blob] = 1
    return vol, lab


@pytest.fixture()
def case(tmp_path: Path):
    """inputs/ holds an 8-slice volume with labels drawn on slices 1 and 5; out/ is empty."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    vol, lab = _blob_volume()
    io.write_volume(inputs / "image.nrrd", vol, GEOM)
    sitk.WriteImage(io.sitk_from_array(lab, GEOM), str(inputs / "labels.nrrd"))
    (inputs / "labels.json").write_text(json.dumps({"1": "blob"}))
    out = tmp_path / "out"
    out.mkdir()
    return inputs / "image.nrrd", inputs / "labels.nrrd", out


def _no_model(monkeypatch, module) -> None:
    """Fail the test if the model would load: the check must come first."""
    monkeypatch.setattr(module, "segmenter_from_args",
                        lambda args: pytest.fail("the model loaded before the outputs were checked"))


# ----------------------------------------------------------------------------- the plan itself

def test_temporary_names_keep_the_suffix_and_commit_or_abort(tmp_path):
    assert split_suffix("a.seg.nrrd") == ("a", ".seg.nrrd")
    assert split_suffix("b.nii.gz") == ("b", ".nii.gz")
    assert split_suffix("c.csv") == ("c", ".csv")
    with OutputPlan() as plan:
        seg = plan.file(tmp_path / "new" / "deep" / "r.seg.nrrd", "--out", (".seg.nrrd",))
        tmp = plan.temp(seg)
        assert tmp.parent == seg.parent and tmp.name.startswith(".r.tmp-")
        assert tmp.name.endswith(".seg.nrrd")
        tmp.write_text("x")
        assert not seg.exists()
        plan.commit()
    assert seg.read_text() == "x" and not temporaries(tmp_path)

    with pytest.raises(RuntimeError), OutputPlan() as plan:
        out = plan.file(tmp_path / "other" / "q.csv", "--scores", (".csv",))
        plan.temp(out).write_text("y")
        raise RuntimeError("the run failed")
    assert not (tmp_path / "other").exists(), "folders the plan made are removed again"
    assert not temporaries(tmp_path)


# ----------------------------------------------------------------------------- bad paths, up front

@pytest.mark.parametrize("kind", ["out-is-folder", "probabilities-is-file", "same-path",
                                  "wrong-suffix", "parent-is-file", "not-writable"])
def test_segment_refuses_bad_output_paths_before_the_model_loads(case, monkeypatch, capsys, kind):
    image, labels, out = case
    _no_model(monkeypatch, cli_segment)
    result = out / "r.seg.nrrd"
    extra: list[str] = ["--scores", str(out / "s.csv")]
    expect = ""
    if kind == "out-is-folder":
        result.mkdir()
        expect = "is a folder"
    elif kind == "probabilities-is-file":
        (out / "prob").write_text("not a folder")
        extra += ["--probabilities", str(out / "prob")]
        expect = "is a file"
    elif kind == "same-path":
        extra += ["--pseudo-masks", str(result)]
        expect = "both name"
    elif kind == "wrong-suffix":
        extra = ["--scores", str(out / "s.txt")]
        expect = "must end with .csv"
    elif kind == "parent-is-file":
        (out / "file").write_text("")
        result = out / "file" / "r.seg.nrrd"
        expect = "not a folder"
    elif kind == "not-writable":
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        locked = out / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        result = locked / "r.seg.nrrd"
        expect = "not writable"
    before = files_under(out)
    rc = main(["segment", str(image), "--labels", str(labels), "--out", str(result), *extra,
               *FAST, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expect in err and err.startswith("error: ")
    assert files_under(out) == before, "nothing written"


def test_eval_and_train_refuse_bad_output_paths_up_front(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_eval, "load_dataset",
                        lambda *a, **k: pytest.fail("the data loaded before the outputs were checked"))
    (tmp_path / "m.csv").mkdir()
    rc = main(["eval", str(tmp_path), "--pred", str(tmp_path), "--csv", str(tmp_path / "m.csv")])
    assert rc == 2 and "is a folder" in capsys.readouterr().err
    rc = main(["eval", str(tmp_path), "--pred", str(tmp_path), "--json", str(tmp_path / "a.csv")])
    assert rc == 2 and "must end with .json" in capsys.readouterr().err

    monkeypatch.setattr(cli_train, "train",
                        lambda *a, **k: pytest.fail("training started before the outputs were checked"))
    (tmp_path / "ck.json").mkdir()  # where the checkpoint's metadata would go
    rc = main(["train", str(tmp_path), "--out", str(tmp_path / "ck.safetensors"), *TRAIN])
    assert rc == 2 and "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "ck.safetensors").exists() and not temporaries(tmp_path)


# ----------------------------------------------------------------------------- failures in the run

def _fail_on_second_output(monkeypatch):
    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "write_score_table", broken)


def _sigterm_in_progress(monkeypatch):
    def stage(self, name, fraction):
        os.kill(os.getpid(), signal.SIGTERM)  # `kill PID`: the run stops at the next check

    monkeypatch.setattr(Progress, "stage", stage)


def _interrupt_in_progress(monkeypatch):
    def stage(self, name, fraction):
        raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "stage", stage)


@pytest.mark.parametrize("failure", ["write-error", "cancel", "interrupt"])
def test_segment_failures_after_the_run_started_leave_nothing(case, monkeypatch, capsys,
                                                              failure):
    image, labels, out = case
    {"write-error": _fail_on_second_output, "cancel": _sigterm_in_progress,
     "interrupt": _interrupt_in_progress}[failure](monkeypatch)
    rc = main(["segment", str(image), "--labels", str(labels), "--out", str(out / "r.seg.nrrd"),
               "--scores", str(out / "s.csv"), "--probabilities", str(out / "prob"),
               "--overlay", str(out / "o.png"), *FAST])
    err = capsys.readouterr().err
    assert rc == (1 if failure == "write-error" else 130), err
    assert ("No space left" in err) if failure == "write-error" else ("nothing" in err.lower())
    assert files_under(out) == set(), "no output, no temporary, no new folder"


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """Three labeled 2D cases (images/ + masks/) with names."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:48, :48]
    for i in range(3):
        mask = ((yy - 20 - 3 * i) / 8) ** 2 + ((xx - 24) / 10) ** 2 < 1
        img = np.clip(rng.normal(60, 15, (48, 48)) + 120 * mask, 0, 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(img), str(root / "images" / f"{i:03d}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(mask.astype(np.uint8)),
                        str(root / "masks" / f"{i:03d}.png"))
    (root / "labels.json").write_text(json.dumps({"1": "blob"}))
    return root


@pytest.mark.parametrize("failure", ["write-error", "cancel", "interrupt"])
def test_eval_failures_after_the_run_started_leave_nothing(dataset, tmp_path, monkeypatch,
                                                           capsys, failure):
    out = tmp_path / "out"
    out.mkdir()
    real_predict = cli_eval.predict_case
    calls = []

    def predict(*a, **k):
        calls.append(1)
        if failure == "cancel":
            os.kill(os.getpid(), signal.SIGTERM)
        if failure == "interrupt" and len(calls) == 2:  # after case 1's prediction was written
            raise KeyboardInterrupt
        return real_predict(*a, **k)

    monkeypatch.setattr(cli_eval, "predict_case", predict)
    if failure == "write-error":
        def broken(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(cli_eval, "write_json", broken)
    rc = main(["eval", str(dataset), "--cases", "1:3", "--model", "tiny", "--bank-cases", "0:1",
               *FAST, "--csv", str(out / "m.csv"), "--json", str(out / "m.json"),
               "--montage", str(out / "m.png"), "--write-pred", str(out / "pred"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == (1 if failure == "write-error" else 130), err
    assert calls, "the run started"
    assert files_under(out) == set(), "no output, no temporary, no new folder"


@pytest.mark.parametrize("failure", ["write-error", "cancel", "interrupt"])
def test_train_failures_after_the_run_started_leave_no_checkpoint(dataset, tmp_path, monkeypatch,
                                                                  capsys, failure):
    out = tmp_path / "out"
    out.mkdir()
    ck = out / "model.safetensors"
    real_step = Trainer.train_step
    steps = []

    def step(self):
        steps.append(1)
        if failure == "interrupt" and len(steps) == 2:
            raise KeyboardInterrupt
        rec = real_step(self)
        if failure == "cancel":
            os.kill(os.getpid(), signal.SIGTERM)  # checked before the next step
        return rec

    monkeypatch.setattr(Trainer, "train_step", step)
    if failure == "write-error":
        real_save = checkpoints.save_sgp_checkpoint

        def save_then_fail(model, path, **kw):
            real_save(model, path, **kw)  # the .safetensors and .json are there ...
            raise OSError(28, "No space left on device")  # ... and then the disk is full

        monkeypatch.setattr(checkpoints, "save_sgp_checkpoint", save_then_fail)
    rc = main(["train", str(dataset), "--out", str(ck), "--steps", "3", *TRAIN])
    err = capsys.readouterr().err
    assert rc == (1 if failure == "write-error" else 130), err
    assert steps, "training started"
    assert not ck.exists() and not ck.with_suffix(".json").exists()
    assert not temporaries(out)
    if failure == "cancel":
        # The resume state is a working file by design: kept, so --resume continues.
        assert "--resume" in err and state_path(ck).is_file()
        assert files_under(out) == {state_path(ck).name}
    else:
        assert files_under(out) == set()


# ----------------------------------------------------------------------------- defects

def test_support_bank_only_run_uses_the_bank_names(tmp_path, capsys):
    bank = tmp_path / "bank"
    vol, lab = _blob_volume()
    for i in range(2):
        c = bank / f"case{i}"
        c.mkdir(parents=True)
        io.write_volume(c / "image.nrrd", np.roll(vol, i, axis=2), GEOM)
        full = np.zeros_like(lab)
        full[:, :, :] = (np.roll(vol, i, axis=2) > 100)
        sitk.WriteImage(io.sitk_from_array(full, GEOM), str(c / "labels.nrrd"))
    (bank / "labels.json").write_text(json.dumps({"1": "kidney"}))
    query = tmp_path / "query.nrrd"
    io.write_volume(query, vol, GEOM)
    out = tmp_path / "q.seg.nrrd"
    rc = main(["segment", str(query), "--support-bank", str(bank), "--out", str(out), *FAST,
               "--quiet"])
    assert rc == 0, capsys.readouterr().err
    seg = slicerio.read_segmentation(str(out))
    assert {int(s["labelValue"]): s["name"] for s in seg["segments"]} == {1: "kidney"}
    assert "kidney" in capsys.readouterr().out


def test_label_value_above_65535_is_written(tmp_path, capsys):
    vol, lab = _blob_volume()
    lab[lab == 1] = 70000
    img, labels = tmp_path / "image.nrrd", tmp_path / "labels.nrrd"
    io.write_volume(img, vol, GEOM)
    sitk.WriteImage(io.sitk_from_array(lab, GEOM), str(labels))
    assert sitk.ReadImage(str(labels)).GetPixelID() == sitk.sitkInt32
    out = tmp_path / "big.seg.nrrd"
    rc = main(["segment", str(img), "--labels", str(labels), "--out", str(out), *FAST,
               "--quiet"])
    assert rc == 0, capsys.readouterr().err
    seg = slicerio.read_segmentation(str(out))
    assert [int(s["labelValue"]) for s in seg["segments"]] == [70000]
    voxels = np.asarray(seg["voxels"]).transpose(2, 1, 0)
    for k in (1, 5):  # the drawn slices come back exactly, value and all
        assert np.array_equal(voxels[k], lab[k])


def test_messages_name_the_axis_as_given_and_print_plain_numbers(case, capsys):
    image, labels, out = case
    vol, lab = _blob_volume(n=20)  # sagittal slices need at least 16 rows
    io.write_volume(image, vol, GEOM)
    lab_i = np.zeros_like(lab)
    lab_i[:, :, 12] = vol[:, :, 12] > 100
    lab_i[:, :, 28] = vol[:, :, 28] > 100
    sitk.WriteImage(io.sitk_from_array(lab_i, GEOM), str(labels))
    rc = main(["segment", str(image), "--labels", str(labels), "--out", str(out / "r.seg.nrrd"),
               "--axis", "sagittal", *FAST, "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "along i (sagittal)" in text and "support slices [12, 28]" in text
    assert "np." not in text and "axis 2" not in text


def test_train_message_prints_plain_numbers(dataset, tmp_path, capsys):
    rc = main(["train", str(dataset), "--out", str(tmp_path / "x.safetensors"), "--label", "7",
               "--steps", "1", *TRAIN])
    err = capsys.readouterr().err
    assert rc == 2 and "present: [1]" in err and "np." not in err


class _Terminal(stdio.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_logs(case, capsys):
    log = stdio.StringIO()
    p = Progress(stream=log)
    for f in (0.0, 0.5, 1.0):
        p.stage("encode slices", f)
    p.stage("propagate", 0.3)
    p.close()
    assert log.getvalue().splitlines() == ["encode slices ...", "propagate ..."]
    tty = _Terminal()
    p = Progress(stream=tty)
    p.stage("encode slices", 0.5)
    p.close()
    assert "\r" in tty.getvalue() and "50%" in tty.getvalue()
    quiet = stdio.StringIO()
    Progress(quiet=True, stream=quiet).stage("encode slices", 0.5)
    assert quiet.getvalue() == ""

    # End to end: stderr under pytest is not a terminal, so a run logs stage lines only.
    image, labels, out = case
    rc = main(["segment", str(image), "--labels", str(labels), "--out", str(out / "r.seg.nrrd"),
               *FAST])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.strip() and all(line.endswith("...") for line in err.strip().splitlines())
    assert "\x1b" not in err and "\r" not in err


def test_segment_with_a_server_checks_only_the_options_given(case, capsys):
    parse = build_parser().parse_args
    args = parse(["segment", "x.nrrd", "--out", "y.seg.nrrd", "--server", "http://h:1"])
    assert cli_segment._expected_model(args) == {}
    args = parse(["segment", "x.nrrd", "--out", "y.seg.nrrd", "--server", "http://h:1",
                  "--model", "small", "--image-size", "512", "--weights", "random"])
    assert cli_segment._expected_model(args) == {"model": "small", "image_size": 512,
                                                 "weights": "random", "seed": 0}
    image, labels, out = case
    rc = main(["segment", str(image), "--labels", str(labels), "--out", str(out / "r.seg.nrrd"),
               "--token-file", str(out / "t"), "--quiet"])
    assert rc == 2 and "--server" in capsys.readouterr().err
    # Nothing listens on port 9 (discard): the client's error, no traceback, nothing written.
    rc = main(["segment", str(image), "--labels", str(labels), "--out", str(out / "r.seg.nrrd"),
               "--server", "http://127.0.0.1:9", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "127.0.0.1:9" in err, err
    assert files_under(out) == set()


def test_complete_slices_make_the_drawn_slices_final(tmp_path, capsys):
    """A slice drawn for one structure is support only for it, unless marked complete."""
    vol, lab = _blob_volume()
    lab[5, 2:6, 2:6] = 2  # structure 2 drawn on slice 5 only; slice 1 shows structure 1 only
    img, labels = tmp_path / "image.nrrd", tmp_path / "labels.nrrd"
    io.write_volume(img, vol, GEOM)
    sitk.WriteImage(io.sitk_from_array(lab, GEOM), str(labels))
    out = tmp_path / "c.seg.nrrd"
    rc = main(["segment", str(img), "--labels", str(labels), "--out", str(out),
               "--complete-slices", "1,5", *FAST, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    voxels = np.asarray(slicerio.read_segmentation(str(out))["voxels"]).transpose(2, 1, 0)
    for k in (1, 5):
        assert np.array_equal(voxels[k], lab[k])
