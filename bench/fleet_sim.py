"""Simulated devices for bench/fleet_load.py: many devices, one asyncio loop, real HTTP/1.1 on loopback.

Two interchangeable HTTP clients carry the devices' requests through a fixed pool of keep-alive
connections (the way a reverse proxy in front of the server would):

- ``raw`` (default): a minimal HTTP/1.1 client on asyncio streams, about 0.05 ms of client CPU
  per request;
- ``httpx``: ``httpx.AsyncClient``, about 2 ms of client CPU per request on the same machine.

The client shares the machine's cores with the server, so with httpx a 10,000-device fleet
spends most of the CPU in the load generator and the figures describe httpx rather than the
server; both are kept so the difference can be measured (``--client``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Fleet", "FleetServerProcess", "HttpxPool", "RawPool", "Recorder"]

PROFILE = "raspberry-pi-5"
Response = tuple[int, dict[str, str], bytes]


class RawPool:
    """HTTP/1.1 keep-alive connections on asyncio streams; ``request`` waits for a free one."""

    def __init__(self, host: str, port: int, size: int, timeout: float, ssl_context: object | None = None) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.ssl = ssl_context  # https (e.g. through nginx): an ssl.SSLContext
        self._free: asyncio.Queue = asyncio.Queue()
        for _ in range(size):
            self._free.put_nowait(None)  # a slot; connected on first use

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Response:
        conn = await self._free.get()
        try:
            if conn is None:
                conn = await asyncio.wait_for(asyncio.open_connection(self.host, self.port, ssl=self.ssl), self.timeout)
            status, head, data, keep = await asyncio.wait_for(self._exchange(conn, method, path, headers, body), self.timeout)
            if not keep:
                conn[1].close()
                conn = None
            return status, head, data
        except BaseException:
            if conn is not None:
                conn[1].close()
            conn = None
            raise
        finally:
            self._free.put_nowait(conn)

    async def _exchange(self, conn, method: str, path: str, headers: dict[str, str], body: bytes):  # noqa: ANN001, ANN202
        reader, writer = conn
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        raw = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = raw[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        head = {}
        for line in header_lines:
            k, _, v = line.partition(":")
            head[k.strip().lower()] = v.strip()
        if head.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while size := int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16):
                data += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")
        else:
            data = await reader.readexactly(int(head.get("content-length", "0")))
        return status, head, data, head.get("connection", "").lower() != "close"

    async def close(self) -> None:
        while not self._free.empty():
            conn = self._free.get_nowait()
            if conn is not None:
                conn[1].close()


class HttpxPool:
    """The same interface on ``httpx.AsyncClient`` (for comparison: it costs ~40x more client CPU)."""

    def __init__(self, host: str, port: int, size: int, timeout: float) -> None:
        import httpx

        self._sem = asyncio.Semaphore(size)  # queue here: httpcore's own pool queue grows costly when thousands wait
        self._http = httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=timeout, trust_env=False,
                                       limits=httpx.Limits(max_connections=size, max_keepalive_connections=size))

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Response:
        async with self._sem:
            r = await self._http.request(method, path, headers=headers, content=body or None)
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content

    async def close(self) -> None:
        await self._http.aclose()


@dataclass
class Recorder:
    """Latency and outcome of every request that finished while recording."""

    latencies: list[float] = field(default_factory=list)
    by_kind: dict[str, list[float]] = field(default_factory=dict)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

    def add(self, kind: str, seconds: float, status: int | None, error: str | None = None) -> None:
        self.latencies.append(seconds)
        self.by_kind.setdefault(kind, []).append(seconds)
        if error:
            self.errors[f"{kind}: {error}"] += 1
            return
        self.statuses[f"{kind} {status}"] += 1
        if status not in (200, 201, 202, 304):
            self.errors[f"{kind}: HTTP {status}"] += 1


@dataclass
class Device:
    """One simulated device: its token and the ETag of its last desired state."""

    name: str
    token: str = ""
    etag: str | None = None


def _telemetry_body(model_sha256: str | None = None, model_version: str | None = None) -> bytes:
    point = {"minute": time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime()), "model_sha256": model_sha256, "model_version": model_version, "count": 60,
             "errors": 0, "escalations": 3, "degraded": 0, "latency_ms": {"p50": 4.1, "p95": 6.0, "p99": 7.5, "max": 9.0},
             "confidence_hist": [0, 0, 0, 0, 1, 2, 4, 8, 15, 30], "sources": {"device": 57, "cloud": 3}}
    return json.dumps({"points": [point], "dropped": 0}).encode()


class Fleet:
    """N simulated devices sharing one connection pool."""

    def __init__(self, pool: RawPool | HttpxPool, n: int) -> None:
        self.pool = pool
        self.devices = [Device(f"bench-{i:06d}") for i in range(n)]
        self.rec = Recorder()
        self.recording = False
        # what the devices' telemetry says they run (None: no model; the server then keeps no rollup for it)
        self.model_sha256: str | None = None
        self.model_version: str | None = None

    async def _call(self, kind: str, method: str, path: str, token: str, body: bytes = b"", etag: str | None = None) -> Response | None:
        headers = {"Authorization": f"Bearer {token}"}
        if body:
            headers["Content-Type"] = "application/json"
        if etag:
            headers["If-None-Match"] = etag
        t0 = time.perf_counter()  # before the wait for a connection: queueing is part of the latency
        try:
            r = await self.pool.request(method, path, headers, body)
        except (asyncio.TimeoutError, TimeoutError):
            r, error = None, "timeout"
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            r, error = None, type(e).__name__
        if self.recording:
            self.rec.add(kind, time.perf_counter() - t0, r[0] if r else None, None if r else error)
        return r

    async def enroll(self, token: str, concurrency: int) -> tuple[float, int]:
        """Enroll every device, ``concurrency`` at a time; returns (seconds, failures)."""
        sem = asyncio.Semaphore(concurrency)
        failures = 0

        async def one(i: int, d: Device) -> None:
            nonlocal failures
            body = json.dumps({"name": d.name, "profile": PROFILE, "tags": ["bench", f"shop-{i % 50}"], "facts": {"bench": True}}).encode()
            async with sem:
                r = await self._call("enroll", "POST", "/v1/devices/enroll", token, body)
            if r is None or r[0] != 201:
                failures += 1
                return
            d.token = json.loads(r[2])["device_token"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, d) for i, d in enumerate(self.devices)))
        return time.perf_counter() - t0, failures

    async def poll(self, d: Device) -> None:
        r = await self._call("desired", "GET", "/v1/device/desired", d.token, etag=d.etag)
        if r is not None and r[0] == 200:
            d.etag = r[1].get("etag")

    async def post_telemetry(self, d: Device) -> None:
        await self._call("telemetry", "POST", "/v1/device/telemetry", d.token, _telemetry_body(self.model_sha256, self.model_version))

    async def first_poll(self, concurrency: int) -> None:
        """Every device fetches its desired state once and keeps the ETag, as a freshly enrolled agent does."""
        sem = asyncio.Semaphore(concurrency)

        async def one(d: Device) -> None:
            async with sem:
                await self.poll(d)

        await asyncio.gather(*(one(d) for d in self.devices if d.token))

    async def run(self, interval: float, seconds: float, telemetry: bool = True) -> tuple[Recorder, float, list[float]]:
        """Each device polls and posts telemetry every ``interval`` s (±20%) for ``seconds``, open loop.

        Returns what finished in the window, the window's length and the event loop's lag samples
        (how late a 50 ms sleep woke up: a busy client shows here, not as server latency)."""
        inflight: set[asyncio.Task] = set()

        async def device_loop(d: Device, job: Callable[[Device], Awaitable[None]]) -> None:
            await asyncio.sleep(random.uniform(0, interval))  # a uniform phase: the offered rate is steady at once
            while True:
                t = asyncio.create_task(job(d))  # a slow answer never delays the device's next request
                inflight.add(t)
                t.add_done_callback(inflight.discard)
                await asyncio.sleep(interval * random.uniform(0.8, 1.2))

        lags: list[float] = []

        async def lag_probe() -> None:
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.05)
                lags.append(time.perf_counter() - t - 0.05)

        live = [d for d in self.devices if d.token]
        jobs = (self.poll, self.post_telemetry) if telemetry else (self.poll,)
        tasks = [asyncio.create_task(device_loop(d, job)) for d in live for job in jobs]
        tasks.append(asyncio.create_task(lag_probe()))
        self.rec, self.recording = Recorder(), True
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        took = time.perf_counter() - t0
        self.recording = False
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if inflight:  # requests still in flight finish unrecorded before the next phase starts
            await asyncio.wait(list(inflight), timeout=60)
        return self.rec, took, lags


class FleetServerProcess:
    """``edgekit server start`` as a real process on a free port, with its tokens."""

    def __init__(self, data_dir: Path, db_url: str | None = None, poll_interval_s: int = 60, **env: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.data_dir, self.url = data_dir, f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "EDGEKIT_LOG_LEVEL": "warning", "EDGEKIT_POLL_INTERVAL_S": str(max(1, poll_interval_s)), **env}
        if db_url:
            self.env["EDGEKIT_DB"] = db_url
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _edgekit(self, *args: str) -> list[str]:
        return [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", *args]

    def __enter__(self) -> FleetServerProcess:
        import httpx

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.data_dir / "server.log", "wb")
        if self.env.get("EDGEKIT_DB", "").startswith("postgresql"):  # PostgreSQL is migrated once, never by a start (docs/server.md)
            subprocess.run(self._edgekit("server", "migrate"), env=self.env, check=True, capture_output=True)
        self.proc = subprocess.Popen(self._edgekit("server", "start", "--data-dir", str(self.data_dir), "--port", str(self.port)),
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {(self.data_dir / 'server.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    # the bench's signing key (EDGEKIT_SIGNING_KEY) publishes the bundles it uploads: allow it
                    subprocess.run(self._edgekit("server", "publisher", "add", "--label", "bench", "--data-dir", str(self.data_dir)),
                                   env=self.env, check=True, capture_output=True)
                    return self
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the server was not ready within 60 s: {(self.data_dir / 'server.log').read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def token(self, scope: str) -> str:
        """A new token of ``scope`` from ``edgekit server token create``."""
        out = subprocess.run(self._edgekit("server", "token", "create", "--scope", scope, "--data-dir", str(self.data_dir)),
                             env=self.env, check=True, capture_output=True, text=True).stdout
        found = re.findall(r"\bek[a-z]{3}_[A-Za-z0-9_-]+", out)
        if not found:
            raise RuntimeError(f"no token in the output of 'edgekit server token create': {out!r}")
        return found[-1]
