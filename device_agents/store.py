"""The agent's data directory: atomic JSON files, the pinned identity, the persisted state.

::

    DIR/
      identity.json      device id, device token, pinned server key (mode 0600; written once, at enrollment)
      state.json         {state, assignment, attempts, last_serial, outbox, ...}: the state machine's record
      contact.json       last successful contact with the server (not fsynced: informational)
      active.json        the active-model pointer (edgekit.runtime.ACTIVE_POINTER; atomic rename)
      models/<sha256>/   content-addressed slots (device_agents.slots)
      models/<sha256>.part   a download in progress (resumed with HTTP Range)
      telemetry/         the bounded telemetry buffer (device_agents.telemetry)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from edgekit.errors import InputError

__all__ = ["DataDir", "atomic_write_json", "fsync_dir", "fsync_tree", "read_json", "utc_now"]


def utc_now() -> str:
    """Now, as the protocol writes times: ISO 8601 UTC with a Z."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created, renamed or removed in it) durable."""
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then every directory (deepest first, ``root`` last).

    Used on a slot before it is renamed into place, so that after a power cut a slot that exists has
    its files whole (extraction and copies write through the page cache only).
    """
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def atomic_write_json(path: Path, data: Any, *, mode: int = 0o644, durable: bool = True) -> None:
    """Write JSON so that a crash leaves the old file or the new one: temp file, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask must not widen or narrow what was asked for
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise InputError(f"{path}: not valid JSON (it is only ever replaced atomically, so it was edited by hand)",
                         "Restore it or remove the data directory and enroll again.") from None


class DataDir:
    """Paths and files of one agent data directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.models = self.root / "models"
        self.identity_path = self.root / "identity.json"
        self.state_path = self.root / "state.json"
        self.contact_path = self.root / "contact.json"

    def ensure(self) -> DataDir:
        """Create the directory tree (mode 0700 for the root: it holds a device token)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(self.root, 0o700)
        self.models.mkdir(exist_ok=True)
        return self

    def identity(self) -> dict | None:
        """What enrollment pinned: device id and token, server key; None before enrollment."""
        return read_json(self.identity_path)

    def save_identity(self, identity: dict) -> None:
        """Pin the identity (mode 0600)."""
        atomic_write_json(self.identity_path, identity, mode=0o600)

    def load_state(self) -> dict:
        """The persisted state-machine record (an idle record when none was written yet)."""
        return read_json(self.state_path) or {"state": "idle", "assignment": None, "attempts": 0, "last_serial": 0,
                                               "outbox": [], "current": None, "last_profile": None, "last_result": None}

    def save_state(self, record: dict) -> None:
        """Persist the record durably before a risky step."""
        atomic_write_json(self.state_path, record)

    def touch_contact(self, what: str) -> None:
        """Remember the last successful exchange with the server."""
        atomic_write_json(self.contact_path, {"at": utc_now(), "what": what}, durable=False)

    def contact(self) -> dict | None:
        """The last successful exchange with the server, if any."""
        try:
            return read_json(self.contact_path)
        except InputError:
            return None
