"""Child processes that end with their parent, even when the parent is killed outright.

A parent that gets Ctrl-C or SIGTERM ends its children itself; one killed by SIGKILL (or the
out-of-memory killer) cannot, and its child would run on: a TFLite conversion writing into a
removed staging directory, a profiler holding the device's CPU. So the spawner passes its pid in
the child's environment (:func:`child_env`) and the child calls :func:`end_with_parent` first:
on Linux the kernel then sends it SIGKILL when the parent dies (``PR_SET_PDEATHSIG``); elsewhere
a daemon thread polls the parent's pid. Done in the child, not in a ``preexec_fn``, which is
unsafe in a parent with threads. Standard library only: device agents use it on Python 3.10.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["PARENT_PID_ENV", "child_env", "end_with_parent"]

PARENT_PID_ENV = "EDGEKIT_PARENT_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) plus this process's pid, for a child that calls :func:`end_with_parent`."""
    return {**(os.environ if base is None else base), PARENT_PID_ENV: str(os.getpid())}


def end_with_parent() -> None:
    """End this process when the parent named by :data:`PARENT_PID_ENV` does (no-op when it is not set).

    The variable is removed, so this process's own children do not take this parent for theirs.
    """
    raw = os.environ.pop(PARENT_PID_ENV, "")
    if not raw.isdigit():
        return
    parent = int(raw)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl in this libc: the watcher below
            pass
        else:
            if os.getppid() != parent:  # the parent died before the request took effect
                os._exit(1)
            return
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
