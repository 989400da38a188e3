"""Where artifact bytes live: a small interface and the directory implementation.

Artifacts are named by the sha256 of their bytes, so each is stored once; a write goes to a
temporary file, is fsynced and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

__all__ = ["ArtifactStore", "DirectoryArtifactStore", "SHA256_RE", "fsync_dir", "is_sha256"]

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def is_sha256(value: str) -> bool:
    """True for 64 lowercase hex characters (the only artifact names there are)."""
    return bool(SHA256_RE.fullmatch(value))


class ArtifactStore(ABC):
    """Content-addressed artifact bytes."""

    @abstractmethod
    def put(self, source: Path, sha256: str) -> bool:
        """Store the file ``source`` (whose sha256 the caller computed) once; True when it was new."""

    @abstractmethod
    def exists(self, sha256: str) -> bool:
        """True when the artifact is stored."""

    @abstractmethod
    def size(self, sha256: str) -> int:
        """Its size in bytes."""

    @abstractmethod
    def open(self, sha256: str) -> BinaryIO:
        """Open it for reading (binary)."""

    @abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove it (used to undo a write whose database transaction failed)."""

    @abstractmethod
    def list(self) -> list[str]:
        """The sha256 of every stored artifact."""

    def path(self, sha256: str) -> Path | None:
        """A local path to the bytes when the store has one (lets the server use sendfile)."""
        return None

    def verify(self, sha256: str) -> bool:
        """False when the stored bytes are known not to hash to ``sha256`` (never served: 410). The directory
        store checks only the size (in ``authorize_artifact``); the database store hashes (fleet_server.artifacts_db)."""
        return True


class DirectoryArtifactStore(ArtifactStore):
    """Artifacts as files ``ROOT/<sha256[:2]>/<sha256>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):  # never build a path from anything else
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, source: Path, sha256: str) -> bool:
        target = self.path(sha256)
        if target.exists():
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{sha256}.tmp-{os.getpid()}-{id(source)}")
        try:
            h = hashlib.sha256()
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    h.update(block)
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
            if h.hexdigest() != sha256:
                raise ValueError(f"{source}: content does not hash to {sha256}")
            os.replace(tmp, target)
            fsync_dir(target.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def exists(self, sha256: str) -> bool:
        return is_sha256(sha256) and self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path(sha256), "rb")

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def list(self) -> list[str]:
        return sorted(p.name for p in self.root.glob("*/*") if is_sha256(p.name) and p.parent.name == p.name[:2] and p.is_file())

    def clear_temporaries(self) -> None:
        """Remove temporary files a killed server left behind."""
        for tmp in self.root.glob("*/.*.tmp-*"):
            tmp.unlink(missing_ok=True)
        staging = self.root.parent / "staging"
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
