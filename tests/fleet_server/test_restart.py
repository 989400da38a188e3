"""Kill -9 the server mid-rollout, start it again on the same database: it continues, with no
lost and no duplicated assignments."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import create_engine, text

from fleet_support import SimDevice, upload, wait_for


def _assignments(db_url: str) -> list[tuple[str, str, str, int]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(text("SELECT device_id, rollout_id, action, serial FROM assignments ORDER BY id"))]
    finally:
        engine.dispose()


def test_killed_mid_rollout_the_server_continues_where_it_stopped(start_fleet_server, fleet_bundles, fleet_db):
    server = start_fleet_server(process=True)
    assert upload(server.admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]]).status_code == 201
    devices = [SimDevice(server, f"pi-{i}").enroll() for i in range(6)]
    r = server.admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "waves": [34, 67, 100],
                                                "gates": {"max_failure_rate": 0.0}})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    waves = [[d for d in devices if d.device_id in {x["device_id"] for x in w["devices"]}] for w in r.json()["waves"]]
    assert [len(w) for w in waves] == [3, 2, 1]

    # wave 1: all but the last device finish; the last one is killed under mid-way
    payloads = {d.device_id: d.poll() for d in waves[0]}
    for d in waves[0][:-1]:
        d.install(payloads[d.device_id])
    last = waves[0][-1]
    assert last.report(payloads[last.device_id]["serial"], "downloaded").status_code == 200
    server.kill()
    server.start()
    assert server.admin.get(f"/v1/rollouts/{rid}").json()["waves"][0]["state"] == "running"
    # a report the device was unsure about is sent again: a duplicate, nothing changes
    assert last.report(payloads[last.device_id]["serial"], "downloaded").json()["duplicate"] is True
    for phase in ("verified", "activated"):
        assert last.report(payloads[last.device_id]["serial"], phase).status_code == 200
    ro = wait_for(lambda: (x := server.admin.get(f"/v1/rollouts/{rid}").json())["waves"][1]["state"] == "running" and x)

    # wave 2 started; kill right away, before any of its devices polled
    server.kill()
    server.start()
    for d in waves[1]:
        p = d.poll()
        assert p["action"] == "install" and p["rollout_id"] == rid
        d.install(p)
    server.kill()
    server.start()
    ro = wait_for(lambda: (x := server.admin.get(f"/v1/rollouts/{rid}").json())["waves"][2]["state"] == "running" and x)
    for d in waves[2]:
        d.install(d.poll())
    ro = wait_for(lambda: (x := server.admin.get(f"/v1/rollouts/{rid}").json())["state"] == "completed" and x)
    assert [w["state"] for w in ro["waves"]] == ["passed", "passed", "passed"]

    rows = _assignments(fleet_db)
    per_device = Counter((dev, ro_id, action) for dev, ro_id, action, _ in rows)
    assert set(per_device.values()) == {1}, per_device  # exactly one install per device: none lost, none twice
    assert len(per_device) == 6
    serials = Counter((dev, serial) for dev, _, _, serial in rows)
    assert set(serials.values()) == {1}
    # the desired state every device sees is the one assignment it was given
    for d in devices:
        assert d.desired()["serial"] == d.last_serial
