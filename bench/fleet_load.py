"""Fleet server under a simulated fleet: N devices enroll, poll ``GET /v1/device/desired`` (with
``If-None-Match``, so mostly 304) and post telemetry, each every ``--interval`` seconds with ±20%
jitter, the way the agent does (docs/protocol.md). Real HTTP on loopback against a real
``edgekit server start`` process, on SQLite and on a throwaway PostgreSQL cluster.

Phases per database:

1. enroll: all N devices, ``--enroll-concurrency`` requests in flight (one transaction each);
2. warm-up (``--warmup-s``): the steady rate, each device starting at a random moment, for one poll interval or
   the server's token cache TTL, whichever is longer. The server caches a device's token for a TTL after a
   lookup; had every device polled in one burst, every cached token would expire in the same few seconds one TTL
   later, and the phase then running would pay ~160 token lookups/s that the others do not (on 2026-12-02 that
   storm fell on the stats phase and read as the stats' cost). After the warm-up each phase sees the steady share
   of lookups a real fleet causes;
3. steady: ``--duration`` seconds at the real interval (10,000 devices, 60 s: ~333 req/s);
3b. stats (``--stats``, on by default): the steady rate again, this time with operators' stats queries running
   (``StatsLoad``: ``--operators`` dashboards showing the field-statistics view, each refreshed ``--refresh-s``
   after the previous refresh, and Prometheus scraping ``/metrics`` every ``--scrape-s``), side by side with
   the steady phase without them (``--stats-reps`` from 2: A B B A ...). For it the database is seeded first
   with ``digits`` 0.9.0 and 1.0.0 and ``--history-hours`` of per-minute rollups (what the telemetry writer
   leaves after that long), every device is marked as running 1.0.0 and its telemetry names 1.0.0's
   artifact, so each post also updates the rollups the stats read;
4. ramp: the rate is stepped by ``--ramp-factor`` every ``--step-duration`` seconds (the poll
   interval compressed when the steady phase held, stretched when it did not) until the outcome
   flips: p99 over ``--p99-goal-ms``, a failed request, or under 90% of the offered rate reached.
   Then ``--refine`` bisection steps between the two; the highest rate that held is the maximum
   sustainable rate.

Latency is measured by the client, from the moment a request wants a connection to reading the
whole answer (the goal is judged on it); the server's own histogram (/metrics, bucket bounds)
is shown next to it. The client, the server and PostgreSQL share this machine's cores: the
client's event-loop lag and each one's CPU use are reported next to every figure, so a saturated
client is not mistaken for a slow server. The simulated devices share one pool of keep-alive
connections (``--connections``), as behind a reverse proxy.

    python bench/fleet_load.py [--devices 10000] [--duration 60] [--db sqlite|postgresql|both]
    python bench/fleet_load.py --no-ramp --stats-reps 2 --duration 30   # with/without stats queries, A B B A
    python bench/fleet_load.py --replicas 1,2   # PostgreSQL, N replicas behind nginx terminating TLS

``--replicas N[,M...]``: instead of one server on each database, N ``edgekit server start`` replicas
on one PostgreSQL (artifacts in the database) behind Debian's nginx running the shipped
``packaging/nginx/edgekit.conf`` over TLS (bench/fleet_replicas.py); each count is one run, side by
side. "server" CPU is then the replicas and nginx together.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import random
import re
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from bench.fleet_sim import Fleet, FleetServerProcess, HttpxPool, RawPool, Recorder
from bench.harness import ROOT

sys.path.insert(0, str(ROOT / "tests"))
from fleet_support import PostgresCluster  # noqa: E402  (the tests' throwaway cluster, reused as is)
from bench.harness import OtherLoad, Ratio, host_facts, prepare_process, write_result

NAME = "fleet_load"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def postgres_cluster() -> Iterator[tuple[str, Path]]:
    """The tests' throwaway PostgreSQL cluster (tests/fleet_support.py): yields (database URL, data directory)."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster.new_database(), cluster.data
    finally:
        cluster.stop()


def cluster_cpu_seconds(data_dir: Path | None) -> float:
    """CPU seconds of a PostgreSQL cluster: the postmaster and every backend it forked."""
    if data_dir is None:
        return 0.0
    try:
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    total = process_cpu_seconds(postmaster)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                total += process_cpu_seconds(int(stat.parent.name))
    return total


MODEL = "digits"
VERSIONS = ("0.9.0", "1.0.0")  # the fleet ran 0.9.0, then 1.0.0 (what the simulated devices run and report)
_CALIBRATION = {"edges": [i / 10 for i in range(11)], "counts": [0, 0, 0, 1, 2, 4, 8, 14, 25, 46]}


