"""Request bodies (pydantic, ``extra="forbid"``): what crosses the wire into the server."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgekit.protocol import DEVICE_NAME_PATTERN, PHASES, REASONS, TAG_PATTERN, TERMINAL_PHASES, Gates, valid_reason

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
    "TERMINAL_PHASES",
]

_TAG = TAG_PATTERN
INT64_MAX = 2**63 - 1  # the largest integer SQLite and PostgreSQL's JSON/bigint take (Python ints are unbounded)
INT32_MAX = 2**31 - 1  # the largest value of an INTEGER column on PostgreSQL


def _reject_nul(value: Any, path: str = "") -> None:
    """Raise ValueError for a NUL character in any string or key (PostgreSQL's text and JSON refuse them)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{path or 'a string'} contains a NUL character (\\u0000)")
    elif isinstance(value, dict):
        for k, v in value.items():
            _reject_nul(k, f"{path}.{k}" if path else "a key")
            _reject_nul(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _reject_nul(v, f"{path}[{i}]")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Body(_In):
    """A whole request body: no NUL character anywhere in it, keys of free-form objects included."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        _reject_nul(data)
        return data


class EnrollRequest(_Body):
    """``POST /v1/devices/enroll``."""

    name: str = Field(pattern=DEVICE_NAME_PATTERN)
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


class RolloutCreate(_Body):
    """``POST /v1/rollouts``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    selector: Selector = Field(default_factory=Selector)
    waves: list[Annotated[float, Field(gt=0, le=100)]] = Field(default_factory=lambda: [5.0, 25.0, 100.0], min_length=1, max_length=20,
                                                               description="Cumulative percentages, strictly increasing, ending at 100.")
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
    p95_rounds_ms: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(default=None, max_length=100)


class ProfiledMetrics(BaseModel):
    """Metrics of a ``profiled`` report; the gates read these (other keys are kept as sent)."""

    model_config = ConfigDict(extra="allow")

    load_ms: float | None = Field(default=None, ge=0)
    warmup_runs: int | None = Field(default=None, ge=0, le=INT64_MAX)
    runs: int | None = Field(default=None, ge=0, le=INT64_MAX)
    p50_ms: float | None = Field(default=None, ge=0)
    p95_ms: float | None = Field(default=None, ge=0)
    p99_ms: float | None = Field(default=None, ge=0)
    peak_rss_mb: float | None = Field(default=None, ge=0)
    golden_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    golden_max_abs_err: float | None = Field(default=None, ge=0)
    golden_passed: bool | None = None
    runtime: str | None = None
    delegate: str | None = None
    timing_source: Literal["measured", "emulated"] | None = None  # emulated (e.g. qemu-user) latency is never gated on
    timing_note: str | None = Field(default=None, max_length=500)
    p95_rounds_ms: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(default=None, max_length=100)  # per-round p95s; p95_ms is their median
    baseline: Baseline | None = None


class ReportRequest(_Body):
    """``POST /v1/device/reports``."""

    serial: int = Field(ge=1, le=INT32_MAX)  # an INTEGER column
    phase: Literal["downloaded", "verified", "profiled", "activated", "failed", "rolled_back"]
    reason: str | None = Field(default=None, max_length=500)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _reason_and_metrics(self) -> ReportRequest:
        if self.phase in ("failed", "rolled_back"):
            if not self.reason:
                raise ValueError(f"a '{self.phase}' report needs a reason")
        if self.reason is not None and not valid_reason(self.reason):
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
    count: int = Field(ge=0, le=INT64_MAX)
    errors: int = Field(default=0, ge=0, le=INT64_MAX)
    escalations: int = Field(default=0, ge=0, le=INT64_MAX)
    degraded: int = Field(default=0, ge=0, le=INT64_MAX)
    latency_ms: Latency = Field(default_factory=Latency)
    confidence_hist: list[int] = Field(default_factory=lambda: [0] * 10, min_length=10, max_length=10)
    sources: dict[str, int] = Field(default_factory=dict, max_length=8)

    @field_validator("minute")
    @classmethod
    def _aware(cls, v: dt.datetime) -> dt.datetime:
        try:
            return v.replace(tzinfo=dt.timezone.utc) if v.tzinfo is None else v.astimezone(dt.timezone.utc)
        except OverflowError:  # e.g. 9999-12-31T23:59-05:00 is past year 9999 in UTC
            raise ValueError("the minute is outside the years 1-9999 in UTC") from None


class TelemetryBatch(_Body):
    """``POST /v1/device/telemetry``."""

    points: list[TelemetryPointIn] = Field(max_length=1000)
    dropped: int = Field(default=0, ge=0, le=INT32_MAX)
