"""N fleet server replicas on one PostgreSQL database behind Debian's nginx terminating TLS, for
``bench/fleet_load.py --replicas``: the production layout of docs/server.md, on one machine.

The database is migrated once (``edgekit server migrate``), every replica signs with the first one's
key and keeps artifacts in the database, and nginx runs the shipped ``packaging/nginx/edgekit.conf``
(tests/nginx_support.py renders it with these ports and a CA made here).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import ROOT

sys.path.insert(0, str(ROOT / "tests"))
from nginx_support import NGINX, Nginx, make_ca_and_server_cert, render_conf  # noqa: E402

__all__ = ["ReplicaFront"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class ReplicaFront:
    """``with ReplicaFront(dir, db_url, n) as front``: ``front.port`` is nginx's https port, ``front.ssl_context`` trusts it."""

    def __init__(self, root: Path, db_url: str, replicas: int, poll_interval_s: int = 60, nginx_workers: int = 1) -> None:
        if NGINX is None:
            raise RuntimeError("nginx is not installed (scripts/setup-test-system.sh installs it)")
        self.root, self.db_url, self.n = root, db_url, replicas
        self.env = {**os.environ, "EDGEKIT_LOG_LEVEL": "warning", "EDGEKIT_POLL_INTERVAL_S": str(max(1, poll_interval_s)),
                    "EDGEKIT_DB": db_url, "EDGEKIT_ARTIFACT_STORE": "database", "EDGEKIT_TRUSTED_PROXIES": "127.0.0.1"}
        self.ports = [_free_port() for _ in range(replicas)]
        self.procs: list[subprocess.Popen] = []
        self.nginx = Nginx(root / "nginx", _free_port(), workers=nginx_workers)
        self.port = self.nginx.https_port
        self.ssl_context: ssl.SSLContext | None = None

    def _edgekit(self, *args: str) -> list[str]:
        return [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", *args]

    @property
    def urls(self) -> list[str]:
        """Each replica's own address (for its /metrics)."""
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def _wait_ready(self, i: int) -> None:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"replica {i} exited: {(self.root / f'replica{i}.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.urls[i]}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"replica {i} not ready within 60 s")

    def __enter__(self) -> ReplicaFront:
        self.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(self._edgekit("server", "migrate"), env=self.env, check=True, capture_output=True)
        for i, port in enumerate(self.ports):
            data = self.root / f"replica{i}"
            data.mkdir(parents=True, exist_ok=True, mode=0o700)
            if i:
                shutil.copy2(self.root / "replica0" / "server_key.pem", data / "server_key.pem")
            log = open(self.root / f"replica{i}.log", "wb")
            self.procs.append(subprocess.Popen(self._edgekit("server", "start", "--data-dir", str(data), "--port", str(port)),
                                               env=self.env, stdout=log, stderr=subprocess.STDOUT))
            self._wait_ready(i)  # the first writes the key the others copy
        ca, cert, key = make_ca_and_server_cert(self.root / "tls")
        self.nginx.start(render_conf(self.ports, cert, key, self.root / "cache", self.port, _free_port()))
        self.ssl_context = ssl.create_default_context(cafile=str(ca))
        return self

    def __exit__(self, *exc: object) -> None:
        self.nginx.stop()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def token(self, scope: str) -> str:
        """A new token of ``scope`` from ``edgekit server token create``."""
        out = subprocess.run(self._edgekit("server", "token", "create", "--scope", scope), env=self.env, check=True,
                             capture_output=True, text=True).stdout
        return re.findall(r"\bek[a-z]{3}_[A-Za-z0-9_-]+", out)[-1]

    def cpu_seconds(self) -> float:
        """CPU seconds of every replica and of nginx (master and workers): the server side of the front door."""
        return sum(_cpu_seconds(p.pid) for p in self.procs) + sum(_cpu_seconds(pid) for pid in self.nginx.pids())
