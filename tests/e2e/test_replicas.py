"""Two fleet server replicas (real ``edgekit server start`` processes) on one throwaway PostgreSQL
database, artifacts in the database: one rollout engine with failover after SIGKILL, token
revocation seen by the other replica at once, racing uploads storing one version, and the replicas
that must refuse to serve (another signing key, another schema, a rotated key, a lost database)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
from collections import Counter

import httpx
import pytest
from sqlalchemy import create_engine, text

from fleet_support import ROOT, PostgresCluster, SimDevice, upload, wait_for
from replica_support import EDGEKIT, migrate, one_leader, start_replicas


@pytest.fixture
def replicas(pg_cluster, tmp_path):
    servers = start_replicas(pg_cluster.new_database(), tmp_path, 2, token_cache_ttl_s=3600)
    yield servers
    for s in servers:
        s.stop()


def _rows(db_url: str, sql: str, **params) -> list:
    engine = create_engine(db_url)
    try:
        with engine.connect() as c:
            return list(c.execute(text(sql), params))
    finally:
        engine.dispose()


def test_sigkill_of_the_engine_replica_mid_wave_fails_over_without_lost_or_doubled_assignments(replicas, fleet_bundles):
    leader = one_leader(replicas)
    standby = next(r for r in replicas if r is not leader)
    assert upload(leader.admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]]).status_code == 201
    devices = [SimDevice(replicas[i % 2], f"pi-{i}").enroll() for i in range(9)]  # enrolled through both replicas
    r = standby.admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "waves": [30, 60, 100],
                                                 "gates": {"max_failure_rate": 0.0}})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    serials: dict[str, int] = {}
    done: set[str] = set()

    def install_ready(limit: int | None = None) -> int:
        n = 0
        for d in devices:
            if d.device_id in done or (limit is not None and n >= limit):
                continue
            p = d.desired()
            if p is None or p.get("rollout_id") != rid:
                continue
            assert p["serial"] > serials.get(d.device_id, 0)
            serials[d.device_id] = p["serial"]
            d.install(p)
            done.add(d.device_id)
            n += 1
        return n

    rollout = lambda: standby.admin.get(f"/v1/rollouts/{rid}").json()  # noqa: E731
    wait_for(lambda: install_ready(limit=3 - len(done)) >= 0 and len(done) == 3)  # wave 1 (3 devices), through whichever replica each device uses
    wait_for(lambda: rollout()["waves"][1]["state"] == "running")
    wait_for(lambda: install_ready(limit=1) == 1)  # wave 2 one third done ...
    leader.kill()  # ... when the replica running the engine dies without any shutdown code
    for d in devices:
        d.server = standby  # the devices it served go to the survivor (what a load balancer does)
    assert one_leader([standby]) is standby
    wait_for(lambda: (install_ready(), rollout()["state"] == "completed")[1], timeout=90)
    ro = rollout()
    assert [w["state"] for w in ro["waves"]] == ["passed", "passed", "passed"]
    assert len(done) == len(devices)
    installs = Counter(row.device_id for row in _rows(standby.db_url, "SELECT device_id FROM assignments WHERE rollout_id = :r AND action = 'install'", r=rid))
    assert set(installs) == {d.device_id for d in devices} and set(installs.values()) == {1}  # none lost, none doubled
    waves = {row.device_id: row.wave_index for row in _rows(standby.db_url, "SELECT device_id, wave_index FROM rollout_devices WHERE rollout_id = :r", r=rid)}
    assert sorted(Counter(waves.values()).values()) == [3, 3, 3]
    started = [w["started_at"] for w in ro["waves"]]
    assert all(started) and started == sorted(started)  # each wave started once, in order
    assert not _rows(standby.db_url, "SELECT 1 FROM assignments WHERE rollout_id = :r AND action = 'revert'", r=rid)


def test_token_revoked_on_one_replica_is_refused_by_the_other_at_once(replicas):
    a, b = replicas
    d = SimDevice(a, "pi-revoke").enroll()
    on_b = b.client(d.token)
    assert on_b.get("/v1/device/desired").status_code == 200  # now cached in b (for an hour: token_cache_ttl_s=3600)
    token_id = _rows(a.db_url, "SELECT id FROM tokens WHERE token_hash = :h", h=hashlib.sha256(d.token.encode()).hexdigest())[0].id
    assert a.admin.post(f"/v1/tokens/{token_id}/revoke").status_code == 200
    wait_for(lambda: on_b.get("/v1/device/desired").status_code == 401)  # the NOTIFY, not the cache's hour
    # a decommissioned device's tokens too
    d2 = SimDevice(b, "pi-decommission").enroll()
    on_a = a.client(d2.token)
    assert on_a.get("/v1/device/desired").status_code == 200
    assert b.admin.post(f"/v1/devices/{d2.device_id}/decommission").status_code == 200
    wait_for(lambda: on_a.get("/v1/device/desired").status_code == 401)


def test_an_upload_racing_on_both_replicas_stores_one_version(replicas, fleet_bundles):
    ekb = fleet_bundles.ekb["v1"]["raspberry-pi-5"]
    statuses: list[int] = []
    barrier = threading.Barrier(2)

    def send(server) -> None:  # noqa: ANN001
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=120) as c:
            barrier.wait()
            statuses.append(upload(c, "digits", [ekb]).status_code)

    threads = [threading.Thread(target=send, args=(s,)) for s in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [201, 409]
    url = replicas[0].db_url
    assert len(_rows(url, "SELECT v.id FROM model_versions v JOIN models m ON m.id = v.model_id WHERE m.name = 'digits'")) == 1
    sha = hashlib.sha256(ekb.read_bytes()).hexdigest()
    assert len(_rows(url, "SELECT seq FROM artifact_chunks WHERE sha256 = :s AND seq = 0", s=sha)) == 1
    for s in replicas:  # either replica serves the bytes (no shared disk)
        got = s.admin.get(f"/v1/artifacts/{sha}")
        assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == sha


def _start_cli(db_url: str, data_dir, timeout: float = 60) -> subprocess.CompletedProcess:  # noqa: ANN001
    from fleet_support import free_port

    return subprocess.run([*EDGEKIT, "server", "start", "--db", db_url, "--data-dir", str(data_dir), "--port", str(free_port())],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_replicas_that_must_not_serve_refuse_and_say_why(replicas, pg_cluster, tmp_path):
    a, b = replicas
    # another signing key (a fresh data dir makes its own)
    res = _start_cli(a.db_url, tmp_path / "stranger")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "is not the fleet's key" in res.stderr and "Hint:" in res.stderr and "server_key.pem" in res.stderr
    # a database no one migrated
    fresh = pg_cluster.new_database()
    res = _start_cli(fresh, tmp_path / "unmigrated")
    assert res.returncode != 0 and "no edgekit schema" in res.stderr and "edgekit server migrate" in res.stderr
    # a database migrated by a newer edgekit
    migrate(fresh)
    engine = create_engine(fresh)
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    res = _start_cli(fresh, tmp_path / "older")
    assert res.returncode != 0 and "newer than this server knows" in res.stderr and "same edgekit version" in res.stderr
    # the key rotated through a: b (still on the old key) stops serving and says so; a goes on
    rotated = a.admin.post("/v1/server/key/rotate")
    assert rotated.status_code == 200, rotated.text
    ready = wait_for(lambda: (r := httpx.get(f"{b.url}/readyz", timeout=5)).status_code == 503 and r.json())
    assert rotated.json()["new_key_id"] in ready["reason"]
    refused = b.admin.get("/v1/devices")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "replica_misconfigured"
    assert httpx.get(f"{a.url}/readyz", timeout=5).status_code == 200 and a.admin.get("/v1/devices").status_code == 200
    # ... until it runs with the new key
    b.stop()
    shutil.copy2(a.data_dir / "server_key.pem", b.data_dir / "server_key.pem")
    b.start()
    assert b.admin.get("/v1/devices").status_code == 200


def test_a_replica_that_loses_its_database_fails_readiness(tmp_path):
    cluster = PostgresCluster()
    cluster.start()
    try:
        (server,) = start_replicas(cluster.new_database(), tmp_path, 1)
        try:
            assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
            cluster._run(cluster.pg_ctl, "-D", str(cluster.data), "-m", "immediate", "-w", "stop")  # noqa: SLF001
            down = wait_for(lambda: (r := httpx.get(f"{server.url}/readyz", timeout=10)).status_code == 503 and r.json())
            assert down["reason"] == "database unreachable"
            wait_for(lambda: httpx.get(f"{server.url}/readyz", timeout=10).json()["engine"] == "standby")  # the next engine tick lets go
            assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200  # alive, just not ready
        finally:
            server.stop()
    finally:
        cluster.stop()
