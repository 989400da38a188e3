"""A fleet server whose device routes a test scripts: real HTTP on loopback, its own Ed25519 key.

The real server (fleet_server/) never signs a bad assignment, serves a corrupted artifact on
purpose or replays an old serial; this one does whatever a test tells it to, so each of the
agent's refusals can be provoked. It implements the device side of docs/protocol.md:
enroll, desired (ETag/304), artifacts with Range, reports (idempotent), telemetry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import contextlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit import signing
from edgekit.bundle import MANIFEST_FILE, open_bundle, pack

__all__ = ["ScriptedServer", "sign_payload"]


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def sign_payload(key: Ed25519PrivateKey, payload: dict) -> dict:
    """A SignedAssignment exactly as docs/protocol.md describes it."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    pub = signing.public_key_b64(key)
    return {"payload": text, "signature": signing.sign(key, text.encode("utf-8")), "key_id": signing.fingerprint(pub)}


class ScriptedServer:
    """Start with ``start()``; ``stop()`` makes it unreachable, ``start()`` again on the same port brings it back."""

    def __init__(self, port: int = 0) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public_key = signing.public_key_b64(self.key)
        self.port = port
        self.device_id = "dev-1"
        self.token = "ekdev_test_token"
        self.artifacts: dict[str, bytes] = {}
        self.assignment: dict | None = None
        self.reports: list[dict] = []
        self.telemetry: list[dict] = []
        self.requests: list[tuple[str, str, dict]] = []
        self.serial = 0
        self.poll_interval_s = 0.2
        self.publishers: list[str] = []
        """The publisher allow-list it signs (``add_bundle`` allows each bundle's signer, as an admin would)."""
        self.publishers_version = 0
        self.rotations: list[dict] = []
        self.throttle_s = 0.0
        """Seconds to sleep after each KiB of an artifact (a slow link, so a download can be interrupted)."""
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()

    # --- scripting --------------------------------------------------------------------------------
    def add_bundle(self, bundle_dir: Path, work: Path) -> dict:
        """Pack a bundle, store its bytes, return the artifact description an assignment names."""
        work.mkdir(parents=True, exist_ok=True)
        ekb = pack(bundle_dir, work / f"{bundle_dir.name}-{len(self.artifacts)}.ekb")
        data = ekb.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        self.artifacts[sha] = data
        m = open_bundle(bundle_dir).manifest
        signer = json.loads((bundle_dir / "signature.json").read_text())["public_key"]
        if signer not in self.publishers:
            self.allow_publisher(signer)
        return {"sha256": sha, "size_bytes": len(data), "profile": m.profile, "format": m.format, "file": m.file,
                "manifest_sha256": hashlib.sha256((bundle_dir / MANIFEST_FILE).read_bytes()).hexdigest(), "url": f"/v1/artifacts/{sha}",
                "version": m.version, "model": m.name}

    def payload(self, artifact: dict | None, *, action: str = "install", serial: int | None = None,
                expires_in_s: float = 3600, **extra) -> dict:
        if serial is None:
            self.serial += 1
            serial = self.serial
        now = dt.datetime.now(dt.timezone.utc)
        art = None if artifact is None else {k: artifact[k] for k in ("sha256", "size_bytes", "profile", "format", "file", "manifest_sha256", "url")}
        return {"type": "edgekit.assignment/v1", "device_id": self.device_id, "rollout_id": extra.pop("rollout_id", f"r{serial}"),
                "serial": serial, "action": action, "model": artifact["model"] if artifact else None,
                "version": artifact["version"] if artifact else None, "artifact": art,
                "issued_at": _iso(now), "expires_at": _iso(now + dt.timedelta(seconds=expires_in_s)), **extra}

    def allow_publisher(self, public_key: str) -> None:
        """Put a key on the allow-list (a new version of it)."""
        with self._lock:
            self.publishers.append(public_key)
            self.publishers_version += 1

    def trust_document(self) -> dict:
        """``/v1/device/trust`` as the real server answers it, signed with this server's key."""
        from edgekit.trust import PUBLISHERS_TYPE, sign_document

        with self._lock:
            payload = {"type": PUBLISHERS_TYPE, "version": self.publishers_version, "server_key_id": signing.fingerprint(self.public_key),
                       "publishers": [{"key_id": signing.fingerprint(k), "public_key": k, "label": ""} for k in self.publishers],
                       "issued_at": _iso(dt.datetime.now(dt.timezone.utc))}
            rotations = list(self.rotations)
        return {"server_key": {"public_key": self.public_key, "key_id": signing.fingerprint(self.public_key)}, "rotations": rotations,
                "publishers": sign_document(self.key, payload)}

    def assign(self, payload: dict, key: Ed25519PrivateKey | None = None) -> dict:
        """Make ``payload`` (signed with ``key``, default the server's) the device's desired assignment."""
        signed = sign_payload(key or self.key, payload)
        with self._lock:
            self.assignment = signed
        return signed

    def phases(self, serial: int) -> list[tuple[str, str | None]]:
        with self._lock:
            return [(r["phase"], r.get("reason")) for r in self.reports if r["serial"] == serial]

    # --- lifecycle ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ScriptedServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                server._connections.add(self.connection)

            def finish(self) -> None:
                server._connections.discard(self.connection)
                super().finish()

            def _json(self, status: int, body: object, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {server.token}":
                    self._json(401, {"error": {"code": "unauthorized", "message": "bad token", "hint": ""}})
                    return False
                return True

            def do_POST(self) -> None:  # noqa: N802
                body = self._body()
                server.requests.append(("POST", self.path, body))
                if self.path == "/v1/devices/enroll":
                    self._json(201, {"device_id": server.device_id, "device_token": server.token, "server_public_key": server.public_key,
                                     "key_id": signing.fingerprint(server.public_key), "poll_interval_s": server.poll_interval_s})
                elif not self._authorized():
                    return
                elif self.path == "/v1/device/reports":
                    with server._lock:
                        dup = any(r["serial"] == body["serial"] and r["phase"] == body["phase"] for r in server.reports)
                        if not dup:
                            server.reports.append(body)
                    self._json(200, {"accepted": not dup, "duplicate": dup})
                elif self.path == "/v1/device/telemetry":
                    with server._lock:
                        server.telemetry.append(body)
                    self._json(202, {"accepted": len(body["points"])})
                else:
                    self._json(404, {"error": {"code": "not_found", "message": self.path, "hint": ""}})

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(("GET", self.path, dict(self.headers)))
                if not self._authorized():
                    return
                if self.path == "/v1/device/desired":
                    with server._lock:
                        signed = server.assignment
                    etag = '"' + hashlib.sha256(json.dumps(signed).encode()).hexdigest()[:16] + '"'
                    if self.headers.get("If-None-Match") == etag:
                        self.send_response(304)
                        self.send_header("ETag", etag)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self._json(200, {"poll_interval_s": server.poll_interval_s, "assignment": signed}, {"ETag": etag})
                    return
                if self.path == "/v1/device/trust":
                    self._json(200, server.trust_document())
                    return
                m = re.fullmatch(r"/v1/artifacts/([0-9a-f]{64})", self.path)
                if not m or m.group(1) not in server.artifacts:
                    self._json(404, {"error": {"code": "not_found", "message": self.path, "hint": ""}})
                    return
                data = server.artifacts[m.group(1)]
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self._json(416, {"error": {"code": "range_not_satisfiable", "message": rng, "hint": ""}},
                                   {"Content-Range": f"bytes */{len(data)}"})
                        return
                    status = 206
                chunk = data[start:]
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(chunk)))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                try:
                    for i in range(0, len(chunk), 1024):
                        self.wfile.write(chunk[i:i + 1024])
                        if server.throttle_s:
                            self.wfile.flush()
                            time.sleep(server.throttle_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the listening socket and every open keep-alive connection: the server is gone."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


