"""Slice features on disk (``feature_cache=DIR``, ``--feature-cache DIR``).

A volume opened again by a new Segmenter or another process loads its slice features instead of
encoding them, and its result is bit-identical to the run that encoded them. Files that are
damaged, written for another batch, or hold other shapes/dtypes are never trusted; another
model's (other seed, weights changed in place) are never used; writes are atomic; the folder
stays within its cap, least recently used batches dropped first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from command_line.test_cli import read_back
from safetensors.torch import load_file, save_file
from synthetic import make_objects_visible, synthetic_volume

from engine.test_rerun import assert_identical
from SlicerSGP import filesystem
from SlicerSGP.cli import build_parser, main
from SlicerSGP.data import io
from SlicerSGP.filesystem import is_temp_name
from SlicerSGP.method import feature_cache as fc
from SlicerSGP.method.feature_cache import FORMAT, FeatureCache
from SlicerSGP.method.segmenter import Segmenter
from SlicerSGP.types import Geometry, SegmentOptions

SIZE = 256
N = 12
BATCH = 2
DRAWN = 5
REPO = Path(__file__).resolve().parents[2]


def new_segmenter(folder: Path | None, seed: int = 0, **kw) -> Segmenter:
    seg = Segmenter("tiny", weights="random", device="cpu", image_size=SIZE, seed=seed,
                    dtype="float32", feature_cache=folder, **kw)
    make_objects_visible(seg.model.sam)
    return seg


def options(**kw) -> SegmentOptions:
    return SegmentOptions(intensity="percentile", stop_after_absent=0, encode_batch_size=BATCH,
                          **kw)


def batch_files(folder: Path) -> dict[tuple[int, int], Path]:
    """(start, end) -> file, for the one volume and model in ``folder``."""
    found = {}
    for path in (folder / FORMAT).glob(f"*/*/*{fc.SUFFIX}"):
        start, end = (int(t) for t in path.name[:-len(fc.SUFFIX)].split("-"))
        found[start, end] = path
    return found


def read_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        header = f.read(int.from_bytes(f.read(8), "little"))
    return json.loads(header)["__metadata__"]


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """The first run on a volume, with an empty feature cache: (volume, drawn, result, folder,
    segmenter)."""
    vol, lab = synthetic_volume(n=N, h=64, w=80, seed=3)
    drawn = np.zeros_like(lab)
    drawn[DRAWN] = lab[DRAWN]
    folder = tmp_path_factory.mktemp("features")
    seg = new_segmenter(folder)
    result = seg.segment(vol, drawn, {1: "blob"}, options())
    assert result.stats["slices_encoded_this_run"] == N
    assert result.stats["slices_loaded_from_disk"] == 0
    assert result.labels.any() and not result.labels.all()
    return vol, drawn, result, folder, seg


def cache_copy(cold, tmp_path: Path) -> Path:
    folder = tmp_path / "features"
    shutil.copytree(cold[3], folder)
    return folder


def test_a_new_segmenter_loads_every_slice_and_equals_the_cold_run(cold, tmp_path):
    vol, drawn, first, _, _ = cold
    folder = cache_copy(cold, tmp_path)
    assert sorted(batch_files(folder)) == [(s, s + BATCH) for s in range(0, N, BATCH)]
    seg = new_segmenter(folder)
    again = seg.segment(vol, drawn, {1: "blob"}, options())
    assert again.stats["slices_encoded_this_run"] == 0
    assert again.stats["slices_loaded_from_disk"] == N
    assert seg.feature_cache.loaded_batches == N // BATCH
    assert seg.feature_cache.rejected_files == 0
    assert_identical(first, again)


def _damage(files: dict[tuple[int, int], Path]) -> dict[str, tuple[int, int]]:
    """Spoil one batch file each way; which batch got which."""
    ways = dict(zip(["truncated", "flipped byte", "foreign", "other shape", "other dtype"],
                    sorted(files), strict=False))
    path = files[ways["truncated"]]
    path.write_bytes(path.read_bytes()[:-1000])
    path = files[ways["flipped byte"]]
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40  # in the tensor data: header and metadata intact
    path.write_bytes(bytes(data))
    # Another batch's (valid, and left intact) file copied in this one's place.
    shutil.copyfile(files[max(files)], files[ways["foreign"]])
    for way, change in (("other shape", lambda t: t[:, :16].contiguous()),
                        ("other dtype", lambda t: t.float())):
        # Right metadata (key, digest of the tensors it holds), wrong tensors.
        path = files[ways[way]]
        meta = read_metadata(path)
        tensors = load_file(path)
        tensors["s0"] = change(tensors["s0"])
        meta["digest"] = fc._digest(tensors)
        save_file(tensors, path, metadata=meta)
    return ways


def test_damaged_foreign_and_misshapen_files_are_ignored_and_rewritten(cold, tmp_path):
    vol, drawn, first, _, _ = cold
    folder = cache_copy(cold, tmp_path)
    files = batch_files(folder)
    ways = _damage(files)
    seg = new_segmenter(folder)
    disk = seg.feature_cache
    again = seg.segment(vol, drawn, {1: "blob"}, options())
    assert disk.rejected_files == len(ways), ways
    assert again.stats["slices_encoded_this_run"] == BATCH * len(ways)
    assert again.stats["slices_loaded_from_disk"] == N - BATCH * len(ways)
    assert_identical(first, again)
    # Rewritten: a fresh cache (as another process) loads every batch, the spoiled ones too,
    # bit for bit what the run used.
    fresh = FeatureCache(folder, seg.runtime)
    feats = seg.encoder.volume(*model_input(vol), BATCH)
    for start, end in files:
        batch = fresh.load(feats.key, start, end)
        assert batch is not None, (start, end)
        assert torch.equal(batch.top, feats.top[start:end])
        assert torch.equal(batch.s0, feats.s0[start:end])
    assert fresh.rejected_files == 0
    assert not [p for p in folder.rglob("*") if is_temp_name(p.name)]


def model_input(vol: np.ndarray):
    from SlicerSGP.data import preprocess

    slices01 = preprocess.normalize_intensity(
        vol, *preprocess.intensity_range(vol, "percentile"))
    return slices01, preprocess.LetterboxTransform(vol.shape[1], vol.shape[2], SIZE)


def test_each_kind_of_bad_file_is_refused_by_itself(cold, tmp_path):
    """The checks one by one, without a run: each spoiled file loads as None and is counted."""
    folder = cache_copy(cold, tmp_path)
    files = batch_files(folder)
    ways = _damage(files)
    disk = FeatureCache(folder, cold[4].runtime)
    key = _volume_key_of(cold)
    for way, (start, end) in ways.items():
        before = disk.rejected_files
        assert disk.load(key, start, end) is None, way
        assert disk.rejected_files == before + 1, way
    intact = next(b for b in files if b not in ways.values())
    assert disk.load(key, *intact) is not None
    # The same key's batch, but the pos file damaged: not trusted either.
    pos = next((folder / FORMAT).glob(f"*/{fc.POS_NAME}"))
    pos.write_bytes(pos.read_bytes()[:50])
    assert FeatureCache(folder, cold[4].runtime).load(key, *intact) is None


def _volume_key_of(cold) -> str:
    """The stable key the cold run's volume was stored under (its folder's full name is in
    each file's metadata)."""
    return read_metadata(next(iter(batch_files(cold[3]).values())))["volume"]


