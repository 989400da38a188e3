"""Tables of the trust chain (docs/security.md): the publisher allow-list, its change log (whose
last id is the allow-list's version) and the server key's rotations. Registered on the one
declarative ``Base`` of :mod:`fleet_server.tables`, which imports this module."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.tables import Base

__all__ = ["Publisher", "ServerKeyRotation", "TrustChange"]


class Publisher(Base):
    """A publisher key whose signed bundles the server stores and devices run."""

    __tablename__ = "publishers"
    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    added_at: Mapped[dt.datetime]


class TrustChange(Base):
    """One change of the allow-list (``add``/``remove``); the largest id is the allow-list's version."""

    __tablename__ = "trust_changes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(200), default="")
    at: Mapped[dt.datetime]


class ServerKeyRotation(Base):
    """One rotation of the server key: the statement, signed by the key it replaces."""

    __tablename__ = "server_key_rotations"
    sequence: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    old_key_id: Mapped[str] = mapped_column(String(16))
    new_key_id: Mapped[str] = mapped_column(String(16), unique=True)
    new_public_key: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    signature: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime]
