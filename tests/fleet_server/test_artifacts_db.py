"""The database artifact store (fleet_server.artifacts_db): chunked rows on SQLite and PostgreSQL, streamed
reads with seeks across chunk boundaries, Range over HTTP, and damaged bytes never served (410)."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest
from sqlalchemy import create_engine, text

from fleet_support import upload


@pytest.fixture
def db_store(fleet_db):
    from fleet_server.artifacts_db import DatabaseArtifactStore
    from fleet_server.db import Database

    db = Database(fleet_db)
    db.migrate()
    yield DatabaseArtifactStore(db)
    db.dispose()


def test_chunked_store_round_trip_seek_and_delete(db_store, tmp_path):
    from fleet_server.artifacts_db import CHUNK_BYTES

    data = os.urandom(2 * CHUNK_BYTES + 12345)  # three chunks, the last one short
    src = tmp_path / "a.bin"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    assert db_store.put(src, sha) is True
    assert db_store.put(src, sha) is False  # content-addressed: stored once
    assert db_store.exists(sha) and db_store.size(sha) == len(data) and db_store.list() == [sha]
    with db_store.open(sha) as f:
        assert f.read() == data
        f.seek(CHUNK_BYTES - 10)
        assert f.read(30) == data[CHUNK_BYTES - 10:CHUNK_BYTES + 20]  # across a chunk boundary
        f.seek(-5, os.SEEK_END)
        assert f.read() == data[-5:]
    assert db_store.verify(sha)
    db_store.delete(sha)
    assert not db_store.exists(sha) and db_store.list() == []


def test_put_refuses_bytes_that_do_not_match_their_name(db_store, tmp_path):
    src = tmp_path / "b.bin"
    src.write_bytes(b"hello")
    with pytest.raises(ValueError, match="does not hash"):
        db_store.put(src, "0" * 64)
    assert not db_store.exists("0" * 64)  # the chunks were rolled back


def test_empty_artifact_exists_and_reads_empty(db_store, tmp_path):
    src = tmp_path / "empty"
    src.write_bytes(b"")
    sha = hashlib.sha256(b"").hexdigest()
    assert db_store.put(src, sha)
    assert db_store.exists(sha) and db_store.size(sha) == 0 and db_store.open(sha).read() == b""


def _corrupt(db_url: str, sha: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as c:
        data = bytes(c.execute(text("SELECT data FROM artifact_chunks WHERE sha256 = :s AND seq = 0"), {"s": sha}).scalar_one())
        flipped = bytes([data[0] ^ 0xFF]) + data[1:]  # same size: only a hash finds it
        c.execute(text("UPDATE artifact_chunks SET data = :d WHERE sha256 = :s AND seq = 0"), {"d": flipped, "s": sha})
    engine.dispose()


def test_server_streams_ranges_from_the_database_and_refuses_damaged_bytes(start_fleet_server, fleet_bundles):
    server = start_fleet_server(artifact_store="database")
    admin = server.admin
    r = upload(admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]])
    assert r.status_code == 201, r.text
    sha = r.json()["artifacts"][0]["sha256"]
    expected = fleet_bundles.ekb["v1"]["raspberry-pi-5"].read_bytes()
    assert not (server.data_dir / "artifacts").exists() or not any((server.data_dir / "artifacts").rglob("*/*"))  # nothing on disk
    full = admin.get(f"/v1/artifacts/{sha}")
    assert full.status_code == 200 and full.content == expected and full.headers["etag"] == f'"{sha}"'
    assert "immutable" in full.headers["cache-control"]
    part = admin.get(f"/v1/artifacts/{sha}", headers={"Range": "bytes=100-299"})
    assert part.status_code == 206 and part.content == expected[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(expected)}"
    assert admin.get(f"/v1/artifacts/{sha}", headers={"Range": "bytes=-7"}).content == expected[-7:]
    assert admin.get(f"/v1/artifacts/{sha}", headers={"Range": f"bytes={len(expected)}-"}).status_code == 416

    # v2: damaged in the database before any process served it → 410, never the bytes
    r2 = upload(admin, "digits", [fleet_bundles.ekb["v2"]["raspberry-pi-5"]])
    assert r2.status_code == 201, r2.text
    sha2 = r2.json()["artifacts"][0]["sha256"]
    _corrupt(server.db_url, sha2)
    bad = admin.get(f"/v1/artifacts/{sha2}")
    assert bad.status_code == 410 and bad.json()["error"]["code"] == "artifact_damaged"
    assert admin.get(f"/v1/artifacts/{sha2}", headers={"Range": "bytes=0-9"}).status_code == 410

    # v1 was verified (and remembered) by this process; damage after that ends the body at the bad chunk
    _corrupt(server.db_url, sha)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=30) as c:
        try:
            late = c.get(f"/v1/artifacts/{sha}")
        except httpx.HTTPError:
            late = None
    assert late is None or hashlib.sha256(late.content).hexdigest() != sha and len(late.content) < len(expected)