def test_another_model_never_uses_the_entries(cold, tmp_path):
    vol, drawn, _, _, _ = cold
    folder = cache_copy(cold, tmp_path)
    other = new_segmenter(folder, seed=1)
    result = other.segment(vol, drawn, {1: "blob"}, options(slice_limits={1: [4, 7]}))
    assert result.stats["slices_loaded_from_disk"] == 0
    assert result.stats["slices_encoded_this_run"] == 4
    assert len(list((folder / FORMAT).iterdir())) == 2  # one folder per model
    # Weights changed in place (as fine-tuning does) and the caches cleared: the fingerprint
    # is computed again and the old features are not used.
    seg = new_segmenter(folder)
    key = _volume_key_of(cold)
    assert seg.feature_cache.load(key, 0, BATCH) is not None
    with torch.no_grad():
        next(seg.model.sam.image_encoder.parameters()).add_(1e-3)
    seg.clear_cache()
    assert seg.feature_cache.load(key, 0, BATCH) is None
    result = seg.segment(vol, drawn, {1: "blob"}, options(slice_limits={1: [4, 7]}))
    assert result.stats["slices_loaded_from_disk"] == 0


def test_other_preprocessing_gets_other_keys(cold):
    seg = cold[4]
    vol = cold[0]
    from SlicerSGP.data import preprocess
    from SlicerSGP.method.encoding import stable_volume_key

    slices01 = preprocess.normalize_intensity(vol, *preprocess.intensity_range(vol, "percentile"))
    base = stable_volume_key(slices01, seg.runtime, BATCH)
    assert base == _volume_key_of(cold)  # what the run stored, recomputed: stable
    assert stable_volume_key(slices01, seg.runtime, BATCH + 1) != base  # other alignment
    assert stable_volume_key(slices01 * 0.5, seg.runtime, BATCH) != base  # other window
    assert stable_volume_key(slices01[:-1], seg.runtime, BATCH) != base


