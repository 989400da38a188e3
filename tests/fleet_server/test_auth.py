"""Scopes on every route (401/403), device isolation, and malformed bodies answered 422, never 500."""

from __future__ import annotations

import re

import httpx

from fleet_support import SimDevice, upload

ADMIN_ROUTES = [
    ("GET", "/v1/models"), ("GET", "/v1/models/digits/versions/1.2.3"), ("POST", "/v1/models/digits/versions"),
    ("POST", "/v1/rollouts"), ("GET", "/v1/rollouts/ro_x"), ("POST", "/v1/rollouts/ro_x/pause"), ("POST", "/v1/rollouts/ro_x/resume"),
    ("POST", "/v1/rollouts/ro_x/promote"), ("POST", "/v1/rollouts/ro_x/rollback"), ("GET", "/v1/devices"), ("GET", "/v1/devices/dev_x"),
    ("GET", "/v1/telemetry"),
    ("GET", "/v1/models/digits/stats"), ("GET", "/v1/models/digits/versions/1.2.3/stats"), ("GET", "/v1/rollouts"),
    ("GET", "/v1/tokens"), ("POST", "/v1/tokens"), ("POST", "/v1/tokens/tok_x/revoke"), ("GET", "/v1/audit"),
    ("POST", "/v1/devices/dev_x/decommission"),
    ("GET", "/v1/publishers"), ("POST", "/v1/publishers"), ("DELETE", "/v1/publishers/key_x"), ("POST", "/v1/server/key/rotate"),
]
DEVICE_ROUTES = [("GET", "/v1/device/desired"), ("POST", "/v1/device/reports"), ("POST", "/v1/device/telemetry")]
ENROLL_ROUTES = [("POST", "/v1/devices/enroll")]


def _call(server, method: str, path: str, token: str | None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return server.client().request(method, path, headers=headers, **kw)


def test_scopes_are_enforced_on_every_route(live_server):
    dev = SimDevice(live_server, "pi-auth").enroll()
    tokens = {"admin": live_server.admin_token, "enroll": live_server.enroll_token, "device": dev.token}
    groups = {"admin": ADMIN_ROUTES, "device": DEVICE_ROUTES, "enroll": ENROLL_ROUTES}
    # the route lists above cover every protected route the app has
    spec = live_server.client().get("/openapi.json").json()
    public = {"/healthz", "/readyz", "/metrics", "/v1/server/public-key", "/v1/artifacts/{sha256}", "/v1/server/key-rotations",
              "/v1/device/trust", "/v1/artifacts/{sha256}/access"}  # the last two: an admin or a device token (checked below)
    listed = {re.sub(r"/(ro_x|dev_x|tok_x|key_x|digits|1\.2\.3)", "/{}", p) for _, p in ADMIN_ROUTES + DEVICE_ROUTES + ENROLL_ROUTES}
    for path, ops in spec["paths"].items():
        if path in public:
            continue
        assert re.sub(r"\{[^}]+\}", "{}", path) in listed, f"{path} is not covered by the auth test"
    for scope, routes in groups.items():
        for method, path in routes:
            for token in (None, "ekadm_not-a-real-token", "garbage"):
                r = _call(live_server, method, path, token)
                assert r.status_code == 401, (method, path, token, r.text)
                assert r.json()["error"]["code"] == "unauthorized"
            r = _call(live_server, method, path, "x" * 5000)
            assert r.status_code == 401
            for other, token in tokens.items():
                if other == scope:
                    continue
                r = _call(live_server, method, path, token)
                assert r.status_code == 403, (method, path, other, r.text)
                assert r.json()["error"]["code"] == "forbidden"
    # a token in another scheme is not a bearer token
    r = live_server.client().get("/v1/models", headers={"Authorization": f"Basic {live_server.admin_token}"})
    assert r.status_code == 401
    # artifacts take an admin or a device token, never enroll
    assert _call(live_server, "GET", "/v1/artifacts/" + "0" * 64, live_server.enroll_token).status_code == 403
    assert _call(live_server, "GET", "/v1/artifacts/" + "0" * 64, None).status_code == 401
    assert _call(live_server, "GET", "/v1/device/trust", live_server.enroll_token).status_code == 403
    assert _call(live_server, "GET", "/v1/device/trust", None).status_code == 401
    assert _call(live_server, "GET", "/v1/artifacts/" + "0" * 64 + "/access", live_server.enroll_token).status_code == 403
    assert _call(live_server, "GET", "/v1/artifacts/" + "0" * 64 + "/access", None).status_code == 401


def test_a_device_never_reaches_another_devices_data(live_server, fleet_bundles):
    admin = live_server.admin
    assert upload(admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]]).status_code == 201
    a = SimDevice(live_server, "pi-a", tags=["a"]).enroll()
    b = SimDevice(live_server, "pi-b", tags=["b"]).enroll()
    r = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "selector": {"tags": ["a"]}, "waves": [100]})
    assert r.status_code == 201, r.text
    pa = a.poll()
    assert pa is not None and b.poll() is None
    # b cannot read a's device record, report on a's assignment, or download a's artifact
    assert b.http.get(f"/v1/devices/{a.device_id}").status_code == 403
    assert b.http.get("/v1/devices").status_code == 403
    r = b.report(pa["serial"], "downloaded")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert b.http.get(pa["artifact"]["url"]).status_code == 403
    assert a.http.get(pa["artifact"]["url"]).status_code == 200
    # ids in the body are not a way in either: the device comes from the token
    r = b.http.post("/v1/device/reports", json={"serial": pa["serial"], "phase": "downloaded", "device_id": a.device_id})
    assert r.status_code == 422
    # nothing b did touched a's progress
    assert admin.get(f"/v1/devices/{a.device_id}").json()["phase"] is None
    assert all(d["phase"] is None for w in admin.get(f"/v1/rollouts/{pa['rollout_id']}").json()["waves"] for d in w["devices"])


