"""Field statistics at fleet scale: how long the stats queries take over a 10,000-device hour of telemetry,
and what they do to telemetry writes running at the same time.

One version's artifact, ``--devices`` devices each with one point per minute for ``--minutes`` minutes
(10,000 x 60 = 600,000 points, what the 10,000-device load benchmark's fleet writes in an hour), inserted
straight into a migrated database (SQLite in WAL mode, and a throwaway PostgreSQL cluster) in batches
of one minute of the fleet, each with its rollup rows as the server's telemetry writer keeps them. A
rollout's first wave holds 5% of the devices (for the field gate's sums). Then, side by
side in one run: each query alone (median of ``--repeat``), and the telemetry writer's batch insert time
alone and while a thread runs the version query in a loop.

    python bench/field_stats.py [--devices 10000] [--minutes 60] [--db sqlite|postgresql|both]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import datetime as dt
import statistics
import tempfile
import threading
import time
from types import SimpleNamespace

from sqlalchemy import insert

from fleet_server.rollups import rollup_rows, upsert_rollups

from bench.harness import ROOT, Ratio, host_facts, print_table, ratio_rows, write_result


def _populate(db, devices: int, minutes: int, now: dt.datetime) -> tuple[str, list[str]]:  # noqa: ANN001
    from fleet_server.tables import Artifact, Device, Model, ModelVersion, Rollout, RolloutDevice, TelemetryPoint, VersionArtifact

    sha = "a" * 64
    with db.write() as s:
        s.add(Model(id=1, name="digits", created_at=now))
        s.add(ModelVersion(id=1, model_id=1, version="1.0.0", created_at=now))
        s.add(Artifact(sha256=sha, size_bytes=1, created_at=now))
        s.add(VersionArtifact(id=1, version_id=1, artifact_sha256=sha, profile="raspberry-pi-5", format="tflite", file="m.tflite",
                              manifest={}, manifest_sha256="b" * 64, validation={}))
    ids = [f"dev_{i:08x}" for i in range(devices)]
    with db.write() as s:
        s.execute(insert(Device), [{"id": d, "name": d, "profile": "raspberry-pi-5", "tags": [], "facts": {}, "enrolled_at": now,
                                    "serial": 0, "desired_serial": 0} for d in ids])
    with db.write() as s:  # a rollout whose first wave (5% of the devices) replaced 0.9.0 (no telemetry of its own) by 1.0.0
        s.add(ModelVersion(id=2, model_id=1, version="0.9.0", created_at=now))
        s.add(Artifact(sha256="c" * 64, size_bytes=1, created_at=now))
        s.add(VersionArtifact(id=2, version_id=2, artifact_sha256="c" * 64, profile="raspberry-pi-5", format="tflite", file="m.tflite",
                              manifest={}, manifest_sha256="d" * 64, validation={}))
        s.add(Rollout(id="ro_bench", version_id=1, model="digits", version="1.0.0", state="running", selector={}, waves_pct=[5, 100],
                      gates={}, wave_timeout_s=600, current_wave=0, created_at=now, updated_at=now, reason=None, skipped=[]))
        s.flush()
        s.execute(insert(RolloutDevice), [{"rollout_id": "ro_bench", "device_id": d, "wave_index": 0, "order": i, "artifact_id": 1,
                                           "previous_artifact_id": 2, "finished": True} for i, d in enumerate(ids[: max(1, devices // 20)])])
    start = now - dt.timedelta(minutes=minutes)
    for m in range(minutes):
        minute = start + dt.timedelta(minutes=m)
        rows = [{"device_id": d, "minute": minute, "model_sha256": sha, "model_version": "1.0.0", "received_at": now,
                 "data": {"count": 60, "errors": 0, "escalations": 6 + i % 5, "degraded": i % 3, "latency_ms": {"p50": 1.0, "p95": 2.0 + i % 7 / 10,
                          "p99": 3.0, "max": 4.0}, "confidence_hist": [0, 0, 0, 0, 0, 1, 2, 7, 20, 30], "sources": {"device": 60}}}
                for i, d in enumerate(ids)]
        with db.write() as s:  # what the server's telemetry writer does per batch (fleet_server.writer)
            s.execute(insert(TelemetryPoint), rows)
            upsert_rollups(s, rollup_rows(rows))
    return sha, ids


def _time(fn, repeat: int) -> tuple[float, object]:  # noqa: ANN001
    out, times = None, []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), out


def _writes(db, ids: list[str], sha: str, batches: int, now: dt.datetime, rollups: bool = True) -> float:  # noqa: ANN001
    """Median ms of one telemetry batch insert (1,000 points in one transaction, like the group-commit writer)."""
    from fleet_server.tables import TelemetryPoint

    times = []
    for b in range(batches):
        rows = [{"device_id": ids[(b * 1000 + i) % len(ids)], "minute": now, "model_sha256": sha, "model_version": "1.0.0", "received_at": now,
                 "data": {"count": 60, "errors": 0, "escalations": 6, "degraded": 0, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0},
                          "confidence_hist": [0] * 9 + [60], "sources": {"device": 60}}} for i in range(1000)]
        t = time.perf_counter()
        with db.write() as s:
            s.execute(insert(TelemetryPoint), rows)
            if rollups:
                upsert_rollups(s, rollup_rows(rows))
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def run_db(name: str, url: str, args: argparse.Namespace) -> dict:
    from fleet_server.db import Database, utcnow
    from fleet_server.services import stats
    from fleet_server.services.field_metrics import field_series
    from fleet_server.services.gates import wave_field_sums
    from fleet_server.tables import RolloutDevice

    db = Database(url)
    db.migrate()
    ctx = SimpleNamespace(db=db)  # the services read ctx.db only
    now = utcnow().replace(second=0, microsecond=0)
    t = time.perf_counter()
    sha, ids = _populate(db, args.devices, args.minutes, now)
    load_s = time.perf_counter() - t
    hour = stats.StatsQuery.build(now - dt.timedelta(minutes=args.minutes), now + dt.timedelta(minutes=1), 60)
    day = stats.StatsQuery.build(now - dt.timedelta(hours=24), now + dt.timedelta(minutes=1), None)
    wave = [RolloutDevice(device_id=d, artifact_id=1, previous_artifact_id=2) for d in ids[: max(1, args.devices // 20)]]
    queries = {
        f"version stats, {args.minutes} min in 1-min buckets": lambda: stats.version_stats(ctx, "digits", "1.0.0", hour),
        "version stats, 24 h, totals": lambda: stats.version_stats(ctx, "digits", "1.0.0", day),
        "model stats (every version), 24 h": lambda: stats.model_stats(ctx, "digits", day),
        f"field gate sums, a 5% wave ({len(wave)} devices)": lambda: _with_session(db, lambda s: wave_field_sums(s, "ro_bench", 0, wave, hour.since, hour.until)),
        "/metrics field gauges (15 min)": lambda: _with_session(db, field_series),
    }
    out = {"db": name, "devices": args.devices, "minutes": args.minutes, "points": args.devices * args.minutes, "load_s": round(load_s, 1),
           "queries_ms": {}}
    for label, fn in queries.items():
        ms, result = _time(fn, args.repeat)
        out["queries_ms"][label] = round(ms, 1)
        if label.startswith("version stats, 24"):
            assert result["totals"]["requests"] == args.devices * args.minutes * 60, result["totals"]["requests"]
    out["write_batch_ms_points_only"] = round(_writes(db, ids, sha, args.batches, now, rollups=False), 2)
    out["write_batch_ms_alone"] = round(_writes(db, ids, sha, args.batches, now), 2)
    stop = threading.Event()
    n = {"queries": 0}

    def hammer() -> None:
        while not stop.is_set():
            stats.version_stats(ctx, "digits", "1.0.0", hour)
            n["queries"] += 1

    th = threading.Thread(target=hammer, daemon=True)
    th.start()
    t = time.perf_counter()
    out["write_batch_ms_during_stats"] = round(_writes(db, ids, sha, args.batches, now), 2)
    stop.set()
    th.join()
    out["stats_queries_during_writes"] = n["queries"]
    out["writes_window_s"] = round(time.perf_counter() - t, 1)
    db.dispose()
    return out


def _with_session(db, fn):  # noqa: ANN001, ANN202
    with db.read() as s:
        return fn(s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--minutes", type=int, default=60)
    p.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batches", type=int, default=20)
    args = p.parse_args(argv)
    host = host_facts()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.db in ("sqlite", "both"):
            results.append(run_db("sqlite", f"sqlite:///{tmp}/fleet.db", args))
        if args.db in ("postgresql", "both"):
            sys.path.insert(0, str(ROOT / "tests"))
            from bench.fleet_load import postgres_cluster

            with postgres_cluster() as (url, _):
                results.append(run_db("postgresql", url, args))
    for r in results:
        print(f"\n{r['db']}: {r['points']:,} points ({r['devices']:,} devices x {r['minutes']} min), loaded in {r['load_s']} s")
        for label, ms in r["queries_ms"].items():
            print(f"  {label:<48} {ms:>9.1f} ms")
        print(f"  telemetry batch insert (1,000 points): {r['write_batch_ms_points_only']} ms without its rollup upsert, "
              f"{r['write_batch_ms_alone']} ms with it, alone; {r['write_batch_ms_during_stats']} ms while "
              f"version stats ran in a loop ({r['stats_queries_during_writes']} queries in {r['writes_window_s']} s): "
              f"x{r['write_batch_ms_during_stats'] / r['write_batch_ms_alone']:.2f}")
    ratios = []
    for r in results:
        ratios += [Ratio(f"{r['db']}: batch write with rollup / without", r["write_batch_ms_alone"] / r["write_batch_ms_points_only"], None),
                   Ratio(f"{r['db']}: batch write while stats run / alone", r["write_batch_ms_during_stats"] / r["write_batch_ms_alone"], None),
                   Ratio(f"{r['db']}: version query (1 h, 1-min buckets) / one batch write",
                         r["queries_ms"][f"version stats, {r['minutes']} min in 1-min buckets"] / r["write_batch_ms_alone"], None)]
    print_table("Ratios", ["ratio", "value", "goal", "met"], ratio_rows(ratios))
    path = write_result("field_stats", host, {"results": results, "ratios": [x.to_dict() for x in ratios]})
    print(f"\nwrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
