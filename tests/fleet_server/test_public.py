"""Public routes, the signing key on disk, and readiness."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

from fleet_support import SimDevice


def test_health_ready_key_and_metrics(live_server):
    c = live_server.client()
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz").json()
    heads = sorted(f.stem.split("_")[0] for f in (Path(__file__).parents[2] / "fleet_server" / "migrations" / "versions").glob("0*.py"))
    assert ready["status"] == "ready" and ready["migrations"] == heads[-1]  # the newest migration shipped
    assert ready["database"] == ("sqlite" if live_server.db_url.startswith("sqlite") else "postgresql")
    key = c.get("/v1/server/public-key").json()
    assert key["algorithm"] == "ed25519" and len(base64.b64decode(key["public_key"])) == 32 and len(key["key_id"]) == 16
    key_file = live_server.data_dir / "server_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    SimDevice(live_server, "pi-m").enroll().poll()
    text = c.get("/metrics").text
    assert 'edgekit_http_requests_total{method="GET",route="/v1/device/desired",status="200"} 1.0' in text
    assert "edgekit_devices 1.0" in text and 'edgekit_rollouts{state="running"} 0.0' in text
    assert "edgekit_http_request_seconds_bucket" in text
    assert c.get("/nope").status_code == 404 and c.get("/nope").json()["error"]["code"] == "not_found"
    assert c.delete("/healthz").status_code == 405


def test_the_key_survives_a_restart(live_server):
    before = live_server.client().get("/v1/server/public-key").json()
    live_server.restart()
    assert live_server.client().get("/v1/server/public-key").json() == before


def test_readyz_is_503_when_the_schema_is_behind(live_server):
    from sqlalchemy import create_engine, text

    engine = create_engine(live_server.db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'old'"))
    engine.dispose()
    r = live_server.client().get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "not_ready"
