"""edgekit.childproc: a child ends with its parent even when the parent is SIGKILLed, on Linux's prctl and on the
portable watcher thread; a pid that is not set or no longer the parent is handled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekit.childproc import PARENT_PID_ENV, child_env, end_with_parent

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import os, sys, time
if sys.argv[1] == "watcher":
    sys.platform = "darwin"  # the portable path: no prctl
from edgekit.childproc import PARENT_PID_ENV, end_with_parent
end_with_parent()
print(os.getpid(), PARENT_PID_ENV in os.environ, flush=True)
time.sleep(300)
"""

PARENT = """
import subprocess, sys, time
from edgekit.childproc import child_env
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=child_env(), stdout=sys.stdout)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see the grandchild")
@pytest.mark.parametrize("how", ["prctl", "watcher"])
def test_child_ends_when_parent_is_sigkilled(how: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, how], env=env, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        pid, inherited = parent.stdout.readline().split()  # the child is running and has asked to end with the parent
        child = int(pid)
        assert inherited == "False"  # the variable is not passed on to the child's own children
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), f"{how}: child {child} outlived its SIGKILLed parent"
    finally:
        parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_parent_already_gone_ends_the_child_at_once() -> None:
    """A child whose named parent died before it asked (it was re-parented): it exits instead of running on."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{PARENT_PID_ENV: str(2**22 + 7)})  # no such parent
    code = "from edgekit.childproc import end_with_parent; end_with_parent(); print('ran on')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "ran on" not in proc.stdout


def test_without_a_parent_pid_nothing_changes(monkeypatch) -> None:
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    end_with_parent()  # a process started by hand: no request, no watcher
    assert child_env({"A": "1"}) == {"A": "1", PARENT_PID_ENV: str(os.getpid())}
