"""The rollup readers behind the field statistics, on SQLite and PostgreSQL: the window's totals summed by the database
(``range_sums``, what the model comparison, the reference version and the /metrics gauges read) equal the per-minute
rows (``minute_sums``, what the buckets fold) added up, over the same window edges."""

from __future__ import annotations

import datetime as dt

import pytest

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64
T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)


def _point(sha: str, minute: dt.datetime, count: int, p95: float, top: int) -> dict:
    hist = [0] * 10
    hist[top] = count
    return {"device_id": "d", "minute": minute, "model_sha256": sha, "model_version": "1.0.0", "received_at": minute,
            "data": {"count": count, "errors": count // 10, "escalations": count // 3, "degraded": count // 7,
                     "latency_ms": {"p50": p95 / 2, "p95": p95, "p99": p95 * 1.5, "max": p95 * 2}, "confidence_hist": hist}}


@pytest.fixture()
def rollups(fleet_db):
    """A migrated database holding rollups of three artifacts around a window [T0, T0 + 5 min)."""
    from fleet_server.db import Database
    from fleet_server.rollups import rollup_rows, upsert_rollups

    db = Database(fleet_db)
    db.migrate()
    points = [_point(SHA_A, T0 + dt.timedelta(minutes=m), 100 + 17 * m, 2.0 + m, m % 10) for m in range(-2, 8)]
    points += [_point(SHA_B, T0 + dt.timedelta(minutes=m), 40 + m, 9.0 - m, 9) for m in (0, 2, 4, 5)]  # 5: on `until`, outside
    points += [_point(SHA_C, T0 + dt.timedelta(minutes=1), 1000, 50.0, 0)]  # another artifact: never in the sums below
    points += [_point(SHA_A, T0 + dt.timedelta(minutes=3), 11, 30.0, 2)]  # a second device in one minute: one rollup row, summed
    with db.write() as s:
        upsert_rollups(s, rollup_rows(points))
    yield db
    db.dispose()


def _fold(rows):  # noqa: ANN001, ANN202
    from fleet_server.services.field_stats import FieldSums

    total = FieldSums()
    for _, _, sums in rows:
        total.add(sums)
    return total


def test_range_sums_equal_the_minute_rows_added_up_within_the_window(rollups) -> None:
    from fleet_server.services.field_stats import minute_sums, range_sums

    until = T0 + dt.timedelta(minutes=5)
    with rollups.read() as s:
        rows = minute_sums(s, [SHA_A, SHA_B], T0, until)
        total = range_sums(s, [SHA_A, SHA_B], T0, until)
    minutes = [m for m, _, _ in rows]
    assert minutes == sorted(minutes) and minutes[0] == T0 and max(minutes) == T0 + dt.timedelta(minutes=4)
    assert all(m.tzinfo is not None for m in minutes)
    assert {sha for _, sha, _ in rows} == {SHA_A, SHA_B} and len(rows) == 5 + 3  # A: minutes 0-4, B: 0, 2, 4
    want = _fold(rows)
    assert total.requests == want.requests == sum(100 + 17 * m for m in range(5)) + 11 + sum(40 + m for m in (0, 2, 4))
    for f in ("errors", "escalations", "degraded", "points", "hist"):
        assert getattr(total, f) == getattr(want, f), f
    for f in ("p50_w", "p95_w", "p99_w"):
        assert getattr(total, f) == pytest.approx(getattr(want, f)), f
    assert total.latency_max == want.latency_max == 60.0  # the second device's 30 ms p95 -> 60 ms max, in minute 3
    assert total.latency()["p95"] == pytest.approx(want.latency()["p95"])


def test_range_sums_of_nothing_are_zero(rollups) -> None:
    from fleet_server.services.field_stats import FieldSums, range_sums

    with rollups.read() as s:
        empty = range_sums(s, [SHA_A], T0 - dt.timedelta(days=2), T0 - dt.timedelta(days=1))
        none = range_sums(s, [], T0, T0 + dt.timedelta(hours=1))
        unknown = range_sums(s, ["d" * 64], T0, T0 + dt.timedelta(hours=1))
    for sums in (empty, none, unknown):
        assert sums.public() == FieldSums().public() and sums.points == 0


@pytest.mark.parametrize("offset_s, bucket_s", [(0, 120), (-30.25, 120), (-90, 300), (0, 3600)])
def test_bucket_sums_group_the_minutes_as_the_window_cuts_them(rollups, offset_s: float, bucket_s: int) -> None:
    """Buckets ``bucket_s`` wide from ``since`` (a minute exactly on a bucket edge opens the next bucket), per artifact,
    as the per-minute rows fold into them; without a bucket width, one row per artifact."""
    from fleet_server.services.field_stats import FieldSums, bucket_sums, minute_sums

    since, until = T0 + dt.timedelta(seconds=offset_s), T0 + dt.timedelta(minutes=5)
    with rollups.read() as s:
        rows = minute_sums(s, [SHA_A, SHA_B], since, until)
        got = bucket_sums(s, [SHA_A, SHA_B], since, until, bucket_s)
        whole = bucket_sums(s, [SHA_A, SHA_B], since, until, None)
        assert bucket_sums(s, [], since, until, bucket_s) == []
    want: dict[tuple[int, str], FieldSums] = {}
    for minute, sha, sums in rows:
        want.setdefault((int((minute - since).total_seconds() // bucket_s), sha), FieldSums()).add(sums)
    assert [i for i, _, _ in got] == sorted(i for i, _, _ in got)  # oldest bucket first
    assert {(i, sha): v.public() for i, sha, v in got} == {k: v.public() for k, v in want.items()}
    if offset_s == 0 and bucket_s == 120:  # minutes 0-1 | 2-3 | 4: T0 + 2 min sits on the edge and opens bucket 1
        assert sorted((i, sha) for i, sha, _ in got) == [(0, SHA_A), (0, SHA_B), (1, SHA_A), (1, SHA_B), (2, SHA_A), (2, SHA_B)]
    per_sha = {sha: _fold([r for r in rows if r[1] == sha]).public() for sha in (SHA_A, SHA_B)}
    assert sorted(sha for i, sha, _ in whole) == [SHA_A, SHA_B] and all(i is None for i, _, _ in whole)
    assert {sha: v.public() for _, sha, v in whole} == per_sha
