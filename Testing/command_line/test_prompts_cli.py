"""`sgp segment --box/--point/--exclude`, locally and through a real `sgp serve` process: a
DeepLesion CT case started from one box, and bad prompts refused with a clear message."""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from service.test_service import raw, start_server

from command_line.test_cli import read_back
from SlicerSGP.cli import main
from SlicerSGP.data import io, preprocess
from SlicerSGP.errors import SGPInputError
from SlicerSGP.service import protocol
from SlicerSGP.service.client import connect_engine
from SlicerSGP.types import Geometry, SegmentOptions, SlicePrompt

MODEL = ["--weights", "random", "--image-size", "256", "--seed", "0"]
FAST = [*MODEL, "--device", "cpu", "--quiet"]
CASE = "ct_lesions/CT_Lesion_000001_02_01_008-023"
# A 112 x 112 x 5 crop around the lesion (slices 7..11 of 16); the key slice, 9, is 2 here.
CROP = (slice(240, 352), slice(200, 312), slice(7, 12))
KEY = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    token_file = folder / "token"
    token_file.write_text("t0k3n-" + "b" * 26 + "\n")
    token_file.chmod(0o600)
    proc, url = start_server([*MODEL, "--model", "tiny", "--device", "cpu", "--token-file",
                              str(token_file)], folder / "stderr.log")
    yield url, token_file
    proc.terminate()
    proc.wait(30)
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in (folder / "stderr.log").read_text()


@pytest.fixture()
def lesion(sgp_data: Path, tmp_path: Path):
    """The crop as image.nrrd, and the box around the lesion on the key slice (from the
    reference mask, as a RECIST-derived box is)."""
    image = sitk.ReadImage(str(sgp_data / CASE / "image.nrrd"))[CROP]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(sgp_data / CASE / "labels.nrrd"))[CROP])
    path = tmp_path / "image.nrrd"
    sitk.WriteImage(image, str(path))
    rows, cols = np.nonzero(labels[KEY])
    return path, (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))