def seed_fleet_history(db_url: str, devices: int, hours: float) -> dict[str, dict]:
    """Register ``digits`` 0.9.0 and 1.0.0 (one raspberry-pi-5 artifact each) and ``hours`` of per-minute rollups, as the
    telemetry writer leaves them after that long with this fleet: 0.9.0 until half-way, 1.0.0 since. Written straight into
    the server's database (as bench/field_stats.py does); returns version -> {"sha256", "artifact_id"}."""
    from sqlalchemy import insert

    from fleet_server.db import Database, utcnow
    from fleet_server.tables import Artifact, Model, ModelVersion, TelemetryRollup, VersionArtifact

    db = Database(db_url)
    now = utcnow().replace(second=0, microsecond=0)
    out: dict[str, dict] = {}
    try:
        with db.write() as s:
            model = Model(name=MODEL, created_at=now - dt.timedelta(hours=hours))
            s.add(model)
            s.flush()
            for i, version in enumerate(VERSIONS):
                sha = f"{i + 1:x}" * 64
                mv = ModelVersion(model_id=model.id, version=version, created_at=now - dt.timedelta(hours=hours * (1 - i / 2)))
                s.add_all([mv, Artifact(sha256=sha, size_bytes=14_000, created_at=now)])
                s.flush()
                va = VersionArtifact(version_id=mv.id, artifact_sha256=sha, profile="raspberry-pi-5", format="tflite", file="model.tflite",
                                     manifest={"name": MODEL, "version": version, "router_policy": {"confidence_histogram": _CALIBRATION}},
                                     manifest_sha256=f"{i + 7:x}" * 64, validation={})
                s.add(va)
                s.flush()
                out[version] = {"sha256": sha, "artifact_id": va.id}
        minutes = int(hours * 60)
        n = 60.0 * devices  # requests a minute: every device answers 60
        rows = [{"model_sha256": out[VERSIONS[0] if m < minutes // 2 else VERSIONS[1]]["sha256"], "minute": now - dt.timedelta(minutes=minutes - m),
                 "requests": n, "errors": 0.0, "escalations": float(round(n * (0.05 + 0.01 * (m % 7) / 7))), "degraded": float(round(n * 0.002 * (m % 3))),
                 "p50_w": n * 4.1, "p95_w": n * (6.0 + (m % 5) / 10), "p99_w": n * 7.5, "latency_max": 9.0, "points": float(devices),
                 **{f"h{b}": float(round(n * c / 100)) for b, c in enumerate(_CALIBRATION["counts"])}} for m in range(minutes)]  # counts: whole
        with db.write() as s:
            if rows:
                s.execute(insert(TelemetryRollup), rows)
    finally:
        db.dispose()
    return out


def mark_devices_running(db_url: str, artifact_id: int) -> int:
    """Every enrolled device runs the artifact, as a completed rollout leaves them (bench/rollout.py times rollouts);
    the /metrics field gauges count the devices that run each version. Returns how many devices."""
    from sqlalchemy import update

    from fleet_server.db import Database
    from fleet_server.tables import Device

    db = Database(db_url)
    try:
        with db.write() as s:
            return s.execute(update(Device).values(active_artifact_id=artifact_id, phase="activated")).rowcount
    finally:
        db.dispose()


class StatsLoad:
    """Operators watching the fleet while it runs, on connections of their own: each one's browser shows the dashboard's
    field-statistics view (fleet_server/dashboard/app.js ``versions``: the model list, every version side by side over
    6 h, then each version with requests in 5-minute buckets over 6 h), refreshed ``refresh_s`` after the previous
    refresh finished (the dashboard's REFRESH_MS, 2 s); and one Prometheus scraping ``/metrics`` every ``scrape_s``."""

    def __init__(self, pool, token: str, operators: int, refresh_s: float, scrape_s: float) -> None:  # noqa: ANN001 - a RawPool
        self.pool, self.token, self.operators, self.refresh_s, self.scrape_s = pool, token, operators, refresh_s, scrape_s
        self.rec = Recorder()
        self.refreshes: list[float] = []

    async def _get(self, kind: str, path: str) -> bytes | None:
        t0 = time.perf_counter()
        try:
            status, _, body = await self.pool.request("GET", path, {"Authorization": f"Bearer {self.token}"})
        except (asyncio.TimeoutError, TimeoutError):
            self.rec.add(kind, time.perf_counter() - t0, None, "timeout")
            return None
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            self.rec.add(kind, time.perf_counter() - t0, None, type(e).__name__)
            return None
        self.rec.add(kind, time.perf_counter() - t0, status)
        return body if status == 200 else None

    async def _refresh(self) -> None:
        since = urllib.parse.quote((dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%S.000Z"))
        models = await self._get("models", "/v1/models")
        if models is None:
            return
        for m in json.loads(models)[:1]:  # the dashboard shows one selected model (the first)
            name = urllib.parse.quote(m["name"], safe="")
            side = await self._get("model stats 6 h", f"/v1/models/{name}/stats?since={since}")
            if side is None:
                return
            for v in json.loads(side)["versions"]:
                if v["requests"] > 0:
                    await self._get("version stats 6 h/5 min", f"/v1/models/{name}/versions/{urllib.parse.quote(v['version'], safe='')}"
                                    f"/stats?since={since}&bucket_s=300")

    async def _operator(self, stop_at: float) -> None:
        await asyncio.sleep(random.uniform(0, self.refresh_s))
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await self._refresh()
            self.refreshes.append(time.perf_counter() - t0)
            await asyncio.sleep(self.refresh_s)

    async def _prometheus(self, stop_at: float) -> None:
        await asyncio.sleep(random.uniform(0, self.scrape_s))
        while time.perf_counter() < stop_at:
            await self._get("/metrics", "/metrics")
            await asyncio.sleep(self.scrape_s)

    async def run(self, seconds: float) -> None:
        """Load for ``seconds``, recording into a fresh recorder (what started in the window is recorded)."""
        self.rec, self.refreshes = Recorder(), []
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(self._operator(stop_at) for _ in range(self.operators)), self._prometheus(stop_at))

    def summary(self, seconds: float) -> dict:
        """Requests, rate and latency per kind, errors, and whole dashboard refreshes."""
        kinds = {k: {"requests": len(v), "per_s": round(len(v) / seconds, 2), "p50_ms": round(_pct(sorted(v), 0.5), 1),
                     "p99_ms": round(_pct(sorted(v), 0.99), 1), "max_ms": round(max(v) * 1000, 1)} for k, v in self.rec.by_kind.items()}
        r = sorted(self.refreshes)
        return {"operators": self.operators, "refresh_s": self.refresh_s, "scrape_s": self.scrape_s, "by_kind": kinds,
                "requests": len(self.rec.latencies), "errors": sum(self.rec.errors.values()), "error_kinds": dict(self.rec.errors),
                "refreshes": len(r), "refresh_p50_ms": round(_pct(r, 0.5), 1), "refresh_p99_ms": round(_pct(r, 0.99), 1)}


@dataclass(frozen=True)
class PhaseResult:
    """One measured phase: offered vs achieved rate, latency percentiles, failures, CPU."""

    db: str
    phase: str
    devices: int
    interval_s: float
    offered_rps: float
    achieved_rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    error_kinds: dict[str, int]
    statuses: dict[str, int]
    by_kind: dict[str, dict[str, float]]
    loop_lag_p99_ms: float
    server_p99_le_ms: float | None
    server_cores: float
    db_cores: float
    client_cores: float
    seconds: float
    stats: dict | None = None  # the operators' stats load in this phase (StatsLoad.summary), None when there was none

    def held(self, p99_goal_ms: float) -> bool:
        """p99 within the goal, no errors, and at least 90% of the offered requests done (less three
        standard deviations of the count, for short windows at low rates)."""
        expected = self.offered_rps * self.seconds
        return self.errors == 0 and self.p99_ms <= p99_goal_ms and self.requests >= 0.9 * expected - 3 * expected ** 0.5


_BUCKET = re.compile(r'^edgekit_http_request_seconds_bucket\{(?P<labels>[^}]*)\} (?P<n>[0-9.e+]+)$', re.M)


def server_buckets(url: str | list[str]) -> dict[str, dict[float, float]]:
    """The server's own latency histogram from /metrics: route -> {upper bound s: cumulative count} (summed over replicas)."""
    import httpx

    out: dict[str, dict[float, float]] = {}
    for one in [url] if isinstance(url, str) else url:
        for m in _BUCKET.finditer(httpx.get(f"{one}/metrics", timeout=10).text):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
            route = f"{labels.get('method')} {labels.get('route')}"
            bucket = out.setdefault(route, {})
            bucket[float(labels["le"])] = bucket.get(float(labels["le"]), 0.0) + float(m["n"])
    return out


def server_cpu_seconds(server) -> float:  # noqa: ANN001 - a FleetServerProcess or a ReplicaFront
    """CPU seconds of the server side: one process, or every replica and nginx."""
    return server.cpu_seconds() if hasattr(server, "cpu_seconds") else process_cpu_seconds(server.pid)


def _metrics_urls(server) -> str | list[str]:  # noqa: ANN001
    return getattr(server, "urls", None) or server.url


def server_p99_ms(before: dict[str, dict[float, float]], after: dict[str, dict[float, float]], routes: tuple[str, ...]) -> float | None:
    """Upper bound (ms) of the histogram bucket holding the 99th percentile of the requests between two scrapes."""
    delta: dict[float, float] = {}
    for route in routes:
        for le, n in after.get(route, {}).items():
            delta[le] = delta.get(le, 0.0) + n - before.get(route, {}).get(le, 0.0)
    total = delta.get(float("inf"), 0.0)
    if not total:
        return None
    return next((le * 1000 for le in sorted(delta) if delta[le] >= 0.99 * total), None)


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] * 1000


def _phase_result(db: str, phase: str, n: int, interval: float, rec: Recorder, took: float, lags: list[float], server_p99: float | None,
                  server_cpu: float, db_cpu: float, client_cpu: float, per_device: int) -> PhaseResult:
    lat = sorted(rec.latencies)
    lags.sort()
    return PhaseResult(db, phase, n, round(interval, 3), round(per_device * n / interval, 1), round(len(lat) / took, 1), len(lat),
                       round(_pct(lat, 0.50), 2), round(_pct(lat, 0.99), 2), round(lat[-1] * 1000 if lat else float("nan"), 1),
                       sum(rec.errors.values()), dict(rec.errors), dict(rec.statuses),
                       {k: {"requests": len(v), "p50_ms": round(_pct(sorted(v), 0.5), 2), "p99_ms": round(_pct(sorted(v), 0.99), 2)}
                        for k, v in rec.by_kind.items()}, round(_pct(lags, 0.99), 1), server_p99,
                       round(server_cpu / took, 2), round(db_cpu / took, 2), round(client_cpu / took, 2), round(took, 1))


async def _measure(fleet: Fleet, server: FleetServerProcess, pg_data: Path | None, db: str, phase: str, interval: float,
                   seconds: float, args: argparse.Namespace, stats: StatsLoad | None = None) -> PhaseResult:
    h0 = server_buckets(_metrics_urls(server))
    s0, d0, c0 = server_cpu_seconds(server), cluster_cpu_seconds(pg_data), time.process_time()
    if stats is None:
        rec, took, lags = await fleet.run(interval, seconds, telemetry=args.telemetry)
    else:  # the operators' dashboards and Prometheus run in the same window, on connections of their own
        (rec, took, lags), _ = await asyncio.gather(fleet.run(interval, seconds, telemetry=args.telemetry), stats.run(seconds))
    s1, d1, c1 = server_cpu_seconds(server), cluster_cpu_seconds(pg_data), time.process_time()
    p99 = server_p99_ms(h0, server_buckets(_metrics_urls(server)), ("GET /v1/device/desired", "POST /v1/device/telemetry"))
    r = _phase_result(db, phase, len(fleet.devices), interval, rec, took, lags, p99, s1 - s0, d1 - d0, c1 - c0, 2 if args.telemetry else 1)
    if stats is not None:
        r = dataclasses.replace(r, stats=stats.summary(took))
    kinds = ", ".join(f"{k} {v['p99_ms']:g}" for k, v in r.by_kind.items())
    print(f"  {phase:>8}: interval {r.interval_s:g} s, offered {r.offered_rps:g} req/s, achieved {r.achieved_rps:g}, "
          f"p50 {r.p50_ms:g} ms, p99 {r.p99_ms:g} ms ({kinds}; server's own histogram: p99 <= {r.server_p99_le_ms} ms), "
          f"errors {r.errors}, client loop lag p99 {r.loop_lag_p99_ms:g} ms, "
          f"CPU cores: server {r.server_cores:g}, postgres {r.db_cores:g}, client {r.client_cores:g}", flush=True)
    if r.stats is not None:
        st = r.stats
        kinds = ", ".join(f"{k}: {v['requests']} ({v['per_s']:g}/s) p50 {v['p50_ms']:g} / p99 {v['p99_ms']:g} ms" for k, v in st["by_kind"].items())
        print(f"            stats load, {st['operators']} dashboards every {st['refresh_s']:g} s + /metrics every {st['scrape_s']:g} s: "
              f"{kinds}; whole refresh p50 {st['refresh_p50_ms']:g} / p99 {st['refresh_p99_ms']:g} ms; errors {st['errors']} "
              f"{st['error_kinds'] or ''}", flush=True)
    return r


async def _search(fleet: Fleet, server: FleetServerProcess, pg_data: Path | None, db: str, args: argparse.Namespace,
                  phases: list[PhaseResult]) -> tuple[PhaseResult | None, PhaseResult | None]:
    """From the steady phase, step the rate up (it held) or down (it did not) by ``--ramp-factor`` until the
    outcome flips, then bisect; returns (highest rate that held, lowest that did not)."""
    goal = args.p99_goal_ms
    steady = phases[0]
    up = steady.held(goal)
    best, failed = (steady, None) if up else (None, steady)
    interval = steady.interval_s
    for step in range(1, args.max_steps + 1 if args.ramp else 1):
        interval = interval / args.ramp_factor if up else interval * args.ramp_factor
        r = await _measure(fleet, server, pg_data, db, f"{'up' if up else 'down'} {step}", interval, args.step_duration, args)
        phases.append(r)
        if r.held(goal):
            best = r
            if not up:
                break
        else:
            failed = r
            if up:
                break
    if best is not None and failed is not None:
        held_iv, failed_iv = best.interval_s, failed.interval_s
        for i in range(args.refine):
            mid = (held_iv * failed_iv) ** 0.5
            r = await _measure(fleet, server, pg_data, db, f"refine {i + 1}", mid, args.step_duration, args)
            phases.append(r)
            if r.held(goal):
                best, held_iv = r, mid
            else:
                failed, failed_iv = r, mid
    return best, failed


async def run_db(db: str, args: argparse.Namespace, scratch: Path, replicas: int = 0) -> dict:
    """All phases against one server on one database (``replicas``: that many behind nginx over TLS, PostgreSQL)."""
    from bench.fleet_replicas import ReplicaFront

    label = f"{replicas} replica{'s' if replicas > 1 else ''} + nginx" if replicas else db
    with postgres_cluster() if db == "postgresql" else contextlib.nullcontext((None, None)) as (url, pg_data):
        front = (ReplicaFront(scratch / f"replicas-{replicas}", url, replicas, poll_interval_s=int(args.interval)) if replicas
                 else FleetServerProcess(scratch / f"server-{db}", url, poll_interval_s=int(args.interval)))
        with front as server:
            db_url = url or f"sqlite:///{(scratch / f'server-{db}' / 'fleet.db').resolve()}"
            db = label
            token = server.token("enroll")
            stats = seeded = None
            if args.stats:
                seeded = seed_fleet_history(db_url, args.devices, args.history_hours)
                stats = StatsLoad(RawPool("127.0.0.1", server.port, args.operators + 1, args.timeout, ssl_context=getattr(server, "ssl_context", None)),
                                  server.token("admin"), args.operators, args.refresh_s, args.scrape_s)
            if replicas:
                if args.client != "raw":
                    raise SystemExit("--replicas needs --client raw (TLS through nginx)")
                pool = RawPool("127.0.0.1", server.port, args.connections, args.timeout, ssl_context=server.ssl_context)
            else:
                pool = (RawPool if args.client == "raw" else HttpxPool)("127.0.0.1", server.port, args.connections, args.timeout)
            fleet = Fleet(pool, args.devices)
            if seeded is not None:
                fleet.model_sha256, fleet.model_version = seeded[VERSIONS[-1]]["sha256"], VERSIONS[-1]
            try:
                fleet.recording = True
                cpu0 = server_cpu_seconds(server)
                enroll_s, enroll_failures = await fleet.enroll(token, args.enroll_concurrency)
                enroll_rec, fleet.recording = fleet.rec, False
                enroll_cores = (server_cpu_seconds(server) - cpu0) / enroll_s
                print(f"  enrolled {args.devices - enroll_failures:,} devices in {enroll_s:.1f} s "
                      f"({(args.devices - enroll_failures) / enroll_s:.0f}/s, {args.enroll_concurrency} in flight, server CPU {enroll_cores:.2f} cores), "
                      f"{enroll_failures} failures {dict(enroll_rec.errors) or ''}", flush=True)
                if seeded is not None:
                    n = mark_devices_running(db_url, seeded[VERSIONS[-1]]["artifact_id"])
                    print(f"  seeded {MODEL} {', '.join(VERSIONS)} with {args.history_hours:g} h of per-minute rollups; {n:,} devices run "
                          f"{VERSIONS[-1]} and report its sha256 in their telemetry", flush=True)
                if args.warmup_s > 0:  # devices start at random moments, as a fleet does: the token cache fills (and expires) evenly
                    _, took, _ = await fleet.run(args.interval, args.warmup_s, telemetry=args.telemetry)
                    print(f"  warm-up: {took:.0f} s at the steady rate (the server's device-token cache reaches its steady state)", flush=True)
                else:
                    await fleet.first_poll(args.enroll_concurrency)
                phases = [await _measure(fleet, server, pg_data, db, "steady", args.interval, args.duration, args)]
                if stats is not None:  # side by side at the steady rate: A B (B A ...), so drift of the machine's load evens out
                    for rep in range(args.stats_reps):
                        tag = "" if rep == 0 else f" {rep + 1}"
                        order = [True] if rep == 0 else [True, False] if rep % 2 else [False, True]  # rep 0's "without" is "steady"
                        for with_stats in order:
                            name = f"steady+stats{tag}" if with_stats else f"steady{tag}"
                            phases.append(await _measure(fleet, server, pg_data, db, name, args.interval, args.duration, args,
                                                         stats if with_stats else None))
                best, failed = await _search(fleet, server, pg_data, db, args, phases)
            finally:
                await pool.close()
                if stats is not None:
                    await stats.pool.close()
    lat = sorted(enroll_rec.latencies)
    return {"db": db, "enroll": {"devices": args.devices, "seconds": round(enroll_s, 2), "per_s": round((args.devices - enroll_failures) / enroll_s, 1),
                                 "failures": enroll_failures, "p50_ms": round(_pct(lat, 0.5), 2), "p99_ms": round(_pct(lat, 0.99), 2),
                                 "server_cores": round(enroll_cores, 2)},
            "phases": [asdict(p) for p in phases], "max_sustainable_rps": best.achieved_rps if best else None,
            "max_sustainable_phase": best.phase if best else None}


def stats_comparison(phases: list[dict]) -> dict | None:
    """The steady-rate phases without and with stats queries, side by side (medians over the phases of each kind)."""
    import statistics

    steady = [p for p in phases if p["phase"] == "steady" or p["phase"].startswith(("steady ", "steady+stats"))]
    without = [p for p in steady if p["stats"] is None]
    with_ = [p for p in steady if p["stats"] is not None]
    if not without or not with_:
        return None

    def med(ps: list[dict]) -> dict:
        kind = lambda p, k: p["by_kind"].get(k, {}).get("p99_ms", float("nan"))  # noqa: E731
        return {"phases": [p["phase"] for p in ps], "achieved_rps": round(statistics.median(p["achieved_rps"] for p in ps), 1),
                "p50_ms": round(statistics.median(p["p50_ms"] for p in ps), 2), "p99_ms": round(statistics.median(p["p99_ms"] for p in ps), 2),
                "desired_p99_ms": round(statistics.median(kind(p, "desired") for p in ps), 2),
                "telemetry_p99_ms": round(statistics.median(kind(p, "telemetry") for p in ps), 2),
                "errors": sum(p["errors"] for p in ps), "server_cores": round(statistics.median(p["server_cores"] for p in ps), 2),
                "db_cores": round(statistics.median(p["db_cores"] for p in ps), 2)}

    w, s = med(without), med(with_)
    kinds: dict[str, dict] = {}
    for k in {k for p in with_ for k in p["stats"]["by_kind"]}:
        vals = [p["stats"]["by_kind"][k] for p in with_ if k in p["stats"]["by_kind"]]
        kinds[k] = {"requests": sum(v["requests"] for v in vals), "p50_ms": round(statistics.median(v["p50_ms"] for v in vals), 1),
                    "p99_ms": round(statistics.median(v["p99_ms"] for v in vals), 1), "max_ms": max(v["max_ms"] for v in vals)}
    return {"without": w, "with": s, "throughput_ratio": round(s["achieved_rps"] / w["achieved_rps"], 3) if w["achieved_rps"] else None,
            "p99_ratio": round(s["p99_ms"] / w["p99_ms"], 3) if w["p99_ms"] else None, "stats_by_kind": dict(sorted(kinds.items())),
            "stats_errors": sum(p["stats"]["errors"] for p in with_),
            "refresh_p99_ms": round(statistics.median(p["stats"]["refresh_p99_ms"] for p in with_), 1)}


def _print_wide(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """The harness's table, but wide enough for eleven columns in a log (rich assumes 80 off a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(160, shutil.get_terminal_size().columns)).print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--interval", type=float, default=60.0, help="Poll and telemetry interval per device in the steady phase (s).")
    p.add_argument("--duration", type=float, default=60.0, help="Length of the steady phase (s).")
    p.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    p.add_argument("--replicas", default="", metavar="N[,M]",
                   help="PostgreSQL, N replicas behind nginx over TLS (one run per count, e.g. 1,2); overrides --db.")
    p.add_argument("--ramp", action=argparse.BooleanOptionalAction, default=True, help="Search the maximum sustainable rate.")
    p.add_argument("--ramp-factor", type=float, default=1.5, help="Rate multiplier per ramp step.")
    p.add_argument("--step-duration", type=float, default=15.0, help="Length of each ramp step (s).")
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--refine", type=int, default=1, help="Bisection steps between the last rate that held and the first that did not.")
    p.add_argument("--p99-goal-ms", type=float, default=100.0)
    p.add_argument("--enroll-concurrency", type=int, default=64)
    p.add_argument("--connections", type=int, default=256, help="Client connection pool (keep-alive) shared by all simulated devices.")
    p.add_argument("--timeout", type=float, default=10.0, help="Per-request timeout (s); a timeout counts as an error.")
    p.add_argument("--telemetry", action=argparse.BooleanOptionalAction, default=True,
                   help="Post telemetry (writes) besides polling; --no-telemetry isolates the read path.")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="HTTP client of the simulated devices: raw asyncio HTTP/1.1 (~0.05 ms CPU/request) or httpx (~2 ms).")
    p.add_argument("--stats", action=argparse.BooleanOptionalAction, default=True,
                   help="Also run the steady rate with operators' stats queries running (field-statistics dashboards and a "
                        "Prometheus scrape), side by side with the steady phase without them.")
    p.add_argument("--operators", type=int, default=5, help="Operators with the dashboard's field-statistics view open.")
    p.add_argument("--refresh-s", type=float, default=2.0, help="Dashboard refresh: this long after the previous one finished (app.js REFRESH_MS).")
    p.add_argument("--scrape-s", type=float, default=15.0, help="Prometheus scrape interval of /metrics.")
    p.add_argument("--history-hours", type=float, default=24.0, help="Per-minute rollups seeded before the run (0.9.0, then 1.0.0).")
    p.add_argument("--warmup-s", type=float, default=None,
                   help="Steady load before the measured phases, each device starting at a random moment (default: the longer of "
                        "--interval and the server's token cache TTL, EDGEKIT_TOKEN_CACHE_TTL_S, 60 s). 0: one burst poll of every "
                        "device instead, which caches every device token at once, so they all expire together one TTL later.")
    p.add_argument("--stats-reps", type=int, default=1,
                   help="Phases with stats (each --duration s); from 2 on, each adds one phase without stats as well, in A B B A order.")
    args = p.parse_args(argv)
    if args.warmup_s is None:
        args.warmup_s = max(args.interval, float(os.environ.get("EDGEKIT_TOKEN_CACHE_TTL_S", "60")))
    if args.warmup_s < 0:
        raise SystemExit("--warmup-s: 0 or more seconds")
    if args.stats and (args.operators < 1 or args.refresh_s <= 0 or args.scrape_s <= 0 or args.stats_reps < 1):
        raise SystemExit("--operators and --stats-reps need 1 or more, --refresh-s and --scrape-s more than 0")
    scratch = prepare_process()
    host = host_facts()
    dbs = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    replica_counts = [int(x) for x in args.replicas.split(",") if x.strip()] if args.replicas else []
    if any(n < 1 for n in replica_counts):
        raise SystemExit("--replicas: counts of 1 or more, e.g. 1,2")
    per_device = 2 if args.telemetry else 1
    print(f"{args.devices:,} simulated devices, one poll{' + one telemetry post' if args.telemetry else ''} each per {args.interval:g} s "
          f"(~{per_device * args.devices / args.interval:.0f} req/s) over {args.client} HTTP/1.1; the client (one asyncio process) "
          f"and the server share {os.cpu_count()} cores", flush=True)
    results = []
    with OtherLoad() as load:
        if replica_counts:
            for n in replica_counts:
                print(f"\n== postgresql, {n} replica(s) behind nginx (TLS) ==", flush=True)
                results.append(asyncio.run(run_db("postgresql", args, scratch, replicas=n)))
        else:
            for db in dbs:
                print(f"\n== {db} ==", flush=True)
                results.append(asyncio.run(run_db(db, args, scratch)))
    rows = []
    for res in results:
        for ph in res["phases"]:
            ok = PhaseResult(**ph).held(args.p99_goal_ms)
            rows.append([res["db"], ph["phase"], f"{ph['interval_s']:g}", f"{ph['offered_rps']:g}", f"{ph['achieved_rps']:g}",
                         f"{ph['p50_ms']:g}", f"{ph['p99_ms']:g}", f"<= {ph['server_p99_le_ms']:g}" if ph["server_p99_le_ms"] else "-",
                         str(ph["errors"]), f"{ph['loop_lag_p99_ms']:g}",
                         f"{ph['server_cores']:g}/{ph['db_cores']:g}/{ph['client_cores']:g}", "yes" if ok else "NO"])
    _print_wide(f"Fleet load ({args.devices:,} devices; latency measured by the client; goal p99 <= {args.p99_goal_ms:g} ms, no errors)",
                ["db", "phase", "interval s", "offered req/s", "req/s", "p50 ms", "p99 ms", "server p99 ms", "errors", "loop lag p99 ms",
                 "CPU srv/pg/cli", "held"], rows)
    stats_rows, comparisons = [], {}
    for res in results:
        c = stats_comparison(res["phases"])
        if c is None:
            continue
        comparisons[res["db"]] = c
        res["stats_comparison"] = c
        w, s_ = c["without"], c["with"]
        stats_rows.append([res["db"], f"{w['achieved_rps']:g} / {s_['achieved_rps']:g}", f"{c['throughput_ratio']:.3f}",
                           f"{w['p99_ms']:g} / {s_['p99_ms']:g}", f"{c['p99_ratio']:.2f}",
                           f"{w['desired_p99_ms']:g} / {s_['desired_p99_ms']:g}", f"{w['telemetry_p99_ms']:g} / {s_['telemetry_p99_ms']:g}",
                           str(s_["errors"]), "; ".join(f"{k} {v['p50_ms']:g}/{v['p99_ms']:g}" for k, v in c["stats_by_kind"].items()),
                           str(c["stats_errors"])])
    if stats_rows:
        _print_wide(f"Device check-in without / with stats queries ({args.operators} dashboards refreshed {args.refresh_s:g} s apart, "
                    f"/metrics every {args.scrape_s:g} s; medians over the phases)",
                    ["db", "req/s", "ratio", "p99 ms", "ratio", "desired p99", "telemetry p99", "errors", "stats p50/p99 ms", "stats errors"],
                    stats_rows)
    for res in results:
        e = res["enroll"]
        print(f"{res['db']}: enrolled {e['devices']:,} in {e['seconds']:g} s ({e['per_s']:g}/s, p99 {e['p99_ms']:g} ms, "
              f"{e['failures']} failures); max sustainable: {res['max_sustainable_rps'] or 'none'} req/s ({res['max_sustainable_phase']})")
    note = (f"client, server and PostgreSQL share {os.cpu_count()} cores (cores each used: 'CPU srv/pg/cli'; the client's event-loop lag is "
            f"shown); one keep-alive pool of {args.connections} connections carries every device's requests; "
            f"{load.describe()}")
    print(note)
    ratios = []
    for res in results:
        steady = res["phases"][0]
        ratios += [Ratio(f"{res['db']}: steady p99 / {args.p99_goal_ms:g} ms", steady["p99_ms"] / args.p99_goal_ms, 1.0,
                         f"{args.devices:,} devices, {steady['achieved_rps']:g} req/s"),
                   Ratio(f"{res['db']}: steady errors", float(steady["errors"]), 0.0),
                   Ratio(f"{res['db']}: max sustainable req/s", float(res["max_sustainable_rps"] or 0), None, "p99 within the goal, no errors")]
        c = comparisons.get(res["db"])
        if c is not None:
            ratios += [Ratio(f"{res['db']}: steady+stats p99 / {args.p99_goal_ms:g} ms", c["with"]["p99_ms"] / args.p99_goal_ms, 1.0,
                             f"{args.operators} dashboards + /metrics while {args.devices:,} devices check in"),
                       Ratio(f"{res['db']}: steady+stats errors (devices and stats)", float(c["with"]["errors"] + c["stats_errors"]), 0.0),
                       Ratio(f"{res['db']}: device p99 with stats / without", c["p99_ratio"], None),
                       Ratio(f"{res['db']}: device req/s without stats / with", 1 / c["throughput_ratio"] if c["throughput_ratio"] else float("inf"), None)]
    path = write_result(f"{NAME}_replicas" if replica_counts else NAME, host, {"config": vars(args), "note": note, "other_load_cores": load.cores,
                                     "ratios": [r.to_dict() for r in ratios], "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
