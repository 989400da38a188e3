"""The one safe way a bundle's bytes land on disk: unpacking an ``.ekb`` or copying a bundle directory.

Used by ``bundle verify``/``open_bundle``, the device agent's slots, ``push`` and the fleet server's
upload validation, so every place that takes a bundle from outside applies the same rules:

- only the members the bundle's own manifest lists (manifest, signature, golden set, model file or
  model directory, extra files), each at most once, are written; anything else refuses the bundle;
- regular files and directories only: no symbolic or hard links, devices, FIFOs;
- no absolute paths, no ``..``, no backslashes or drive letters;
- bounded: member count, total bytes, the manifest's own size, and the model's bytes never more
  than the manifest says; the archive is read as a stream, so a bomb is refused at its header;
- a directory copy never follows a link.

It does not use ``tarfile``'s extraction filters (Python 3.11.4+): every member is checked here
and written with ``O_EXCL | O_NOFOLLOW``, so it behaves the same on Debian 12's Python 3.11.2 and
on Python 3.10. On any refusal the destination is removed and :class:`BundleError` is raised.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from pydantic import ValidationError

from edgekit.errors import BundleError, BundleTooLargeError
from edgekit.manifest import Manifest

__all__ = ["ExtractLimits", "copy_bundle_dir", "default_limits", "extract_bundle", "refuse_links"]

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "signature.json"
_CHUNK = 1 << 20
_HINT = "Re-create it with 'edgekit convert' and 'edgekit bundle pack'; a bundle holds only the files its manifest lists."


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on what a bundle may write: total bytes, member count and the manifest's size."""

    max_bytes: int = 4 << 30
    max_members: int = 256
    max_manifest_bytes: int = 4 << 20


def default_limits() -> ExtractLimits:
    """The limits in force: ``EDGEKIT_MAX_BUNDLE_BYTES`` and ``EDGEKIT_MAX_BUNDLE_MEMBERS`` override the defaults."""
    base = ExtractLimits()
    try:
        max_bytes = int(os.environ.get("EDGEKIT_MAX_BUNDLE_BYTES", base.max_bytes))
        max_members = int(os.environ.get("EDGEKIT_MAX_BUNDLE_MEMBERS", base.max_members))
    except ValueError:
        raise BundleError(
            "EDGEKIT_MAX_BUNDLE_BYTES / EDGEKIT_MAX_BUNDLE_MEMBERS must be whole numbers", "Unset them or give a number of bytes / members."
        ) from None
    return ExtractLimits(max_bytes=max(1, max_bytes), max_members=max(4, max_members), max_manifest_bytes=base.max_manifest_bytes)


class _Refused(Exception):
    """Internal: a rule was broken (turned into BundleError with the source's name)."""


class _TooLarge(_Refused):
    """Internal: a size or count limit was passed (BundleTooLargeError)."""


def _safe_parts(name: str) -> tuple[str, ...]:
    if not name or name.startswith(("/", "\\")) or "\x00" in name:
        raise _Refused(f"unsafe path {name!r}")
    parts = PurePosixPath(name).parts
    if not parts or any(p in ("..", "") or "\\" in p or ":" in p for p in parts):
        raise _Refused(f"unsafe path {name!r}")
    return parts


class _Listing:
    """Which relative paths a manifest allows, and how many model bytes it promises."""

    def __init__(self, manifest: Manifest) -> None:
        self.model = manifest.file
        self.files = {MANIFEST_NAME, SIGNATURE_NAME, manifest.golden.file, *(e.file for e in manifest.extra_files)}
        self.model_bytes = manifest.size_bytes

    def kind(self, rel: tuple[str, ...]) -> str | None:
        """'model' for the model file or anything under a model directory, 'file' for another listed file, else None."""
        if rel[0] == self.model:
            return "model"
        if len(rel) == 1 and rel[0] in self.files:
            return "file"
        return None


def _parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise _Refused(f"invalid manifest ({where}): {loc}: {first['msg']}") from None


