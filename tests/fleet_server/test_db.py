"""Migrations: they build exactly the schema the models describe, on SQLite and PostgreSQL, and step down and up."""

from __future__ import annotations


def test_migrations_match_the_models_and_step_down_and_up(fleet_db):
    from alembic import command

    from fleet_server.db import Database

    db = Database(fleet_db)
    try:
        assert db.current() is None
        head = db.migrate()
        assert head == db.head() == db.current()
        cfg = db._alembic_config()
        command.check(cfg)  # raises when the migrated schema differs from fleet_server.tables
        command.downgrade(cfg, "base")
        assert db.current() is None
        assert db.migrate() == head
        command.check(cfg)
        assert db.migrate() == head  # idempotent
    finally:
        db.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path):
    from sqlalchemy import text

    from fleet_server.db import Database

    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        db.migrate()
        with db.connect() as c:
            assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        db.dispose()


def test_migration_0006_rolls_up_the_points_already_stored(fleet_db):
    import datetime as dt

    from alembic import command
    from sqlalchemy import insert, select

    from fleet_server.db import Database
    from fleet_server.tables import Device, TelemetryPoint, TelemetryRollup

    db = Database(fleet_db)
    try:
        cfg = db._alembic_config()
        command.upgrade(cfg, "0005")
        now = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
        with db.write() as s:
            s.execute(insert(Device.__table__), [{"id": "dev_1", "name": "d1", "profile": "raspberry-pi-5", "tags": [], "facts": {},
                                                  "enrolled_at": now, "serial": 0, "desired_serial": 0}])
            point = {"count": 10, "errors": 1, "escalations": 3, "degraded": 2, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 5.0},
                     "confidence_hist": [0] * 9 + [10], "sources": {}}
            s.execute(insert(TelemetryPoint.__table__), [
                {"device_id": "dev_1", "minute": now, "model_sha256": "a" * 64, "model_version": "1", "data": point, "received_at": now},
                {"device_id": "dev_1", "minute": now, "model_sha256": "a" * 64, "model_version": "1", "data": {**point, "count": 30},
                 "received_at": now},
                {"device_id": "dev_1", "minute": now, "model_sha256": None, "model_version": None, "data": point, "received_at": now}])
        db.migrate()
        with db.read() as s:
            (r,) = s.execute(select(TelemetryRollup)).scalars().all()
        assert (r.model_sha256, r.requests, r.errors, r.escalations, r.degraded, r.points) == ("a" * 64, 40, 2, 6, 4, 2)
        assert r.p95_w == 80.0 and r.latency_max == 5.0 and r.h9 == 20
    finally:
        db.dispose()
