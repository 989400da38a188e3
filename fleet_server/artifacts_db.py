"""Artifact bytes in the database itself, for replicas that share nothing but PostgreSQL.

Each artifact is a run of 1 MiB rows in ``artifact_chunks`` (sha256, seq, offset, the chunk's own
sha256, bytes), written in one transaction, so a reader sees all of an artifact or none of it.
Reads stream one chunk at a time (a Range reads only the chunks it covers) and check each chunk's
digest as it is read. Before an artifact is first served by a process its whole content is hashed
once and compared with its name (``verify``): damaged bytes are never served (410), and damage
found later, mid-body, ends the response instead of sending the bad chunk.

Chunked rows rather than PostgreSQL large objects: they are plain rows (``pg_dump`` and logical
replication carry them, no ``lo_unlink`` bookkeeping), and the same code runs on SQLite.
"""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from fleet_server.db import Database
from fleet_server.tables import ArtifactChunk  # (defined in fleet_server.replica_tables; imported through tables, which registers it)
from fleet_server.storage import ArtifactStore, is_sha256

__all__ = ["CHUNK_BYTES", "ArtifactChunkDamaged", "DatabaseArtifactStore"]

CHUNK_BYTES = 1 << 20
_VERIFIED_MAX = 10_000


class ArtifactChunkDamaged(OSError):
    """A stored chunk does not match its recorded digest (raised mid-read)."""


class DatabaseArtifactStore(ArtifactStore):
    """Content-addressed artifacts as chunked rows of the server's own database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._verified: set[str] = set()
        self._lock = threading.Lock()

    def put(self, source: Path, sha256: str) -> bool:
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        if self.exists(sha256):
            return False
        h = hashlib.sha256()
        try:
            with self.db.write() as s, open(source, "rb") as src:
                conn = s.connection()
                seq = offset = 0
                while True:
                    block = src.read(CHUNK_BYTES)
                    if not block and seq > 0:
                        break
                    h.update(block)
                    conn.execute(insert(ArtifactChunk), {"sha256": sha256, "seq": seq, "offset": offset,
                                                         "chunk_sha256": hashlib.sha256(block).hexdigest(), "data": block})
                    seq, offset = seq + 1, offset + len(block)
                    if not block:  # an empty artifact: one empty chunk, so it exists
                        break
                if h.hexdigest() != sha256:
                    raise ValueError(f"{source}: content does not hash to {sha256}")  # rolls the chunks back
        except IntegrityError:  # stored by another process a moment ago
            return False
        return True

    def exists(self, sha256: str) -> bool:
        if not is_sha256(sha256):
            return False
        with self.db.connect() as c:
            return c.execute(select(ArtifactChunk.seq).where(ArtifactChunk.sha256 == sha256, ArtifactChunk.seq == 0)).first() is not None

    def size(self, sha256: str) -> int:
        with self.db.connect() as c:
            total = c.execute(select(func.sum(func.length(ArtifactChunk.data))).where(ArtifactChunk.sha256 == sha256)).scalar_one()
        if total is None:
            raise FileNotFoundError(sha256)
        return int(total)

    def open(self, sha256: str) -> BinaryIO:
        return io.BufferedReader(_ChunkReader(self.db, sha256, self.size(sha256)), buffer_size=1 << 16)  # type: ignore[return-value]

    def delete(self, sha256: str) -> None:
        with self.db.write() as s:
            s.execute(delete(ArtifactChunk).where(ArtifactChunk.sha256 == sha256))
        with self._lock:
            self._verified.discard(sha256)

    def list(self) -> list[str]:
        with self.db.connect() as c:
            return sorted(c.execute(select(ArtifactChunk.sha256).where(ArtifactChunk.seq == 0)).scalars())

    def verify(self, sha256: str) -> bool:
        """True when the stored bytes hash to ``sha256`` (read in full once per process, then remembered: they are immutable)."""
        if sha256 in self._verified:
            return True
        h = hashlib.sha256()
        try:
            with self.open(sha256) as f:
                while block := f.read(CHUNK_BYTES):
                    h.update(block)
        except OSError:
            return False
        if h.hexdigest() != sha256:
            return False
        with self._lock:
            if len(self._verified) >= _VERIFIED_MAX:
                self._verified.clear()
            self._verified.add(sha256)
        return True


class _ChunkReader(io.RawIOBase):
    """A seekable, read-only view of one artifact's chunks; one chunk (1 MiB) held at a time."""

    def __init__(self, db: Database, sha256: str, size: int) -> None:
        self.db, self.sha256, self.length = db, sha256, size
        self.pos = 0
        self._chunk_offset = -1
        self._chunk = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def _load(self) -> None:
        with self.db.connect() as c:
            # every chunk but the last holds exactly CHUNK_BYTES: a primary-key lookup, no scan
            row = c.execute(select(ArtifactChunk.offset, ArtifactChunk.chunk_sha256, ArtifactChunk.data)
                            .where(ArtifactChunk.sha256 == self.sha256, ArtifactChunk.seq == self.pos // CHUNK_BYTES)).first()
        if row is None or row.offset != (self.pos // CHUNK_BYTES) * CHUNK_BYTES:
            raise ArtifactChunkDamaged(f"artifact {self.sha256}: no chunk at byte {self.pos}")
        data = bytes(row.data)
        if hashlib.sha256(data).hexdigest() != row.chunk_sha256:
            raise ArtifactChunkDamaged(f"artifact {self.sha256}: the chunk at byte {row.offset} does not match its digest")
        self._chunk_offset, self._chunk = row.offset, data

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer
        if self.pos >= self.length or len(buffer) == 0:
            return 0
        inside = self._chunk_offset >= 0 and self._chunk_offset <= self.pos < self._chunk_offset + len(self._chunk)
        if not inside:
            self._load()
        start = self.pos - self._chunk_offset
        piece = self._chunk[start:start + len(buffer)]
        if not piece:
            raise ArtifactChunkDamaged(f"artifact {self.sha256}: bytes missing at {self.pos}")
        buffer[:len(piece)] = piece
        self.pos += len(piece)
        return len(piece)