def sources(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [row["source"] for row in csv.DictReader(f)]


def test_box_only_lesion_case_locally_and_through_the_server(lesion, server, tmp_path, capsys):
    image, box = lesion
    spec = f"1:{KEY}:" + ",".join(map(str, box))
    out, scores = tmp_path / "local.seg.nrrd", tmp_path / "local.csv"
    rc = main(["segment", str(image), "--box", spec, "--name", "1:lesion", "--out", str(out),
               "--scores", str(scores), *FAST])
    printed = capsys.readouterr().out
    assert rc == 0
    voxels, names, _ = read_back(out)
    assert names == {1: "lesion"}
    rows = sources(scores)
    assert rows[KEY] == "prompted"
    propagated = [k for k, s in enumerate(rows) if s in ("forward", "backward", "fused")]
    assert propagated == [0, 1, 3, 4]
    assert f"slices [{KEY}] made from prompts, 4 slices propagated" in printed
    assert all(voxels[k].any() for k in range(5))

    # The key slice is SAM2's mask of that box (its own prompt encoder and decoder, the best
    # of three by predicted IoU), made here directly on the slice's features.
    from SlicerSGP.method.segmenter import Segmenter

    seg = Segmenter("tiny", weights="random", device="cpu", image_size=256, seed=0)
    vol, _ = io.read_image(image)
    slices01 = preprocess.normalize_intensity(vol, *preprocess.intensity_range(vol, "auto"))
    transform = preprocess.LetterboxTransform(*vol.shape[1:], 256)
    feats = seg.encoder.volume(slices01, transform, 1)
    want, _ = seg.predictor.from_prompts(feats, KEY, transform,
                                         np.array([box[:2], box[2:]], float), [2, 3], None, True)
    assert want.any() and np.array_equal(voxels[KEY] == 1, want)

    # The same through a real `sgp serve` process.
    url, token_file = server
    out2, scores2 = tmp_path / "served.seg.nrrd", tmp_path / "served.csv"
    rc = main(["segment", str(image), "--box", spec, "--name", "1:lesion", "--out", str(out2),
               "--scores", str(scores2), "--server", url, "--token-file", str(token_file),
               *MODEL, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    served, served_names, _ = read_back(out2)
    assert served_names == names and np.array_equal(served, voxels)
    assert scores2.read_text() == scores.read_text()


@pytest.fixture()
def small(tmp_path: Path):
    vol = np.random.default_rng(0).normal(0, 30, (8, 24, 40)).astype(np.float32)
    path = tmp_path / "image.nrrd"
    io.write_volume(path, vol, Geometry())
    lab = np.zeros(vol.shape, np.uint8)
    lab[:, 2:6, 2:6] = 2
    lab_path = tmp_path / "labels.nrrd"
    sitk.WriteImage(io.sitk_from_array(lab, Geometry()), str(lab_path))
    return path, lab_path


BAD = [
    (["--box", "1:3:10,5,45,20"], "reaches outside the 40 x 24 slice"),
    (["--box", "1:3:30,5,10,20"], "is inverted"),
    (["--box", "1:8:1,1,5,5"], "slice 8 is outside the volume: along axis k (axial) it has "
                               "slices 0..7"),
    (["--box", "1:30:1,1,5,5", "--axis", "j"], "slice 30 is outside the volume: along axis "
                                                "j (coronal) it has slices 0..23"),
    (["--box", "1:3:1,1,5,9", "--axis", "j"], "reaches outside the 40 x 8 slice"),
    (["--box", "1:3:1,1,5"], "--box '1:3:1,1,5': give V:K:X0,Y0,X1,Y1"),
    (["--box", "one:3:1,1,5,5"], "give V:K:X0,Y0,X1,Y1"),
    (["--box", "1:3:1,1,5,5", "--box", "1:3:2,2,6,6"], "already has a box on slice 3"),
    (["--point", "1:3:10"], "--point '1:3:10': give V:K:X,Y[,+|-]"),
    (["--point", "1:3:10,4,x"], "give V:K:X,Y[,+|-]"),
    (["--point", "1:3:50,4"], "the click (50, 4) lies outside"),
    (["--box", "1:3:1,1,5,5", "--name", "1"], "--name '1': give V:NAME"),
    (["--box", "1:3:1,1,5,5", "--exclude", "2"], "--exclude names label values of --labels"),
    (["--box", "1:3:1,1,5,5", "--exclude", "a"], "give label values, e.g. --exclude 2,3"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_prompt_gets_a_clear_message_before_the_model_loads(small, tmp_path, capsys,
                                                                monkeypatch, args, message):
    import SlicerSGP.cli.segment as segment_cli

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the prompts were checked")

    monkeypatch.setattr(segment_cli, "segmenter_from_args", no_model)
    out = tmp_path / "o" / "x.seg.nrrd"
    rc = main(["segment", str(small[0]), *args, "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_exclude_with_labels_names_a_value_the_labels_lack(small, tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.seg.nrrd"
    rc = main(["segment", str(small[0]), "--labels", str(small[1]), "--box", "1:3:10,5,30,20",
               "--exclude", "3", "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "[3] are to be 'not here'" in err and not out.exists()


def test_service_refuses_bad_prompts_with_4xx_naming_the_field(server):
    url, token_file = server
    token = token_file.read_text().strip()
    client = connect_engine(url, token)
    vol = np.zeros((6, 24, 40), np.float32)
    vid = client.ensure_volume(vol, None)
    for prompt, message in [(SlicePrompt(1, 2, (3, 2, 45, 10)), "reaches outside"),
                            (SlicePrompt(1, 2, (30, 2, 10, 10)), "inverted"),
                            (SlicePrompt(1, 9, (3, 2, 5, 5)), "slice 9 is outside"),
                            (SlicePrompt(1, 2, mask=np.zeros((3, 3), bool)), "(3, 3)")]:
        with pytest.raises(SGPInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            client.start_run(vid, None, None, SegmentOptions(), prompts=[prompt])
    for prompts, field in [("abc", "prompts"), ([{"value": 1}], "prompts[0] lacks slice"),
                           ([{"value": 1, "slice": 2, "box": [1, 2]}], "prompts[0].box"),
                           ([{"value": 1, "slice": 2, "box": ["a", 1, 2, 3]}],
                            "prompts[0].box[0]"),
                           ([{"value": 1, "slice": 2, "points": [[1, 2, "yes"]]}],
                            "prompts[0].points[0][2]"),
                           ([{"value": 0, "slice": 2, "points": [[1, 2, True]]}],
                            "prompts[0].value"),
                           ([{"value": 1, "slice": 2, "mask": True}], "prompt_mask_0"),
                           ([{"value": 1, "slice": 2, "colour": "red"}], "unknown key")]:
        body = protocol.pack({}, {"volume_id": vid, "prompts": prompts})
        status, payload = raw(url, "POST", "/v1/runs", token, body,
                              {"Content-Type": protocol.NPZ})
        assert 400 <= status < 500, (status, payload)
        assert field in str(payload), payload
