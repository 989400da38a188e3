"""A staged rollout across 1,000 simulated agents: time to converge, time to roll back a failed wave.

A real ``edgekit server start`` process (SQLite) on loopback; 1,000 lightweight simulated agents
in one asyncio loop speaking docs/protocol.md over real HTTP: they poll ``desired`` every
``--interval`` seconds (1 s, ±20% jitter, ETag/304), verify each signed assignment with the
pinned Ed25519 key, download the artifact and check its sha256, then report downloaded,
verified, profiled and activated (or rolled_back for a revert). They do not run the model:
the ``profiled`` figures are synthetic (p95 2.0 ms for the good version, 6.0 ms for the
regressed one, ``baseline`` = the version they run), which is what the server's gates read.

Two rollouts, three waves each (5%, 25%, 100%):

1. ``1.0.0`` to every device: seconds from ``POST /v1/rollouts`` to ``completed``, and per wave;
2. ``1.1.0``, 3x slower, with ``max_p95_ratio=1.5``: seconds to the gate's decision (``failed``)
   and to the last ``rolled_back`` report of the failed wave's devices; the later waves must
   never receive it.

    python bench/rollout.py [--devices 1000] [--interval 1] [--client httpx|raw]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field

from bench.fleet_sim import FleetServerProcess
from bench.harness import Ratio, host_facts, prepare_process, print_table, quiet, write_result

NAME = "rollout"
WAVES = [5, 25, 100]


@dataclass
class SimAgent:
    """One simulated device: identity, pinned key, last serial, what it runs."""

    name: str
    token: str = ""
    device_id: str = ""
    etag: str | None = None
    last_serial: int = 0
    active: str | None = None  # version
    previous: str | None = None
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (time, phase, version)


class Bench:
    """The simulated fleet and its bookkeeping."""

    def __init__(self, pool, public_key: str, interval: float, p95: dict[str, float]) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        self.pool, self.interval, self.p95 = pool, interval, p95
        self.key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key))
        self.agents: list[SimAgent] = []
        self.errors: dict[str, int] = {}
        self.requests = 0
        self.stop = asyncio.Event()
        self.lags: list[float] = []

    def _err(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    async def call(self, a: SimAgent, method: str, path: str, body: dict | None = None, token: str | None = None):
        headers = {"Authorization": f"Bearer {token or a.token}"}
        data = b""
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        if a.etag and path == "/v1/device/desired":
            headers["If-None-Match"] = a.etag
        self.requests += 1
        return await self.pool.request(method, path, headers, data)

    async def enroll(self, n: int, enroll_token: str, concurrency: int = 32) -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            a = SimAgent(f"sim-{i:05d}")
            async with sem:
                status, _, body = await self.call(a, "POST", "/v1/devices/enroll",
                                                  {"name": a.name, "profile": "raspberry-pi-5", "tags": ["bench"], "facts": {}}, enroll_token)
            if status != 201:
                raise RuntimeError(f"enroll {a.name}: HTTP {status} {body[:200]!r}")
            d = json.loads(body)
            a.token, a.device_id = d["device_token"], d["device_id"]
            self.agents.append(a)

        await asyncio.gather(*(one(i) for i in range(n)))

    async def report(self, a: SimAgent, serial: int, phase: str, reason: str | None = None, metrics: dict | None = None) -> None:
        for _ in range(20):  # reports are idempotent: retry until delivered
            try:
                status, _, _ = await self.call(a, "POST", "/v1/device/reports",
                                               {"serial": serial, "phase": phase, "reason": reason, "metrics": metrics or {}})
                if status == 200:
                    return
                self._err(f"report {phase}: HTTP {status}")
            except Exception as e:  # noqa: BLE001 - count it and retry, as the agent does
                self._err(f"report {phase}: {type(e).__name__}")
            await asyncio.sleep(0.2)

    async def handle(self, a: SimAgent, payload: dict) -> None:
        serial, version, art = payload["serial"], payload["version"], payload["artifact"]
        if payload["action"] == "revert":
            a.active = None if art is None else a.previous
            await self.report(a, serial, "rolled_back", "gate_failed", {})
            a.events.append((time.monotonic(), "rolled_back", version))
            return
        status, _, blob = await self.call(a, "GET", art["url"])
        if status != 200 or hashlib.sha256(blob).hexdigest() != art["sha256"]:
            self._err(f"download: HTTP {status}")
            await self.report(a, serial, "failed", "sha256_mismatch" if status == 200 else "download_failed")
            return
        await self.report(a, serial, "downloaded")
        await self.report(a, serial, "verified")
        p95 = self.p95[version] * random.uniform(0.95, 1.05)
        baseline = None if a.active is None else {"sha256": "0" * 64, "p95_ms": self.p95[a.active]}
        metrics = {"load_ms": 3.0, "warmup_runs": 10, "runs": 200, "p50_ms": p95 * 0.8, "p95_ms": p95, "p99_ms": p95 * 1.2,
                   "peak_rss_mb": 12.0, "golden_top1_agreement": 1.0, "golden_max_abs_err": 0.0, "golden_passed": True,
                   "runtime": "simulated", "delegate": "none", "baseline": baseline}
        await self.report(a, serial, "profiled", metrics=metrics)
        a.previous, a.active = a.active, version
        await self.report(a, serial, "activated")
        a.events.append((time.monotonic(), "activated", version))

    async def agent_loop(self, a: SimAgent) -> None:
        await asyncio.sleep(random.uniform(0, self.interval))
        while not self.stop.is_set():
            try:
                status, headers, body = await self.call(a, "GET", "/v1/device/desired")
                if status == 200:
                    a.etag = headers.get("etag")
                    signed = json.loads(body)["assignment"]
                    if signed:
                        self.key.verify(base64.b64decode(signed["signature"]), signed["payload"].encode())
                        payload = json.loads(signed["payload"])
                        if payload["serial"] > a.last_serial:
                            a.last_serial = payload["serial"]
                            await self.handle(a, payload)
                elif status != 304:
                    self._err(f"desired: HTTP {status}")
            except Exception as e:  # noqa: BLE001 - the agent backs off and keeps going
                self._err(f"desired: {type(e).__name__}")
            await asyncio.sleep(self.interval * random.uniform(0.8, 1.2))

    async def lag_probe(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            await asyncio.sleep(0.1)
            self.lags.append(time.monotonic() - t - 0.1)


async def wait_rollout(pool, admin: str, rid: str, states: tuple[str, ...], timeout: float) -> tuple[dict, float]:
    t0 = time.monotonic()
    while True:
        status, _, body = await pool.request("GET", f"/v1/rollouts/{rid}", {"Authorization": f"Bearer {admin}"})
        r = json.loads(body)
        if r["state"] in states:
            return r, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"rollout {rid} still {r['state']} after {timeout}s")
        await asyncio.sleep(0.05)


def _make_bundles(scratch: Path) -> dict[str, Path]:
    """A small digits CNN converted for raspberry-pi-5 (1.0.0) and the same bundle re-signed as 1.1.0."""
    import numpy as np

    with quiet():
        import keras
        from sklearn.datasets import load_digits

        from converters.pipeline import ConvertOptions, run_convert
        from edgekit import signing
        from edgekit.bundle import pack

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)[..., None]
        y = d.target.astype(np.int64)
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
        m.compile("adam", "sparse_categorical_crossentropy")
        m.fit(x[400:], y[400:], epochs=5, verbose=0)
        m.save(scratch / "digits.keras")
        np.savez(scratch / "calib.npz", x=x[400:600], y=y[400:600])
        np.savez(scratch / "eval.npz", x=x[:400], y=y[:400])
        report = run_convert(ConvertOptions(model=scratch / "digits.keras", profiles=("raspberry-pi-5",), formats=("tflite",),
                                            calibration=scratch / "calib.npz", eval=scratch / "eval.npz", out=scratch / "b",
                                            name="digits", version="1.0.0", latency_runs=5))
        src = report.results[0].bundle_dir
        out = {"1.0.0": pack(src, scratch / "v1.ekb")}
        import shutil

        dst = scratch / "b2" / src.name
        shutil.copytree(src, dst)
        manifest = json.loads((dst / "manifest.json").read_text())
        manifest["version"] = "1.1.0"
        data = (json.dumps(manifest, indent=2) + "\n").encode()
        (dst / "manifest.json").write_bytes(data)
        key = signing.load_or_create_key()
        pub = signing.public_key_b64(key)
        (dst / "signature.json").write_text(json.dumps({"algorithm": "ed25519", "public_key": pub, "key_id": signing.fingerprint(pub),
                                                         "signature": signing.sign(key, data)}))
        out["1.1.0"] = pack(dst, scratch / "v2.ekb")
    return out


def _upload(url: str, admin: str, path: Path) -> None:
    import httpx

    r = httpx.post(f"{url}/v1/models/digits/versions", headers={"Authorization": f"Bearer {admin}"}, timeout=120,
                   files=[("bundles", (path.name, path.read_bytes(), "application/octet-stream"))])
    if r.status_code != 201:
        raise RuntimeError(f"upload {path.name}: {r.status_code} {r.text[:300]}")


def _cpu_s(pid: int | None = None) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def _run(args: argparse.Namespace, server_pid: int, port: int, admin: str, enroll: str, public_key: str) -> dict:
    from bench.fleet_sim import HttpxPool, RawPool

    pool = (HttpxPool if args.client == "httpx" else RawPool)("127.0.0.1", port, args.connections, 30.0)
    bench = Bench(pool, public_key, args.interval, {"1.0.0": 2.0, "1.1.0": 6.0})
    t0 = time.monotonic()
    await bench.enroll(args.devices, enroll)
    enroll_s = time.monotonic() - t0
    loops = [asyncio.create_task(bench.agent_loop(a)) for a in bench.agents]
    probe = asyncio.create_task(bench.lag_probe())
    auth = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}
    results: dict = {"enroll_s": round(enroll_s, 2)}
    try:
        await asyncio.sleep(2 * args.interval)  # every agent has polled once: steady state
        cpu0, srv0, wall0 = _cpu_s(), _cpu_s(server_pid), time.monotonic()
        if True:
            # 1. converge
            body = {"model": "digits", "version": "1.0.0", "selector": {"profiles": [], "tags": ["bench"]}, "waves": WAVES,
                    "gates": {"max_failure_rate": 0.0, "max_p95_ratio": 1.5}, "wave_timeout_s": 300}
            req0 = bench.requests
            t = time.monotonic()
            status, _, raw = await pool.request("POST", "/v1/rollouts", auth, json.dumps(body).encode())
            assert status == 201, raw
            rid = json.loads(raw)["id"]
            r1, converge_s = await wait_rollout(pool, admin, rid, ("completed", "failed"), args.timeout)
            activated = [max(tt for tt, ph, v in a.events if ph == "activated" and v == "1.0.0") for a in bench.agents
                         if any(ph == "activated" and v == "1.0.0" for _, ph, v in a.events)]
            results["converge"] = {"state": r1["state"], "seconds_to_completed": round(converge_s, 2),
                                   "seconds_to_last_activated": round(max(activated) - t, 2) if activated else None,
                                   "devices_activated": len(activated), "requests": bench.requests - req0,
                                   "waves": [{"percent": w["percent"], "devices": len(w["devices"]), "state": w["state"],
                                              "started_at": w["started_at"], "finished_at": w["finished_at"]} for w in r1["waves"]]}
            # 2. a regressed version: the first wave fails its gate and is rolled back
            body = {**body, "version": "1.1.0", "gates": {"max_p95_ratio": 1.5}}
            req0 = bench.requests
            t = time.monotonic()
            status, _, raw = await pool.request("POST", "/v1/rollouts", auth, json.dumps(body).encode())
            assert status == 201, raw
            rid2 = json.loads(raw)["id"]
            r2, decide_s = await wait_rollout(pool, admin, rid2, ("failed", "completed"), args.timeout)
            wave1 = {d["device_id"] for d in r2["waves"][0]["devices"]}
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                done = [a for a in bench.agents if a.device_id in wave1 and any(ph == "rolled_back" and v == "1.1.0" for _, ph, v in a.events)]
                if len(done) == len(wave1):
                    break
                await asyncio.sleep(0.05)
            back = [max(tt for tt, ph, v in a.events if ph == "rolled_back") for a in done]
            got_v2 = sum(1 for a in bench.agents if a.device_id not in wave1 and any(v == "1.1.0" for _, _, v in a.events))
            results["rollback"] = {"state": r2["state"], "reason": r2.get("reason"), "wave_devices": len(wave1),
                                   "seconds_to_gate_failed": round(decide_s, 2),
                                   "seconds_to_last_rolled_back": round(max(back) - t, 2) if back else None,
                                   "seconds_decision_to_last_rolled_back": round(max(back) - t - decide_s, 2) if back else None,
                                   "devices_rolled_back": len(done), "later_wave_devices_that_received_it": got_v2,
                                   "requests": bench.requests - req0}
        wall = time.monotonic() - wall0
        results["cpu_cores"] = {"client": round((_cpu_s() - cpu0) / wall, 2), "server": round((_cpu_s(server_pid) - srv0) / wall, 2),
                                "machine": os.cpu_count()}
    finally:
        bench.stop.set()
        for task in (*loops, probe):
            task.cancel()
        await asyncio.gather(*loops, probe, return_exceptions=True)
        await pool.close()
    lags = sorted(bench.lags)
    results["client_loop_lag_p99_ms"] = round(lags[int(0.99 * (len(lags) - 1))] * 1000, 1) if lags else None
    results["errors"] = bench.errors
    return results


def _one(args: argparse.Namespace, client: str, scratch: Path, bundles: dict[str, Path]) -> dict:
    """One full run (fresh server, fresh fleet) with one HTTP client for the simulated agents."""
    import httpx

    with FleetServerProcess(scratch / f"server-{client}", poll_interval_s=max(1, round(args.interval)),
                            EDGEKIT_ENGINE_INTERVAL_S="0.5") as server:
        admin, enroll = server.token("admin"), server.token("enroll")
        for b in bundles.values():
            _upload(server.url, admin, b)
        public_key = httpx.get(f"{server.url}/v1/server/public-key").json()["public_key"]
        run_args = argparse.Namespace(**{**vars(args), "client": client})
        return asyncio.run(_run(run_args, server.proc.pid, server.port, admin, enroll, public_key))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=1.0, help="Poll interval of the simulated agents (s).")
    ap.add_argument("--client", choices=("httpx", "raw", "both"), default="both",
                    help="HTTP client of the simulated agents: httpx (~2 ms client CPU a request), the raw asyncio client of "
                         "bench/fleet_sim.py (~0.05 ms), or both, one after the other.")
    ap.add_argument("--connections", type=int, default=64, help="Keep-alive connections shared by the simulated agents.")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    scratch = prepare_process()
    host = host_facts()
    bundles = _make_bundles(scratch)
    clients = ("httpx", "raw") if args.client == "both" else (args.client,)
    runs = {c: _one(args, c, scratch, bundles) for c in clients}
    rows = []
    for c, res in runs.items():
        cv, rb, cpu = res["converge"], res["rollback"], res["cpu_cores"]
        waves = ", ".join(f"{w['devices']} {w['state']}" for w in cv["waves"])
        rows += [
            [c, "enroll all devices", _fmt(res["enroll_s"]), ""],
            [c, f"converge: {len(WAVES)} waves {WAVES} -> {cv['state']}", _fmt(cv["seconds_to_completed"]),
             f"{cv['devices_activated']} activated ({waves})"],
            [c, "regressed version: wave 1 gate failed", _fmt(rb["seconds_to_gate_failed"]), (rb["reason"] or "").split(" on device")[0]],
            [c, "  + wave 1 back on the previous version", _fmt(rb["seconds_decision_to_last_rolled_back"]),
             f"{rb['devices_rolled_back']}/{rb['wave_devices']} rolled back; later waves that got it: "
             f"{rb['later_wave_devices_that_received_it']}"],
            [c, "  cores busy: client / server", f"{cpu['client']} / {cpu['server']}",
             f"of {cpu['machine']}; loop lag p99 {res['client_loop_lag_p99_ms']} ms; errors {sum(res['errors'].values())}"],
        ]
    print_table(f"Rollout across {args.devices} simulated agents, poll {args.interval:g} s", ["client", "step", "seconds", "note"], rows,
                text_columns=2)
    print(f"load average now {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (the machine is shared: other processes disturb the figures)")
    main_run = runs[clients[0]]
    cv, rb = main_run["converge"], main_run["rollback"]
    ratios = [Ratio(f"converge_s / poll_interval_s ({clients[0]})", cv["seconds_to_completed"] / args.interval, None, "3 waves"),
              Ratio(f"rollback_s / poll_interval_s ({clients[0]})", (rb["seconds_decision_to_last_rolled_back"] or float("nan")) / args.interval,
                    None, "gate decision to the last device back")]
    path = write_result(NAME, host, {"devices": args.devices, "interval_s": args.interval, "waves": WAVES, "runs": runs,
                                     "ratios": [x.to_dict() for x in ratios]})
    print(f"wrote {path}")
    ok = all(r["converge"]["state"] == "completed" and r["rollback"]["state"] == "failed"
             and r["rollback"]["later_wave_devices_that_received_it"] == 0 for r in runs.values())
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
