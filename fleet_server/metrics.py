"""Prometheus metrics: request count and latency by route template (a pure ASGI middleware,
cheap enough for the polling hot path), plus devices and rollouts by state and per-version field gauges
(``edgekit_field_*{model,version}``, at most 20 versions) read at scrape time."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from fleet_server.tables import Device, Rollout

__all__ = ["FleetMetrics", "MetricsMiddleware", "method_label"]

_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


def method_label(method: str) -> str:
    """The method as a label value: the standard ones as they are, anything a client invents as 'other' (bounded cardinality)."""
    return method if method in _METHODS else "other"


class _StateCollector:
    def __init__(self, get_db: Callable) -> None:
        self.get_db = get_db

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        db = self.get_db()
        if db is None:
            return
        try:
            with db.read() as s:
                devices = s.execute(select(func.count()).select_from(Device)).scalar_one()
                by_state = dict(s.execute(select(Rollout.state, func.count()).group_by(Rollout.state)).all())
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is down
            return
        g = GaugeMetricFamily("edgekit_devices", "Enrolled devices.")
        g.add_metric([], devices)
        yield g
        r = GaugeMetricFamily("edgekit_rollouts", "Rollouts by state.", labels=["state"])
        for state in ("running", "paused", "completed", "failed", "rolled_back"):
            r.add_metric([state], by_state.get(state, 0))
        yield r
        yield from self._field()

    def _field(self):  # noqa: ANN202
        from fleet_server.services.field_metrics import field_series

        try:
            with self.get_db().read() as s:
                series = field_series(s)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is down
            return
        labels = ["model", "version"]
        fams = {
            "requests": GaugeMetricFamily("edgekit_field_requests", "Requests in the last 15 minutes, per model version.", labels=labels),
            "escalation": GaugeMetricFamily("edgekit_field_escalation_rate", "Escalated share of requests (last 15 minutes).", labels=labels),
            "degraded": GaugeMetricFamily("edgekit_field_degraded_rate", "Degraded answers per request (last 15 minutes).", labels=labels),
            "error": GaugeMetricFamily("edgekit_field_error_rate", "Unanswered requests per request (last 15 minutes).", labels=labels),
            "p95": GaugeMetricFamily("edgekit_field_latency_p95_ms", "Request-weighted p95 latency, ms (last 15 minutes).", labels=labels),
        }
        for name, version, t in series:
            fams["requests"].add_metric([name, version], t.requests)
            if t.requests:
                fams["escalation"].add_metric([name, version], t.escalation_rate or 0.0)
                fams["degraded"].add_metric([name, version], t.degraded_rate or 0.0)
                fams["error"].add_metric([name, version], t.error_rate or 0.0)
                fams["p95"].add_metric([name, version], t.latency()["p95"] or 0.0)
        yield from fams.values()


class FleetMetrics:
    """One registry per app (several apps can live in one test process)."""

    def __init__(self, get_db: Callable) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("edgekit_http_requests", "HTTP requests.", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("edgekit_http_request_seconds", "HTTP request latency.", ["method", "route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.registry.register(_StateCollector(get_db))


class MetricsMiddleware:
    """Counts and times every HTTP request under its route template (``/v1/rollouts/{rollout_id}``)."""

    def __init__(self, app, metrics: FleetMetrics) -> None:  # noqa: ANN001 - ASGI app
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The matched route's template (``/v1/rollouts/{rollout_id}``), never the raw path: unmatched paths share one label.
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = method_label(scope["method"])
            self.metrics.requests.labels(method, template, str(status[0])).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
