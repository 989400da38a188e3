"""The database schema (SQLAlchemy 2 declarative). Migrations in ``fleet_server/migrations`` create it.

Uniqueness constraints carry the correctness of the rollout engine: an assignment is unique on
``(device, serial)`` and on ``(rollout, device, action, seq)``, a report on
``(device, rollout, phase)``, so a step repeated after a restart cannot write twice.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Artifact",
    "Assignment",
    "AuditEvent",
    "Base",
    "Device",
    "Model",
    "ModelVersion",
    "Report",
    "Rollout",
    "RolloutDevice",
    "RolloutWave",
    "TelemetryDrop",
    "TelemetryPoint",
    "TelemetryRollup",
    "Token",
    "VersionArtifact",
]

UTCDateTime = DateTime(timezone=True)


class Base(DeclarativeBase):
    """Declarative base of every table."""

    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, dt.datetime: UTCDateTime}


class Token(Base):
    """An API token; only its sha256 is stored."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    device_id: Mapped[str | None] = mapped_column(ForeignKey("devices.id"), nullable=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime]
    name: Mapped[str | None] = mapped_column(String(64), unique=True)  # admin tokens: who acted, in the audit log
    revoked_at: Mapped[dt.datetime | None]


class Model(Base):
    """A model name in the registry."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime]


class ModelVersion(Base):
    """One immutable version of a model: a set of artifacts, one per (profile, format)."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime]


class Artifact(Base):
    """A stored .ekb file, by sha256 (stored once however many versions use it)."""

    __tablename__ = "artifacts"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime]


class VersionArtifact(Base):
    """The artifact of one (profile, format) of a version, with its manifest and upload validation."""

    __tablename__ = "version_artifacts"
    __table_args__ = (UniqueConstraint("version_id", "profile", "format", name="uq_version_artifacts_profile_format"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    artifact_sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))
    profile: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(16))
    file: Mapped[str] = mapped_column(String(255))
    manifest: Mapped[dict[str, Any]]
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    validation: Mapped[dict[str, Any]]


class Device(Base):
    """An enrolled device. ``desired_body`` is its current SignedAssignment, ready to send."""

    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    profile: Mapped[str] = mapped_column(String(64), index=True)
    tags: Mapped[list[Any]]
    facts: Mapped[dict[str, Any]]
    enrolled_at: Mapped[dt.datetime]
    last_seen: Mapped[dt.datetime | None]
    serial: Mapped[int] = mapped_column(Integer, default=0)
    desired_serial: Mapped[int] = mapped_column(Integer, default=0)
    desired_body: Mapped[str | None] = mapped_column(Text)
    desired_issued_at: Mapped[dt.datetime | None]
    desired_expires_at: Mapped[dt.datetime | None]
    active_artifact_id: Mapped[int | None] = mapped_column(ForeignKey("version_artifacts.id"))
    phase: Mapped[str | None] = mapped_column(String(32))
    decommissioned_at: Mapped[dt.datetime | None]


class Rollout(Base):
    """A staged rollout of one version to the devices a selector matched."""

    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    selector: Mapped[dict[str, Any]]
    waves_pct: Mapped[list[Any]]
    gates: Mapped[dict[str, Any]]
    wave_timeout_s: Mapped[int] = mapped_column(Integer)
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    reason: Mapped[str | None] = mapped_column(Text)
    skipped: Mapped[list[Any]]


