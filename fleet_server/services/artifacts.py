"""Artifact downloads: who may fetch what, and HTTP Range arithmetic."""

from __future__ import annotations

import logging
import re

from sqlalchemy import select

from fleet_server.context import AppContext
from fleet_server.errors import ArtifactDamaged, Forbidden, NotFound, RangeNotSatisfiable
from fleet_server.storage import is_sha256
from fleet_server.tables import Artifact, Assignment, VersionArtifact
from fleet_server.tokens import Principal

__all__ = ["authorize_artifact", "parse_range"]

log = logging.getLogger("edgekit.fleet")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def authorize_artifact(ctx: AppContext, principal: Principal, sha256: str) -> int:
    """The artifact's size when the caller may fetch it (never touching the disk for a bad name).

    A device may fetch only artifacts named by its own assignments (any other: 403).
    """
    if not is_sha256(sha256):
        raise NotFound("no such artifact", "Artifacts are named by 64 lowercase hex characters.")
    with ctx.db.read() as s:
        size = s.execute(select(Artifact.size_bytes).where(Artifact.sha256 == sha256)).scalar_one_or_none()
        if size is not None and principal.scope == "device":
            mine = s.execute(select(Assignment.id).join(VersionArtifact, VersionArtifact.id == Assignment.artifact_id)
                             .where(Assignment.device_id == principal.device_id, VersionArtifact.artifact_sha256 == sha256).limit(1)).first()
            if mine is None:
                raise Forbidden("this artifact is not in any of this device's assignments", "Fetch the artifact named in your assignment.")
    if size is None or not ctx.store.exists(sha256):
        raise NotFound("no such artifact", "Fetch the artifact named in your assignment.")
    try:
        stored = ctx.store.size(sha256)
    except OSError:
        raise NotFound("no such artifact", "Fetch the artifact named in your assignment.") from None
    if stored != size:  # never promise a Content-Length the file cannot fill: the connection would drop mid-body
        log.error("ARTIFACT DAMAGED: stored file of artifact %s has %d bytes, the database says %d; refusing to serve it "
                  "(restore it from a backup or upload it again)", sha256, stored, size)
        raise ArtifactDamaged(f"the server's copy of artifact {sha256} is damaged ({stored} of {size} bytes)")
    if not ctx.store.verify(sha256):
        log.error("ARTIFACT DAMAGED: the stored bytes of artifact %s do not hash to its name; refusing to serve it "
                  "(restore it from a backup or upload it again)", sha256)
        raise ArtifactDamaged(f"the server's copy of artifact {sha256} is damaged (its bytes do not match its sha256)")
    return size


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single ``Range``; None for no or an unparseable header (send it all).

    Unsatisfiable → RangeNotSatisfiable. Several ranges are not supported and get the whole file.
    """
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None:
        return None
    first, last = m.groups()
    if first == "" and last == "":
        return None
    if len(first) > 19 or len(last) > 19:  # past any file's size, and before int()'s 4,300-digit limit
        raise RangeNotSatisfiable(f"range {header[:40]!r}... has a number longer than 19 digits (the artifact is {size} bytes)")
    if first == "":  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header!r} is empty for an artifact of {size} bytes")
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        raise RangeNotSatisfiable(f"range {header!r} is outside the artifact ({size} bytes)")
    return start, end
