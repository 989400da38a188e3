"""``edgekit server publisher add|list|remove`` and ``edgekit server key rotate|show``: the trust chain (docs/security.md).

The publisher allow-list lives in the server's database, so these commands work on it directly
(``--db`` / ``--data-dir``, like ``server token create``), with the server running or not; a
running server uses a change at its next upload and devices get it with their next assignment.
A key rotation goes through the running server (``--server``/``--token``), which switches to the
new key at once.
"""

from __future__ import annotations

from pathlib import Path

import click

from edgekit.cli.output import emit, stdout
from edgekit.errors import UsageError

__all__ = ["key", "publisher"]


def _database(db: str | None, data_dir: Path | None):  # noqa: ANN202
    from edgekit.cli.server import open_database

    return open_database(db, data_dir)


def _db_options(f):  # noqa: ANN001, ANN202
    f = click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)
    f = click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Data dir (EDGEKIT_DATA_DIR).")(f)
    return click.option("--db", default=None, help="Database URL (EDGEKIT_DB).")(f)


def _as_remote(e: Exception) -> Exception:
    from fleet_server.errors import FleetError

    if isinstance(e, FleetError):
        return UsageError(e.message, e.hint)
    return e


@click.group()
def publisher() -> None:
    """The publisher allow-list: only bundles signed by these keys are stored and run."""


@publisher.command("add")
@click.argument("key", required=False)
@click.option("--label", default="", help="Who holds the key, e.g. ci-main.")
@_db_options
def add(key: str | None, label: str, db: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Allow KEY: base64, a PEM public/private key file, or (no KEY) this machine's signing key."""
    from edgekit import signing
    from fleet_server.services.publishers import add_publisher

    public = signing.parse_public_key(key) if key else signing.public_key_b64(signing.load_or_create_key())
    with _database(db, data_dir) as database:
        try:
            with database.write() as s:
                row = add_publisher(s, public, label)
        except Exception as e:  # noqa: BLE001 - a domain error becomes Error/Hint
            raise _as_remote(e) from None
    emit(row, as_json, lambda: stdout.print(f"allowed publisher key {row['key_id']} ({row['label'] or 'no label'})", highlight=False, markup=False))


@publisher.command("list")
@_db_options
def list_(db: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Every allowed publisher key."""
    from fleet_server.services.publishers import allow_list_version, list_publishers

    with _database(db, data_dir) as database, database.read() as s:
        rows, version = list_publishers(s), allow_list_version(s)

    def render() -> None:
        if not rows:
            stdout.print("no publisher keys: every upload is refused (add one with 'edgekit server publisher add')", highlight=False, markup=False)
        for r in rows:
            stdout.print(f"{r['key_id']}  {r['public_key']}  {r['label'] or '-'}  added {r['added_at']:%Y-%m-%d %H:%M}", highlight=False, markup=False)
        stdout.print(f"allow-list version {version}", highlight=False, markup=False)

    emit({"version": version, "publishers": rows}, as_json, render)


@publisher.command("remove")
@click.argument("key_id")
@_db_options
def remove(key_id: str, db: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Take KEY_ID (16 hex, from 'publisher list') off the allow-list."""
    from fleet_server.services.publishers import remove_publisher

    with _database(db, data_dir) as database:
        try:
            with database.write() as s:
                row = remove_publisher(s, key_id)
        except Exception as e:  # noqa: BLE001
            raise _as_remote(e) from None
    emit(row, as_json, lambda: stdout.print(f"removed publisher key {row['key_id']}", highlight=False, markup=False))


@click.group()
def key() -> None:
    """The server's signing key: rotate it without re-enrolling devices."""


@key.command("rotate")
@click.option("--server", envvar="EDGEKIT_SERVER", show_envvar=True, help="Fleet server URL.")
@click.option("--token", envvar="EDGEKIT_TOKEN", show_envvar=True, help="Admin token.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True, help="Seconds to wait for the answer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def rotate(server: str | None, token: str | None, timeout: float, as_json: bool) -> None:
    """Make a new server key, announced signed by the old one; devices switch at their next assignment."""
    from edgekit.fleet_client import FleetClient

    if not server:
        raise UsageError("no fleet server given", "Pass --server URL or set EDGEKIT_SERVER.")
    with FleetClient(server, token or "", timeout=timeout) as client:
        result = client.rotate_server_key()
    emit(result, as_json, lambda: stdout.print(
        f"server key rotated: {result['old_key_id']} -> {result['new_key_id']} (rotation {result['sequence']}, "
        f"{result['resigned_assignments']} desired assignments re-signed). Restart other replicas with the new key file.", highlight=False, markup=False))
