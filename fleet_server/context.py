"""The objects one running server shares: settings, database, artifact store, key, caches."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, update

from fleet_server.db import Database, utcnow
from fleet_server.leadership import EngineLeadership
from fleet_server.settings import Settings
from fleet_server.signer import ServerKey
from fleet_server.storage import ArtifactStore
from fleet_server.tables import Device
from fleet_server.tokens import TokenCache

if TYPE_CHECKING:
    from fleet_server.revocations import RevocationListener
    from fleet_server.writer import TelemetryWriter

__all__ = ["AppContext", "LastSeen"]


class LastSeen:
    """Devices' last-seen times, buffered in memory and written in one batch by the engine loop.

    A poll then costs no write: 10,000 devices polling every minute would otherwise be ~170
    single-row UPDATEs a second queueing on SQLite's one writer.
    """

    def __init__(self) -> None:
        self._pending: dict[str, object] = {}
        self._lock = threading.Lock()

    def touch(self, device_id: str) -> None:
        now = utcnow()
        with self._lock:  # flush() swaps the dict under this lock; never insert into one being read
            self._pending[device_id] = now

    def peek(self, device_id: str):  # noqa: ANN201 - datetime | None
        return self._pending.get(device_id)

    def flush(self, db: Database) -> int:
        """Write every pending time; returns how many devices were written."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        stmt = update(Device).where(Device.id == bindparam("b_id")).values(last_seen=bindparam("b_seen"))
        with db.write() as s:
            s.connection().execute(stmt, [{"b_id": k, "b_seen": v} for k, v in pending.items()])
        return len(pending)


@dataclass
class AppContext:
    """Everything a request or the engine loop needs; one per app."""

    settings: Settings
    db: Database
    store: ArtifactStore
    key: ServerKey
    tokens: TokenCache
    last_seen: LastSeen = field(default_factory=LastSeen)
    head: str = ""
    upload_lock: threading.Lock = field(default_factory=threading.Lock)  # artifact writes + their transaction (registry.store_version)
    telemetry: TelemetryWriter | None = None  # the telemetry group-commit writer; started in the app's lifespan
    leadership: EngineLeadership = field(default_factory=EngineLeadership)  # which replica runs the rollout engine
    refusal: str | None = None  # set while this replica must not serve (fleet_server.replicas); checked on each engine tick
    revocations: RevocationListener | None = None  # PostgreSQL: token revocations from every replica
