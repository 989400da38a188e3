"""Admin: field statistics per model version.

The queries run in worker threads under a limiter of their own (``STATS_THREADS`` at a time per
process), not the threadpool's shared one: however many dashboards are open, stats requests queue
among themselves and never hold the threads (or pooled connections) that device requests need.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Query, Request

from fleet_server.deps import AdminDep, CtxDep
from fleet_server.hardening import IsoDateTime
from fleet_server.services import stats

router = APIRouter(tags=["stats"])

STATS_THREADS = 2

Since = Annotated[IsoDateTime | None, Query(description="Start (ISO 8601; default: until - 24 h).")]
Until = Annotated[IsoDateTime | None, Query(description="End, exclusive (default: now).")]


async def _bounded(request: Request, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a worker thread, at most ``STATS_THREADS`` at a time in this app."""
    limiter = getattr(request.app.state, "stats_limiter", None)
    if limiter is None:
        limiter = request.app.state.stats_limiter = anyio.CapacityLimiter(STATS_THREADS)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=limiter)


@router.get("/v1/models/{name}/versions/{version}/stats")
async def version_stats(request: Request, name: str, version: str, ctx: CtxDep, _: AdminDep, since: Since = None, until: Until = None,
                        bucket_s: Annotated[int | None, Query(ge=1, le=31 * 86400, description="Bucket width, >= 60 s.")] = None,
                        profile: Annotated[str | None, Query(max_length=64)] = None,
                        reference_version: Annotated[str | None, Query(max_length=64)] = None) -> dict:
    """Requests, escalation/degraded/error rates, latency percentiles, confidence histogram and drift of one version."""
    q = stats.StatsQuery.build(since, until, bucket_s)
    return await _bounded(request, stats.version_stats, ctx, name, version, q, profile=profile, reference_version=reference_version)


@router.get("/v1/models/{name}/stats")
async def model_stats(request: Request, name: str, ctx: CtxDep, _: AdminDep, since: Since = None, until: Until = None) -> dict:
    """Every version of a model side by side over one window."""
    return await _bounded(request, stats.model_stats, ctx, name, stats.StatsQuery.build(since, until, None))
