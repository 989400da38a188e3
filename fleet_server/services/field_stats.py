"""Field statistics: what a model version does on devices, aggregated from stored telemetry.

Devices post one point per (minute, model) with counts, per-minute latency percentiles and a
10-bin confidence histogram (``device_agents.telemetry``). The telemetry writer adds each
batch to a per-(artifact, minute) rollup row in the same transaction (``fleet_server.rollups``), so a
version's statistics read one row per minute and artifact; Python folds the minutes into buckets.
Field gates need the wave's own devices: those sums are read from the points, joined on the wave. What follows from
the points and what does not:

- requests, escalations, degraded answers: exact sums.
- errors: requests that got no answer at all, as the hybrid router records them; a degraded answer
  (the device's answer stood because the cloud failed) is an answer: counted as degraded, not as an error.
- latency p50/p95/p99 over a bucket: the request-weighted mean of the per-minute percentiles
  (devices send percentiles, not samples; exact for one minute of one device), max: exact.
- drift: the population stability index (PSI) of the confidence histogram against a reference
  histogram, bins floored at 1e-4; above ``PSI_DRIFT_THRESHOLD`` (0.2) it reads as drifted. The reference is the
  confidence histogram the router was calibrated on (``router_policy.confidence_histogram`` in the version's
  manifests, binned as telemetry bins: :func:`calibration_reference`) when every artifact with field requests has
  one, else the previous version's field histogram; the output says which.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, cast, extract, func, literal_column, select
from sqlalchemy.orm import Session

from edgekit.protocol import PSI_DRIFT_THRESHOLD
from fleet_server.db import utc
from fleet_server.tables import RolloutDevice, TelemetryPoint, TelemetryRollup

__all__ = ["BINS", "FieldSums", "bucket_sums", "calibration_hist", "calibration_reference", "minute_sums", "psi", "range_sums",
           "wave_sums"]

BINS = 10
_EPS = 1e-4


@dataclass
class FieldSums:
    """Additive field telemetry of some set of points."""

    requests: int = 0
    errors: int = 0
    escalations: int = 0
    degraded: int = 0
    p50_w: float = 0.0  # Σ count × per-minute p50 (likewise p95, p99)
    p95_w: float = 0.0
    p99_w: float = 0.0
    latency_max: float = 0.0
    hist: list[int] = field(default_factory=lambda: [0] * BINS)
    points: int = 0
    # the confidence distribution these points' artifacts were calibrated on, and what it is (set by the field gates'
    # reader; not summed by add/minus)
    calibration: tuple[list[float], str] | None = None

    def add(self, other: FieldSums) -> None:
        """Add another set's sums to this one."""
        self.requests += other.requests
        self.errors += other.errors
        self.escalations += other.escalations
        self.degraded += other.degraded
        self.p50_w += other.p50_w
        self.p95_w += other.p95_w
        self.p99_w += other.p99_w
        self.latency_max = max(self.latency_max, other.latency_max)
        self.hist = [a + b for a, b in zip(self.hist, other.hist)]
        self.points += other.points

    def minus(self, other: FieldSums) -> FieldSums:
        """These sums without ``other``'s (a subset of them); the maximum latency cannot be taken out and stays."""
        return FieldSums(requests=max(0, self.requests - other.requests), errors=max(0, self.errors - other.errors),
                         escalations=max(0, self.escalations - other.escalations), degraded=max(0, self.degraded - other.degraded),
                         p50_w=max(0.0, self.p50_w - other.p50_w), p95_w=max(0.0, self.p95_w - other.p95_w),
                         p99_w=max(0.0, self.p99_w - other.p99_w), latency_max=self.latency_max, points=max(0, self.points - other.points),
                         hist=[max(0, a - b) for a, b in zip(self.hist, other.hist)])

    def _rate(self, n: int) -> float | None:
        return n / self.requests if self.requests else None

    @property
    def escalation_rate(self) -> float | None:
        return self._rate(self.escalations)

    @property
    def degraded_rate(self) -> float | None:
        return self._rate(self.degraded)

    @property
    def error_rate(self) -> float | None:
        return self._rate(self.errors)

    def latency(self) -> dict[str, float | None]:
        """Request-weighted latency percentiles (ms) and the maximum."""
        if not self.requests:
            return {"p50": None, "p95": None, "p99": None, "max": None}
        n = self.requests
        return {"p50": self.p50_w / n, "p95": self.p95_w / n, "p99": self.p99_w / n, "max": self.latency_max}

    def public(self) -> dict[str, Any]:
        """The sums as the API shows them."""
        return {"requests": self.requests, "escalations": self.escalations, "escalation_rate": self.escalation_rate,
                "degraded": self.degraded, "degraded_rate": self.degraded_rate, "errors": self.errors,
                "error_rate": self.error_rate, "latency_ms": self.latency(), "confidence_hist": list(self.hist)}


