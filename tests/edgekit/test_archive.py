"""The one safe unpacking (edgekit.archive): listed members only, no links, bounded, nothing left behind."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from edgekit.archive import ExtractLimits, copy_bundle_dir, extract_bundle
from edgekit.bundle import open_bundle, pack, verify_bundle
from edgekit.errors import BundleError, BundleTooLargeError


@pytest.fixture()
def bundle_dir(digits_bundles, tmp_path: Path) -> Path:
    src = next(r for r in digits_bundles.results if r.profile == "raspberry-pi-5").bundle_dir
    dst = tmp_path / "src" / src.name
    shutil.copytree(src, dst)
    return dst


def _rewrite(bundle_dir: Path, out: Path, extra: list[tarfile.TarInfo], data: dict[str, bytes] | None = None, top: bool = True) -> Path:
    """An .ekb of the bundle plus hostile members (written after the real ones)."""
    data = data or {}
    with tarfile.open(out, "w:gz") as tar:
        tar.add(bundle_dir, arcname=bundle_dir.name if top else ".", recursive=True)
        for info in extra:
            payload = data.get(info.name)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out


def test_packed_bundle_round_trips(bundle_dir: Path, tmp_path: Path) -> None:
    ekb = pack(bundle_dir, tmp_path / "b.ekb")
    out = extract_bundle(ekb, tmp_path / "x")
    assert verify_bundle(out).ok
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in bundle_dir.iterdir())


def test_flat_archive_is_accepted(bundle_dir: Path, tmp_path: Path) -> None:
    ekb = tmp_path / "flat.ekb"
    with tarfile.open(ekb, "w:gz") as tar:
        for p in sorted(bundle_dir.iterdir()):
            tar.add(p, arcname=p.name)
    assert verify_bundle(extract_bundle(ekb, tmp_path / "x")).ok


def test_unlisted_member_is_refused_before_its_bytes_are_written(bundle_dir: Path, tmp_path: Path) -> None:
    # A 3 GiB member declared in the header: refused at the header (the bytes are never read or written).
    big = tarfile.TarInfo(f"{bundle_dir.name}/zzz.bin")
    big.size = 3 << 30
    ekb = tmp_path / "bomb.ekb"
    with tarfile.open(ekb, "w:gz") as tar:
        tar.add(bundle_dir, arcname=bundle_dir.name)
        tar.addfile(big)  # header only: the archive is truncated after it
    with pytest.raises(BundleError, match="not listed|expands past"):
        extract_bundle(ekb, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_total_size_limit(bundle_dir: Path, tmp_path: Path) -> None:
    ekb = pack(bundle_dir, tmp_path / "b.ekb")
    with pytest.raises(BundleTooLargeError, match="expands past"):
        extract_bundle(ekb, tmp_path / "x", ExtractLimits(max_bytes=1000))
    assert not (tmp_path / "x").exists()


def test_model_bytes_beyond_the_manifest_are_refused(bundle_dir: Path, tmp_path: Path) -> None:
    m = open_bundle(bundle_dir).manifest
    with open(bundle_dir / m.file, "ab") as f:
        f.write(b"\0" * 4096)
    with pytest.raises(BundleError, match="exceed"):
        extract_bundle(pack(bundle_dir, tmp_path / "b.ekb"), tmp_path / "x")


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "chardev"])
def test_links_and_special_files_are_refused(bundle_dir: Path, tmp_path: Path, kind: str) -> None:
    info = tarfile.TarInfo(f"{bundle_dir.name}/evil")
    info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "chardev": tarfile.CHRTYPE}[kind]
    info.linkname = "/etc/passwd"
    ekb = _rewrite(bundle_dir, tmp_path / "l.ekb", [info])
    with pytest.raises(BundleError, match="link or special file"):
        extract_bundle(ekb, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a\\b", "c:evil"])
def test_unsafe_paths_are_refused(bundle_dir: Path, tmp_path: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = 1
    ekb = _rewrite(bundle_dir, tmp_path / "p.ekb", [info], {name: b"x"})
    with pytest.raises(BundleError, match="unsafe path|outside"):
        extract_bundle(ekb, tmp_path / "x")
    assert not (tmp_path.parent / "escape").exists()


def test_member_count_limit(bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleTooLargeError, match="entries"):
        extract_bundle(pack(bundle_dir, tmp_path / "b.ekb"), tmp_path / "x", ExtractLimits(max_members=3))
    assert not (tmp_path / "x").exists()


def test_duplicate_member_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    info = tarfile.TarInfo(f"{bundle_dir.name}/golden.npz")
    info.size = 3
    ekb = _rewrite(bundle_dir, tmp_path / "d.ekb", [info], {info.name: b"abc"})
    with pytest.raises(BundleError, match="twice"):
        extract_bundle(ekb, tmp_path / "x")


@pytest.mark.parametrize("content", [b"", b"\x1f\x8b\x08\x00garbage", b"not a tar at all" * 10])
def test_empty_or_garbage_archive(tmp_path: Path, content: bytes) -> None:
    ekb = tmp_path / "e.ekb"
    if content == b"":
        with tarfile.open(ekb, "w:gz"):
            pass
    else:
        ekb.write_bytes(content)
    with pytest.raises(BundleError):
        extract_bundle(ekb, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_extraction_never_uses_tarfile_filters(bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian 12's Python 3.11.2 has no extraction filters: the routine must not depend on them."""

    def no_filters(*a, **k):
        raise AssertionError("extractall/extract must not be called")

    monkeypatch.setattr(tarfile.TarFile, "extractall", no_filters)
    monkeypatch.setattr(tarfile.TarFile, "extract", no_filters)
    assert verify_bundle(extract_bundle(pack(bundle_dir, tmp_path / "b.ekb"), tmp_path / "x")).ok


def test_directory_copy_takes_only_listed_files(bundle_dir: Path, tmp_path: Path) -> None:
    (bundle_dir / "unlisted.bin").write_bytes(b"x" * 100)
    out = copy_bundle_dir(bundle_dir, tmp_path / "c")
    assert not (out / "unlisted.bin").exists()
    assert verify_bundle(out).ok


@pytest.mark.parametrize("target", ["/dev/zero", "outside"])
def test_directory_copy_never_follows_a_link(bundle_dir: Path, tmp_path: Path, target: str) -> None:
    m = open_bundle(bundle_dir).manifest
    model = bundle_dir / m.file
    if target == "outside":
        outside = tmp_path / "outside.bin"
        shutil.copy2(model, outside)
        target = str(outside)
    model.unlink()
    os.symlink(target, model)
    with pytest.raises(BundleError, match="symbolic link"):
        copy_bundle_dir(bundle_dir, tmp_path / "c")
    assert not (tmp_path / "c").exists()
