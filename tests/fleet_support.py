"""Fixtures for the fleet server: a real server on a free port, SQLite and a throwaway PostgreSQL,
real bundles from the digits conversion, and a device simulator that speaks docs/protocol.md.

Loaded by tests/conftest.py (``from fleet_support import *``), so every test can use:

- ``fleet_db``: a database URL, parametrized over ``sqlite`` and ``postgresql`` (a fresh
  database per test in a session-wide throwaway cluster; skipped only when the PostgreSQL
  binaries are missing).
- ``live_server``: the app under uvicorn in a thread on ``fleet_db``: ``.url``,
  ``.admin_token``, ``.enroll_token``, ``.data_dir``, ``.db_url``, ``.admin`` (an httpx client),
  ``.stop()``, ``.start()``, ``.restart()``.
- ``start_fleet_server(**settings)``: the same with other settings (e.g. ``max_upload_mb``);
  ``process=True`` runs ``edgekit server start`` as a subprocess that ``.kill()`` can SIGKILL.
- ``fleet_bundles``: packed ``.ekb`` files of two versions for raspberry-pi-5 and coral-edgetpu.
- ``SimDevice``: enroll, poll, download and report like an agent, with plain httpx calls.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

__all__ = [
    "FleetBundles",
    "LiveServer",
    "PostgresCluster",
    "SimDevice",
    "allow_publisher",
    "fleet_bundles",
    "fleet_db",
    "fleet_format_bundles",
    "free_port",
    "live_server",
    "pg_cluster",
    "rebundle",
    "start_fleet_server",
    "verify_assignment",
]

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- PostgreSQL ------------------------------------------------------------------------------


class PostgresCluster:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) in a temp dir on a free port."""

    def __init__(self) -> None:
        self.initdb = shutil.which("initdb")
        self.pg_ctl = shutil.which("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise FileNotFoundError("initdb/pg_ctl not on PATH")
        self.dir = Path(tempfile.mkdtemp(prefix="edgekit-pg-"))
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self._counter = itertools.count()

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(self.initdb, "-D", str(self.data), "-U", "edgekit", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.dir / "log"), "-o", opts, "-w", "-t", "60", "start")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://edgekit@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"fleet_{os.getpid()}_{next(self._counter)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=edgekit dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for the whole session (skipped with the reason when the binaries are missing)."""
    try:
        cluster = PostgresCluster()
    except FileNotFoundError as e:
        pytest.skip(f"PostgreSQL binaries missing: {e}")
    try:
        cluster.start()
    except subprocess.CalledProcessError as e:
        cluster.stop()
        pytest.fail(f"could not start a throwaway PostgreSQL: {e.stderr.decode(errors='replace')[-2000:]}")
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database URL: SQLite in tmp_path, or a new database in the throwaway PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return request.getfixturevalue("pg_cluster").new_database()


# -- the server ------------------------------------------------------------------------------


def allow_publisher(db_url: str, key_path: Path | None = None, label: str = "tests") -> str:
    """Put a publisher key (default: the session's signing key, which convert and ``rebundle`` sign with) on the
    server's allow-list, straight in the database; returns its base64 public key."""
    from edgekit import signing
    from fleet_server.db import Database
    from fleet_server.services.publishers import add_publisher
    from fleet_server.trust_tables import Publisher

    pub = signing.public_key_b64(signing.load_or_create_key(key_path))
    db = Database(db_url)
    try:
        db.migrate()
        with db.write() as s:
            if s.get(Publisher, signing.fingerprint(pub)) is None:
                add_publisher(s, pub, label)
    finally:
        db.dispose()
    return pub


def _create_token(db_url: str, scope: str) -> str:
    from fleet_server.db import Database
    from fleet_server.tokens import create_token

    db = Database(db_url)
    try:
        db.migrate()
        with db.write() as s:
            return create_token(s, scope, label="tests")
    finally:
        db.dispose()


