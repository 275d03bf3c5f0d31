"""The support library (engine side and `sgp support`): saved sets keep each structure's own
slices and the engine's intensity window; save/list/rename/export/delete/import round-trips
byte for byte; damaged or hostile zips are refused and leave nothing; a set gives the same
segmentation as its imported copy, through the API and through `sgp segment --support-bank`.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from project.test_layout import imports_torch
from synthetic import make_objects_visible, synthetic_volume

from SlicerSGP.cli import main
from SlicerSGP.data import io
from SlicerSGP.data.intensity import intensity_range, normalize_intensity
from SlicerSGP.data.support_library import (
    MANIFEST,
    SupportLibrary,
    default_root,
    resolve_support_bank,
)
from SlicerSGP.errors import SGPInputError
from SlicerSGP.types import Geometry, SegmentOptions

GEOM = Geometry(origin=(10.0, -20.0, 5.0), spacing=(0.8, 0.9, 2.5),
                direction=(0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # fmt: skip
FAST = ["--weights", "random", "--image-size", "256", "--device", "cpu", "--quiet"]
BLOB_SLICES, CORNER_SLICES = [1, 4], [2]


def drawn_case(seed: int = 0, n: int = 6):
    """A volume with a blob (1) drawn on slices 1 and 4 and a bright corner (2) drawn on slice 2
    only (it is also visible, undrawn, on every other slice)."""
    vol, truth = synthetic_volume(n=n, seed=seed)
    vol[:, 5:20, 5:25] += 60.0
    masks = {1: truth.astype(bool), 2: np.zeros(vol.shape, bool)}
    masks[2][:, 5:20, 5:25] = True
    lab = np.zeros(vol.shape, np.uint8)
    for k in BLOB_SLICES:
        lab[k][masks[1][k]] = 1
    for k in CORNER_SLICES:
        lab[k][masks[2][k]] = 2
    return vol, lab


def save_case(lib: SupportLibrary, name: str, seed: int = 0, **options):
    vol, lab = drawn_case(seed)
    slices = {1: BLOB_SLICES, 2: CORNER_SLICES}
    return lib.save(name, vol, {1: lab == 1, 2: lab == 2}, slices, geometry=GEOM,
                    names={1: "blob", 2: "corner"}, colors={1: (1.0, 0.0, 0.0)},
                    source="case0", **options)  # fmt: skip


def contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def entries(root: Path) -> list[str]:
    """Everything in the library folder, hidden temporaries included."""
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.fixture
def lib(tmp_path) -> SupportLibrary:
    return SupportLibrary(tmp_path / "library")


# ------------------------------------------------------------------------------ library


def test_save_list_rename_export_delete_import_round_trips_byte_for_byte(lib, tmp_path):
    summary = save_case(lib, "Abdomen CT", description="two structures")
    assert summary.structures == {1: "blob", 2: "corner"}
    assert summary.slices == {1: 2, 2: 1} and summary.size > 0 and summary.created
    assert [s.name for s in lib.list()] == ["Abdomen CT"]
    assert lib.path("abdomen ct") == lib.root / "Abdomen CT"  # names ignore letter case

    renamed = lib.rename("Abdomen CT", "liver set")
    assert renamed.name == "liver set" and lib.names() == ["liver set"]
    assert json.loads((renamed / MANIFEST).read_text())["name"] == "liver set"
    before = contents(renamed)
    items_before, _ = lib.load("liver set")

    zip_a = lib.export_zip("liver set", tmp_path / "out" / "liver.zip")
    zip_b = lib.export_zip("liver set", tmp_path / "out" / "again.zip")
    assert zip_a.read_bytes() == zip_b.read_bytes()  # the same set exports to the same bytes
    lib.delete("liver set")
    assert entries(lib.root) == []

    imported = lib.import_zip(zip_a)
    assert imported.name == "liver set"
    assert contents(lib.path("liver set")) == before
    items_after, _ = lib.load("liver set")
    for v in (1, 2):
        for a, b in zip(items_before[v], items_after[v], strict=True):
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.mask, b.mask)
    copy = lib.import_zip(zip_a, name="copy")
    assert copy.name == "copy" and lib.names() == ["copy", "liver set"]
    assert json.loads((copy.path / MANIFEST).read_text())["name"] == "copy"


def test_names_clashes_and_overwrite(lib, tmp_path):
    save_case(lib, "a")
    for bad in ("", "../x", "a/b", ".hidden", "x" * 101, "con:"):
        with pytest.raises(SGPInputError, match="not allowed"):
            save_case(lib, bad)
    with pytest.raises(SGPInputError, match="already exists"):
        save_case(lib, "A")
    assert entries(lib.root) == ["a"]
    save_case(lib, "b", description="second")
    with pytest.raises(SGPInputError, match="already exists"):
        lib.rename("a", "B")
    lib.rename("a", "A")  # only the letter case changes
    assert lib.names() == ["A", "b"]
    zipped = lib.export_zip("b", tmp_path / "b.zip")
    with pytest.raises(SGPInputError, match="already exists"):
        lib.import_zip(zipped, name="A")
    lib.import_zip(zipped, name="a", overwrite=True)
    assert lib.names() == ["a", "b"] and entries(lib.root) == ["a", "b"]
    assert lib.show("a")["description"] == "second"
    with pytest.raises(SGPInputError, match="No support set named 'zzz'"):
        lib.path("zzz")
    with pytest.raises(SGPInputError, match=r"exists; choose another file"):
        lib.export_zip("a", zipped)


def _rewrite_zip(src: Path, dst: Path, edit) -> Path:
    """Copy an exported zip member by member through ``edit(name, data) -> [(name, data)]``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            for name, data in edit(info.filename, zin.read(info)):
                zout.writestr(name, data)
    return dst


