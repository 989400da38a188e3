"""Request bodies (pydantic, ``extra="forbid"``): what crosses the wire into the server."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "PHASES",
    "REASONS",
    "EnrollRequest",
    "Gates",
    "ProfiledMetrics",
    "ReportRequest",
    "RolloutCreate",
    "Selector",
    "TelemetryBatch",
    "TelemetryPointIn",
]

PHASES = ("downloaded", "verified", "profiled", "activated", "failed", "rolled_back")
TERMINAL_PHASES = frozenset({"activated", "failed", "rolled_back"})
REASONS = frozenset({
    "sha256_mismatch", "download_failed", "bad_signature", "expired", "replayed_serial", "wrong_profile", "bundle_invalid",
    "load_failed", "golden_mismatch", "activation_failed", "crash_loop", "server_rollback", "gate_failed",
})
_TAG = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$"


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnrollRequest(_In):
    """``POST /v1/devices/enroll``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    profile: str = Field(min_length=1, max_length=64)
    tags: list[str] = Field(default_factory=list, max_length=64)
    facts: dict[str, Any] = Field(default_factory=dict)

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: list[str]) -> list[str]:
        for t in tags:
            if not re.fullmatch(_TAG, t):
                raise ValueError(f"invalid tag {t!r} (letters, digits and ._:/- up to 64)")
        return tags


class Selector(_In):
    """Which devices a rollout targets: profile in ``profiles`` (empty = any) and every tag in ``tags``."""

    profiles: list[str] = Field(default_factory=list, max_length=64)
    tags: list[str] = Field(default_factory=list, max_length=64)


class Gates(_In):
    """Wave gates; an absent gate is not checked."""

    max_failure_rate: float | None = Field(default=None, ge=0, le=1)
    min_agreement: float | None = Field(default=None, ge=0, le=1)
    max_p95_ratio: float | None = Field(default=None, gt=0)
    max_peak_rss_mb: float | None = Field(default=None, gt=0)


class RolloutCreate(_In):
    """``POST /v1/rollouts``."""

    model: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    selector: Selector = Field(default_factory=Selector)
    waves: list[float] = Field(default_factory=lambda: [5.0, 25.0, 100.0], min_length=1, max_length=20)
    gates: Gates = Field(default_factory=Gates)
    wave_timeout_s: int = Field(default=600, ge=1, le=7 * 24 * 3600)

    @field_validator("waves")
    @classmethod
    def _waves(cls, waves: list[float]) -> list[float]:
        if any(not 0 < w <= 100 for w in waves):
            raise ValueError("every wave is a cumulative percentage in (0, 100]")
        if any(b <= a for a, b in zip(waves, waves[1:])):
            raise ValueError("waves must be strictly increasing")
        if waves[-1] != 100:
            raise ValueError("the last wave must be 100")
        return waves


class Baseline(BaseModel):
    """The model active on the device when the new one was profiled."""

    sha256: str | None = None
    p95_ms: float | None = Field(default=None, ge=0)


class ProfiledMetrics(BaseModel):
    """Metrics of a ``profiled`` report; the gates read these (other keys are kept as sent)."""

    model_config = ConfigDict(extra="allow")

    load_ms: float | None = None
    warmup_runs: int | None = None
    runs: int | None = None
    p50_ms: float | None = Field(default=None, ge=0)
    p95_ms: float | None = Field(default=None, ge=0)
    p99_ms: float | None = Field(default=None, ge=0)
    peak_rss_mb: float | None = Field(default=None, ge=0)
    golden_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    golden_max_abs_err: float | None = None
    golden_passed: bool | None = None
    runtime: str | None = None
    delegate: str | None = None
    baseline: Baseline | None = None


class ReportRequest(_In):
    """``POST /v1/device/reports``."""

    serial: int = Field(ge=1)
    phase: Literal["downloaded", "verified", "profiled", "activated", "failed", "rolled_back"]
    reason: str | None = Field(default=None, max_length=500)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _reason_and_metrics(self) -> ReportRequest:
        if self.phase in ("failed", "rolled_back"):
            if not self.reason:
                raise ValueError(f"a '{self.phase}' report needs a reason")
        if self.reason is not None and self.reason not in REASONS and not (self.reason.startswith("other:") and len(self.reason) > 6):
            raise ValueError(f"unknown reason {self.reason!r}: one of {', '.join(sorted(REASONS))} or 'other:<text>'")
        if self.phase == "profiled":
            ProfiledMetrics.model_validate(self.metrics)
        return self


class Latency(BaseModel):
    """Latency percentiles of one minute."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    p50: float | None = Field(default=None, ge=0)
    p95: float | None = Field(default=None, ge=0)
    p99: float | None = Field(default=None, ge=0)
    max: float | None = Field(default=None, ge=0)


class TelemetryPointIn(_In):
    """One minute of a device's inference telemetry."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    minute: dt.datetime
    model_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    model_version: str | None = Field(default=None, max_length=64)
    count: int = Field(ge=0)
    errors: int = Field(default=0, ge=0)
    escalations: int = Field(default=0, ge=0)
    degraded: int = Field(default=0, ge=0)
    latency_ms: Latency = Field(default_factory=Latency)
    confidence_hist: list[int] = Field(default_factory=lambda: [0] * 10, min_length=10, max_length=10)
    sources: dict[str, int] = Field(default_factory=dict, max_length=8)

    @field_validator("minute")
    @classmethod
    def _aware(cls, v: dt.datetime) -> dt.datetime:
        return v.replace(tzinfo=dt.timezone.utc) if v.tzinfo is None else v.astimezone(dt.timezone.utc)


class TelemetryBatch(_In):
    """``POST /v1/device/telemetry``."""

    points: list[TelemetryPointIn] = Field(max_length=1000)
    dropped: int = Field(default=0, ge=0)
