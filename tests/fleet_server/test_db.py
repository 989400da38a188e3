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
