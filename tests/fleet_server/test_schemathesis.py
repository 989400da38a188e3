"""A bounded schemathesis run (``--checks all``) against the real server over HTTP on SQLite: zero server
errors and zero contract violations (the config beside this file states the two documented allowances)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet_support import LiveServer

pytestmark = pytest.mark.timeout(600)
HERE = Path(__file__).resolve().parent
MAX_EXAMPLES = 10
SEED = 20261201


def test_schemathesis_finds_no_server_error_and_no_contract_violation(tmp_path: Path) -> None:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if exe is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[dev]'")
    server = LiveServer(data_dir=tmp_path / "data", db_url=f"sqlite:///{tmp_path / 'fleet.db'}", process=True).start()
    try:
        run = subprocess.run(
            [exe, "--config-file", str(HERE / "schemathesis.toml"), "run", f"{server.url}/openapi.json",
             "-H", f"Authorization: Bearer {server.admin_token}", "--checks", "all", "--max-examples", str(MAX_EXAMPLES),
             "--seed", str(SEED), "--no-color", "--request-timeout", "30"],
            capture_output=True, text=True, timeout=540, cwd=tmp_path)  # its .schemathesis/ cache stays out of the checkout
    finally:
        server.stop()
    out = run.stdout + run.stderr
    summary = out[out.find("SUMMARY"):] if "SUMMARY" in out else out[-4000:]
    failures = out[out.find("FAILURES"):out.find("WARNINGS")] if "FAILURES" in out else ""
    assert run.returncode == 0, (failures[:6000] or out[-6000:])
    assert " passed" in summary and "failures" not in summary.split("Test cases:")[-1], summary
    log = (tmp_path / f"server-{server.port}.log").read_text(errors="replace")
    assert "unhandled error" not in log and "internal error" not in log, log[-4000:]
