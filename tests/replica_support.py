"""Fleet server replicas for tests: N ``edgekit server start`` processes on one throwaway PostgreSQL
database (migrated once by ``edgekit server migrate``), artifacts in the database, one signing key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from fleet_support import ROOT, LiveServer, wait_for

__all__ = ["EDGEKIT", "engine_roles", "migrate", "start_replicas"]

EDGEKIT = [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())"]


def migrate(db_url: str) -> subprocess.CompletedProcess:
    """``edgekit server migrate --db URL`` (checked)."""
    return subprocess.run([*EDGEKIT, "server", "migrate", "--db", db_url], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)


def start_replicas(db_url: str, root: Path, n: int = 2, **settings: Any) -> list[LiveServer]:
    """``n`` replicas (subprocesses) on ``db_url``; the first creates the tokens and the key, the others copy its key file."""
    migrate(db_url)
    replicas: list[LiveServer] = []
    values = {"artifact_store": "database", **settings}
    try:
        for i in range(n):
            data = root / f"replica{i}"
            server = LiveServer(data_dir=data, db_url=db_url, settings=values, process=True)
            if replicas:
                data.mkdir(parents=True, mode=0o700)
                shutil.copy2(replicas[0].data_dir / "server_key.pem", data / "server_key.pem")
                server.admin_token, server.enroll_token = replicas[0].admin_token, replicas[0].enroll_token
            replicas.append(server)
            server.start()
    except BaseException:  # one that did not come up: stop the ones that did (no process outlives the test)
        for r in replicas:
            r.stop()
        raise
    return replicas


def engine_roles(replicas: list[LiveServer]) -> list[str]:
    """Each live replica's ``engine`` field of /readyz (``leader``/``standby``), or ``down``."""
    roles = []
    for r in replicas:
        try:
            roles.append(httpx.get(f"{r.url}/readyz", timeout=5).json().get("engine", "?"))
        except httpx.HTTPError:
            roles.append("down")
    return roles


def one_leader(replicas: list[LiveServer]) -> LiveServer:
    """Wait until exactly one replica runs the engine; return it."""
    roles = wait_for(lambda: (x := engine_roles(replicas)).count("leader") == 1 and x)
    return replicas[roles.index("leader")]
