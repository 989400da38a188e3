"""Debian's nginx running the shipped example (packaging/nginx/edgekit.conf) with a certificate made here;
used by tests/e2e/test_nginx_tls.py and bench/fleet_load.py --replicas."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fleet_support import ROOT, wait_for

__all__ = ["CONF", "NGINX", "Nginx", "make_ca_and_server_cert", "render_conf"]

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
CONF = ROOT / "packaging" / "nginx" / "edgekit.conf"


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


def render_conf(replica_ports: list[int], cert: Path, key: Path, cache: Path, https_port: int, http_port: int) -> str:
    """The shipped example with these addresses, ports and paths (and nothing else) substituted; any number of replicas."""
    text = CONF.read_text()
    upstream = "".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n" for p in replica_ports)
    subs = {"    server 127.0.0.1:8401 max_fails=1 fail_timeout=5s;\n    server 127.0.0.1:8402 max_fails=1 fail_timeout=5s;\n": upstream,
            "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;", "listen 80;": f"listen 127.0.0.1:{http_port};",
            "/etc/edgekit/tls/server.crt": str(cert), "/etc/edgekit/tls/server.key": str(key), "/var/cache/nginx/edgekit": str(cache)}
    for old, new in subs.items():
        assert text.count(old) == 1, f"the example no longer has {old!r}: update tests/nginx_support.py with it"
        text = text.replace(old, new)
    return text


@dataclass
class Nginx:
    """Debian's nginx in the foreground with a prefix of its own."""

    prefix: Path
    https_port: int
    workers: int = 1
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
            f"{user}daemon off;\nworker_processes {self.workers};\npid {self.prefix}/nginx.pid;\nerror_log {self.prefix}/logs/error.log warn;\n"
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

    def pids(self) -> list[int]:
        """The master and its workers (for CPU accounting)."""
        if self.proc is None:
            return []
        out = [self.proc.pid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                pass
        return out


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


