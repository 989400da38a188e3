"""The shipped nginx example (packaging/nginx/edgekit.conf) run with Debian's nginx: TLS with a certificate
made here, two replicas on one PostgreSQL behind it, 18 simulated devices and 2 real agents (CA pinned at
enrollment) through it in a three-wave rollout, the artifact cache serving only authorized callers, the
upload limits, and forwarded headers believed only from configured proxies."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from fleet_support import ROOT, LiveServer, SimDevice, free_port, wait_for
from replica_support import start_replicas

pytestmark = pytest.mark.timeout(600)
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
CONF = ROOT / "packaging" / "nginx" / "edgekit.conf"
AGENT_ENV = {"EDGEKIT_AGENT_POLL_INTERVAL_S": "0.3", "EDGEKIT_AGENT_PROFILE_RUNS": "20", "EDGEKIT_AGENT_PROFILE_BUDGET_S": "1",
             "EDGEKIT_AGENT_PROFILE_WARMUP": "2", "EDGEKIT_AGENT_BACKOFF_BASE_S": "0.1", "EDGEKIT_AGENT_BACKOFF_MAX_S": "1"}


def make_ca_and_server_cert(out: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it (cryptography): (ca.pem, server.crt, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgekit test {name}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"{name}.pem", out / f"{name}-server.crt", out / f"{name}-server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def render_conf(replicas: list[LiveServer], cert: Path, key: Path, cache: Path, https_port: int, http_port: int) -> str:
    """The shipped example with this test's addresses, ports and paths (and nothing else) substituted."""
    text = CONF.read_text()
    subs = {"127.0.0.1:8401": f"127.0.0.1:{replicas[0].port}", "127.0.0.1:8402": f"127.0.0.1:{replicas[1].port}",
            "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;", "listen 80;": f"listen 127.0.0.1:{http_port};",
            "/etc/edgekit/tls/server.crt": str(cert), "/etc/edgekit/tls/server.key": str(key), "/var/cache/nginx/edgekit": str(cache)}
    for old, new in subs.items():
        assert text.count(old) == 1, f"the example no longer has {old!r}: update this test with it"
        text = text.replace(old, new)
    return text


@dataclass
class Nginx:
    """Debian's nginx in the foreground with a prefix of its own."""

    prefix: Path
    https_port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def start(self, site: str) -> Nginx:
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
            (self.prefix / d).mkdir(parents=True, exist_ok=True)
        (self.prefix / "edgekit.conf").write_text(site)
        user = "user root root;\n" if os.geteuid() == 0 else ""
        (self.prefix / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {self.prefix}/nginx.pid;\nerror_log {self.prefix}/logs/error.log warn;\n"
            "events { worker_connections 512; }\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {self.prefix}/body;\n  proxy_temp_path {self.prefix}/proxy;\n"
            f"  fastcgi_temp_path {self.prefix}/fastcgi;\n  uwsgi_temp_path {self.prefix}/uwsgi;\n  scgi_temp_path {self.prefix}/scgi;\n"
            f"  include {self.prefix}/edgekit.conf;\n}}\n")
        cmd = [NGINX, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")]
        check = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.prefix / "logs" / "stderr.log", "wb"))
        wait_for(lambda: _listening(self.https_port))
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


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
        nginx.start(render_conf(replicas, cert, key, root / "cache", nginx.https_port, free_port()))
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

        def step() -> bool:
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
            return admin_http.get(f"/v1/rollouts/{rid}").json()["state"] == "completed"

        wait_for(step, timeout=300, interval=0.3)
    finally:
        for proc, _ in agents:
            proc.terminate()
        for proc, _ in agents:
            proc.wait(30)
    ro = admin_http.get(f"/v1/rollouts/{rid}").json()
    assert [w["state"] for w in ro["waves"]] == ["passed", "passed", "passed"]
    assert len(done) == 18
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
