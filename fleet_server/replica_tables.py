"""Tables for replicas sharing one database (migration 0005): the fleet's identity and artifact bytes
in chunked rows. Registered on the one declarative ``Base`` of :mod:`fleet_server.tables`."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.tables import Base

__all__ = ["ArtifactChunk", "FleetIdentity"]


class FleetIdentity(Base):
    """One named fact every replica must agree on (``server_key_id``: the key that signs assignments)."""

    __tablename__ = "fleet_identity"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[dt.datetime]


class ArtifactChunk(Base):
    """One chunk of an artifact's bytes (``DatabaseArtifactStore``), with the sha256 of the chunk itself."""

    __tablename__ = "artifact_chunks"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    offset: Mapped[int] = mapped_column(BigInteger)
    chunk_sha256: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)
