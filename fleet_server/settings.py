"""The fleet server's one settings object, read from ``EDGEKIT_*`` environment variables and CLI flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgekit.errors import UsageError

__all__ = ["ENV_PREFIX", "Settings"]

ENV_PREFIX = "EDGEKIT_"


class Settings(BaseModel):
    """Everything the server can be told; each field is also ``EDGEKIT_<FIELD>`` in the environment.

    pydantic-settings is not a dependency, so ``from_env`` does its small job: environment
    first, then explicit overrides (CLI flags), validated by this model.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Field(default=Path("edgekit-data"), description="Artifacts, the signing key and the SQLite database.")
    db: str | None = Field(default=None, description="SQLAlchemy URL; default sqlite:///DATA_DIR/fleet.db.")
    host: str = "127.0.0.1"
    port: int = Field(default=8400, ge=0, le=65535)
    max_upload_mb: float = Field(default=512, gt=0, description="Largest accepted upload (all bundles of one request).")
    max_json_mb: float = Field(default=8, gt=0, description="Largest accepted JSON request body.")
    poll_interval_s: int = Field(default=60, ge=1, description="How often devices poll their desired state.")
    assignment_ttl_s: int = Field(default=30 * 24 * 3600, ge=2, description="Lifetime of a signed assignment.")
    engine_interval_s: float = Field(default=0.5, gt=0, description="Period of the rollout engine's loop.")
    token_cache_ttl_s: float = Field(default=60.0, ge=0, description="How long a token lookup is cached in-process.")
    db_pool_size: int = Field(default=8, ge=1)
    telemetry_queue_points: int = Field(default=100_000, ge=1000,
                                        description="Telemetry points queued for the writer at most; a post over it gets 503 + Retry-After.")
    upload_validation_timeout_s: float = Field(default=120.0, gt=0, description="Longest an upload's validation may take (else 400 validation_timeout).")
    artifact_store: Literal["directory", "database"] = Field(
        default="directory", description="Where artifact bytes live: the data dir (one server), or the database (replicas without a shared disk).")
    trusted_proxies: str = Field(default="", description="Comma-separated addresses or CIDRs of reverse proxies whose X-Forwarded-For and "
                                 "X-Forwarded-Proto the server believes (the audit log's client address); empty: none, the peer is the client.")
    log_level: str = "info"

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL actually used."""
        return self.db or f"sqlite:///{(self.data_dir / 'fleet.db').resolve()}"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_mb * 1024 * 1024)

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def key_path(self) -> Path:
        return self.data_dir / "server_key.pem"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``EDGEKIT_*`` variables, then ``overrides`` (``None`` values are ignored)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in env and env[key] != "":
                values[name] = env[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(x) for x in first["loc"])
            raise UsageError(f"invalid server setting {field} ({ENV_PREFIX}{field.upper()}): {first['msg']}",
                             "See docs/server.md for the settings and their types.") from None
