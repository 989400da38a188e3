"""Telemetry: the Recorder's per-minute points, the bounded on-disk buffer, drops counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from device_agents.telemetry import Recorder, TelemetryBuffer

T0 = 1_790_000_000.0  # a fixed minute boundary region (epoch seconds)


def test_record_aggregates_one_point_per_minute_and_model(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, background=False, model_sha256="a" * 64, model_version="1.0.0")
    for i in range(100):
        rec.record(latency_ms=float(i + 1), confidence=i / 100, source="device" if i % 4 else "cloud",
                   error="timeout" if i == 7 else None, escalated=i % 4 == 0, degraded=i == 9, at=T0 - T0 % 60 + 1)
    rec.record(latency_ms=5.0, confidence=0.95, at=T0 - T0 % 60 + 61)  # the next minute
    assert rec.flush(include_current=True) == 2
    batch = TelemetryBuffer(tmp_path).batch()
    first, second = sorted(batch.points, key=lambda p: p["minute"])
    assert first["count"] == 100 and first["errors"] == 1 and first["degraded"] == 1 and first["escalations"] == 25
    assert first["sources"] == {"cloud": 25, "device": 75}
    assert first["confidence_hist"] == [10] * 10
    assert first["latency_ms"]["max"] == 100.0 and 49 <= first["latency_ms"]["p50"] <= 52 and first["latency_ms"]["p99"] > 98
    assert first["model_sha256"] == "a" * 64 and first["model_version"] == "1.0.0"
    assert first["minute"].endswith(":00Z") and second["count"] == 1 and second["confidence_hist"][9] == 1
    assert batch.dropped == 0


def test_unfinished_minute_stays_in_memory_until_close(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, background=False, model_sha256="b" * 64, model_version="2")
    rec.record(latency_ms=1.0, confidence=0.5)
    assert rec.flush() == 0  # the current minute is not finished
    rec.close()
    assert TelemetryBuffer(tmp_path).fill()[0] == 1


def test_buffer_is_bounded_and_counts_drops_until_acknowledged(tmp_path: Path) -> None:
    buf = TelemetryBuffer(tmp_path, capacity=5)
    rec = Recorder(tmp_path, capacity=5, background=False, model_sha256="c" * 64, model_version="1")
    for m in range(8):
        rec.record(latency_ms=1.0, confidence=0.9, at=T0 + 60 * m)
    rec.flush(include_current=True)
    assert buf.fill() == (5, 5, 3)
    batch = buf.batch(limit=3)
    assert len(batch.points) == 3 and batch.dropped == 3
    buf.ack(batch)
    assert buf.fill() == (2, 5, 0)
    # the oldest points were posted first; nothing below capacity was lost
    rest = buf.batch()
    assert [p["minute"] for p in batch.points + rest.points] == sorted(p["minute"] for p in batch.points + rest.points)


def test_record_does_no_io_and_exit_writes_the_open_minute(tmp_path: Path) -> None:
    code = (
        "import os, sys, time; from device_agents.telemetry import Recorder\n"
        f"r = Recorder({str(tmp_path)!r}, model_sha256='d'*64, model_version='9', background=False)\n"
        "t = time.perf_counter()\n"
        "for i in range(20000): r.record(latency_ms=1.5, confidence=0.7, source='device', error=None, escalated=False, degraded=False)\n"
        "per_call_us = (time.perf_counter() - t) / 20000 * 1e6\n"
        f"print(len(os.listdir({str(tmp_path / 'telemetry' / 'points')!r})), per_call_us)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    files_during, per_call_us = out.stdout.split()
    assert files_during == "0"  # 20,000 records and not one write
    print(f"record(): {float(per_call_us):.2f} µs per call")
    points = TelemetryBuffer(tmp_path).batch().points
    assert sum(p["count"] for p in points) == 20000  # atexit wrote the open minute(s)
    assert not list((tmp_path / "telemetry").glob(".*.tmp"))


def test_model_follows_the_active_pointer(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, background=False)
    rec.record(latency_ms=1.0, at=T0)
    (tmp_path / "active.json").write_text(json.dumps({"sha256": "e" * 64, "name": "m", "version": "3", "bundle": "models/x/bundle"}))
    rec._active_checked = -1e9  # as if a second had passed
    rec.record(latency_ms=1.0, at=T0)
    rec.close()
    points = TelemetryBuffer(tmp_path).batch().points
    assert sorted((p["model_sha256"] or "") for p in points) == ["", "e" * 64]
