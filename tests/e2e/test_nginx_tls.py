"""The shipped nginx example (packaging/nginx/edgekit.conf) run with Debian's nginx: TLS with a certificate
made here, two replicas on one PostgreSQL behind it, 18 simulated devices and 2 real agents (CA pinned at
enrollment) through it in a three-wave rollout with the engine's replica SIGKILLed mid-wave, the artifact cache serving only authorized callers, the
upload limits, and forwarded headers believed only from configured proxies."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from fleet_support import ROOT, LiveServer, SimDevice, free_port, wait_for
from nginx_support import NGINX, Nginx, make_ca_and_server_cert, render_conf
from replica_support import one_leader, start_replicas

pytestmark = pytest.mark.timeout(600)
AGENT_ENV = {"EDGEKIT_AGENT_POLL_INTERVAL_S": "0.3", "EDGEKIT_AGENT_PROFILE_RUNS": "20", "EDGEKIT_AGENT_PROFILE_BUDGET_S": "1",
             "EDGEKIT_AGENT_PROFILE_WARMUP": "2", "EDGEKIT_AGENT_BACKOFF_BASE_S": "0.1", "EDGEKIT_AGENT_BACKOFF_MAX_S": "1"}


@dataclass
class Front:
    """What SimDevice needs of a server, through nginx over TLS verified against the test CA."""

    url: str
    enroll_token: str
    ca: Path
    _clients: dict[str | None, httpx.Client] = field(default_factory=dict)

    def client(self, token: str | None = None) -> httpx.Client:
        if token not in self._clients:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            self._clients[token] = httpx.Client(base_url=self.url, headers=headers, timeout=60, verify=ssl.create_default_context(cafile=str(self.ca)))
        return self._clients[token]

    def close(self) -> None:
        for c in self._clients.values():
            c.close()


@pytest.fixture(scope="module")
def tls_fleet(pg_cluster, tmp_path_factory):
    if NGINX is None:
        pytest.skip("nginx is not installed (scripts/setup-test-system.sh installs Debian's nginx)")
    root = tmp_path_factory.mktemp("tls-fleet")
    ca, cert, key = make_ca_and_server_cert(root / "tls")
    replicas = start_replicas(pg_cluster.new_database(), root, 2, trusted_proxies="127.0.0.1")
    nginx = Nginx(root / "nginx", free_port())
    front = Front(nginx.url, replicas[0].enroll_token, ca)
    try:
        nginx.start(render_conf([r.port for r in replicas], cert, key, root / "cache", nginx.https_port, free_port()))
        yield replicas, nginx, front, root
    finally:
        front.close()
        nginx.stop()
        for r in replicas:
            r.stop()


def _start_agent(front: Front, root: Path, i: int) -> tuple[subprocess.Popen, Path]:
    data = root / f"agent{i}"
    env = {**os.environ, **AGENT_ENV, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "agent", "run", "--server", front.url,
           "--server-ca", str(front.ca), "--enroll-token", front.enroll_token, "--data-dir", str(data), "--profile", "raspberry-pi-5",
           "--name", f"agent{i}", "--tag", "fleet", "-v"]
    return subprocess.Popen(cmd, env=env, stdout=open(root / f"agent{i}.log", "wb"), stderr=subprocess.STDOUT, cwd=ROOT), data


def test_rollout_through_nginx_tls_to_two_replicas_with_an_authorizing_artifact_cache(tls_fleet, fleet_bundles):
    from edgekit.errors import RemoteError
    from edgekit.fleet_client import FleetClient

    replicas, nginx, front, root = tls_fleet
    ekb = fleet_bundles.ekb["v1"]["raspberry-pi-5"]
    with pytest.raises(RemoteError, match="not trusted"):  # the system CAs do not know the test CA
        with FleetClient(front.url, replicas[0].admin_token) as untrusting:
            untrusting.models()
    with FleetClient(front.url, replicas[0].admin_token, ca_file=front.ca) as admin:  # what push does with EDGEKIT_CA_FILE
        version = admin.upload("digits", [ekb])
    sha = version["artifacts"][0]["sha256"]
    agents = [_start_agent(front, root, i) for i in range(2)]
    try:
        sims = [SimDevice(front, f"sim-{i}", tags=["fleet"]).enroll() for i in range(18)]  # type: ignore[arg-type]
        outsider = SimDevice(front, "outsider", tags=["elsewhere"]).enroll()  # type: ignore[arg-type]
        admin_http = front.client(replicas[0].admin_token)
        wait_for(lambda: len([d for d in admin_http.get("/v1/devices").json() if "fleet" in d["tags"]]) == 20, timeout=120)
        r = admin_http.post("/v1/rollouts", json={"model": "digits", "version": version["version"], "selector": {"profiles": [], "tags": ["fleet"]},
                                                  "waves": [10, 50, 100], "gates": {"max_failure_rate": 0.0}, "wave_timeout_s": 300})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        done: set[str] = set()
        cache_states: list[str] = []
        killed: list[LiveServer] = []

        def step() -> bool:
            wave2_running = admin_http.get(f"/v1/rollouts/{rid}").json()["waves"][1]["state"] == "running"
            for d in sims:
                if d.device_id in done:
                    continue
                p = d.desired()
                if p is None or p.get("rollout_id") != rid:
                    continue
                got = d.http.get(p["artifact"]["url"])
                assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == sha
                cache_states.append(got.headers.get("x-cache-status", ""))
                d.install(p)
                done.add(d.device_id)
                if wave2_running and not killed:  # mid-wave 2: SIGKILL the replica running the engine; nginx routes around it
                    killed.append(one_leader(replicas))
                    killed[0].kill()
            return admin_http.get(f"/v1/rollouts/{rid}").json()["state"] == "completed"

        wait_for(step, timeout=300, interval=0.3)
        assert killed, "wave 2 was never seen running"
        survivor = next(r for r in replicas if r is not killed[0])
        assert one_leader([survivor]) is survivor
    finally:
        for proc, _ in agents:
            proc.terminate()
        for proc, _ in agents:
            proc.wait(30)
    ro = admin_http.get(f"/v1/rollouts/{rid}").json()
    assert [w["state"] for w in ro["waves"]] == ["passed", "passed", "passed"]
    assert len(done) == 18
    engine = create_engine(replicas[0].db_url)
    with engine.connect() as c:
        installs = Counter(c.execute(text("SELECT device_id FROM assignments WHERE rollout_id = :r AND action = 'install'"), {"r": rid}).scalars())
    engine.dispose()
    assert len(installs) == 20 and set(installs.values()) == {1}  # none lost, none doubled across the failover
    killed[0].start()  # back for the module's other tests
    for _, data in agents:  # the real agents pinned the CA at enrollment and got there over https
        assert (data / "server-ca.pem").read_bytes() == front.ca.read_bytes()
    assert "HIT" in cache_states  # the cache served the model ...
    anon = httpx.get(f"{front.url}/v1/artifacts/{sha}", verify=ssl.create_default_context(cafile=str(front.ca)))
    assert anon.status_code == 401  # ... but never to a caller without a token, cached or not
    stranger = outsider.http.get(f"/v1/artifacts/{sha}")
    assert stranger.status_code == 403  # nor to a device the artifact was not assigned to
    part = sims[0].http.get(f"/v1/artifacts/{sha}", headers={"Range": "bytes=10-109"})
    assert part.status_code == 206 and part.content == ekb.read_bytes()[10:110] and part.headers.get("x-cache-status") == "HIT"


def test_agent_client_refuses_a_certificate_from_another_ca(tls_fleet, tmp_path):
    from device_agents.client import FleetClient as AgentClient
    from device_agents.machine import TransientError

    _, _, front, _ = tls_fleet
    other_ca, _, _ = make_ca_and_server_cert(tmp_path, "other")
    client = AgentClient(front.url, ca_file=str(other_ca))
    try:
        with pytest.raises(TransientError, match="CERTIFICATE_VERIFY_FAILED"):
            client.enroll(front.enroll_token, name="mitm", profile="raspberry-pi-5", tags=(), facts={})
    finally:
        client.close()


def test_upload_limits_of_the_example_pass_512_mb_and_stop_larger_bodies_at_the_proxy(tls_fleet):
    _, nginx, front, _ = tls_fleet
    ctx = ssl.create_default_context(cafile=str(front.ca))

    def declare(length: int) -> bytes:
        """Send only the headers of an upload declaring ``length`` bytes; nginx answers at once if it refuses them."""
        with socket.create_connection(("127.0.0.1", nginx.https_port), timeout=30) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(f"POST /v1/models/digits/versions HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                      f"Content-Length: {length}\r\nConnection: close\r\n\r\n".encode())
            s.settimeout(3)
            try:
                return s.recv(200)
            except TimeoutError:
                return b""  # nothing yet: nginx accepted the size and is streaming the body to a replica

    assert declare(700 * 1024 * 1024).startswith(b"HTTP/1.1 413")  # over client_max_body_size: refused by nginx
    assert not declare(513 * 1024 * 1024).startswith(b"HTTP/1.1 413")  # a 512 MB upload plus multipart overhead passes on


def test_forwarded_headers_are_believed_only_from_configured_proxies(tls_fleet, tmp_path):
    replicas, _, _, _ = tls_fleet
    trusting = replicas[0]  # --trusted-proxies 127.0.0.1
    plain = LiveServer(data_dir=tmp_path / "plain", db_url=trusting.db_url, settings={"artifact_store": "database"}, process=True)
    (tmp_path / "plain").mkdir(mode=0o700)
    shutil.copy2(trusting.data_dir / "server_key.pem", tmp_path / "plain" / "server_key.pem")
    plain.admin_token, plain.enroll_token = trusting.admin_token, trusting.enroll_token
    plain.start()
    try:
        def remote_of(server: LiveServer, name: str) -> str:
            r = server.admin.post("/v1/tokens", json={"scope": "enroll", "name": name}, headers={"X-Forwarded-For": "203.0.113.9"})
            assert r.status_code == 201, r.text
            items = server.admin.get("/v1/audit", params={"action": "POST /v1/tokens", "limit": 5}).json()["items"]
            return items[0]["remote_addr"]

        assert remote_of(trusting, f"fwd-{time.time_ns()}") == "203.0.113.9"  # from a configured proxy: believed
        assert remote_of(plain, f"fwd-{time.time_ns()}") == "127.0.0.1"  # no proxies configured: the peer is the client
    finally:
        plain.stop()


def test_push_verifies_the_server_certificate_against_edgekit_ca_file(tls_fleet, fleet_bundles):
    replicas, _, front, _ = tls_fleet
    bundle = fleet_bundles.dirs["v2"]["raspberry-pi-5"]
    cmd = [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "push", str(bundle), "--server", front.url,
           "--token", replicas[0].admin_token, "--json"]
    env = {k: v for k, v in os.environ.items() if k != "EDGEKIT_CA_FILE"}
    refused = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "not trusted" in refused.stderr and "EDGEKIT_CA_FILE" in refused.stderr
    pushed = subprocess.run(cmd, env={**env, "EDGEKIT_CA_FILE": str(front.ca)}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert pushed.returncode == 0, pushed.stderr
    assert '"1.3.0"' in pushed.stdout


def test_a_512_mb_upload_passes_the_proxy_to_a_replica(tls_fleet, tmp_path):
    """512,000,000 bytes streamed through nginx over TLS reach the replica, which reads them all and judges the content
    (not a bundle: 400 bad_bundle from the server, not a 413 or a timeout from the proxy)."""
    replicas, _, front, _ = tls_fleet
    big = tmp_path / "big.ekb"
    with open(big, "wb") as f:
        f.truncate(512_000_000)  # sparse: costs no disk until read
    with open(big, "rb") as f, httpx.Client(base_url=front.url, verify=ssl.create_default_context(cafile=str(front.ca)), timeout=600,
                                            headers={"Authorization": f"Bearer {replicas[0].admin_token}"}) as c:
        r = c.post("/v1/models/big/versions", files=[("bundles", ("big.ekb", f, "application/octet-stream"))])
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.text[:200])  # the replica's answer
    assert r.status_code in (400, 422) and r.status_code != 413, r.text
