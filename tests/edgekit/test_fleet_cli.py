"""``edgekit push``, ``edgekit rollout ...`` and ``edgekit devices list`` against a real fleet server.

The server is ``edgekit server start`` in its own process on a free port (one per module); devices
are scripted with httpx, speaking the device side of docs/protocol.md (enroll, poll desired,
report phases), so rollouts move exactly as far as each test drives them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from edgekit.bundle import pack

EDGEKIT = [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running ``edgekit server start`` and its tokens."""

    url: str
    admin: str
    enroll: str
    data_dir: Path
    env: dict[str, str]

    def get(self, path: str, token: str | None = None) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {token or self.admin}"}, timeout=10)

    def wait_for(self, rollout_id: str, predicate: Callable[[dict], bool], what: str, timeout: float = 30) -> dict:
        """Poll the rollout until ``predicate`` holds (the server's engine moves it every few tenths of a second)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.get(f"/v1/rollouts/{rollout_id}").json()
            if predicate(r):
                return r
            if time.monotonic() > deadline:
                raise AssertionError(f"rollout never reached: {what}; last: {json.dumps(r)[:2000]}")
            time.sleep(0.1)


def _token(env: dict[str, str], data_dir: Path, scope: str) -> str:
    out = subprocess.run([*EDGEKIT, "server", "token", "create", "--scope", scope, "--data-dir", str(data_dir)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return re.findall(r"\bek[a-z]{3}_[A-Za-z0-9_-]+", out)[-1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("fleet")
    port = _free_port()
    env = {**os.environ, "EDGEKIT_ENGINE_INTERVAL_S": "0.1", "EDGEKIT_LOG_LEVEL": "warning"}
    log = open(data_dir / "server.log", "wb")
    proc = subprocess.Popen([*EDGEKIT, "server", "start", "--data-dir", str(data_dir), "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (data_dir / "server.log").read_text()
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready in 60 s: " + (data_dir / "server.log").read_text()
            time.sleep(0.1)
        # the session's signing key (convert's publisher key) goes on the allow-list, as an operator would do
        subprocess.run([*EDGEKIT, "server", "publisher", "add", "--label", "tests", "--data-dir", str(data_dir)], env=env, check=True,
                       capture_output=True)
        yield Server(url, _token(env, data_dir, "admin"), _token(env, data_dir, "enroll"), data_dir, env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@dataclass
class Device:
    """A scripted device: enrolls, polls its desired state, reports phases (the agent's side of the protocol)."""

    server: Server
    name: str
    profile: str
    tags: list[str]
    id: str = ""
    token: str = ""
    last: dict = field(default_factory=dict)

    def enroll(self) -> Device:
        r = httpx.post(self.server.url + "/v1/devices/enroll", headers={"Authorization": f"Bearer {self.server.enroll}"},
                       json={"name": self.name, "profile": self.profile, "tags": self.tags, "facts": {"test": True}}, timeout=10)
        assert r.status_code == 201, r.text
        self.id, self.token = r.json()["device_id"], r.json()["device_token"]
        return self

    def assignment(self) -> dict | None:
        r = self.server.get("/v1/device/desired", self.token)
        assert r.status_code == 200, r.text
        signed = r.json()["assignment"]
        return json.loads(signed["payload"]) if signed else None

    def report(self, serial: int, phase: str, metrics: dict | None = None, reason: str | None = None) -> None:
        r = httpx.post(self.server.url + "/v1/device/reports", headers={"Authorization": f"Bearer {self.token}"}, timeout=10,
                       json={"serial": serial, "phase": phase, "reason": reason, "metrics": metrics or {}})
        assert r.status_code == 200, r.text

    def install(self, agreement: float = 1.0, p95: float = 1.0, baseline_p95: float | None = None) -> dict:
        """Take the current install assignment through every phase to activated."""
        a = self.assignment()
        assert a and a["action"] == "install", a
        for phase in ("downloaded", "verified"):
            self.report(a["serial"], phase)
        metrics = {"load_ms": 3.0, "warmup_runs": 3, "runs": 30, "p50_ms": p95 * 0.8, "p95_ms": p95, "p99_ms": p95 * 1.1,
                   "peak_rss_mb": 60.0, "golden_top1_agreement": agreement, "golden_max_abs_err": 0.01, "golden_passed": agreement >= 0.99,
                   "runtime": "litert", "delegate": None,
                   "baseline": {"sha256": "0" * 64, "p95_ms": baseline_p95} if baseline_p95 else None}
        self.report(a["serial"], "profiled", metrics)
        self.report(a["serial"], "activated")
        return a


def _wave_devices(rollout: dict, index: int) -> set[str]:
    return {d["device_id"] for d in rollout["waves"][index]["devices"]}


class PushBundles:
    """The raspberry-pi-5 bundle as a directory and the coral-edgetpu one as an .ekb (1.2.3), and copies of them at other
    versions (``at``), signed with the session's key: the registry version is the manifest's (version truth)."""

    def __init__(self, dirs: dict[str, Path], out: Path) -> None:
        self.dirs, self.out = dirs, out
        self._made: dict[tuple[str, str], Path] = {}

    def __getitem__(self, kind: str) -> Path:
        return self.at(kind, "1.2.3")

    def at(self, kind: str, version: str) -> Path:
        if (kind, version) not in self._made:
            from fleet_support import rebundle

            src = self.dirs[kind]
            d = src if version == "1.2.3" else rebundle(src, self.out / version / src.name, version=version,
                                                        key_path=Path(os.environ["EDGEKIT_SIGNING_KEY"]))
            d = Path(shutil.copytree(d, self.out / f"{kind}-{version}" / d.name))
            self._made[(kind, version)] = d if kind == "pi5" else pack(d, self.out / f"coral-{version}.ekb")
        return self._made[(kind, version)]


@pytest.fixture(scope="module")
def bundles(digits_bundles, tmp_path_factory: pytest.TempPathFactory) -> PushBundles:
    """The digits bundles for pushing (see PushBundles)."""
    pi5 = next(r for r in digits_bundles.results if r.profile == "raspberry-pi-5").bundle_dir
    coral = next(r for r in digits_bundles.results if r.profile == "coral-edgetpu").bundle_dir
    return PushBundles({"pi5": pi5, "coral": coral}, tmp_path_factory.mktemp("push"))


@pytest.fixture(scope="module")
def fleet(server: Server) -> dict[str, Device]:
    """Three raspberry-pi-5 devices in shop-1, one in shop-2, one coral in shop-1."""
    specs = {"pi-a": ("raspberry-pi-5", ["shop-1"]), "pi-b": ("raspberry-pi-5", ["shop-1"]), "pi-c": ("raspberry-pi-5", ["shop-1"]),
             "pi-d": ("raspberry-pi-5", ["shop-2"]), "coral-a": ("coral-edgetpu", ["shop-1"])}
    return {name: Device(server, name, profile, tags).enroll() for name, (profile, tags) in specs.items()}


def _admin(server: Server) -> tuple[str, ...]:
    return ("--server", server.url, "--token", server.admin)


def test_push_rolls_out_in_waves_with_gates(run_cli, server: Server, fleet: dict[str, Device], bundles: PushBundles) -> None:
    code, out, err = run_cli("push", bundles.at("pi5", "1.0.0"), bundles.at("coral", "1.0.0"), *_admin(server), "--version", "1.0.0", "--rollout",
                             "--select", "profile=raspberry-pi-5,tag=shop-1", "--waves", "30,100",
                             "--gate", "min_agreement=0.99", "--gate", "max_p95_ratio=1.2", "--json")
    assert code == 0, err
    result = json.loads(out)
    mv, rollout = result["model"], result["rollout"]
    assert (mv["name"], mv["version"]) == ("digits", "1.0.0")
    assert {a["profile"] for a in mv["artifacts"]} == {"raspberry-pi-5", "coral-edgetpu"}
    assert all(a["validation"]["loads"] for a in mv["artifacts"])
    assert "100%" in err  # the upload's progress, as plain lines off a terminal
    assert rollout["state"] == "running" and rollout["waves_pct"] == [30, 100]
    assert rollout["selector"] == {"profiles": ["raspberry-pi-5"], "tags": ["shop-1"]}
    assert rollout["gates"]["min_agreement"] == 0.99 and rollout["gates"]["max_p95_ratio"] == 1.2
    shop1 = {fleet[n].id for n in ("pi-a", "pi-b", "pi-c")}
    first = _wave_devices(rollout, 0)
    assert len(first) == 1 and first <= shop1  # ceil(30% of 3)
    by_id = {d.id: d for d in fleet.values()}
    for device_id in first:
        by_id[device_id].install(p95=1.1, baseline_p95=1.0)
    r = server.wait_for(rollout["id"], lambda r: r["waves"][0]["state"] == "passed" and r["waves"][1]["state"] == "running", "wave 2 running")
    gates = {g["gate"]: g for g in r["waves"][0]["gate_results"]}
    assert gates["min_agreement"]["passed"] and gates["max_p95_ratio"]["passed"]
    code, out, err = run_cli("rollout", "status", rollout["id"], *_admin(server))
    assert code == 0, err
    assert "Waves" in out and "Gate results" in out and "passed" in out and "min_agreement" in out and "activated" in out
    assert by_id[next(iter(first))].name in out
    for device_id in _wave_devices(r, 1):
        by_id[device_id].install()
    r = server.wait_for(rollout["id"], lambda r: r["state"] == "completed", "completed")
    assert _wave_devices(r, 0) | _wave_devices(r, 1) == shop1
    code, out, _ = run_cli("devices", "list", *_admin(server), "--tag", "shop-1", "--profile", "raspberry-pi-5", "--json")
    assert code == 0
    listed = json.loads(out)
    assert {d["name"] for d in listed} == {"pi-a", "pi-b", "pi-c"}
    assert all(d["active"] and d["active"]["version"] == "1.0.0" for d in listed)


def test_failed_gate_fails_the_rollout(run_cli, server: Server, fleet: dict[str, Device], bundles: PushBundles) -> None:
    code, out, err = run_cli("push", bundles.at("pi5", "1.1.0"), *_admin(server), "--version", "1.1.0", "--rollout", "--select", "tag=shop-2",
                             "--gate", "min_agreement=0.99", "--json")
    assert code == 0, err
    rollout = json.loads(out)["rollout"]
    assert _wave_devices(rollout, 0) == {fleet["pi-d"].id}
    fleet["pi-d"].install(agreement=0.5)
    r = server.wait_for(rollout["id"], lambda r: r["state"] == "failed", "failed")
    code, out, _ = run_cli("rollout", "status", rollout["id"], *_admin(server))
    assert code == 0 and "failed" in out and "FAIL" in out and "min_agreement" in out
    assert fleet["pi-d"].assignment()["action"] == "revert"  # the wave's device is sent back
    assert next(g for g in r["waves"][0]["gate_results"] if g["gate"] == "min_agreement")["passed"] is False


def test_pause_resume_promote_rollback(run_cli, server: Server, fleet: dict[str, Device], bundles: PushBundles) -> None:
    code, out, err = run_cli("push", bundles.at("pi5", "2.0.0"), *_admin(server), "--version", "2.0.0", "--rollout", "--select", "tag=shop-1",
                             "--select", "profile=raspberry-pi-5", "--waves", "30,60,100", "--json")
    assert code == 0, err
    rid = json.loads(out)["rollout"]["id"]
    states = []
    for action in ("pause", "resume", "promote", "rollback"):
        code, out, err = run_cli("rollout", action, rid, *_admin(server), "--json")
        assert code == 0, f"{action}: {err}"
        states.append(json.loads(out)["state"])
    assert states[0] == "paused" and states[1] == "running" and states[3] == "rolled_back"
    code, out, err = run_cli("rollout", "resume", rid, *_admin(server))
    assert code == 8 and out == ""
    assert "Error: server:" in err and "409" in err and "Hint:" in err
    code, out, err = run_cli("rollout", "pause", rid, *_admin(server))  # text output path of an action
    assert code == 8


def test_watch_follows_a_rollout_to_the_end(run_cli, server: Server, fleet: dict[str, Device], bundles: PushBundles) -> None:
    code, out, err = run_cli("push", bundles.at("coral", "3.0.0"), *_admin(server), "--version", "3.0.0", "--rollout", "--select",
                             "profile=coral-edgetpu", "--json")
    assert code == 0, err
    rid = json.loads(out)["rollout"]["id"]
    env = {**server.env, "EDGEKIT_SERVER": server.url, "EDGEKIT_TOKEN": server.admin}
    watcher = subprocess.Popen([*EDGEKIT, "rollout", "status", rid, "--watch", "--interval", "0.2", "--watch-timeout", "120"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(iter(watcher.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        server.wait_for(rid, lambda r: r["state"] == "running", "running")
        deadline = time.monotonic() + 60  # the watcher has printed the running state once (its start-up may be slow on a busy box)
        while not any(line.startswith("- rollout ") and "running" in line for line in list(err_lines)) and time.monotonic() < deadline:
            time.sleep(0.05)
        fleet["coral-a"].install()
        out = watcher.stdout.read()
        watcher.wait(120)
        reader.join(10)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    err = "".join(err_lines)
    assert watcher.returncode == 0, err
    lines = [line for line in err.splitlines() if line.startswith("- rollout ")]
    assert "running" in lines[0] and "completed" in lines[-1]
    assert "completed" in out and "Waves" in out


def test_watch_gives_up_after_its_timeout(run_cli, server: Server, fleet: dict[str, Device], bundles: PushBundles) -> None:
    code, out, err = run_cli("push", bundles.at("pi5", "3.1.0"), *_admin(server), "--version", "3.1.0", "--rollout", "--select", "tag=shop-2", "--json")
    assert code == 0, err
    rid = json.loads(out)["rollout"]["id"]
    code, out, err = run_cli("rollout", "status", rid, *_admin(server), "--watch", "--interval", "0.2", "--watch-timeout", "1", "--json")
    assert code == 8 and "still running after 1 s" in err
    assert run_cli("rollout", "rollback", rid, *_admin(server))[0] == 0


def test_devices_list_and_env_vars(run_cli, server: Server, fleet: dict[str, Device], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEKIT_SERVER", server.url)
    monkeypatch.setenv("EDGEKIT_TOKEN", server.admin)
    code, out, err = run_cli("devices", "list", "--json")
    assert code == 0, err
    listed = {d["name"]: d for d in json.loads(out)}
    assert set(fleet) <= set(listed)
    assert listed["coral-a"]["profile"] == "coral-edgetpu" and listed["pi-d"]["tags"] == ["shop-2"]
    assert listed["pi-a"]["id"] == fleet["pi-a"].id
    code, out, _ = run_cli("devices", "list")
    assert code == 0 and "pi-a" in out and "coral-edgetpu" in out and "shop-2" in out
    code, out, _ = run_cli("devices", "list", "--profile", "coral-edgetpu", "--json")
    assert [d["name"] for d in json.loads(out)] == ["coral-a"]
    monkeypatch.setenv("EDGEKIT_TOKEN", "ekadm_wrong")
    code, _, err = run_cli("devices", "list", "--token", server.admin)  # the flag wins over the variable
    assert code == 0, err


def test_server_errors_become_error_and_hint(run_cli, server: Server, fleet: dict[str, Device], bundles: PushBundles) -> None:
    code, out, err = run_cli("devices", "list", "--server", server.url, "--token", "ekadm_not-a-real-token")
    assert code == 8 and out == ""
    assert "Error: server:" in err and "401" in err and "Hint:" in err
    code, _, err = run_cli("devices", "list", "--server", server.url, "--token", server.enroll)
    assert code == 8 and "403" in err
    code, _, err = run_cli("rollout", "status", "no-such-rollout", *_admin(server))
    assert code == 8 and "404" in err and "not_found" in err
    # No device matches: the version is uploaded, the rollout refused with the server's reason.
    code, _, err = run_cli("push", bundles.at("pi5", "4.0.0"), *_admin(server), "--version", "4.0.0", "--rollout", "--select", "tag=nowhere")
    assert code == 8
    assert "uploaded digits 4.0.0, but the rollout was not created" in err and "no_matching_devices" in err
    code, _, err = run_cli("push", bundles.at("pi5", "4.0.0"), *_admin(server), "--version", "4.0.0")
    assert code == 8 and "409" in err and "conflict" in err
    versions = server.get("/v1/models").json()
    assert "4.0.0" in next(m for m in versions if m["name"] == "digits")["versions"]


def test_damaged_bundle_is_refused_before_upload(run_cli, server: Server, bundles: dict[str, Path], tmp_path: Path) -> None:
    bad = Path(shutil.copytree(bundles["pi5"], tmp_path / "bad"))
    model = next(p for p in bad.iterdir() if p.suffix == ".tflite")
    model.write_bytes(model.read_bytes()[:-16])
    code, _, err = run_cli("push", bad, *_admin(server), "--version", "5.0.0")
    assert code == 3 and "nothing was uploaded" in err
    assert all("5.0.0" not in m["versions"] for m in server.get("/v1/models").json())


def test_server_down_is_a_clear_error(run_cli, bundles: PushBundles) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    code, _, err = run_cli("devices", "list", "--server", url, "--token", "ekadm_x")
    assert code == 8 and f"cannot reach the fleet server at {url} (connection refused)" in err and "EDGEKIT_SERVER" in err
    code, _, err = run_cli("push", bundles["pi5"], "--server", url, "--token", "ekadm_x")
    assert code == 8 and "cannot reach" in err


@pytest.mark.parametrize(("args", "message"), [
    (("--rollout", "--waves", "50,25,100"), "strictly increasing"),
    (("--rollout", "--waves", "5,25"), "ending at 100"),
    (("--rollout", "--gate", "max_speed=2"), "NAME=NUMBER"),
    (("--rollout", "--gate", "min_agreement=high"), "NAME=NUMBER"),
    (("--rollout", "--select", "shop-1"), "profile=ID or tag=T"),
    (("--select", "tag=shop-1"), "Add --rollout"),
    (("--model", "Digits!"), "not valid"),
])
def test_bad_flags_are_usage_errors(run_cli, bundles: dict[str, Path], args: tuple[str, ...], message: str) -> None:
    code, _, err = run_cli("push", bundles["pi5"], "--server", "http://127.0.0.1:9", "--token", "ekadm_x", *args)
    assert code == 2 and message in err, err


def test_no_server_or_token_is_a_usage_error(run_cli, bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEKIT_SERVER", raising=False)
    monkeypatch.delenv("EDGEKIT_TOKEN", raising=False)
    code, _, err = run_cli("devices", "list")
    assert code == 2 and "EDGEKIT_SERVER" in err
    code, _, err = run_cli("devices", "list", "--server", "http://127.0.0.1:9")
    assert code == 2 and "EDGEKIT_TOKEN" in err


def test_server_that_never_answers_times_out(run_cli) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        code, _, err = run_cli("devices", "list", "--server", url, "--token", "ekadm_x", "--timeout", "0.5")
    assert code == 8 and f"the fleet server at {url} did not answer GET /v1/devices within 0.5 s" in err


def test_fleet_stats_audit_tokens_decommission_and_rollout_list(run_cli, server: Server, fleet: dict[str, Device]) -> None:
    """``edgekit fleet stats`` on real telemetry, ``token create|list|revoke``, ``audit``, ``devices decommission``, ``rollout list``."""
    import datetime as dt

    version = httpx.get(server.url + "/v1/models/digits/versions/1.0.0", headers={"Authorization": f"Bearer {server.admin}"}).json()
    sha = next(a["sha256"] for a in version["artifacts"] if a["profile"] == "raspberry-pi-5")
    minute = dt.datetime.now(dt.timezone.utc).replace(second=0, microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
    point = {"minute": minute, "model_sha256": sha, "model_version": "1.0.0", "count": 200, "errors": 0, "escalations": 50, "degraded": 0,
             "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0}, "confidence_hist": [0] * 8 + [50, 150], "sources": {"device": 200}}
    r = httpx.post(server.url + "/v1/device/telemetry", headers={"Authorization": f"Bearer {fleet['pi-a'].token}"}, json={"points": [point]})
    assert r.status_code in (200, 202), r.text
    code, out, err = run_cli("fleet", "stats", "digits", "1.0.0", *_admin(server), "--json")
    assert code == 0, err
    totals = json.loads(out)["totals"]
    assert totals["requests"] == 200 and totals["escalation_rate"] == 0.25 and totals["latency_ms"]["p95"] == 2.0
    code, out, err = run_cli("fleet", "stats", "digits", "1.0.0", *_admin(server))
    assert code == 0 and "escalation 25.0%" in out and "PSI" in out
    code, out, err = run_cli("fleet", "stats", "digits", *_admin(server), "--json")
    assert code == 0 and {v["version"] for v in json.loads(out)["versions"]} >= {"1.0.0", "1.1.0"}
    for args, code_name in ((("digits", "9.9.9"), "not_found"), (("digits", "1.0.0", "--bucket", "1"), "bucket_too_small"),
                            (("digits", "1.0.0", "--since", "2020-01-01T00:00:00Z"), "range_too_large")):
        code, out, err = run_cli("fleet", "stats", *args, *_admin(server))
        assert code != 0 and "Error:" in err and "Hint:" in err and code_name in err and "Traceback" not in err, err
    # a named token acts; the audit log names it; revoked, it is refused on the next request
    code, out, err = run_cli("token", "create", "--name", "cli-bot", *_admin(server), "--json")
    assert code == 0, err
    bot = json.loads(out)
    code, out, err = run_cli("devices", "decommission", fleet["coral-a"].id, "--server", server.url, "--token", bot["token"], "--json")
    assert code == 0, err
    assert json.loads(out)["decommissioned_at"]
    code, out, err = run_cli("audit", *_admin(server), "--actor", "cli-bot", "--json")
    assert code == 0, err
    (event,) = json.loads(out)["items"]
    assert event["action"] == "POST /v1/devices/{device_id}/decommission" and event["result"] == "ok" and event["remote_addr"] == "127.0.0.1"
    code, out, err = run_cli("token", "list", *_admin(server), "--json")
    assert code == 0 and "cli-bot" in {t["name"] for t in json.loads(out)["items"]}
    code, out, err = run_cli("token", "revoke", "cli-bot", *_admin(server))
    assert code == 0 and "revoked" in out
    code, out, err = run_cli("rollout", "list", "--server", server.url, "--token", bot["token"])
    assert code != 0 and "unauthorized" in err
    code, out, err = run_cli("rollout", "list", *_admin(server), "--json")
    assert code == 0, err
    page = json.loads(out)
    assert page["total"] >= 3 and all(r["model"] == "digits" for r in page["items"])
    code, out, err = run_cli("rollout", "list", *_admin(server), "--state", "failed", "--json")
    assert code == 0 and all(r["state"] == "failed" for r in json.loads(out)["items"])