def _copy_bounded(src: IO[bytes], dest: Path, size: int) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as out:
        left = size
        while left > 0:
            block = src.read(min(_CHUNK, left))
            if not block:
                raise _Refused(f"{dest.name}: shorter than its header says")
            out.write(block)
            left -= len(block)
        if src.read(1):
            raise _Refused(f"{dest.name}: longer than its header says")


def _scan(tar: tarfile.TarFile, limits: ExtractLimits) -> tuple[list[tarfile.TarInfo], tuple[str, ...], Manifest]:
    """Read every header once (stream order), checking each rule as early as possible."""
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    prefix: tuple[str, ...] | None = None
    listing: _Listing | None = None
    manifest: Manifest | None = None
    total = 0
    model_bytes = 0

    def check_listed(parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        nonlocal model_bytes
        rel = parts[len(prefix):]  # type: ignore[arg-type]
        if not rel:
            return
        kind = listing.kind(rel)  # type: ignore[union-attr]
        if kind is None or (kind == "file" and not m.isfile()):
            raise _Refused(f"{m.name!r} is not listed in the manifest")
        if kind == "model" and m.isfile():
            model_bytes += m.size
            if model_bytes > listing.model_bytes:  # type: ignore[union-attr]
                raise _Refused(f"the model's files exceed the {listing.model_bytes} bytes the manifest lists")  # type: ignore[union-attr]

    for m in tar:
        if len(members) >= limits.max_members:
            raise _TooLarge(f"more than {limits.max_members} entries in the archive")
        parts = _safe_parts(m.name)
        if not (m.isfile() or m.isdir()):
            raise _Refused(f"{m.name!r} is a link or special file; bundles hold regular files only")
        key = "/".join(parts)
        if key in seen:
            raise _Refused(f"{m.name!r} appears twice in the archive")
        seen.add(key)
        total += m.size if m.isfile() else 0
        if total > limits.max_bytes:
            raise _TooLarge(f"the archive expands past {limits.max_bytes} bytes (EDGEKIT_MAX_BUNDLE_BYTES)")
        if prefix is None:
            # .ekb files written by 'bundle pack' hold one top directory; a flat archive is accepted too.
            prefix = parts[:1] if (m.isdir() and len(parts) == 1) or (len(parts) > 1) else ()
        if parts[: len(prefix)] != prefix:
            raise _Refused(f"{m.name!r} is outside the bundle's directory {'/'.join(prefix)!r}")
        if m.isfile() and parts[len(prefix):] == (MANIFEST_NAME,):
            if m.size > limits.max_manifest_bytes:
                raise _TooLarge(f"{MANIFEST_NAME} is {m.size} bytes (at most {limits.max_manifest_bytes})")
            f = tar.extractfile(m)
            assert f is not None
            manifest = _parse_manifest(f.read(limits.max_manifest_bytes + 1), m.name)
            listing = _Listing(manifest)
            for earlier in members:
                check_listed(_safe_parts(earlier.name), earlier)
        elif listing is not None:
            check_listed(parts, m)
        members.append(m)
    if manifest is None or prefix is None:
        raise _Refused(f"no {MANIFEST_NAME} in the archive; not a bundle")
    return members, prefix, manifest


def extract_bundle(archive: Path, dest: Path, limits: ExtractLimits | None = None) -> Path:
    """Unpack the ``.ekb`` at ``archive`` so that ``dest`` (which must not exist) is the bundle directory.

    Returns ``dest``. Raises :class:`BundleError` (and leaves no ``dest``) if any rule is broken.
    """
    limits = limits or default_limits()
    archive, dest = Path(archive), Path(dest)
    if dest.exists() or dest.is_symlink():
        raise BundleError(f"{dest}: already exists; cannot unpack a bundle over it", "Remove it or choose another directory.")
    try:
        with tarfile.open(archive, "r:*") as tar:
            members, prefix, _ = _scan(tar, limits)
            dest.mkdir(parents=True)
            for m in members:
                rel = _safe_parts(m.name)[len(prefix):]
                if not rel:
                    continue
                target = dest.joinpath(*rel)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                _copy_bounded(src, target, m.size)
    except _Refused as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise (BundleTooLargeError if isinstance(e, _TooLarge) else BundleError)(f"{archive.name}: {e}", _HINT) from None
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise BundleError(f"{archive.name}: not a readable bundle archive ({type(e).__name__}: {e})", _HINT) from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _copy_file_nofollow(src: Path, dest: Path, budget: list[int], limit: int) -> None:
    fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(f"{src.name} is not a regular file")
        budget[0] += st.st_size
        if budget[0] > limit:
            raise _TooLarge(f"the bundle is larger than {limit} bytes (EDGEKIT_MAX_BUNDLE_BYTES)")
        _copy_bounded(f, dest, st.st_size)


def _copy_tree_nofollow(src: Path, dest: Path, budget: list[int], limits: ExtractLimits, count: list[int]) -> None:
    dest.mkdir()
    with os.scandir(src) as it:
        for entry in sorted(it, key=lambda e: e.name):
            count[0] += 1
            if count[0] > limits.max_members:
                raise _TooLarge(f"more than {limits.max_members} files in the bundle")
            if entry.is_symlink():
                raise _Refused(f"{entry.name} is a symbolic link; bundles hold regular files only")
            if entry.is_dir(follow_symlinks=False):
                _copy_tree_nofollow(Path(entry.path), dest / entry.name, budget, limits, count)
            elif entry.is_file(follow_symlinks=False):
                _copy_file_nofollow(Path(entry.path), dest / entry.name, budget, limits.max_bytes)
            else:
                raise _Refused(f"{entry.name} is not a regular file")


def copy_bundle_dir(src: Path, dest: Path, limits: ExtractLimits | None = None) -> Path:
    """Copy the files a bundle directory's manifest lists (and only those) to ``dest``, never following a link."""
    limits = limits or default_limits()
    src, dest = Path(src), Path(dest)
    if dest.exists() or dest.is_symlink():
        raise BundleError(f"{dest}: already exists; cannot copy a bundle over it", "Remove it or choose another directory.")
    try:
        mpath = src / MANIFEST_NAME
        try:
            fd = os.open(mpath, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise _Refused(f"no {MANIFEST_NAME}; not a bundle") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise _Refused(f"{MANIFEST_NAME} is not a regular file")
            data = f.read(limits.max_manifest_bytes + 1)
        if len(data) > limits.max_manifest_bytes:
            raise _TooLarge(f"{MANIFEST_NAME} is larger than {limits.max_manifest_bytes} bytes")
        listing = _Listing(_parse_manifest(data, str(mpath)))
        dest.mkdir(parents=True)
        budget, count = [0], [0]
        for name in sorted({listing.model, *listing.files}):
            _safe_parts(name)
            p = src / name
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue  # verification reports a missing file with its name
            count[0] += 1
            if stat.S_ISLNK(st.st_mode):
                raise _Refused(f"{name} is a symbolic link; bundles hold regular files only")
            if stat.S_ISDIR(st.st_mode) and name == listing.model:
                _copy_tree_nofollow(p, dest / name, budget, limits, count)
            elif stat.S_ISREG(st.st_mode):
                _copy_file_nofollow(p, dest / name, budget, limits.max_bytes)
            else:
                raise _Refused(f"{name} is not a regular file")
    except _Refused as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise (BundleTooLargeError if isinstance(e, _TooLarge) else BundleError)(f"{src}: {e}", _HINT) from None
    except OSError as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise BundleError(f"{src}: cannot copy the bundle ({type(e).__name__}: {e})", _HINT) from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def refuse_links(root: Path, limits: ExtractLimits | None = None) -> None:
    """Raise BundleError if the bundle directory ``root`` holds anything but regular files and directories.

    Run before a local directory is hashed, so no link (to ``/dev/zero``, or to an intact copy outside
    the bundle) is ever followed, not even to compute the slot's name.
    """
    limits = limits or default_limits()
    root = Path(root)
    count = 0
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in (*dirs, *files):
            count += 1
            if count > limits.max_members:
                raise BundleTooLargeError(f"{root}: more than {limits.max_members} files in the bundle", _HINT)
            st = os.lstat(os.path.join(dirpath, name))
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                raise BundleError(f"{root}: {os.path.relpath(os.path.join(dirpath, name), root)} is {kind}; bundles hold regular files only",
                                  _HINT)
