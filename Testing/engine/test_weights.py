"""Checkpoint registry, cache, download, verification and loading (no network)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from SlicerSGP import weights as W
from SlicerSGP import weights_registry as WR
from SlicerSGP.cli import weights as CW
from SlicerSGP.errors import SGPInputError, SGPWeightsError
from SlicerSGP.filesystem import is_temp_name


class _NotATensor:
    pass


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_checkpoint(path: Path, n: int = 1000) -> Path:
    torch.save({"model": {"w": torch.arange(n, dtype=torch.float32)}}, path)
    return path


def _info_for(path: Path, name: str = "tiny", *, sha256: str | None = "real") -> W.CheckpointInfo:
    real = W.REGISTRY[name]
    return W.CheckpointInfo(
        name=real.name,
        config=real.config,
        url=path.as_uri(),
        size=path.stat().st_size,
        sha256=_sha(path) if sha256 == "real" else sha256,
        filename=real.filename,
    )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SGP_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def fake_tiny(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> W.CheckpointInfo:
    """Replace the registry's tiny entry by a small real torch file served from file://."""
    (tmp_path / "src").mkdir()
    info = _info_for(_fake_checkpoint(tmp_path / "src" / "upstream.pt"))
    monkeypatch.setitem(W.REGISTRY, "tiny", info)
    return info


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sgp")
    CW.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- registry


def test_registry_has_the_four_official_checkpoints() -> None:
    assert list(W.REGISTRY) == ["tiny", "small", "base_plus", "large"]
    base = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
    expected = {
        "tiny": (
            "t",
            156008466,
            "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
        ),
        "small": (
            "s",
            184416285,
            "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
        ),
        "base_plus": ("b+", 323606802, None),
        "large": ("l", 898083611, None),
    }
    for name, (short, size, sha) in expected.items():
        info = W.REGISTRY[name]
        assert info.name == name
        assert info.config == f"configs/sam2.1/sam2.1_hiera_{short}.yaml"
        assert info.filename == f"sam2.1_hiera_{name}.pt"
        assert info.url == base + info.filename
        assert info.size == size
        assert info.sha256 == sha
    with pytest.raises(AttributeError):
        W.REGISTRY["tiny"].size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("tiny", "tiny"),
        ("t", "tiny"),
        ("T", "tiny"),
        ("sam2.1_hiera_tiny", "tiny"),
        ("sam2.1_hiera_tiny.pt", "tiny"),
        ("s", "small"),
        ("sam2.1_hiera_small", "small"),
        ("b+", "base_plus"),
        ("base+", "base_plus"),
        ("base_plus", "base_plus"),
        ("sam2.1_hiera_b+", "base_plus"),
        ("configs/sam2.1/sam2.1_hiera_b+.yaml", "base_plus"),
        ("l", "large"),
        ("large", "large"),
        ("sam2.1_hiera_large", "large"),
    ],
)
def test_alias_resolution(alias: str, name: str) -> None:
    assert W.resolve_model_name(alias).name == name


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(SGPInputError) as err:
        W.resolve_model_name("huge")
    msg = str(err.value)
    assert "'huge'" in msg
    for name in ("tiny", "small", "base_plus", "large"):
        assert name in msg


# ---------------------------------------------------------------------------- cache folder


def test_cache_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a" / "b"
    monkeypatch.setenv("SGP_CACHE_DIR", str(target))
    assert W.cache_dir() == target
    assert target.is_dir()
    assert W.cached_checkpoint_path("l") == target / "sam2.1_hiera_large.pt"


def test_cache_dir_xdg_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SGP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert W.cache_dir() == tmp_path / "xdg" / "slicersgp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert W.cache_dir() == tmp_path / "home" / ".cache" / "slicersgp"


# ---------------------------------------------------------------------------- download