def encoded_batch(seg: Segmenter, seed: int):
    images = torch.from_numpy(np.random.default_rng(seed).normal(size=(1, 3, SIZE, SIZE))
                              .astype(np.float32))
    return seg.encoder.encode_images(images, 1)


def test_the_cap_drops_the_least_recently_used_first(cold, tmp_path):
    seg = cold[4]
    a, b, c = (encoded_batch(seg, s) for s in range(3))
    probe = FeatureCache(tmp_path / "probe", seg.runtime)
    probe.save("a", 0, 1, a)
    pos_bytes = (probe._pos_path()).stat().st_size
    one = probe.batch_path("a", 0, 1).stat().st_size
    # Room for the position encoding and two batches, not three.
    cap_mb = (pos_bytes + 2.5 * one) / 2**20
    disk = FeatureCache(tmp_path / "lru", seg.runtime, cap_mb)
    disk.save("a", 0, 1, a)
    time.sleep(0.05)
    disk.save("b", 0, 1, b)
    time.sleep(0.05)
    assert disk.load("a", 0, 1) is not None  # a used: b is now the least recently used
    time.sleep(0.05)
    disk.save("c", 0, 1, c)
    assert not disk.batch_path("b", 0, 1).exists()
    assert not disk.batch_path("b", 0, 1).parent.exists()  # its empty folder too
    assert disk.batch_path("a", 0, 1).exists() and disk.batch_path("c", 0, 1).exists()
    assert disk.usage() <= disk.max_bytes
    assert disk.load("b", 0, 1) is None
    got = disk.load("a", 0, 1)
    for name in ("s0", "s1", "top", "pos", "pooled"):
        x, y = getattr(got, name), getattr(a, name)
        assert torch.equal(x, y) and x.dtype == y.dtype and x.stride() == y.stride(), name
    # Another process's cache of the same folder sees the cap too.
    other = FeatureCache(tmp_path / "lru", seg.runtime, cap_mb)
    other.save("d", 0, 1, a)
    assert other.usage() <= other.max_bytes
    assert other.batch_path("d", 0, 1).exists()