MALFORMED = [b"{", b"{\"name\": ", b"null", b"[]", b"\"text\"", b"12", b"{\"a\": NaN}", b"\xff\xfe\x00garbage", b"[" * 50_000 + b"]" * 50_000,
             b"{\"serial\": 1e999, \"phase\": \"downloaded\"}", b"{\"points\": " + b"[" * 2000 + b"]" * 2000 + b"}", b""]


def test_malformed_json_on_every_route_is_422_never_500(live_server):
    dev = SimDevice(live_server, "pi-json").enroll()
    clients = {scope: live_server.client(token) for scope, token in
               {"admin": live_server.admin_token, "enroll": live_server.enroll_token, "device": dev.token}.items()}
    spec = clients["admin"].get("/openapi.json").json()
    checked = 0
    for path, ops in spec["paths"].items():
        concrete = path.replace("{name}", "digits").replace("{version}", "1.2.3").replace("{rollout_id}", "ro_x") \
            .replace("{device_id}", dev.device_id).replace("{sha256}", "0" * 64)
        for method, op in ops.items():
            takes_json = "application/json" in op.get("requestBody", {}).get("content", {})
            for scope, client in clients.items():
                for body in MALFORMED if takes_json else MALFORMED[:2]:
                    r = client.request(method.upper(), concrete, content=body, headers={"content-type": "application/json"})
                    assert r.status_code < 500, (method, path, scope, body[:40], r.text)
                    if r.status_code != 204:  # a 204 has no body (e.g. the proxy's artifact access check)
                        assert r.headers["content-type"].startswith(("application/json", "text/plain")), r.headers
                    if takes_json and r.status_code not in (401, 403):
                        assert r.status_code == 422, (method, path, scope, body[:40], r.text)
                        assert r.json()["error"]["code"] == "invalid_request"
                        checked += 1
    assert checked >= 4 * len(MALFORMED)  # rollouts, enroll, reports, telemetry at least
