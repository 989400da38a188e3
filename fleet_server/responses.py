"""Response bodies (pydantic): the shapes docs/protocol.md promises, published in /openapi.json.

``extra="forbid"``: a service that returns a key the contract does not name fails loudly in the
tests instead of leaking it to clients.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict

from fleet_server.schemas import Selector

__all__ = [
    "ActiveModel", "ArtifactPublic", "DesiredState", "DevicePublic", "EnrollResponse", "ErrorBody", "GateResult", "ModelSummary",
    "ModelVersionPublic", "PublicKey", "ReportAck", "RolloutPublic", "SignedAssignment", "TelemetryAck", "TelemetryPage",
]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Out):
    code: str
    message: str
    hint: str


class ErrorBody(_Out):
    """Every error: ``{"error": {"code", "message", "hint"}}``."""

    error: ErrorDetail


class PublicKey(_Out):
    """The key that signs assignments."""

    algorithm: str
    public_key: str
    key_id: str


class ArtifactPublic(_Out):
    """One (profile, format) artifact of a version."""

    sha256: str
    size_bytes: int
    profile: str
    format: str
    file: str
    manifest_sha256: str
    manifest: dict[str, Any]
    validation: dict[str, Any]


class ModelVersionPublic(_Out):
    """An immutable version and its artifacts."""

    name: str
    version: str
    created_at: dt.datetime
    artifacts: list[ArtifactPublic]


class ModelSummary(_Out):
    """A model and its versions, oldest first."""

    name: str
    versions: list[str]
    latest: str


class SkippedDevice(_Out):
    device_id: str
    name: str
    profile: str
    reason: str


class Skipped(_Out):
    count: int
    devices: list[SkippedDevice]


class WaveDevice(_Out):
    device_id: str
    name: str
    profile: str
    phase: str | None
    finished: bool
    metrics: dict[str, Any] | None
    reason: str | None


class GateResult(_Out):
    gate: str
    limit: float | bool
    value: float | None  # None: not a finite number (failed), or not known (see note)
    passed: bool | None  # None: the gate could not be read (e.g. emulated timing, no reference telemetry); it does not fail the wave
    device_id: str | None
    note: str | None = None


class WavePublic(_Out):
    index: int
    percent: float
    state: str
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    bake_started_at: dt.datetime | None = None
    devices: list[WaveDevice]
    gate_results: list[GateResult]


class RolloutPublic(_Out):
    """A rollout with its waves, devices and gate results."""

    id: str
    model: str
    version: str
    state: str
    selector: Selector
    waves_pct: list[float]
    gates: dict[str, float | bool]
    wave_timeout_s: int
    current_wave: int
    created_at: dt.datetime
    updated_at: dt.datetime
    reason: str | None
    skipped: Skipped
    waves: list[WavePublic]


class ActiveModel(_Out):
    model: str
    version: str
    sha256: str


class DevicePublic(_Out):
    """An enrolled device as admins see it."""

    id: str
    name: str
    profile: str
    tags: list[str]
    facts: dict[str, Any]
    enrolled_at: dt.datetime
    last_seen: dt.datetime | None
    active: ActiveModel | None
    phase: str | None
    serial: int
    decommissioned_at: dt.datetime | None = None
    last_profile: dict[str, Any] | None = None  # the latest on-device profile: version, p95, golden, timing source


class EnrollResponse(_Out):
    """The device's identity; the token is shown once."""

    device_id: str
    device_token: str
    server_public_key: str
    key_id: str
    poll_interval_s: int


class SignedAssignment(_Out):
    """The canonical JSON payload, its Ed25519 signature, and the key id."""

    payload: str
    signature: str
    key_id: str


class DesiredState(_Out):
    """``GET /v1/device/desired`` (200)."""

    poll_interval_s: int
    assignment: SignedAssignment | None


class ReportAck(_Out):
    accepted: bool
    duplicate: bool


class TelemetryAck(_Out):
    accepted: int


class TelemetryPage(_Out):
    points: list[dict[str, Any]]
    dropped: int