def test_download_file_url_gives_verified_file(tmp_path: Path, fake_tiny: W.CheckpointInfo) -> None:
    calls: list[tuple[int, int]] = []
    dest = tmp_path / "dest"
    out = W.download_checkpoint(
        fake_tiny,
        dest,
        progress=False,
        chunk=257,
        progress_callback=lambda done, total: calls.append((done, total)),
    )
    assert out == dest / "sam2.1_hiera_tiny.pt"
    assert out.read_bytes() == Path(fake_tiny.url.removeprefix("file://")).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == [out.name, out.name + ".verified"]
    assert len(calls) > 1 and calls[-1] == (fake_tiny.size, fake_tiny.size)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    sidecar = json.loads((dest / "sam2.1_hiera_tiny.pt.verified").read_text())
    assert sidecar["sha256"] == fake_tiny.sha256 and sidecar["size"] == fake_tiny.size
    W.verify_checkpoint(out, fake_tiny)
    assert W.load_sam2_state_dict(out)["w"].shape == (1000,)


def test_download_default_goes_to_cache(cache: Path, fake_tiny: W.CheckpointInfo) -> None:
    out = W.download_checkpoint(fake_tiny, progress=False)
    assert out == cache / fake_tiny.filename and out.is_file()


def test_download_truncated_source_fails_and_leaves_nothing(tmp_path: Path, cache: Path) -> None:
    src = _fake_checkpoint(tmp_path / "full.pt")
    info = _info_for(src)
    short = tmp_path / "short.pt"
    short.write_bytes(src.read_bytes()[: info.size // 2])
    dest = tmp_path / "dest"
    with pytest.raises(SGPWeightsError) as err:
        W.download_checkpoint(info, dest, progress=False, url=short.as_uri())
    msg = str(err.value)
    assert f"{info.size:,}" in msg and f"{info.size // 2:,}" in msg
    assert "--weights" in msg and "offline" in msg
    assert not dest.exists() or list(dest.iterdir()) == []


def test_download_oversized_source_stops(tmp_path: Path) -> None:
    src = _fake_checkpoint(tmp_path / "full.pt")
    info = _info_for(src)
    big = tmp_path / "big.pt"
    big.write_bytes(src.read_bytes() * 3)
    dest = tmp_path / "dest"
    with pytest.raises(SGPWeightsError, match="more than the expected"):
        W.download_checkpoint(info, dest, progress=False, url=big.as_uri(), chunk=64)
    assert list(dest.iterdir()) == []


def test_download_unreachable_url_gives_offline_hint(tmp_path: Path, cache: Path) -> None:
    src = _fake_checkpoint(tmp_path / "full.pt")
    info = _info_for(src)
    dest = tmp_path / "dest"
    with pytest.raises(SGPWeightsError) as err:
        W.download_checkpoint(info, dest, progress=False, url=(tmp_path / "nope.pt").as_uri())
    msg = str(err.value)
    assert "offline" in msg
    assert "--weights /path/to/sam2.1_hiera_tiny.pt" in msg
    assert "sgp weights fetch tiny --file" in msg
    assert list(dest.iterdir()) == []


def test_download_sha256_mismatch_detected(tmp_path: Path) -> None:
    src = _fake_checkpoint(tmp_path / "full.pt")
    info = _info_for(src, sha256="0" * 64)
    dest = tmp_path / "dest"
    with pytest.raises(SGPWeightsError, match="sha256"):
        W.download_checkpoint(info, dest, progress=False)
    assert list(dest.iterdir()) == []


def test_download_keeps_valid_file_and_replaces_bad_one(
    tmp_path: Path, fake_tiny: W.CheckpointInfo
) -> None:
    dest = tmp_path / "dest"
    out = W.download_checkpoint(fake_tiny, dest, progress=False)
    mtime = out.stat().st_mtime_ns
    # A valid file is not fetched again: a broken URL must not matter.
    W.download_checkpoint(fake_tiny, dest, progress=False, url="file:///nonexistent/x.pt")
    assert out.stat().st_mtime_ns == mtime
    with pytest.raises(SGPWeightsError):
        W.download_checkpoint(
            fake_tiny, dest, progress=False, force=True, url="file:///nonexistent/x.pt"
        )
    assert out.is_file()  # a failed forced download leaves the good file alone
    out.write_bytes(b"x" * 10)
    W.download_checkpoint(fake_tiny, dest, progress=False)
    assert out.stat().st_size == fake_tiny.size


# ---------------------------------------------------------------------------- verification


def test_verify_size_mismatch_names_file_and_fix(tmp_path: Path) -> None:
    src = _fake_checkpoint(tmp_path / "full.pt")
    info = _info_for(src)
    short = tmp_path / "sam2.1_hiera_tiny.pt"
    short.write_bytes(src.read_bytes()[:100])
    with pytest.raises(SGPWeightsError) as err:
        W.verify_checkpoint(short, info)
    msg = str(err.value)
    assert str(short) in msg
    assert "100 bytes" in msg and f"{info.size:,} bytes" in msg
    assert "truncated" in msg and "sgp weights fetch tiny --force" in msg


def test_verify_sha256_mismatch(tmp_path: Path) -> None:
    src = _fake_checkpoint(tmp_path / "full.pt")
    info = _info_for(src, sha256="ab" * 32)
    with pytest.raises(SGPWeightsError) as err:
        W.verify_checkpoint(src, info)
    assert "ab" * 32 in str(err.value) and _sha(src) in str(err.value)


def test_verify_size_only_entry_skips_hash(tmp_path: Path, monkeypatch) -> None:
    src = _fake_checkpoint(tmp_path / "full.pt")
    info = _info_for(src, "large", sha256=None)
    monkeypatch.setattr(WR, "file_sha256", lambda *a, **k: pytest.fail("hashed"))
    W.verify_checkpoint(src, info)
    src.write_bytes(src.read_bytes() + b"x")
    with pytest.raises(SGPWeightsError, match="bytes"):
        W.verify_checkpoint(src, info)


def test_sidecar_makes_second_verify_instant_and_is_invalidated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _fake_checkpoint(tmp_path / "ck.pt")
    info = _info_for(src)
    hashed: list[int] = []
    real_sha256 = hashlib.sha256

    def counting_sha256(*a):
        hashed.append(1)
        return real_sha256(*a)

    monkeypatch.setattr(hashlib, "sha256", counting_sha256)
    W.verify_checkpoint(src, info)
    assert len(hashed) == 1
    assert (tmp_path / "ck.pt.verified").is_file()
    W.verify_checkpoint(src, info)
    assert len(hashed) == 1  # served from the sidecar

    # Same size, different bytes, newer mtime: must be re-hashed and rejected.
    data = bytearray(src.read_bytes())
    data[-30] ^= 0xFF
    src.write_bytes(bytes(data))
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    with pytest.raises(SGPWeightsError, match="sha256"):
        W.verify_checkpoint(src, info)
    assert len(hashed) == 2


def test_stale_sidecar_with_forged_hash_is_ignored(tmp_path: Path) -> None:
    src = _fake_checkpoint(tmp_path / "ck.pt")
    info = _info_for(src, sha256="cd" * 32)
    sidecar = tmp_path / "ck.pt.verified"
    sidecar.write_text(json.dumps({"size": info.size, "mtime_ns": 1, "sha256": "cd" * 32}))
    with pytest.raises(SGPWeightsError, match="sha256"):
        W.verify_checkpoint(src, info)


# ---------------------------------------------------------------------------- import


def test_import_copies_verified_file(tmp_path: Path, fake_tiny: W.CheckpointInfo, cache) -> None:
    local = Path(fake_tiny.url.removeprefix("file://"))
    out = W.import_checkpoint(local, fake_tiny, progress=False)
    assert out == cache / fake_tiny.filename
    assert out.read_bytes() == local.read_bytes()
    assert not [p for p in cache.iterdir() if is_temp_name(p.name)]


def test_import_wrong_file_rejected(tmp_path: Path, fake_tiny: W.CheckpointInfo, cache) -> None:
    other = _fake_checkpoint(tmp_path / "other.pt", n=10)
    with pytest.raises(SGPWeightsError, match=f"{fake_tiny.size:,} bytes"):
        W.import_checkpoint(other, fake_tiny, progress=False)
    assert not (cache / fake_tiny.filename).exists()


# ---------------------------------------------------------------------------- resolve


def test_resolve_random(cache: Path) -> None:
    r = W.resolve_weights("b+", "random")
    assert r.checkpoint is None
    assert r.config == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert "random" in r.description and r.model == "base_plus"


@pytest.mark.parametrize("spec", [None, "auto", "pretrained", "tiny", "t"])
def test_resolve_missing_cached_file_says_how_to_fetch(cache: Path, spec) -> None:
    with pytest.raises(SGPWeightsError) as err:
        W.resolve_weights("tiny", spec)
    msg = str(err.value)
    assert "sgp weights fetch tiny" in msg
    assert "--weights random" in msg
    assert str(cache / "sam2.1_hiera_tiny.pt") in msg


@pytest.mark.parametrize("spec", [None, "pretrained", "sam2.1_hiera_tiny"])
def test_resolve_cached_file(fake_tiny: W.CheckpointInfo, cache: Path, spec) -> None:
    W.download_checkpoint(fake_tiny, progress=False)
    r = W.resolve_weights("t", spec)
    assert r.checkpoint == cache / fake_tiny.filename
    assert r.config == "configs/sam2.1/sam2.1_hiera_t.yaml"


def test_resolve_registry_name_of_other_model_rejected(cache: Path) -> None:
    with pytest.raises(SGPWeightsError, match="--model large"):
        W.resolve_weights("tiny", "large")


def test_resolve_explicit_custom_path(tmp_path: Path, cache: Path) -> None:
    p = _fake_checkpoint(tmp_path / "finetuned.pt")
    r = W.resolve_weights("small", str(p))
    assert r.checkpoint == p
    assert r.config == "configs/sam2.1/sam2.1_hiera_s.yaml"
    assert "custom" in r.description


def test_resolve_explicit_official_path_is_verified(
    tmp_path: Path, fake_tiny: W.CheckpointInfo, cache: Path
) -> None:
    local = Path(fake_tiny.url.removeprefix("file://"))
    r = W.resolve_weights("tiny", local)
    assert r.checkpoint == local and "sha256 checked" in r.description
    # Same size as the (faked) tiny entry, wrong bytes: verified, not merely loaded.
    data = bytearray(local.read_bytes())
    data[-30] ^= 0xFF
    local.write_bytes(bytes(data))
    st = local.stat()
    os.utime(local, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    with pytest.raises(SGPWeightsError, match="sha256"):
        W.resolve_weights("tiny", local)
    with pytest.raises(SGPWeightsError, match="--model tiny"):
        W.resolve_weights("small", local)


def test_resolve_missing_or_bad_path(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(SGPWeightsError, match="does not exist"):
        W.resolve_weights("tiny", str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint" * 50)
    with pytest.raises(SGPWeightsError, match="not a readable PyTorch checkpoint"):
        W.resolve_weights("tiny", str(bad))


def test_resolve_unknown_model(cache: Path) -> None:
    with pytest.raises(SGPInputError):
        W.resolve_weights("huge", "random")


# ---------------------------------------------------------------------------- loading


def test_load_state_dict_wrapped_and_bare(tmp_path: Path) -> None:
    wrapped = _fake_checkpoint(tmp_path / "wrapped.pt", n=5)
    bare = tmp_path / "bare.pt"
    torch.save({"a.weight": torch.ones(2, 2), "b": torch.zeros(1)}, bare)
    assert torch.equal(W.load_sam2_state_dict(wrapped)["w"], torch.arange(5.0))
    sd = W.load_sam2_state_dict(bare)
    assert set(sd) == {"a.weight", "b"}
    assert torch.equal(W.load_sam2_state_dict(bare, mmap=True)["a.weight"], torch.ones(2, 2))


def test_load_garbage_raises(tmp_path: Path) -> None:
    p = tmp_path / "garbage.pt"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(SGPWeightsError, match="not a readable PyTorch checkpoint"):
        W.load_sam2_state_dict(p)


def test_load_truncated_zip_raises(tmp_path: Path) -> None:
    full = _fake_checkpoint(tmp_path / "full.pt", n=5000)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(SGPWeightsError, match="truncated"):
        W.load_sam2_state_dict(cut)


def test_load_refuses_to_unpickle_objects(tmp_path: Path) -> None:
    p = tmp_path / "obj.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _NotATensor()}, p)
    with pytest.raises(SGPWeightsError, match="arbitrary code"):
        W.load_sam2_state_dict(p)


def test_load_non_state_dict_rejected(tmp_path: Path) -> None:
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], p)
    with pytest.raises(SGPWeightsError, match="state dict"):
        W.load_sam2_state_dict(p)
    q = tmp_path / "mixed.pt"
    torch.save({"model": {"w": torch.zeros(1), "step": 3}}, q)
    with pytest.raises(SGPWeightsError, match="'step'"):
        W.load_sam2_state_dict(q)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SGPWeightsError, match="does not exist"):
        W.load_sam2_state_dict(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------- CLI


def test_cli_list(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(["weights", "list"])
    assert args.func is CW.cli_list
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "small", "base_plus", "large"):
        assert name in out
    assert str(cache) in out
    assert "only their size is checked" in out
    assert out.count("not downloaded") == 4


def test_cli_requires_a_weights_command() -> None:
    with pytest.raises(SystemExit):
        _parse(["weights"])


def test_cli_fetch_and_verify(
    fake_tiny: W.CheckpointInfo, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parse(["weights", "fetch", "t", "--quiet"])
    assert args.func is CW.cli_fetch and args.force is False and args.file is None
    assert args.func(args) == 0
    assert (cache / fake_tiny.filename).is_file()
    capsys.readouterr()
    args = _parse(["weights", "verify", "tiny"])
    assert args.func(args) == 0
    assert "OK" in capsys.readouterr().out
    args = _parse(["weights", "verify"])
    assert args.func(args) == 0
    assert str(cache / fake_tiny.filename) in capsys.readouterr().out
    assert CW.cli_list(_parse(["weights", "list"])) == 0
    assert "cached, verified" in capsys.readouterr().out


def test_cli_fetch_from_file(
    tmp_path: Path, fake_tiny: W.CheckpointInfo, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = Path(fake_tiny.url.removeprefix("file://"))
    args = _parse(["weights", "fetch", "tiny", "--file", str(local), "--force", "--quiet"])
    assert args.force is True and args.file == str(local)
    assert args.func(args) == 0
    assert (cache / fake_tiny.filename).read_bytes() == local.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"0" * 10)
    assert CW.cli_fetch(_parse(["weights", "fetch", "tiny", "--file", str(bad)])) == 1
    assert f"{fake_tiny.size:,}" in capsys.readouterr().err


def test_cli_fetch_unknown_model(capsys: pytest.CaptureFixture[str], cache: Path) -> None:
    assert CW.cli_fetch(_parse(["weights", "fetch", "huge"])) == 1
    assert "Valid names" in capsys.readouterr().err


def test_cli_verify_bad_file_fails(tmp_path: Path, cache: Path, capsys) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    args = _parse(["weights", "verify", str(bad)])
    assert args.func is CW.cli_verify
    assert args.func(args) != 0
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    truncated = tmp_path / "sam2.1_hiera_small.pt"
    truncated.write_bytes(b"x" * 1000)
    assert CW.cli_verify(_parse(["weights", "verify", str(truncated)])) != 0
    assert "184,416,285" in capsys.readouterr().err


def test_cli_verify_good_custom_file(tmp_path: Path, cache: Path, capsys) -> None:
    p = _fake_checkpoint(tmp_path / "mine.pt")
    assert CW.cli_verify(_parse(["weights", "verify", str(p)])) == 0
    assert "1 tensors" in capsys.readouterr().out


def test_cli_verify_missing_cached_model(cache: Path, capsys) -> None:
    assert CW.cli_verify(_parse(["weights", "verify", "large"])) == 1
    assert "sgp weights fetch large" in capsys.readouterr().err


def test_cli_verify_corrupt_cached_file(
    fake_tiny: W.CheckpointInfo, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache.mkdir()
    (cache / fake_tiny.filename).write_bytes(b"x" * 7)
    assert CW.cli_verify(_parse(["weights", "verify"])) == 1
    assert "FAILED" in capsys.readouterr().err
