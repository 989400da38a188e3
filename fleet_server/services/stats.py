"""Per-version field statistics for admins: validated filters, time buckets, drift against a reference version."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.context import AppContext
from fleet_server.db import utcnow
from fleet_server.errors import BadRequest, NotFound
from fleet_server.services.field_stats import FieldSums, bucket_sums, calibration_reference, drift, range_sums
from fleet_server.tables import Model, ModelVersion, VersionArtifact

__all__ = ["MAX_BUCKETS", "MAX_RANGE", "MIN_BUCKET_S", "StatsQuery", "model_stats", "version_stats"]

MAX_RANGE = dt.timedelta(days=31)
MIN_BUCKET_S = 60
MAX_BUCKETS = 1440


@dataclass(frozen=True)
class StatsQuery:
    """A validated window: ``[since, until)`` cut into buckets of ``bucket_s`` seconds (None: one bucket)."""

    since: dt.datetime
    until: dt.datetime
    bucket_s: int | None

    @classmethod
    def build(cls, since: dt.datetime | None, until: dt.datetime | None, bucket_s: int | None) -> StatsQuery:
        """Defaults (the last 24 h), then every check; BadRequest with the reason otherwise."""
        until = _aware(until) if until is not None else utcnow()
        since = _aware(since) if since is not None else until - dt.timedelta(hours=24)
        if until <= since:
            raise BadRequest(f"the range is empty or inverted (since {since:%Y-%m-%dT%H:%M:%SZ} is not before until {until:%Y-%m-%dT%H:%M:%SZ})",
                             "Give since < until (ISO 8601, UTC).", code="bad_range")
        if until - since > MAX_RANGE:
            raise BadRequest(f"the range is {(until - since).days} days; at most {MAX_RANGE.days} days per query",
                             "Query a shorter range, or several.", code="range_too_large")
        if bucket_s is not None:
            if bucket_s < MIN_BUCKET_S:
                raise BadRequest(f"bucket_s={bucket_s}: telemetry is per minute, so buckets are at least {MIN_BUCKET_S} s",
                                 f"Use bucket_s >= {MIN_BUCKET_S}.", code="bucket_too_small")
            n = math.ceil((until - since).total_seconds() / bucket_s)
            if n > MAX_BUCKETS:
                raise BadRequest(f"{n} buckets of {bucket_s} s in this range; at most {MAX_BUCKETS} per query",
                                 f"Use bucket_s >= {math.ceil((until - since).total_seconds() / MAX_BUCKETS)}, or a shorter range.",
                                 code="too_many_buckets")
        return cls(since, until, bucket_s)


def _aware(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _model_versions(s: Session, name: str) -> list[ModelVersion]:
    model = s.execute(select(Model).where(Model.name == name)).scalar_one_or_none()
    if model is None:
        raise NotFound(f"no model '{name}'", "List models with GET /v1/models.")
    return list(s.execute(select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(ModelVersion.created_at, ModelVersion.id)).scalars())


def _artifacts(s: Session, version_id: int, profile: str | None) -> dict[str, str]:
    """artifact sha256 → profile, for one version (and one profile)."""
    q = select(VersionArtifact.artifact_sha256, VersionArtifact.profile).where(VersionArtifact.version_id == version_id)
    if profile is not None:
        q = q.where(VersionArtifact.profile == profile)
    return dict(s.execute(q).all())


def _total(s: Session, shas: list[str], q: StatsQuery) -> FieldSums:
    return range_sums(s, shas, q.since, q.until)  # summed by the database: one row back


def version_stats(ctx: AppContext, name: str, version: str, q: StatsQuery, *, profile: str | None = None,
                  reference_version: str | None = None) -> dict[str, Any]:
    """Field statistics of one version: totals, per profile, per bucket, and drift against the reference version."""
    with ctx.db.read() as s:
        versions = _model_versions(s, name)
        by_name = {mv.version: mv for mv in versions}
        mv = by_name.get(version)
        if mv is None:
            raise NotFound(f"no version '{version}' of model '{name}'", f"Versions of '{name}': {', '.join(by_name) or 'none'}.")
        shas = _artifacts(s, mv.id, profile)
        if not shas:
            raise NotFound(f"version '{version}' of '{name}' has no artifact for profile '{profile}'",
                           f"Its profiles: {', '.join(sorted(set(_artifacts(s, mv.id, None).values())))}.")
        if reference_version is not None:
            ref = by_name.get(reference_version)
            if ref is None:
                raise NotFound(f"no version '{reference_version}' of model '{name}' (reference_version)",
                               f"Versions of '{name}': {', '.join(by_name)}.")
        else:
            earlier = versions[:versions.index(mv)]
            ref = earlier[-1] if earlier else None
        rows = bucket_sums(s, list(shas), q.since, q.until, q.bucket_s)  # grouped by the database: buckets x artifacts rows
        ref_total = _total(s, list(_artifacts(s, ref.id, profile)), q) if ref is not None else None
        manifests = dict(s.execute(select(VersionArtifact.artifact_sha256, VersionArtifact.manifest)
                                   .where(VersionArtifact.version_id == mv.id, VersionArtifact.artifact_sha256.in_(list(shas)))).all())
    total, per_profile, buckets = FieldSums(), {}, {}
    for index, sha, sums in rows:
        total.add(sums)
        per_profile.setdefault(shas[sha], FieldSums()).add(sums)
        if index is not None:
            buckets.setdefault(q.since + dt.timedelta(seconds=q.bucket_s * index), FieldSums()).add(sums)
    ref_ok = ref_total is not None and ref_total.requests > 0
    if ref is None:
        label = "none: no earlier version to compare with"
    else:
        label = f"version {ref.version}, same window and profiles" + ("" if ref_ok else " (no telemetry in this window)")
    requests: dict[str, int] = {}
    for _, sha, sums in rows:
        requests[sha] = requests.get(sha, 0) + sums.requests
    calibration, why = calibration_reference(manifests, requests) if reference_version is None else (None, "reference_version given")
    if calibration is not None:
        label = why
    else:
        label += f"; not the calibration histogram: {why}"
    return {
        "model": name, "version": version, "profile": profile,
        "window": {"since": _iso(q.since), "until": _iso(q.until), "bucket_s": q.bucket_s},
        "totals": {**total.public(), "drift": drift(total, calibration if calibration is not None else ref_total if ref_ok else None,
                                                    label)},
        "profiles": {p: v.public() for p, v in sorted(per_profile.items())},
        "buckets": [{"start": _iso(t), **b.public()} for t, b in sorted(buckets.items())],
        "notes": ["latency percentiles over many minutes are the request-weighted mean of per-minute percentiles",
                  "errors are requests without an answer; degraded answers (the device's answer after a cloud failure) are not errors"],
    }


def model_stats(ctx: AppContext, name: str, q: StatsQuery) -> dict[str, Any]:
    """Every version of a model side by side over one window (totals only)."""
    with ctx.db.read() as s:
        versions = _model_versions(s, name)
        out = []
        for mv in versions:
            total = _total(s, list(_artifacts(s, mv.id, None)), q)
            out.append({"version": mv.version, **total.public()})
    return {"model": name, "window": {"since": _iso(q.since), "until": _iso(q.until), "bucket_s": None}, "versions": out}