def _flip_byte(name, data):
    if name.endswith("01_blob/image.nrrd"):
        data = data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]
    return [(name, data)]


def _traversal(name, data):
    if name != MANIFEST:
        return [(name, data)]
    manifest = json.loads(data)
    manifest["files"]["../evil.txt"] = {"sha256": "0" * 64, "size": 4}
    return [(name, json.dumps(manifest)), ("../evil.txt", b"evil")]


def _manifest_data(edit):
    def apply(name, data):
        if name != MANIFEST:
            return [(name, data)]
        manifest = json.loads(data)
        edit(manifest)
        return [(name, json.dumps(manifest))]

    return apply


HOSTILE = {
    "bad sha256": (_flip_byte, "does not match its sha256"),
    "path traversal": (_traversal, "would leave its folder"),
    "absolute path": (lambda n, d: [(n, d)] + ([("/tmp/abs.txt", b"x")] if n == MANIFEST else []),
                      "would leave its folder"),
    "missing manifest": (lambda n, d: [] if n == MANIFEST else [(n, d)], "has no sgp-support"),
    "unlisted file": (lambda n, d: [(n, d)] + ([("extra.txt", b"x")] if n == MANIFEST else []),
                      "not listed: \\['extra.txt'\\]"),
    "missing file": (lambda n, d: [] if n.endswith("labels.json") else [(n, d)],
                     "missing: \\['labels.json'\\]"),
    "wrong size": (_manifest_data(lambda m: m["files"]["labels.json"].update(size=3)),
                   "its manifest says 3"),
    "not a manifest": (_manifest_data(lambda m: m.update(format="other")), "not a support set"),
    "image that does not load": (  # a consistent manifest over garbage image bytes
        lambda n, d: [(n, b"garbage" if n.endswith("02_corner/image.nrrd") else d)], None),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_damaged_or_hostile_zips_are_refused_and_leave_nothing(lib, tmp_path, case):
    save_case(lib, "good")
    exported = lib.export_zip("good", tmp_path / "good.zip")
    edit, message = HOSTILE[case]
    if case == "image that does not load":  # re-hash, so only the image content is wrong
        bad = _rewrite_zip(exported, tmp_path / "stage.zip", edit)
        import hashlib

        def fix(name, data):
            if name != MANIFEST:
                return [(name, data)]
            m = json.loads(data)
            with zipfile.ZipFile(bad) as z:
                blob = z.read("02_corner/image.nrrd")
            m["files"]["02_corner/image.nrrd"] = {"sha256": hashlib.sha256(blob).hexdigest(),
                                                  "size": len(blob)}  # fmt: skip
            return [(name, json.dumps(m))]

        bad = _rewrite_zip(bad, tmp_path / "bad.zip", fix)
        message = "02_corner cannot be read"
    else:
        bad = _rewrite_zip(exported, tmp_path / "bad.zip", edit)
    before = entries(lib.root)
    with pytest.raises(SGPInputError, match=message):
        lib.import_zip(bad, name="new")
    assert entries(lib.root) == before == ["good"]
    assert not (tmp_path / "evil.txt").exists() and not (lib.root / "evil.txt").exists()
    assert main(["support", "import", str(bad), "--name", "new", "--library", str(lib.root)]) == 2
    assert entries(lib.root) == ["good"]


def test_not_a_zip_is_refused(lib, tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK not really")
    with pytest.raises(SGPInputError, match="is not a zip file"):
        lib.import_zip(junk)
    assert entries(lib.root) == []


def test_a_damaged_set_on_disk_is_reported(lib):
    path = save_case(lib, "s").path
    (path / "01_blob" / "labels.nrrd").write_bytes(b"changed")
    with pytest.raises(SGPInputError, match="damaged: 01_blob/labels.nrrd does not match"):
        io.load_support_sets(path)


def test_default_root_and_resolving_names(tmp_path, monkeypatch):
    monkeypatch.setenv("SGP_SUPPORT_LIBRARY", str(tmp_path / "env"))
    assert default_root() == tmp_path / "env"
    monkeypatch.delenv("SGP_SUPPORT_LIBRARY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "slicersgp" / "support"
    monkeypatch.setenv("XDG_DATA_HOME", "relative")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".local" / "share" / "slicersgp" / "support"

    lib = SupportLibrary(tmp_path / "lib")
    saved = save_case(lib, "set one").path
    assert resolve_support_bank("SET ONE", lib) == saved
    assert resolve_support_bank(tmp_path, lib) == tmp_path  # a folder stays a folder
    with pytest.raises(SGPInputError, match=r"neither a folder nor a support set .*set one"):
        resolve_support_bank("nope", lib)


def test_library_modules_do_not_import_torch():
    for module in ("SlicerSGP.data.support_library", "SlicerSGP.data.support_set"):
        assert not imports_torch(module), f"{module} loads torch"


# ------------------------------------------------------------------------------ content


def test_support_semantics_an_undrawn_structure_is_not_taught_absent(lib, tmp_path):
    save_case(lib, "s")
    bank = io.load_support_sets(lib.path("s"))
    # The corner is visible but undrawn on slices 1 and 4: it gets no item from them.
    assert [it.source.split()[-1] for it in bank[2]] == ["2"]
    assert [it.source.split()[-1] for it in bank[1]] == ["1", "4"]
    assert all(it.mask.any() for v in (1, 2) for it in bank[v])

    # The set is a plain bank too (no manifest): still no "absent" item across structures.
    plain = tmp_path / "plain"
    shutil.copytree(lib.path("s"), plain)
    (plain / MANIFEST).unlink()
    legacy = io.load_support_sets(plain)
    assert len(legacy[2]) == 1 and legacy[2][0].mask.any()
    assert io.support_bank_names(plain) == {1: "blob", 2: "corner"}

    # What the set avoids: the same drawn slices as one labeled case teach "corner absent".
    vol, lab = drawn_case()
    case = tmp_path / "case"
    case.mkdir()
    io.write_volume(case / "image.nrrd", vol, GEOM)
    sitk.WriteImage(io.sitk_from_array(lab, GEOM), str(case / "labels.nrrd"))
    naive = io.load_support_sets(case)
    assert any(not it.mask.any() for it in naive[2])


def test_a_slice_drawn_empty_for_a_structure_teaches_absence_for_it_only(lib):
    vol, lab = drawn_case()
    lib.save("e", vol, {1: lab == 1, 2: lab == 2}, {1: [1, 3, 4], 2: [2]})
    manifest = lib.show("e")
    assert manifest["structures"][0]["empty_slices"] == [3]
    bank = io.load_support_sets(lib.path("e"))
    assert [bool(it.mask.any()) for it in bank[1]] == [True, False, True]
    assert len(bank[2]) == 1


def test_slices_are_mapped_with_the_window_the_engine_used_on_the_source(lib):
    rng = np.random.default_rng(3)
    ct = rng.normal(-700.0, 200.0, (8, 40, 48)).astype(np.int16)  # CT-like, in HU
    ct[:, 10:30, 10:30] = rng.normal(-650.0, 50.0, (8, 20, 20)).astype(np.int16)
    ct[0, 0, 0], ct[0, 0, 1] = -1024, 1500
    masks = {1: np.zeros(ct.shape, bool)}
    masks[1][:, 12:28, 12:28] = True
    lib.save("lung", ct, masks, {1: [2, 6]}, axis=0, geometry=GEOM)
    drawn = ct[[2, 6]][masks[1][[2, 6]]]
    window = intensity_range(ct, "auto", drawn=drawn)
    assert window == (-1350.0, 150.0)  # the lung window, chosen from the drawn voxels
    items = io.load_support_sets(lib.path("lung"))[1]
    expected = normalize_intensity(ct, *window)
    for item, k in zip(items, (2, 6), strict=True):
        np.testing.assert_array_equal(item.image, expected[k])
    # another mode maps with its window over the whole source volume, not just the saved slices
    pct = io.load_support_sets(lib.path("lung"), intensity="percentile")[1]
    np.testing.assert_array_equal(
        pct[0].image, normalize_intensity(ct, *intensity_range(ct, "percentile"))[2]
    )
    m = lib.show("lung")
    assert m["geometry"]["spacing"] == [0.8, 0.9, 2.5] and m["shape"] == [8, 40, 48]
    stored = sitk.ReadImage(str(lib.path("lung") / "01_label_1" / "image.nrrd"))
    assert stored.GetSpacing() == (0.8, 0.9, 2.5)
    raw = sitk.GetArrayFromImage(stored)  # the set's own NRRD writer, read by SimpleITK
    assert raw.dtype == np.int16
    np.testing.assert_array_equal(raw, ct[[2, 6]])  # raw intensities kept


def test_rgb_sets(lib):
    rgb = (np.random.default_rng(2).random((4, 32, 40, 3)) * 255).astype(np.uint8)
    masks = {1: np.zeros(rgb.shape[:3], bool)}
    masks[1][:, 8:20, 8:20] = True
    lib.save("rgb", rgb, masks, {1: [0, 3]})
    items = io.load_support_sets(lib.path("rgb"))[1]
    assert [it.image.shape for it in items] == [(32, 40, 3)] * 2
    np.testing.assert_array_equal(items[1].image, normalize_intensity(rgb[3], 0.0, 255.0))
    stored = sitk.ReadImage(str(lib.path("rgb") / "01_label_1" / "image.nrrd"))
    assert stored.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), rgb[[0, 3]])


def test_saving_along_another_axis(lib):
    vol, lab = drawn_case()
    masks = {1: np.zeros(vol.shape, bool)}
    masks[1][:, 40:60, 50:70] = True
    lib.save("sag", vol, masks, {1: [55, 60]}, axis=2, geometry=GEOM)
    items = io.load_support_sets(lib.path("sag"), axis=0)[1]  # the query's axis does not matter
    assert [it.image.shape for it in items] == [vol[:, :, 0].shape] * 2
    np.testing.assert_array_equal(items[1].mask, masks[1][:, :, 60])
    stored = sitk.ReadImage(str(lib.path("sag") / "01_label_1" / "image.nrrd"))
    assert stored.GetSpacing() == (0.9, 2.5, 0.8)  # columns J, rows K, slices I


def test_bad_saves_name_the_problem_and_leave_nothing(lib):
    vol, lab = drawn_case()
    with pytest.raises(SGPInputError, match="no voxels on its drawn slices"):
        lib.save("x", vol, {2: lab == 2}, {2: [1, 4]})
    with pytest.raises(SGPInputError, match="outside the volume"):
        lib.save("x", vol, {1: lab == 1}, {1: [1, 40]})
    with pytest.raises(SGPInputError, match="Unknown intensity mode"):
        lib.save("x", vol, {1: lab == 1}, {1: [1]}, intensity="bright")
    assert entries(lib.root) == []


# ------------------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
def segmenter():
    from SlicerSGP.method.segmenter import Segmenter  # torch: only for these tests

    seg = Segmenter("tiny", weights="random", device="cpu", image_size=256, seed=0)
    make_objects_visible(seg.model.sam)
    return seg


def test_imported_set_segments_a_new_case_exactly_as_the_original(lib, tmp_path, segmenter):
    save_case(lib, "orig")
    other = SupportLibrary(tmp_path / "elsewhere")
    other.import_zip(lib.export_zip("orig", tmp_path / "orig.zip"))
    query, _ = drawn_case(seed=7)
    results = []
    for library in (lib, other):
        bank = io.load_support_sets(library.path("orig"))
        results.append(segmenter.segment(query, None, {1: "blob", 2: "corner"},
                                         SegmentOptions(), support_bank=bank))  # fmt: skip
    a, b = results
    assert a.labels.any(), "the support set produced nothing to compare"
    np.testing.assert_array_equal(a.labels, b.labels)
    for v in (1, 2):
        np.testing.assert_array_equal(a.probabilities[v], b.probabilities[v])


def test_sgp_support_save_then_sgp_segment_by_name_matches_the_api(tmp_path, monkeypatch, capsys):
    from SlicerSGP.method.segmenter import Segmenter

    monkeypatch.setenv("SGP_SUPPORT_LIBRARY", str(tmp_path / "lib"))
    vol, lab = drawn_case()
    io.write_volume(tmp_path / "image.nrrd", vol, GEOM)
    sitk.WriteImage(io.sitk_from_array(lab, GEOM), str(tmp_path / "labels.nrrd"))
    (tmp_path / "labels.json").write_text(json.dumps({"1": "blob", "2": "corner"}))
    assert main(["support", "save", "my set", str(tmp_path / "image.nrrd"),
                 "--labels", str(tmp_path / "labels.nrrd")]) == 0  # fmt: skip
    assert "saved support set 'my set'" in capsys.readouterr().out
    lib = SupportLibrary()
    saved = lib.show("my set")["structures"]
    assert [s["slices"] for s in saved] == [BLOB_SLICES, CORNER_SLICES]  # each its own slices

    query, _ = drawn_case(seed=7)
    io.write_volume(tmp_path / "query.nrrd", query, GEOM)
    outs = {}
    for how, bank_arg in (("name", "my set"), ("folder", str(lib.path("my set")))):
        out, prob = tmp_path / f"{how}.seg.nrrd", tmp_path / f"prob_{how}"
        rc = main(["segment", str(tmp_path / "query.nrrd"), "--support-bank", bank_arg,
                   "--out", str(out), "--probabilities", str(prob), *FAST])  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        outs[how] = (io.read_labels(out)[0], io.read_image(prob / "blob_probability.nrrd")[0])

    bank = io.load_support_sets(lib.path("my set"))
    ref = Segmenter("tiny", weights="random", device="cpu", image_size=256, seed=0).segment(
        query, None, {1: "blob", 2: "corner"}, SegmentOptions(), support_bank=bank
    )
    for labels, prob in outs.values():
        np.testing.assert_array_equal(labels, ref.labels)
        np.testing.assert_allclose(prob, ref.probabilities[1], atol=1e-6)
    assert float(ref.probabilities[1].max()) > 0.0


# ------------------------------------------------------------------------------ CLI


def test_cli_save_with_slices_list_show_rename_export_import_delete(tmp_path, capsys):
    library = ["--library", str(tmp_path / "lib")]
    vol, _ = drawn_case()
    full = np.zeros(vol.shape, np.uint8)  # a fully labeled case
    full[:, 30:60, 40:90] = 1
    full[:, 5:20, 5:25] = 2
    full[3, 5:20, 5:25] = 0  # the corner really absent on slice 3
    io.write_volume(tmp_path / "image.nrrd", vol, GEOM)
    sitk.WriteImage(io.sitk_from_array(full, GEOM), str(tmp_path / "labels.nrrd"))
    assert main(["support", "save", "full", str(tmp_path / "image.nrrd"), "--labels",
                 str(tmp_path / "labels.nrrd"), "--slices", "0,3", "--structure-slices",
                 "2:3,5", *library]) == 0  # fmt: skip
    lib = SupportLibrary(tmp_path / "lib")
    s = lib.show("full")["structures"]
    assert (s[0]["slices"], s[1]["slices"], s[1]["empty_slices"]) == ([0, 3], [3, 5], [3])

    assert main(["support", "list", *library]) == 0
    assert "full" in capsys.readouterr().out
    assert main(["support", "show", "FULL", *library]) == 0
    assert "sha256 checked" in capsys.readouterr().out
    assert main(["support", "rename", "full", "renamed", *library]) == 0
    assert main(["support", "export", "renamed", str(tmp_path / "r.zip"), *library]) == 0
    assert main(["support", "delete", "renamed", *library]) == 0
    assert lib.names() == []
    assert main(["support", "import", str(tmp_path / "r.zip"), *library]) == 0
    assert lib.names() == ["renamed"]
    capsys.readouterr()
    assert main(["support", "import", str(tmp_path / "r.zip"), *library]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["support", "delete", "nothing", *library]) == 2
    bad = ["support", "save", "x", str(tmp_path / "image.nrrd"), "--labels",
           str(tmp_path / "labels.nrrd"), "--structure-slices", "2:x", *library]  # fmt: skip
    assert main(bad) == 2
    assert "give VALUE:LIST" in capsys.readouterr().err
