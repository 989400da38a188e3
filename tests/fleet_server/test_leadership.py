"""Which process runs the rollout engine (fleet_server.leadership) and 'edgekit server migrate':
an advisory lock on PostgreSQL that moves when its holder dies, a file lock on SQLite."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from fleet_support import ROOT, free_port, wait_for
from replica_support import EDGEKIT


def test_one_holder_of_the_engine_lock_and_handover_on_close(pg_cluster):
    from sqlalchemy.engine import make_url

    from fleet_server.leadership import PostgresLeadership

    url = make_url(pg_cluster.new_database())
    a, b = PostgresLeadership(url), PostgresLeadership(url)
    try:
        assert a.acquire() and a.holds()
        assert not b.acquire() and not b.holds()
        assert a.acquire() and not b.acquire()  # kept, tick after tick
        a.close()
        assert b.acquire()
    finally:
        a.close()
        b.close()


def test_the_lock_moves_when_its_holder_is_killed(pg_cluster):
    from sqlalchemy.engine import make_url

    from fleet_server.leadership import PostgresLeadership

    db = pg_cluster.new_database()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from sqlalchemy.engine import make_url\n"
        "from fleet_server.leadership import PostgresLeadership\n"
        f"l = PostgresLeadership(make_url({db!r}))\n"
        "assert l.acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")], cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    other = PostgresLeadership(make_url(db))
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not other.acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        wait_for(other.acquire)  # the dead holder's session ended: the lock is free
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        other.close()


def test_sqlite_says_when_a_second_process_opens_it(tmp_path, caplog):
    from fleet_server.leadership import SQLiteLeadership

    db = tmp_path / "fleet.db"
    first = SQLiteLeadership(db, exclusive=True)
    with caplog.at_level(logging.WARNING, logger="edgekit.fleet"):
        second = SQLiteLeadership(db, exclusive=False)  # embedded use: told, not refused
    assert f"pid {os.getpid()}" in caplog.text and "single-process" in caplog.text
    from edgekit.errors import UsageError

    with pytest.raises(UsageError, match="another edgekit server process"):
        SQLiteLeadership(db, exclusive=True)
    second.close()
    first.close()
    SQLiteLeadership(db, exclusive=True).close()  # free again once the holder closed


def test_server_start_refuses_a_second_process_on_one_sqlite_file(tmp_path):
    port = free_port()
    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen([*EDGEKIT, "server", "start", "--data-dir", str(tmp_path / "data"), "--port", str(port)], cwd=ROOT,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx

        wait_for(lambda: _ready(httpx, port))
        res = subprocess.run([*EDGEKIT, "server", "start", "--data-dir", str(tmp_path / "data"), "--port", str(free_port())], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and "Traceback" not in res.stderr
        assert f"pid {first.pid}" in res.stderr and "Hint:" in res.stderr and "PostgreSQL" in res.stderr
    finally:
        first.terminate()
        first.wait(30)
        log.close()


def _ready(httpx, port: int) -> bool:  # noqa: ANN001
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_server_migrate_runs_once_and_says_what_it_did(pg_cluster):
    db = pg_cluster.new_database()
    run = lambda: subprocess.run([*EDGEKIT, "server", "migrate", "--db", db, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)  # noqa: E731
    first = run()
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    assert data["from"] is None and data["changed"] and data["to"]
    again = json.loads(run().stdout)
    assert again == {"database": "postgresql", "from": data["to"], "to": data["to"], "changed": False}
