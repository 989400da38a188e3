"""Admin: field statistics per model version."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from fleet_server.deps import AdminDep, CtxDep
from fleet_server.services import stats
from fleet_server.hardening import IsoDateTime

router = APIRouter(tags=["stats"])

Since = Annotated[IsoDateTime | None, Query(description="Start (ISO 8601; default: until - 24 h).")]
Until = Annotated[IsoDateTime | None, Query(description="End, exclusive (default: now).")]


@router.get("/v1/models/{name}/versions/{version}/stats")
def version_stats(name: str, version: str, ctx: CtxDep, _: AdminDep, since: Since = None, until: Until = None,
                  bucket_s: Annotated[int | None, Query(ge=1, le=31 * 86400, description="Bucket width, >= 60 s.")] = None,
                  profile: Annotated[str | None, Query(max_length=64)] = None,
                  reference_version: Annotated[str | None, Query(max_length=64)] = None) -> dict:
    """Requests, escalation/degraded/error rates, latency percentiles, confidence histogram and drift of one version."""
    q = stats.StatsQuery.build(since, until, bucket_s)
    return stats.version_stats(ctx, name, version, q, profile=profile, reference_version=reference_version)


@router.get("/v1/models/{name}/stats")
def model_stats(name: str, ctx: CtxDep, _: AdminDep, since: Since = None, until: Until = None) -> dict:
    """Every version of a model side by side over one window."""
    return stats.model_stats(ctx, name, stats.StatsQuery.build(since, until, None))
