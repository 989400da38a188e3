"""``edgekit server token create``: printed once, only its hash stored, accepted by the server."""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import create_engine, text


def test_token_create_prints_once_and_stores_only_the_hash(run_cli, live_server):
    code, out, err = run_cli("server", "token", "create", "--scope", "admin", "--db", live_server.db_url, "--json")
    assert code == 0, err
    token = json.loads(out)["token"]
    assert token.startswith("ekadm_") and len(token) > 40
    engine = create_engine(live_server.db_url)
    with engine.connect() as c:
        stored = [r[0] for r in c.execute(text("SELECT token_hash FROM tokens"))]
    engine.dispose()
    assert hashlib.sha256(token.encode()).hexdigest() in stored and token not in stored
    assert live_server.client(token).get("/v1/models").status_code == 200
    code, out, err = run_cli("server", "token", "create", "--scope", "enroll", "--db", live_server.db_url)
    assert code == 0 and out.strip().startswith("ekenr_") and "hash" in err
    enroll = out.strip()
    assert live_server.client(enroll).get("/v1/models").status_code == 403
    code, _, err = run_cli("server", "token", "create", "--scope", "device", "--db", live_server.db_url)
    assert code == 2 and "device" in err


def test_token_create_with_a_name_is_who_the_audit_log_names(run_cli, live_server):
    code, out, err = run_cli("server", "token", "create", "--scope", "admin", "--name", "ops-alice", "--db", live_server.db_url, "--json")
    assert code == 0, err
    created = json.loads(out)
    assert created["name"] == "ops-alice"
    alice = live_server.client(created["token"])
    assert alice.post("/v1/rollouts/ro_none/pause").status_code == 404
    (event,) = live_server.admin.get("/v1/audit", params={"actor": "ops-alice"}).json()["items"]
    assert event["action"] == "POST /v1/rollouts/{rollout_id}/pause" and event["result"] == "not_found"
    code, _, err = run_cli("server", "token", "create", "--scope", "admin", "--name", "ops-alice", "--db", live_server.db_url)
    assert code != 0 and "exists" in err and "Hint:" in err
    code, _, err = run_cli("server", "token", "create", "--scope", "admin", "--name", "Not Valid", "--db", live_server.db_url)
    assert code != 0 and "token names match" in err


def test_token_create_with_a_data_dir_makes_the_sqlite_database(run_cli, tmp_path):
    code, out, err = run_cli("server", "token", "create", "--scope", "admin", "--data-dir", tmp_path / "d")
    assert code == 0, err
    assert (tmp_path / "d" / "fleet.db").is_file()


def test_bad_settings_are_usage_errors(run_cli, tmp_path, monkeypatch):
    code, _, err = run_cli("server", "token", "create", "--scope", "admin", "--db", "mysql://x/y")
    assert code == 2 and "unsupported database" in err
    monkeypatch.setenv("EDGEKIT_MAX_UPLOAD_MB", "lots")
    code, _, err = run_cli("server", "start", "--data-dir", tmp_path)
    assert code == 2 and "EDGEKIT_MAX_UPLOAD_MB" in err


def test_an_unreachable_database_or_unwritable_dir_is_a_clear_error(run_cli, tmp_path):
    code, _, err = run_cli("server", "token", "create", "--scope", "admin", "--db", "postgresql+psycopg://u:secret@127.0.0.1:1/x")
    assert code == 8 and "cannot use the database" in err and "secret" not in err
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run_cli("server", "start", "--data-dir", blocker / "data")
    assert code == 7 and "data dir" in err
