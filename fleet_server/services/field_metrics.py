"""Per-version field gauges for ``/metrics``: the last 15 minutes of the versions devices run, with bounded labels.

Labels are (model, version) only: no device, profile or free-form value. At most ``MAX_SERIES`` pairs,
those active on the most devices, so a registry with thousands of versions cannot blow up a scrape.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet_server.db import utcnow
from fleet_server.services.field_stats import FieldSums, range_sums
from fleet_server.tables import Device, Model, ModelVersion, VersionArtifact

__all__ = ["MAX_SERIES", "WINDOW", "field_series"]

MAX_SERIES = 20
WINDOW = dt.timedelta(minutes=15)


def field_series(s: Session) -> list[tuple[str, str, FieldSums]]:
    """(model, version, sums over the last 15 minutes) for the versions active on the most devices (at most MAX_SERIES)."""
    active = s.execute(select(ModelVersion.id, Model.name, ModelVersion.version, func.count(Device.id).label("n"))
                       .join(VersionArtifact, VersionArtifact.id == Device.active_artifact_id)
                       .join(ModelVersion, ModelVersion.id == VersionArtifact.version_id).join(Model, Model.id == ModelVersion.model_id)
                       .group_by(ModelVersion.id, Model.name, ModelVersion.version).order_by(func.count(Device.id).desc()).limit(MAX_SERIES)).all()
    now = utcnow()
    out = []
    for version_id, name, version, _ in active:
        shas = list(s.execute(select(VersionArtifact.artifact_sha256).where(VersionArtifact.version_id == version_id)).scalars())
        out.append((name, version, range_sums(s, shas, now - WINDOW, now + dt.timedelta(minutes=1))))
    return out