@dataclass
class LiveServer:
    """The fleet server on 127.0.0.1, in a thread (default) or a subprocess, restartable on the same data."""

    data_dir: Path
    db_url: str
    settings: dict[str, Any] = field(default_factory=dict)
    process: bool = False
    port: int = field(default_factory=free_port)
    admin_token: str = ""
    enroll_token: str = ""
    _server: Any = None
    _thread: threading.Thread | None = None
    _proc: subprocess.Popen | None = None
    _clients: list[httpx.Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _settings(self):  # noqa: ANN202
        from fleet_server.settings import Settings

        values = {"data_dir": self.data_dir, "db": self.db_url, "host": "127.0.0.1", "port": self.port, "engine_interval_s": 0.1,
                  "log_level": "warning", **self.settings}
        return Settings.from_env(env={}, **values)

    def start(self) -> LiveServer:
        """Start (or start again) on the same port, database and data dir."""
        if not self.admin_token:
            self.admin_token = _create_token(self.db_url, "admin")
            self.enroll_token = _create_token(self.db_url, "enroll")
            allow_publisher(self.db_url)
        if self.process:
            self._start_process()
        else:
            self._start_thread()
        self._wait_ready()
        return self

    def _start_thread(self) -> None:
        import uvicorn

        from fleet_server.app import create_app

        settings = self._settings()
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"fleet-server-{self.port}", daemon=True)
        self._thread.start()

    def _start_process(self) -> None:
        env = {**os.environ, "EDGEKIT_ENGINE_INTERVAL_S": "0.1", "PYTHONPATH": str(ROOT)}
        env.update({f"EDGEKIT_{k.upper()}": str(v) for k, v in self.settings.items()})
        cmd = [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "server", "start",
               "--host", "127.0.0.1", "--port", str(self.port), "--db", self.db_url, "--data-dir", str(self.data_dir), "--log-level", "warning"]
        self._log = open(self.data_dir.parent / f"server-{self.port}.log", "ab")
        self._proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_S
        with httpx.Client(base_url=self.url, timeout=2) as probe:
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self._proc.returncode}; see {self._log.name}")
                try:
                    if probe.get("/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"fleet server on {self.url} not ready after {WAIT_S}s")

    def stop(self) -> None:
        """Stop gracefully (lifespan shutdown runs)."""
        for c in self._clients:
            c.close()
        self._clients.clear()
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join(WAIT_S)
            self._server = self._thread = None
        if self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def kill(self) -> None:
        """SIGKILL the server process (process mode only): no shutdown code runs."""
        assert self._proc is not None, "kill() needs process=True"
        self._proc.kill()
        self._proc.wait()
        self._proc = None
        for c in self._clients:
            c.close()
        self._clients.clear()

    def restart(self) -> LiveServer:
        """Stop and start again on the same database and data dir."""
        self.stop()
        return self.start()

    def client(self, token: str | None = None) -> httpx.Client:
        """An httpx client on the server, with a bearer token when given (one per token, closed at stop)."""
        for c in self._clients:
            if c.base_url == httpx.URL(self.url) and c.headers.get("authorization") == (f"Bearer {token}" if token else None):
                return c
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        c = httpx.Client(base_url=self.url, headers=headers, timeout=60)
        self._clients.append(c)
        return c

    @property
    def admin(self) -> httpx.Client:
        """A client with the admin token."""
        return self.client(self.admin_token)


@pytest.fixture
def start_fleet_server(fleet_db: str, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Factory: ``start_fleet_server(process=False, **settings)`` → a started LiveServer on ``fleet_db``."""
    servers: list[LiveServer] = []

    def start(process: bool = False, **settings: Any) -> LiveServer:
        data = tmp_path / f"data{len(servers)}"
        server = LiveServer(data_dir=data, db_url=fleet_db, settings=settings, process=process)
        servers.append(server)
        return server.start()

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def live_server(start_fleet_server: Callable[..., LiveServer]) -> LiveServer:
    """The fleet server with default settings on ``fleet_db`` (SQLite and PostgreSQL)."""
    return start_fleet_server()


# -- bundles ---------------------------------------------------------------------------------


def rebundle(src: Path, dest: Path, *, version: str | None = None, manifest: Callable[[dict], None] | None = None,
             files: Callable[[Path], None] | None = None, rehash: bool = True, key_path: Path | None = None) -> Path:
    """Copy a bundle directory, change it, fix the hashes (unless ``rehash=False``) and re-sign it.

    ``files(dir)`` edits files in the copy; ``manifest(dict)`` edits the manifest JSON in place.
    ``key_path``: the signing key (default: the session's publisher key, which the test servers allow).
    """
    from edgekit import signing
    from edgekit.bundle import sha256_file

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    if files:
        files(dest)
    m = json.loads((dest / "manifest.json").read_text())
    if version:
        m["version"] = version
    if rehash:
        m["sha256"] = sha256_file(dest / m["file"])
        m["size_bytes"] = (dest / m["file"]).stat().st_size
        m["golden"]["sha256"] = sha256_file(dest / m["golden"]["file"])
    if manifest:
        manifest(m)
    data = (json.dumps(m, indent=2) + "\n").encode()
    (dest / "manifest.json").write_bytes(data)
    key = signing.load_or_create_key(key_path)
    pub = signing.public_key_b64(key)
    (dest / "signature.json").write_text(json.dumps({"algorithm": "ed25519", "public_key": pub, "key_id": signing.fingerprint(pub),
                                                     "signature": signing.sign(key, data)}))
    return dest


@dataclass(frozen=True)
class FleetBundles:
    """Bundle directories and packed .ekb files: ``v1`` (1.2.3) and ``v2`` (1.3.0), by profile."""

    dirs: dict[str, dict[str, Path]]
    ekb: dict[str, dict[str, Path]]
    root: Path

    def make(self, name: str, *, profile: str = "raspberry-pi-5", base: str = "v1", **changes: Any) -> Path:
        """A packed variant of a bundle (``rebundle`` keyword arguments), named ``name`` (packed without
        validation, so it can be broken on purpose)."""
        d = rebundle(self.dirs[base][profile], self.root / "variants" / name / f"digits-{profile}-tflite", **changes)
        return pack_raw(d, self.root / "variants" / f"{name}.ekb")


def pack_raw(bundle_dir: Path, out: Path) -> Path:
    """A .ekb (gzip tar) of a directory, like ``edgekit bundle pack`` but without checking it."""
    import tarfile

    with tarfile.open(out, "w:gz") as tar:
        tar.add(bundle_dir, arcname=bundle_dir.name)
    return out


@pytest.fixture(scope="session")
def fleet_bundles(digits_bundles, tmp_path_factory: pytest.TempPathFactory) -> FleetBundles:
    """Two versions of the real digits bundles (raspberry-pi-5, coral-edgetpu), packed as .ekb."""
    from edgekit.bundle import pack

    root = tmp_path_factory.mktemp("fleet-bundles")
    dirs: dict[str, dict[str, Path]] = {"v1": {}, "v2": {}}
    ekb: dict[str, dict[str, Path]] = {"v1": {}, "v2": {}}
    for r in digits_bundles.results:
        dirs["v1"][r.profile] = r.bundle_dir
        ekb["v1"][r.profile] = pack(r.bundle_dir, root / f"v1-{r.profile}.ekb")
        d2 = rebundle(r.bundle_dir, root / "v2" / r.bundle_dir.name, version="1.3.0")
        dirs["v2"][r.profile] = d2
        ekb["v2"][r.profile] = pack(d2, root / f"v2-{r.profile}.ekb")
    return FleetBundles(dirs, ekb, root)


@pytest.fixture(scope="session")
def fleet_format_bundles(digits, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Every format (.tflite, .ort, .mlpackage) for pixel-8 and iphone-15-pro, version 2.0.0, packed: (profile, format) → .ekb."""
    from converters.pipeline import ConvertOptions, run_convert
    from edgekit.bundle import pack

    out = tmp_path_factory.mktemp("fleet-formats")
    report = run_convert(ConvertOptions(model=digits["model"], profiles=("pixel-8", "iphone-15-pro"), formats=("all",),
                                        calibration=digits["calib"], eval=digits["eval"], out=out / "bundles", name="digits",
                                        version="2.0.0", latency_runs=5))
    return {(r.profile, r.format): pack(r.bundle_dir, out / f"{r.profile}-{r.format}.ekb") for r in report.results}


def upload(client: httpx.Client, name: str, paths: list[Path], version: str | None = None) -> httpx.Response:
    """POST the .ekb files as one version (multipart, as in docs/protocol.md)."""
    files = [("bundles", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    data = {"version": version} if version else {}
    return client.post(f"/v1/models/{name}/versions", files=files, data=data)


# -- a simulated device ----------------------------------------------------------------------


def verify_assignment(signed: dict, public_key_b64: str) -> dict:
    """Verify a SignedAssignment with the server's public key; returns the parsed payload."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
    pub.verify(base64.b64decode(signed["signature"]), signed["payload"].encode())  # raises InvalidSignature
    return json.loads(signed["payload"])


@dataclass
class SimDevice:
    """A device speaking the protocol with plain httpx calls (no agent code)."""

    server: LiveServer
    name: str
    profile: str = "raspberry-pi-5"
    tags: list[str] = field(default_factory=list)
    device_id: str = ""
    token: str = ""
    public_key: str = ""
    etag: str | None = None
    last_serial: int = 0

    def enroll(self) -> SimDevice:
        r = self.server.client(self.server.enroll_token).post("/v1/devices/enroll", json={"name": self.name, "profile": self.profile,
                                                                                           "tags": self.tags, "facts": {"sim": True}})
        assert r.status_code == 201, r.text
        body = r.json()
        self.device_id, self.token, self.public_key = body["device_id"], body["device_token"], body["server_public_key"]
        return self

    @property
    def http(self) -> httpx.Client:
        return self.server.client(self.token)

    def poll(self) -> dict | None:
        """GET desired (with If-None-Match); returns the verified payload, or None for no assignment or 304."""
        headers = {"If-None-Match": self.etag} if self.etag else {}
        r = self.http.get("/v1/device/desired", headers=headers)
        if r.status_code == 304:
            return None
        assert r.status_code == 200, r.text
        self.etag = r.headers["etag"]
        a = r.json()["assignment"]
        if a is None:
            return None
        payload = verify_assignment(a, self.public_key)
        assert payload["serial"] > self.last_serial, "serial went down or repeated"
        self.last_serial = payload["serial"]
        return payload

    def desired(self) -> dict | None:
        """The current desired payload (no ETag), verified."""
        r = self.http.get("/v1/device/desired")
        assert r.status_code == 200, r.text
        a = r.json()["assignment"]
        return None if a is None else verify_assignment(a, self.public_key)

    def report(self, serial: int, phase: str, reason: str | None = None, metrics: dict | None = None) -> httpx.Response:
        return self.http.post("/v1/device/reports", json={"serial": serial, "phase": phase, "reason": reason, "metrics": metrics or {}})

    def install(self, payload: dict, *, p95_ms: float = 2.0, baseline_p95: float | None = None, agreement: float = 1.0,
                peak_rss_mb: float = 50.0, fail: str | None = None) -> None:
        """Download the artifact, check its sha256, report every phase (or fail with ``fail``)."""
        import hashlib

        art = payload["artifact"]
        r = self.http.get(art["url"])
        assert r.status_code == 200, r.text
        assert hashlib.sha256(r.content).hexdigest() == art["sha256"]
        serial = payload["serial"]
        for phase in ("downloaded", "verified"):
            assert self.report(serial, phase).status_code == 200
        baseline = {"sha256": "0" * 64, "p95_ms": baseline_p95} if baseline_p95 else None
        metrics = {"load_ms": 3.0, "warmup_runs": 5, "runs": 50, "p50_ms": p95_ms * 0.8, "p95_ms": p95_ms, "p99_ms": p95_ms * 1.1,
                   "peak_rss_mb": peak_rss_mb, "golden_top1_agreement": agreement, "golden_max_abs_err": 0.0,
                   "golden_passed": agreement >= 0.9, "runtime": "litert", "delegate": "xnnpack", "baseline": baseline}
        assert self.report(serial, "profiled", metrics=metrics).status_code == 200
        if fail:
            assert self.report(serial, "failed", reason=fail).status_code == 200
        else:
            assert self.report(serial, "activated").status_code == 200


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition", *, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds, naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def golden_with_wrong_outputs(d: Path) -> None:
    """Edit a bundle's golden.npz so the stored outputs disagree with the model."""
    g = d / "golden.npz"
    with np.load(g) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["y_host"] = np.roll(arrays["y_host"], 1, axis=-1)
    np.savez(g, **arrays)
