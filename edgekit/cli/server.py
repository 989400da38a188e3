"""``edgekit server``: run the fleet server, make API tokens."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from edgekit.cli.output import emit, stdout
from edgekit.errors import OutputError, RuntimeUnavailableError, UsageError

__all__ = ["server"]


def _settings(**overrides):  # noqa: ANN003, ANN202
    try:
        from fleet_server.settings import Settings
    except ImportError as e:
        raise RuntimeUnavailableError(f"the fleet server is not installed ({e})", "Install it with: pip install 'edgekit[server]'") from None
    return Settings.from_env(**overrides)


@contextmanager
def open_database(db: str | None, data_dir: Path | None, *, migrate: bool = True) -> Iterator[Any]:
    """The server's database for a CLI command (the default SQLite data dir created 0700 if missing), disposed after."""
    settings = _settings(db=db, data_dir=data_dir)
    from fleet_server.db import Database

    if settings.db is None and not settings.data_dir.exists():
        try:
            settings.data_dir.mkdir(parents=True, mode=0o700)
        except OSError as e:
            raise OutputError(f"cannot create the data dir {settings.data_dir}: {e.strerror}", "Choose a --data-dir you can write.") from None
    database = Database(settings.database_url)
    try:
        if migrate:
            database.migrate()
        yield database
    finally:
        database.dispose()


@click.group()
def server() -> None:
    """Run the fleet server and manage its tokens."""


@server.command()
@click.option("--host", default=None, help="Address to listen on (EDGEKIT_HOST, default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (EDGEKIT_PORT, default 8400).")
@click.option("--db", default=None, help="Database URL (EDGEKIT_DB); default SQLite in the data dir, or postgresql+psycopg://...")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Artifacts, key and SQLite file (EDGEKIT_DATA_DIR).")
@click.option("--max-upload-mb", type=float, default=None, help="Largest accepted upload (EDGEKIT_MAX_UPLOAD_MB, default 512).")
@click.option("--poll-interval", "poll_interval_s", type=int, default=None, help="Seconds between device polls (EDGEKIT_POLL_INTERVAL_S).")
@click.option("--log-level", default=None, type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--artifact-store", type=click.Choice(["directory", "database"]), default=None,
              help="Artifact bytes in the data dir (default) or the database, for replicas (EDGEKIT_ARTIFACT_STORE).")
@click.option("--trusted-proxies", default=None, help="Proxies whose X-Forwarded-* headers are believed (EDGEKIT_TRUSTED_PROXIES; default none).")
def start(**options) -> None:  # noqa: ANN003
    """Serve the fleet API until interrupted (SQLite: migrates first; PostgreSQL: run 'server migrate' once before)."""
    settings = _settings(**options)
    import uvicorn

    from fleet_server.app import bootstrap, create_app

    ctx = bootstrap(settings, exclusive_sqlite=True)  # schema and key checked now, so a bad --db fails before listening
    click.echo(f"edgekit fleet server on http://{settings.host}:{settings.port} "
               f"(database {ctx.db.dialect}, migration {ctx.head}, key {ctx.key.key_id}, data {settings.data_dir})", err=True)
    try:
        uvicorn.run(create_app(settings, context=ctx), host=settings.host, port=settings.port, log_level=settings.log_level,
                    access_log=settings.log_level == "debug", timeout_keep_alive=75,
                    proxy_headers=bool(settings.trusted_proxies), forwarded_allow_ips=settings.trusted_proxies or None)
    except OSError as e:
        raise UsageError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}", "Pick another --port or --host.") from None


@server.command()
@click.option("--db", default=None, help="Database URL (EDGEKIT_DB); default SQLite in the data dir.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Data dir (EDGEKIT_DATA_DIR), for the default SQLite file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def migrate(db: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Upgrade the database schema to this version's newest migration (once per upgrade, before starting replicas)."""
    with open_database(db, data_dir, migrate=False) as database:
        before = database.current()
        head = database.migrate()
    data = {"database": database.dialect, "from": before, "to": head, "changed": before != head}
    emit(data, as_json, lambda: click.echo(f"database {database.url.render_as_string(hide_password=True)}: "
                                           + (f"migrated {before or 'empty'} -> {head}" if before != head else f"already at {head}")))


def _add_trust_commands() -> None:
    from edgekit.cli.server_trust import key, publisher

    server.add_command(publisher)
    server.add_command(key)


_add_trust_commands()


@server.group()
def token() -> None:
    """Make API tokens (only their sha256 is stored)."""


@token.command("create")
@click.option("--scope", type=click.Choice(["admin", "enroll"]), required=True, help="admin: admin routes; enroll: device enrollment only.")
@click.option("--label", default="", help="A note stored with the token's hash.")
@click.option("--name", default=None, help="Who acts with it (admin tokens), as the audit log names it, e.g. ci-pipeline; unique.")
@click.option("--db", default=None, help="Database URL (EDGEKIT_DB).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Data dir (EDGEKIT_DATA_DIR).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def create(scope: str, label: str, name: str | None, db: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Create a token and print it once."""
    import re

    if name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
        raise UsageError(f"--name {name!r}: token names match ^[a-z0-9][a-z0-9._-]{{0,63}}$", "For example: --name ci-pipeline.")
    from sqlalchemy import select

    from fleet_server.tables import Token
    from fleet_server.tokens import create_token

    with open_database(db, data_dir) as database, database.write() as s:
        if name is not None and s.execute(select(Token.id).where(Token.name == name)).first() is not None:
            raise UsageError(f"a token named '{name}' exists", "Pick another --name (names are unique).")
        value = create_token(s, scope, label=label, name=name)
    data = {"scope": scope, "token": value, "label": label, "name": name}
    emit(data, as_json, lambda: (stdout.print(value, highlight=False, markup=False, soft_wrap=True),
                                 click.echo("Store it now: the server keeps only its hash.", err=True)))