def psi(actual: Iterable[float], reference: Iterable[float]) -> float | None:
    """Population stability index of two histograms (None when either is empty)."""
    a, r = list(actual), list(reference)
    ta, tr = sum(a), sum(r)
    if not ta or not tr:
        return None
    total = 0.0
    for x, y in zip(a, r):
        p, q = max(x / ta, _EPS), max(y / tr, _EPS)
        total += (p - q) * math.log(p / q)
    return total


def calibration_hist(manifest: dict[str, Any] | None) -> list[int] | None:
    """The router policy's calibration confidence histogram in a stored manifest, when it has one whose bins are the
    telemetry's (``BINS`` equal bins over [0, 1]) and holds any counts; else None."""
    from edgekit.manifest import ConfidenceHistogram

    raw = ((manifest or {}).get("router_policy") or {}).get("confidence_histogram")
    if not raw:
        return None
    try:
        h = ConfidenceHistogram.model_validate(raw)
    except ValueError:
        return None
    if len(h.counts) != BINS or any(abs(e - i / BINS) > 1e-9 for i, e in enumerate(h.edges)) or not sum(h.counts):
        return None
    return list(h.counts)


def calibration_reference(manifests: dict[str, dict[str, Any]], requests: dict[str, int]) -> tuple[list[float] | None, str]:
    """The calibration histograms of the artifacts (sha256 → manifest) that served requests (sha256 → count), mixed in
    proportion to those requests, and what it is; (None, why not) when any of them lacks one."""
    served = {sha: n for sha, n in requests.items() if n > 0}
    if not served:
        return None, "no field requests"
    mix = [0.0] * BINS
    examples = 0
    for sha, n in served.items():
        counts = calibration_hist(manifests.get(sha))
        if counts is None:
            return None, "no calibration histogram (router_policy.confidence_histogram) in the manifest of every artifact"
        total = sum(counts)
        examples += total
        mix = [m + n * c / total for m, c in zip(mix, counts)]
    return mix, f"calibration: the router policy's confidence histogram ({examples} calibration examples)"


def drift(actual: FieldSums, reference: FieldSums | list[float] | None, label: str) -> dict[str, Any]:
    """The PSI of ``actual``'s confidence histogram against ``reference``'s (or a reference histogram), with the threshold
    it is read against."""
    ref_hist = reference.hist if isinstance(reference, FieldSums) else reference
    value = psi(actual.hist, ref_hist) if ref_hist is not None else None
    return {"statistic": "psi", "value": value, "threshold": PSI_DRIFT_THRESHOLD, "reference": label,
            "drifted": None if value is None else value > PSI_DRIFT_THRESHOLD}


def _columns() -> list[Any]:
    # every JSON field is read as FLOAT: counts are summed as doubles (an INTEGER cast overflows on PostgreSQL)
    d = TelemetryPoint.data
    count = d["count"].as_float()
    cols = [func.sum(count), func.sum(d["errors"].as_float()), func.sum(d["escalations"].as_float()), func.sum(d["degraded"].as_float()),
            func.sum(count * d[("latency_ms", "p50")].as_float()), func.sum(count * d[("latency_ms", "p95")].as_float()),
            func.sum(count * d[("latency_ms", "p99")].as_float()), func.max(d[("latency_ms", "max")].as_float()), func.count()]
    cols += [func.sum(d[("confidence_hist", i)].as_float()) for i in range(BINS)]
    return cols


def _sums(row: Any, offset: int) -> FieldSums:
    v = [x if x is not None else 0 for x in row[offset:]]
    return FieldSums(requests=int(v[0]), errors=int(v[1]), escalations=int(v[2]), degraded=int(v[3]), p50_w=float(v[4]),
                     p95_w=float(v[5]), p99_w=float(v[6]), latency_max=float(v[7]), points=int(v[8]), hist=[int(x) for x in v[9:9 + BINS]])


_ROLLUP = TelemetryRollup.__table__
_ROLLUP_SUMS = ("requests", "errors", "escalations", "degraded", "p50_w", "p95_w", "p99_w", "latency_max", "points",
                *(f"h{i}" for i in range(BINS)))  # the order _sums reads
