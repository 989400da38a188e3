"""packaging/systemd: the units pass ``systemd-analyze verify`` and the agent takes its token as a credential."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_agents.enroll_token import CREDENTIAL_NAME
from device_agents.profiler import ProfileSettings

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "packaging" / "systemd"
ENTRY_POINT = Path(sys.executable).parent / "edgekit"  # the installed console script, standing in for /opt/edgekit/bin/edgekit


def _verify(unit_files: list[Path]) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing: run scripts/setup-test-system.sh (installs systemd)")
    return subprocess.run(["systemd-analyze", "verify", *map(str, unit_files)], capture_output=True, text=True, timeout=60)


def _installed_copy(unit: Path, dest: Path, edit=lambda text: text) -> Path:  # noqa: ANN001
    """The unit as installed, with ExecStart pointing at this machine's real entry point."""
    out = dest / unit.name
    out.write_text(edit(unit.read_text().replace("/opt/edgekit/bin/edgekit", str(ENTRY_POINT))))
    return out


def _service(unit: Path) -> configparser.SectionProxy:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(unit)
    return cp["Service"]


@pytest.mark.parametrize("name", ["edgekit-agent.service", "edgekit-server.service"])
def test_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    assert ENTRY_POINT.exists()
    proc = _verify([_installed_copy(UNITS / name, tmp_path)])
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stderr + proc.stdout


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check can fail: a missing executable and a bad value are reported."""
    missing = _verify([UNITS / "edgekit-agent.service"])  # /opt/edgekit/bin/edgekit is not installed here
    assert missing.returncode != 0 and "/opt/edgekit/bin/edgekit" in missing.stderr
    bad = _verify([_installed_copy(UNITS / "edgekit-agent.service", tmp_path, lambda t: t.replace("Restart=always", "Restart=sometimes"))])
    assert "restart specifier" in bad.stderr and "sometimes" in bad.stderr


def test_agent_unit_policy() -> None:
    s = _service(UNITS / "edgekit-agent.service")
    assert s["User"] == "edgekit" and s["Group"] == "edgekit"
    assert s["StateDirectory"] == "edgekit/agent" and "/var/lib/edgekit/agent" in s["ExecStart"]
    assert s["Restart"] == "always" and "6" in s["RestartPreventExitStatus"].split()
    budget = ProfileSettings()
    longest_profile_s = 2 * budget.budget_s + 120  # device_agents.profiler.profile_candidate's deadline
    assert int(s["TimeoutStopSec"]) > longest_profile_s
    assert s["LoadCredential"] == f"{CREDENTIAL_NAME}:/etc/edgekit/enroll-token"
    assert "--enroll-token" not in s["ExecStart"] and "TOKEN" not in s["ExecStart"]
    users = (UNITS / "edgekit.sysusers.conf").read_text()
    assert "u edgekit " in users and "u edgekit-server " in users


@pytest.fixture
def fleet_db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


def test_agent_enrolls_with_the_token_from_its_credential_never_on_argv(start_fleet_server, tmp_path: Path) -> None:
    """As systemd runs it: $CREDENTIALS_DIRECTORY/enroll-token, no token in the process's command line."""
    server = start_fleet_server()
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / CREDENTIAL_NAME).write_text(server.enroll_token + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CREDENTIALS_DIRECTORY": str(creds), "EDGEKIT_AGENT_POLL_INTERVAL_S": "0.2"}
    env.pop("EDGEKIT_AGENT_ENROLL_TOKEN", None)
    cmd = [str(ENTRY_POINT), "agent", "run", "--server", server.url, "--data-dir", str(tmp_path / "agent"), "--profile", "raspberry-pi-5",
           "--name", "credential-dev"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not any(d["name"] == "credential-dev" for d in server.admin.get("/v1/devices").json()):
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the agent did not enroll"
            time.sleep(0.2)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert server.enroll_token not in cmdline
    finally:
        proc.terminate()
        proc.wait(30)


def test_an_empty_token_file_is_an_error_with_a_hint(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    proc = subprocess.run([str(ENTRY_POINT), "agent", "run", "--server", "http://127.0.0.1:9", "--data-dir", str(tmp_path / "d"),
                           "--profile", "raspberry-pi-5", "--enroll-token-file", str(empty)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert "Error:" in proc.stderr and "Hint:" in proc.stderr and "Traceback" not in proc.stderr
