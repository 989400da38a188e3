"""Telemetry: apps record predictions, the agent posts per-minute points to the fleet server.

::

    app process                         data dir                          agent process
    Recorder.record()  ── per minute ──► telemetry/points/*.json ──batch──► POST /v1/device/telemetry
      (in memory, µs)     (one file per   (bounded: capacity points;          (deletes what was accepted,
                           finished        overflow counted in                 reports ``dropped``)
                           minute)         telemetry/dropped)

``record`` only updates an in-memory aggregate under a lock (no I/O, no fsync): a finished minute
is written as one point by a background thread, by ``flush()`` or at ``close()``. Points are
additive: two points with the same minute and model (two processes, or a flush followed by more
records in that minute) are summed by whoever reads them. The buffer is a directory of
JSON files, one per point, written atomically (temp file + rename) under an ``flock`` so its
bound is exact across processes; while the server is down nothing below capacity is lost, and
a point that would exceed it is dropped and counted, and the count is reported with the next
successful post.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import fcntl
import json
import os
import random
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_CAPACITY", "Recorder", "TelemetryBatch", "TelemetryBuffer"]

DEFAULT_CAPACITY = 10_000
_LATENCY_SAMPLES = 10_000  # per minute and model; beyond it a uniform reservoir keeps quantiles honest


def _capacity_from_env() -> int:
    return int(os.environ.get("EDGEKIT_AGENT_TELEMETRY_CAPACITY", DEFAULT_CAPACITY))


@dataclass(frozen=True)
class TelemetryBatch:
    """Points read from the buffer for one post, and the drop count to report with them."""

    files: tuple[Path, ...]
    points: tuple[dict, ...]
    dropped: int


class TelemetryBuffer:
    """The bounded on-disk buffer of telemetry points shared by apps (writers) and the agent (reader)."""

    def __init__(self, data_dir: str | os.PathLike[str], capacity: int | None = None) -> None:
        self.root = Path(data_dir) / "telemetry"
        self.points_dir = self.root / "points"
        self.capacity = capacity if capacity is not None else _capacity_from_env()
        self.points_dir.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.root / ".lock"
        self._dropped_path = self.root / "dropped"
        self._seq = 0

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _count(self) -> int:
        return sum(1 for e in os.scandir(self.points_dir) if e.name.endswith(".json"))

    def _read_dropped(self) -> int:
        try:
            return int(self._dropped_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _write_dropped(self, value: int) -> None:
        tmp = self._dropped_path.with_name(f".dropped.{os.getpid()}.tmp")
        tmp.write_text(str(max(0, value)))
        os.replace(tmp, self._dropped_path)

    def add(self, point: dict) -> bool:
        """Store one point; False (and the drop counted) when the buffer is full."""
        with self._locked():
            if self._count() >= self.capacity:
                self._write_dropped(self._read_dropped() + 1)
                return False
            self._seq += 1
            name = f"{point['minute'].replace(':', '').replace('-', '')}-{os.getpid()}-{threading.get_ident() % 10_000}-{self._seq}.json"
            tmp = self.root / f".{name}.tmp"
            tmp.write_text(json.dumps(point, separators=(",", ":")))
            os.replace(tmp, self.points_dir / name)  # readers never see a half-written point
            return True

    def fill(self) -> tuple[int, int, int]:
        """(points buffered, capacity, drops not yet reported)."""
        return self._count(), self.capacity, self._read_dropped()

    def batch(self, limit: int = 1000) -> TelemetryBatch:
        """The oldest ``limit`` points and the current drop count (nothing is removed)."""
        with self._locked():
            names = sorted(e.name for e in os.scandir(self.points_dir) if e.name.endswith(".json"))[:limit]
            files, points = [], []
            for n in names:
                path = self.points_dir / n
                try:
                    points.append(json.loads(path.read_text()))
                    files.append(path)
                except (OSError, ValueError):
                    path.unlink(missing_ok=True)  # unreadable point: cannot be posted; do not block the queue
            return TelemetryBatch(tuple(files), tuple(points), self._read_dropped())

    def ack(self, batch: TelemetryBatch) -> None:
        """The server accepted ``batch``: remove its points and the drops it reported."""
        with self._locked():
            for f in batch.files:
                f.unlink(missing_ok=True)
            if batch.dropped:
                self._write_dropped(self._read_dropped() - batch.dropped)


@dataclass
class _Bucket:
    """One minute of one model's records, aggregated in memory."""

    count: int = 0
    errors: int = 0
    escalations: int = 0
    degraded: int = 0
    latency_max: float = 0.0
    latencies: list[float] = field(default_factory=list)
    hist: list[int] = field(default_factory=lambda: [0] * 10)
    sources: dict[str, int] = field(default_factory=dict)

    def point(self, minute: int, sha256: str | None, version: str | None) -> dict:
        lat = np.asarray(self.latencies, dtype=np.float64)
        q = np.percentile(lat, [50, 95, 99]) if lat.size else (0.0, 0.0, 0.0)
        return {
            "minute": dt.datetime.fromtimestamp(minute * 60, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:00Z"),
            "model_sha256": sha256,
            "model_version": version,
            "count": self.count,
            "errors": self.errors,
            "escalations": self.escalations,
            "degraded": self.degraded,
            "latency_ms": {"p50": float(q[0]), "p95": float(q[1]), "p99": float(q[2]), "max": self.latency_max},
            "confidence_hist": list(self.hist),
            "sources": dict(self.sources),
        }


_live: weakref.WeakSet[Recorder] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for rec in list(_live):
        with contextlib.suppress(Exception):
            rec.close()


class Recorder:
    """Records one prediction at a time for the agent to report; ``record`` is cheap (no I/O).

    ``model_sha256``/``model_version`` default to the model active in ``data_dir`` (re-read at most
    once a second), so an app that follows ``edgekit.runtime.load_active`` is attributed correctly.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, capacity: int | None = None, flush_interval_s: float = 5.0,
                 model_sha256: str | None = None, model_version: str | None = None, background: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.buffer = TelemetryBuffer(self.data_dir, capacity)
        self._fixed = (model_sha256, model_version) if model_sha256 else None
        self._active: tuple[str | None, str | None] = (None, None)
        self._active_checked = -1e9
        self._buckets: dict[tuple[int, str | None, str | None], _Bucket] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.written = 0
        self.dropped = 0
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._flush_loop, args=(flush_interval_s,), name="edgekit-telemetry", daemon=True)
            self._thread.start()
        _live.add(self)

    def _model(self) -> tuple[str | None, str | None]:
        if self._fixed is not None:
            return self._fixed
        now = time.monotonic()
        if now - self._active_checked > 1.0:
            from edgekit.runtime import read_active_pointer

            self._active_checked = now
            try:
                ptr = read_active_pointer(self.data_dir)
            except OSError:
                ptr = None
            self._active = (ptr.sha256, ptr.version) if ptr else (None, None)
        return self._active

    def record(self, *, latency_ms: float, confidence: float | None = None, source: str = "device", error: str | None = None,
               escalated: bool = False, degraded: bool = False, at: float | None = None,
               model_sha256: str | None = None, model_version: str | None = None) -> None:
        """Count one prediction: its latency, calibrated confidence (0..1), who answered, and what went wrong.

        ``at`` (epoch seconds) defaults to now; ``model_sha256``/``model_version`` override the active model.
        """
        minute = int((time.time() if at is None else at) // 60)
        sha, version = (model_sha256, model_version) if model_sha256 else self._model()
        key = (minute, sha, version)
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = _Bucket()
            b.count += 1
            if error is not None:
                b.errors += 1
            if escalated:
                b.escalations += 1
            if degraded:
                b.degraded += 1
            b.sources[source] = b.sources.get(source, 0) + 1
            if confidence is not None:
                b.hist[min(9, max(0, int(confidence * 10)))] += 1
            lat = float(latency_ms)
            if lat > b.latency_max:
                b.latency_max = lat
            if len(b.latencies) < _LATENCY_SAMPLES:
                b.latencies.append(lat)
            else:  # reservoir sampling: every record has the same chance to be in the sample
                j = random.randrange(b.count)
                if j < _LATENCY_SAMPLES:
                    b.latencies[j] = lat

    def flush(self, *, include_current: bool = False) -> int:
        """Write finished minutes (and the current one with ``include_current``) to the buffer; points written."""
        now_minute = int(time.time() // 60)
        with self._lock:
            keys = [k for k in self._buckets if include_current or k[0] < now_minute]
            taken = [(k, self._buckets.pop(k)) for k in sorted(keys, key=lambda k: k[0])]
        n = 0
        for (minute, sha, version), bucket in taken:
            if self.buffer.add(bucket.point(minute, sha, version)):
                n += 1
            else:
                self.dropped += 1
        self.written += n
        return n

    def _flush_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            with contextlib.suppress(OSError):
                self.flush()

    def close(self) -> None:
        """Write everything recorded so far, including the current minute, and stop the background thread."""
        self._closed.set()
        self.flush(include_current=True)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