# the aggregates of those columns, built once (constructing 19 SQL function objects per query showed in the profile)
_ROLLUP_AGGS = tuple(func.max(_ROLLUP.c[c]) if c == "latency_max" else func.sum(_ROLLUP.c[c]) for c in _ROLLUP_SUMS)


def minute_sums(s: Session, shas: list[str], since: dt.datetime, until: dt.datetime) -> list[tuple[dt.datetime, str, FieldSums]]:
    """(minute, artifact sha256, sums) for the artifacts in ``[since, until)``, oldest first, from the rollups
    (one row per minute and artifact, kept by the telemetry writer: ``fleet_server.rollups``). Plain rows, no ORM
    objects: a day of one artifact is 1,440 rows, read while the fleet's devices are checking in."""
    if not shas:
        return []
    t = _ROLLUP
    q = (select(t.c.minute, t.c.model_sha256, *(t.c[c] for c in _ROLLUP_SUMS))
         .where(t.c.model_sha256.in_(shas), t.c.minute >= since, t.c.minute < until).order_by(t.c.minute))
    return [(utc(row[0]), row[1], _sums(row, 2)) for row in s.execute(q)]


def range_sums(s: Session, shas: list[str], since: dt.datetime, until: dt.datetime) -> FieldSums:
    """The artifacts' rollups in ``[since, until)`` summed by the database: one row back, whatever the window (the
    totals of :func:`minute_sums`' rows)."""
    if not shas:
        return FieldSums()
    t = _ROLLUP
    cols = _ROLLUP_AGGS
    return _sums(s.execute(select(*cols).where(t.c.model_sha256.in_(shas), t.c.minute >= since, t.c.minute < until)).one(), 0)


def _bucket_index(dialect: str, since: dt.datetime, bucket_s: int) -> Any:
    """SQL for the bucket of each rollup row, ``floor((minute - since) / bucket_s)`` (rows are never before ``since``).
    The two numbers are written into the SQL, not bound, so the expression reads the same in SELECT and GROUP BY."""
    t = _ROLLUP
    origin, width = literal_column(f"{since.timestamp():.6f}"), literal_column(f"{float(bucket_s):.1f}")
    if dialect == "postgresql":
        return cast(func.floor((extract("epoch", t.c.minute) - origin) / width), BigInteger)
    # SQLite keeps UTC timestamps as text; strftime('%s') reads them as whole seconds; a non-negative REAL cast to
    # INTEGER is its floor
    return cast((cast(func.strftime("%s", t.c.minute), BigInteger) - origin) / width, BigInteger)


def bucket_sums(s: Session, shas: list[str], since: dt.datetime, until: dt.datetime,
                bucket_s: int | None) -> list[tuple[int | None, str, FieldSums]]:
    """(bucket index, artifact sha256, sums) for the artifacts in ``[since, until)``, the buckets ``bucket_s`` seconds wide
    from ``since`` (None: one per artifact, index None), summed by the database: at most buckets x artifacts rows back,
    however many minutes the window holds (a 31-day window is 44,640 minute rows per artifact)."""
    if not shas:
        return []
    t = _ROLLUP
    cols = _ROLLUP_AGGS
    where = (t.c.model_sha256.in_(shas), t.c.minute >= since, t.c.minute < until)
    if bucket_s is None:
        q = select(t.c.model_sha256, *cols).where(*where).group_by(t.c.model_sha256)
        return [(None, row[0], _sums(row, 1)) for row in s.execute(q)]
    idx = _bucket_index(s.get_bind().dialect.name, since, bucket_s).label("bucket")
    q = select(idx, t.c.model_sha256, *cols).where(*where).group_by(idx, t.c.model_sha256).order_by(idx)
    return [(int(row[0]), row[1], _sums(row, 2)) for row in s.execute(q)]


def wave_sums(s: Session, rollout_id: str, wave_index: int, shas: list[str], since: dt.datetime, until: dt.datetime) -> FieldSums:
    """The raw points of one wave's devices on these artifacts in ``[since, until)``, summed (a join on the wave's
    rollout_devices rows and the ``(device_id, minute)`` index: no device list in the query)."""
    if not shas:
        return FieldSums()
    q = (select(*_columns()).select_from(TelemetryPoint)
         .join(RolloutDevice, (RolloutDevice.device_id == TelemetryPoint.device_id) & (RolloutDevice.rollout_id == rollout_id)
               & (RolloutDevice.wave_index == wave_index))
         .where(TelemetryPoint.model_sha256.in_(shas), TelemetryPoint.minute >= since, TelemetryPoint.minute < until))
    return _sums(s.execute(q).one(), 0)