def test_writes_are_atomic(cold, tmp_path, monkeypatch):
    seg = cold[4]
    batch = encoded_batch(seg, 7)
    disk = FeatureCache(tmp_path, seg.runtime)
    final = disk.batch_path("v", 0, 1)
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        src, dst = Path(src), Path(dst)
        # At the rename, the whole file is under the temporary name, nothing under the final.
        replaced.append((src.name, dst, src.parent == dst.parent, dst.exists(),
                         src.stat().st_size))
        real_replace(src, dst)

    monkeypatch.setattr(fc.os, "replace", spy)
    disk.save("v", 0, 1, batch)
    names = {r[1] for r in replaced}
    assert final in names
    tmp_name, _, same_folder, existed, size = next(r for r in replaced if r[1] == final)
    assert tmp_name != final.name and is_temp_name(tmp_name)
    assert same_folder and not existed and size == final.stat().st_size
    monkeypatch.setattr(fc.os, "replace", real_replace)

    # A failure half way through writing leaves neither a final file nor a temporary; the
    # run is not failed by it (the batch is simply not on disk).
    def half_then_fail(f, data, chunk=0):
        f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filesystem, "write_all", half_then_fail)
    disk.save("w", 0, 1, batch)
    assert not disk.batch_path("w", 0, 1).exists()
    assert not [p for p in tmp_path.rglob("*") if is_temp_name(p.name)]
    with pytest.raises(OSError):
        filesystem.atomic_write_bytes(tmp_path / "x.safetensors", b"0123456789")
    assert not list(tmp_path.glob("x.safetensors*")) and not list(tmp_path.glob(".x*"))
    # An interrupt mid-write propagates, and leaves nothing either.
    monkeypatch.setattr(filesystem, "write_all", lambda f, data: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        disk.save("k", 0, 1, batch)
    assert not disk.batch_path("k", 0, 1).exists()
    assert not [p for p in tmp_path.rglob("*") if is_temp_name(p.name)]


def test_temporaries_left_by_a_dead_writer_are_removed_once_stale(cold, tmp_path):
    seg = cold[4]
    disk = FeatureCache(tmp_path, seg.runtime)
    disk.save("v", 0, 1, encoded_batch(seg, 7))
    final = disk.batch_path("v", 0, 1)
    stale, fresh = (filesystem.temp_path(final.with_name(f"{n}{fc.SUFFIX}")) for n in ("1-2", "2-3"))
    for tmp in (stale, fresh):
        tmp.write_bytes(b"half a file")
    old = time.time() - fc.STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    listed = [p for _, _, p in disk.files()]
    assert final in listed and stale not in listed and fresh not in listed
    assert not stale.exists() and fresh.exists() and final.exists()


def test_bad_options_are_refused_before_the_model_loads(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    img, lab = tmp_path / "image.nrrd", tmp_path / "labels.nrrd"
    io.write_volume(img, np.zeros((4, 32, 32), np.float32), Geometry())
    drawn = np.zeros((4, 32, 32), np.uint8)
    drawn[1, 10:20, 10:20] = 1
    sitk.WriteImage(io.sitk_from_array(drawn, Geometry()), str(lab))
    base = ["segment", str(img), "--labels", str(lab), "--out", str(tmp_path / "o.seg.nrrd"),
            "--weights", "random", "--device", "cpu", "--quiet"]
    for extra, words in (
            (["--feature-cache", str(a_file / "sub")], ["is a file", "folder"]),
            (["--feature-cache", str(tmp_path / "ok"), "--feature-cache-mb", "0"],
             ["--feature-cache-mb", "positive"]),
            (["--feature-cache-mb", "100"], ["--feature-cache DIR"]),
            (["--feature-cache", str(tmp_path / "ok"), "--server", "http://127.0.0.1:9"],
             ["sgp serve --feature-cache"])):
        t0 = time.perf_counter()
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert all(w in err for w in words), (extra, err)
        assert time.perf_counter() - t0 < 20  # no model was built
    with pytest.raises(Exception, match="positive"):
        Segmenter("tiny", weights="random", device="cpu", image_size=SIZE,
                  feature_cache=tmp_path / "ok", feature_cache_mb=float("nan"))


def test_help_documents_the_options(capsys):
    for command in ("segment", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--feature-cache DIR" in text and "--feature-cache-mb N" in text, command
        assert "least recently used" in text
    from SlicerSGP.cli.common import FEATURE_CACHE_MB

    assert FEATURE_CACHE_MB == fc.DEFAULT_FEATURE_CACHE_MB  # --help names the engine's default
    docs = (REPO / "docs" / "command-line.md").read_text()
    assert "--feature-cache" in docs


def test_the_slicer_module_starts_its_engine_with_a_feature_cache(tmp_path):
    """serveArguments (Slicer's process: no torch) names a folder in the user's cache, and
    `sgp serve` accepts what it gives."""
    code = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[2], sys.argv[3]]\n"
            "import slicer_i18n; slicer_i18n.install()\n"
            "from SGPSegmentLib.engine_connection import ModelSettings\n"
            "print(json.dumps([ModelSettings(weights='random').serveArguments(),"
            " 'torch' in sys.modules]))\n")
    env = {**os.environ, "SGP_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "SGPSegment"), str(REPO),
                           str(REPO / "Testing")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    args, imported_torch = json.loads(proc.stdout)
    assert not imported_torch
    assert args[args.index("--feature-cache") + 1] == str(tmp_path / "cache" / "features")
    parsed = build_parser().parse_args(["serve", *args])
    assert parsed.feature_cache == tmp_path / "cache" / "features"
    assert parsed.feature_cache_mb > 0


def test_a_second_sgp_segment_process_encodes_nothing(tmp_path):
    vol, lab = synthetic_volume(n=8, h=48, w=64, seed=4)
    drawn = np.zeros_like(lab)
    drawn[3] = lab[3]
    img, lab_path = tmp_path / "image.nrrd", tmp_path / "labels.nrrd"
    io.write_volume(img, vol, Geometry())
    sitk.WriteImage(io.sitk_from_array(drawn, Geometry()), str(lab_path))
    cache = tmp_path / "features"

    def run(name: str) -> tuple[str, Path, Path]:
        out, probs = tmp_path / f"{name}.seg.nrrd", tmp_path / f"{name}_p"
        proc = subprocess.run(
            [sys.executable, "-m", "SlicerSGP.cli", "segment", str(img), "--labels",
             str(lab_path), "--out", str(out), "--probabilities", str(probs),
             "--feature-cache", str(cache), "--feature-cache-mb", "64", "--weights", "random",
             "--image-size", str(SIZE), "--device", "cpu", "--dtype", "float32",
             "--stop-after-absent", "0", "--batch-size", "4", "--quiet"],
            capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout, out, probs

    first, out1, p1 = run("first")
    second, out2, p2 = run("second")
    assert "slice features: 8 slices encoded, 0 loaded" in first
    assert "slice features: 0 slices encoded, 8 loaded" in second
    assert np.array_equal(read_back(out1)[0], read_back(out2)[0])
    prob = "label_1_probability.nrrd"
    assert np.array_equal(io.read_image(p1 / prob)[0], io.read_image(p2 / prob)[0])
