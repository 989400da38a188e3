"""No 500 from input (SQLite and PostgreSQL): nesting and number sizes bounded before Python's limits,
Range numbers bounded, Allow on 405, date-times as text only, Connection: close on any 5xx."""

from __future__ import annotations

import asyncio

import httpx

from fleet_server.hardening import MAX_JSON_DEPTH, ConnectionCloseOn5xx
from fleet_support import LiveServer, SimDevice


def test_deep_nesting_and_huge_numbers_are_422(live_server: LiveServer) -> None:
    dev = SimDevice(live_server, "d-nest").enroll()
    deep = '{"serial": 1, "phase": "failed", "reason": "x", "metrics": {"a": ' + "[" * 500 + "]" * 500 + "}}"
    for body in (deep, '{"serial": ' + "9" * 4301 + ', "phase": "failed", "metrics": {}}',
                 '{"points": [], "dropped": ' + "1" * 5000 + "}"):
        for path in ("/v1/device/reports", "/v1/device/telemetry"):
            r = dev.http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (path, r.status_code, r.text[:300])
            assert r.json()["error"]["code"] == "invalid_request"
    ok = '{"serial": 1, "phase": "failed", "reason": "x", "metrics": {"a": ' + "[" * (MAX_JSON_DEPTH - 3) + "]" * (MAX_JSON_DEPTH - 3) + "}}"
    r = dev.http.post("/v1/device/reports", content=ok, headers={"Content-Type": "application/json"})
    assert "nested deeper" not in r.text and r.status_code < 500, r.text  # within the bound: judged by the route (unknown serial)
    assert live_server.admin.get("/readyz").status_code == 200


def test_range_with_a_huge_number_is_416(live_server: LiveServer, fleet_bundles) -> None:
    from fleet_support import upload

    r = upload(live_server.admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]])
    assert r.status_code == 201, r.text
    sha = r.json()["artifacts"][0]["sha256"]
    for rng in ("bytes=" + "1" * 4301 + "-", "bytes=0-" + "9" * 5000, "bytes=-" + "7" * 30):
        r = live_server.admin.get(f"/v1/artifacts/{sha}", headers={"Range": rng})
        assert r.status_code == 416, (rng[:20], r.status_code, r.text[:200])


def test_405_names_the_allowed_methods(live_server: LiveServer) -> None:
    for method, path, allowed in (("DELETE", "/v1/devices/enroll", {"POST"}), ("TRACE", "/healthz", {"GET", "HEAD"}),
                                  ("PUT", "/v1/publishers", {"GET", "POST", "HEAD"}), ("OPTIONS", "/v1/rollouts", {"GET", "POST", "HEAD"})):
        r = live_server.admin.request(method, path)
        assert r.status_code == 405, (method, path, r.status_code)
        assert set(r.headers["allow"].replace(" ", "").split(",")) == allowed, (path, r.headers.get("allow"))


def test_since_must_be_an_iso_date_time(live_server: LiveServer) -> None:
    for path in ("/v1/telemetry", "/v1/audit"):
        assert live_server.admin.get(path, params={"since": "0.5"}).status_code == 422, path
        assert live_server.admin.get(path, params={"since": "1700000000"}).status_code == 422, path
        assert live_server.admin.get(path, params={"since": "2026-12-01T00:00:00Z"}).status_code == 200, path


def test_every_5xx_closes_the_connection() -> None:
    async def app(scope, receive, send) -> None:  # noqa: ANN001 - a tiny ASGI app answering the status in its path
        status = int(scope["path"].strip("/"))
        await send({"type": "http.response.start", "status": status, "headers": [(b"connection", b"keep-alive")]})
        await send({"type": "http.response.body", "body": b"{}"})

    async def probe() -> dict[int, str | None]:
        transport = httpx.ASGITransport(app=ConnectionCloseOn5xx(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return {s: (await c.get(f"/{s}")).headers.get("connection") for s in (200, 404, 500, 503)}

    got = asyncio.run(probe())
    assert got[500] == got[503] == "close" and got[200] == got[404] == "keep-alive", got


def test_shape_check_ignores_strings_and_counts_only_real_nesting() -> None:
    from fleet_server.hardening import MAX_NUMBER_CHARS, json_shape_problem

    deep = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    assert "nested" in json_shape_problem(deep)
    assert json_shape_problem(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is None
    assert json_shape_problem(b'{"s": "' + b"[" * 100 + b'", "t": "' + b"9" * 100 + b'"}') is None  # inside strings: nothing
    assert json_shape_problem(b'{"s": "a \\" [[[[ \\\\", "n": 1}') is None  # escaped quotes and backslashes
    # closing brackets hidden in a string cannot mask real nesting
    masked = b'{"a": ' + b'[' * 40 + b'"' + b']' * 40 + b'"' + b']' * 40 + b'}'
    assert "nested" in json_shape_problem(masked)
    assert "longer" in json_shape_problem(b'{"n": -' + b"1" * (MAX_NUMBER_CHARS + 1) + b"}")
    assert json_shape_problem(b'{"x": 1.2345678901234567e-300, "y": 9223372036854775807}') is None


def test_the_openapi_states_the_limits(live_server: LiveServer) -> None:
    spec = live_server.client().get("/openapi.json").json()
    text = spec["info"]["description"]
    for phrase in (f"nests at most {MAX_JSON_DEPTH} levels", "NUL", "Range number", "ISO 8601", "bytes (413)", "parts"):
        assert phrase in text, phrase
    params = [p for item in spec["paths"].values() for op in item.values() if isinstance(op, dict) for p in op.get("parameters", [])]

    def free(schema: dict) -> list[dict]:
        subs = schema.get("anyOf") or [schema]
        return [s for s in subs if s.get("type") == "string" and not ({"enum", "format", "const"} & set(s))]

    strings = [s for p in params for s in free(p.get("schema") or {})]
    assert strings and all("pattern" in s for s in strings), [s for s in strings if "pattern" not in s]
