"""The rollout engine under concurrency: many evaluators (a second server process's worth) and
devices reporting in parallel never duplicate an assignment or skip a wave."""

from __future__ import annotations

import threading
from collections import Counter

from sqlalchemy import create_engine, text

from fleet_support import SimDevice, upload, wait_for


def test_concurrent_engine_steps_and_reports_do_not_duplicate_assignments(live_server, fleet_bundles):
    from fleet_server.app import bootstrap
    from fleet_server.services.engine import evaluate
    from fleet_server.settings import Settings

    assert upload(live_server.admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]]).status_code == 201
    devices = [SimDevice(live_server, f"pi-{i}").enroll() for i in range(12)]
    r = live_server.admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "waves": [25, 50, 100],
                                                     "gates": {"max_failure_rate": 0.0}})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    # a second engine on the same database and data dir, stepping as fast as it can from 2 threads
    other = bootstrap(Settings.from_env(env={}, data_dir=live_server.data_dir, db=live_server.db_url))
    stop = threading.Event()
    errors: list[BaseException] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                evaluate(other, rid)
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)
                return

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        done: set[str] = set()
        while len(done) < len(devices):
            # every device that has an install installs it, all of them at once
            ready = [(d, p) for d in devices if d.device_id not in done and (p := d.desired()) is not None]
            workers = [threading.Thread(target=d.install, args=(p,)) for d, p in ready]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            done |= {d.device_id for d, _ in ready}
            if len(done) < len(devices):
                wait_for(lambda: any(d.desired() is not None for d in devices if d.device_id not in done))
        ro = wait_for(lambda: (x := live_server.admin.get(f"/v1/rollouts/{rid}").json())["state"] == "completed" and x)
    finally:
        stop.set()
        for t in threads:
            t.join()
        other.db.dispose()
    assert not errors, errors
    assert [len(w["devices"]) for w in ro["waves"]] == [3, 3, 6]
    assert [w["state"] for w in ro["waves"]] == ["passed"] * 3
    engine = create_engine(live_server.db_url)
    with engine.connect() as c:
        rows = c.execute(text("SELECT device_id, action, serial FROM assignments")).all()
    engine.dispose()
    assert Counter((d, a) for d, a, _ in rows) == Counter({(d.device_id, "install"): 1 for d in devices})
    assert all(d.desired()["serial"] == 1 for d in devices)