class RolloutWave(Base):
    """One wave of a rollout."""

    __tablename__ = "rollout_waves"
    __table_args__ = (UniqueConstraint("rollout_id", "index", name="uq_rollout_waves_index"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"))
    index: Mapped[int] = mapped_column(Integer)
    percent: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    gate_results: Mapped[list[Any]]
    bake_started_at: Mapped[dt.datetime | None]


class RolloutDevice(Base):
    """A device targeted by a rollout: its wave, target and previous artifact, and its progress."""

    __tablename__ = "rollout_devices"
    __table_args__ = (
        UniqueConstraint("rollout_id", "device_id", name="uq_rollout_devices_device"),
        Index("ix_rollout_devices_wave", "rollout_id", "wave_index", "finished"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    wave_index: Mapped[int] = mapped_column(Integer)
    order: Mapped[int] = mapped_column(Integer)
    artifact_id: Mapped[int] = mapped_column(ForeignKey("version_artifacts.id"))
    previous_artifact_id: Mapped[int | None] = mapped_column(ForeignKey("version_artifacts.id"))
    phase: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    finished: Mapped[bool] = mapped_column(Boolean, default=False)


class Assignment(Base):
    """One signed assignment as issued to a device (its history; the latest is the desired state)."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("device_id", "serial", name="uq_assignments_device_serial"),
        UniqueConstraint("rollout_id", "device_id", "action", "seq", name="uq_assignments_rollout_device_action_seq"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    serial: Mapped[int] = mapped_column(Integer)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"))
    action: Mapped[str] = mapped_column(String(16))
    seq: Mapped[int] = mapped_column(Integer, default=0)
    artifact_id: Mapped[int | None] = mapped_column(ForeignKey("version_artifacts.id"))
    payload: Mapped[str] = mapped_column(Text)
    signature: Mapped[str] = mapped_column(String(128))
    issued_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]


class Report(Base):
    """A device's report of a phase; one per (device, rollout, phase)."""

    __tablename__ = "reports"
    __table_args__ = (UniqueConstraint("device_id", "rollout_id", "phase", name="uq_reports_device_rollout_phase"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"))
    serial: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime]


class TelemetryPoint(Base):
    """One minute of a device's inference telemetry."""

    __tablename__ = "telemetry_points"
    __table_args__ = (Index("ix_telemetry_points_device_minute", "device_id", "minute"),
                      Index("ix_telemetry_points_sha_minute", "model_sha256", "minute"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    minute: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any]]
    received_at: Mapped[dt.datetime]


class TelemetryRollup(Base):
    """One minute of one artifact's telemetry across every device, summed (the field statistics read these).

    Sums are doubles (counts up to 2^63 per point would overflow an integer column); ``pXX_w`` are
    Σ count × per-minute percentile, ``hN`` the confidence histogram bins.
    """

    __tablename__ = "telemetry_rollups"
    model_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    minute: Mapped[dt.datetime] = mapped_column(UTCDateTime, primary_key=True)
    requests: Mapped[float] = mapped_column(Float, server_default="0")
    errors: Mapped[float] = mapped_column(Float, server_default="0")
    escalations: Mapped[float] = mapped_column(Float, server_default="0")
    degraded: Mapped[float] = mapped_column(Float, server_default="0")
    p50_w: Mapped[float] = mapped_column(Float, server_default="0")
    p95_w: Mapped[float] = mapped_column(Float, server_default="0")
    p99_w: Mapped[float] = mapped_column(Float, server_default="0")
    points: Mapped[float] = mapped_column(Float, server_default="0")
    h0: Mapped[float] = mapped_column(Float, server_default="0")
    h1: Mapped[float] = mapped_column(Float, server_default="0")
    h2: Mapped[float] = mapped_column(Float, server_default="0")
    h3: Mapped[float] = mapped_column(Float, server_default="0")
    h4: Mapped[float] = mapped_column(Float, server_default="0")
    h5: Mapped[float] = mapped_column(Float, server_default="0")
    h6: Mapped[float] = mapped_column(Float, server_default="0")
    h7: Mapped[float] = mapped_column(Float, server_default="0")
    h8: Mapped[float] = mapped_column(Float, server_default="0")
    h9: Mapped[float] = mapped_column(Float, server_default="0")
    latency_max: Mapped[float] = mapped_column(Float, server_default="0")


class TelemetryDrop(Base):
    """Points a device's bounded buffer dropped, as it said in one telemetry post."""

    __tablename__ = "telemetry_drops"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    dropped: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[dt.datetime]


class AuditEvent(Base):
    """One admin action: who (token name), what, when, from where, and its result."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    token_id: Mapped[int | None] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(200))
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    result: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]]


from fleet_server.trust_tables import Publisher, ServerKeyRotation, TrustChange  # noqa: E402,F401 - registers the trust-chain tables on Base
from fleet_server.replica_tables import ArtifactChunk, FleetIdentity  # noqa: E402,F401 - registers the replica tables on Base
