"""Measure the agent's install and memory footprint (docs/benchmarks.md, "Agent footprint").

    .venv/bin/python scripts/agent-footprint.py --bundle BUNDLE [--arm64-root /var/cache/edgekit/arm64-root-bookworm]

BUNDLE: a raspberry-pi-5 bundle directory (its publisher key is put on the server's allow-list). Starts a fleet server on 127.0.0.1, one agent
(on this host, or with --arm64-root in the Debian 12 arm64 root of scripts/arm64-root.sh, under
qemu-user) and reports: the wheels ``pip`` pulls for ``edgekit[agent]`` and their bytes; the
agent's RSS idle (enrolled, polling); its RSS and its profiler child's while a rollout of BUNDLE
is profiled; the profiler's own peak figures. Under qemu-user every RSS includes the emulator's
memory (translator and code cache): not a board's figure. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
EDGEKIT = [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())"]
BUILD_ONLY = ("setuptools-", "wheel-")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["agent"]


def wheels_x86(work: Path) -> list[Path]:
    dest = work / "wheels-x86"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(dest), *agent_requirements()],
                   check=True, timeout=900)
    return sorted(dest.iterdir())


def wheels_arm64(root: Path) -> list[Path]:
    return sorted(p for p in (root / "var/cache/edgekit-wheels").iterdir() if not p.name.startswith(BUILD_ONLY))


def rss_mb(pid: int) -> tuple[float, float]:
    """(the process's RSS, the RSS of its children) in MiB; zeros once it is gone."""
    try:
        p = psutil.Process(pid)
        own = p.memory_info().rss
        kids = sum(c.memory_info().rss for c in p.children(recursive=True))
    except psutil.Error:
        return 0.0, 0.0
    return own / 2**20, kids / 2**20


def token(data_dir: Path, scope: str) -> str:
    out = subprocess.run([*EDGEKIT, "server", "token", "create", "--scope", scope, "--data-dir", str(data_dir), "--json"],
                         check=True, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout)["token"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--arm64-root", type=Path)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgekit-footprint-"))
    root = a.arm64_root
    mounted = False
    server = agent = None
    try:
        wheels = wheels_arm64(root) if root else wheels_x86(work)
        data = work / "server"
        admin_token, enroll_token = token(data, "admin"), token(data, "enroll")
        bundle = a.bundle
        if bundle.is_dir():
            from edgekit.bundle import pack

            bundle = pack(bundle, work / "bundle.ekb")
        from edgekit.bundle import verify_bundle

        publisher = verify_bundle(a.bundle).public_key  # the server runs only allowed publishers' bundles
        subprocess.run([*EDGEKIT, "server", "publisher", "add", publisher, "--label", "footprint", "--data-dir", str(data)], check=True,
                       capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "EDGEKIT_ENGINE_INTERVAL_S": "0.2"}
        server = subprocess.Popen([*EDGEKIT, "server", "start", "--port", str(port), "--data-dir", str(data), "--log-level", "warning"],
                                  cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=60)
        for _ in range(300):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = admin.post("/v1/models/digits/versions", files=[("bundles", (bundle.name, bundle.read_bytes(), "application/octet-stream"))])
        if r.status_code != 201:
            raise SystemExit(f"upload refused: {r.status_code} {r.text}")
        version = r.json()["version"]
        agent_env = {"EDGEKIT_AGENT_ENROLL_TOKEN": enroll_token, "EDGEKIT_AGENT_POLL_INTERVAL_S": "1"}
        if root:
            if not os.path.ismount(root / "proc"):
                subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
                mounted = True
            inside = f"/tmp/{work.name}"
            (root / inside.lstrip("/")).mkdir(parents=True)
            cmd = ["chroot", str(root), "/usr/bin/env", "-i", "PATH=/opt/edgekit-agent/bin:/usr/bin:/bin", "HOME=/root",
                   *(f"{k}={v}" for k, v in agent_env.items()), "edgekit", "agent", "run", "--server", url, "--data-dir", f"{inside}/agent",
                   "--profile", "raspberry-pi-5", "--name", "footprint", "--tag", "footprint"]
            agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            agent = subprocess.Popen([*EDGEKIT, "agent", "run", "--server", url, "--data-dir", str(work / "agent"), "--profile",
                                      "raspberry-pi-5", "--name", "footprint", "--tag", "footprint"], cwd=REPO,
                                     env={**env, **agent_env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not admin.get("/v1/devices").json():
            assert agent.poll() is None and time.monotonic() < deadline, "the agent did not enroll"
            time.sleep(0.5)
        time.sleep(10)  # settled: enrolled, polling every second
        idle = [rss_mb(agent.pid)[0] for _ in range(10) if time.sleep(0.5) is None]
        r = admin.post("/v1/rollouts", json={"model": "digits", "version": version, "selector": {"profiles": [], "tags": ["footprint"]},
                                             "waves": [100], "gates": {}})
        r.raise_for_status()
        rid = r.json()["id"]
        peak_agent = peak_child = peak_total = 0.0
        while admin.get(f"/v1/rollouts/{rid}").json()["state"] not in ("completed", "failed", "rolled_back"):
            own, kids = rss_mb(agent.pid)
            peak_agent, peak_child, peak_total = max(peak_agent, own), max(peak_child, kids), max(peak_total, own + kids)
            time.sleep(0.05)
        rollout = admin.get(f"/v1/rollouts/{rid}").json()
        metrics = rollout["waves"][0]["devices"][0].get("metrics") or {}
        time.sleep(5)
        active = [rss_mb(agent.pid)[0] for _ in range(10) if time.sleep(0.5) is None]
        out = {
            "where": "Debian 12 arm64 root, Python 3.11.2 aarch64 under qemu-user" if root else f"this host, Python {sys.version.split()[0]}",
            "host_cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                              if ln.startswith("model name")), "?"),
            "rollout_state": rollout["state"],
            "wheels": len(wheels), "wheel_bytes": sum(p.stat().st_size for p in wheels),
            "largest_wheels": [(p.name, p.stat().st_size) for p in sorted(wheels, key=lambda p: -p.stat().st_size)[:3]],
            "tensorflow_pulled": any(p.name.lower().startswith(("tensorflow", "tf_", "keras")) for p in wheels),
            "idle_rss_mb": statistics.median(idle), "active_idle_rss_mb": statistics.median(active),
            "profiling_agent_rss_peak_mb": peak_agent, "profiling_child_rss_peak_mb": peak_child,
            "profiling_total_rss_peak_mb": peak_total,
            "profiler_process_peak_rss_mb": metrics.get("process_peak_rss_mb"), "profiler_model_peak_rss_mb": metrics.get("peak_rss_mb"),
            "timing_source": metrics.get("timing_source"),
        }
        print(json.dumps(out, indent=1))
        return 0
    finally:
        for p in (agent, server):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        if mounted:
            subprocess.run(["umount", "-l", str(root / "proc")], check=False)
        if root:
            shutil.rmtree(root / "tmp" / work.name, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
