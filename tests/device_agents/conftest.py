"""Fixtures for the device agent: real digits bundles, re-signed variants, an agent as a real process."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from agent_support import FAST_ENV, ROOT, agent_cmd, resign
from edgekit.bundle import GOLDEN_FILE

@pytest.fixture(scope="session")
def bundles(digits_bundles, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``pi``/``coral``: digits 1.2.3; ``pi_b``: the same model as 1.3.0; ``pi_bad_golden``: reference outputs that disagree."""
    by = {r.profile: r.bundle_dir for r in digits_bundles.results}
    work = tmp_path_factory.mktemp("agent-bundles")
    out = {"pi": by["raspberry-pi-5"], "coral": by["coral-edgetpu"]}
    out["pi_b"] = resign(out["pi"], work / "digits-pi-1.3.0", version="1.3.0")
    out["coral_b"] = resign(out["coral"], work / "digits-coral-1.3.0", version="1.3.0")
    with np.load(out["pi"] / GOLDEN_FILE) as g:
        golden = {k: g[k] for k in g.files}
    golden["y_host"] = np.roll(golden["y_host"], 1, axis=-1)  # every arg-max moves: top-1 agreement 0
    out["pi_bad_golden"] = resign(out["pi"], work / "digits-pi-1.4.0-bad", golden=golden, version="1.4.0")
    return out


@pytest.fixture()
def agent_env() -> dict[str, str]:
    env = {**os.environ, **FAST_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("EDGEKIT_PROFILE_PATH", None)
    return env


@pytest.fixture()
def spawn_agent(agent_env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start ``edgekit agent run`` as a real process; every one still running is killed at the end."""
    procs: list[subprocess.Popen] = []

    def spawn(server: str, data_dir: Path, *, profile: str = "raspberry-pi-5", token: str | None = "ekenr_test", extra_env: dict | None = None,
              name: str = "dev", log: Path | None = None) -> subprocess.Popen:
        args = ["run", "--server", server, "--data-dir", str(data_dir), "--profile", profile, "--name", name, "-v"]
        if token:
            args += ["--enroll-token", token]
        out = open(log or data_dir.with_name(data_dir.name + ".log"), "ab")
        p = subprocess.Popen(agent_cmd(*args), env={**agent_env, **(extra_env or {})}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


