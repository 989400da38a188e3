"""The Debian 12 arm64 root of scripts/arm64-root.sh as a test device: build it, mount /proc, run in it.

Processes run with ``chroot`` in the root through the qemu-aarch64 binfmt interpreter: real
aarch64 binaries (Debian's Python 3.11.2, the aarch64 wheels of LiteRT and ONNX Runtime), on the
host's network namespace, so a server on the host's 127.0.0.1 is reachable. Only ``/proc`` is
mounted in the root, never the host's ``/sys`` (LiteRT and ONNX Runtime segfault under qemu-user
when they parse the host's CPU lists there). Everything mounted is unmounted at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Arm64Root", "arm64_unavailable_reason", "build_arm64_root"]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "arm64-root.sh"
VENV = "/opt/edgekit-agent"                 # the agent's venv in the root (the root's stock python3)
LITERT_ONLY_VENV = "/opt/edgekit-litert-only"  # edgekit + LiteRT, no ONNX Runtime


def arm64_unavailable_reason() -> str | None:
    """Why this machine cannot run the arm64 root at all (None when it can)."""
    if os.uname().sysname != "Linux":
        return "the arm64 device root needs Linux (binfmt_misc, chroot)"
    if os.geteuid() != 0:
        return "the arm64 device root needs root (debootstrap, chroot, mount); run the suite as root"
    if not Path("/usr/bin/qemu-aarch64-static").exists() or shutil.which("debootstrap") is None:
        return "qemu-user-static/debootstrap are not installed: run scripts/setup-test-system.sh"
    if not Path("/proc/sys/fs/binfmt_misc").is_dir():
        return "this kernel has no binfmt_misc, so aarch64 binaries cannot run here"
    return None


def build_arm64_root(timeout_s: float = 1800) -> tuple[Path | None, str]:
    """Run scripts/arm64-root.sh (a no-op when cached); (root, '') or (None, why it could not be built)."""
    proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        return None, (proc.stderr or proc.stdout).strip()[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1]), ""


@dataclass
class Arm64Root:
    """A built root with /proc mounted; ``work`` is a fresh directory inside it for one session."""

    path: Path
    mounted: list[Path] = field(default_factory=list)
    work_name: str = field(default_factory=lambda: f"edgekit-e2e-{uuid.uuid4().hex[:8]}")

    @property
    def work(self) -> Path:
        """The session's directory, as the host sees it."""
        return self.path / "tmp" / self.work_name

    def inside(self, host_path: Path) -> str:
        """The path a process in the root sees for ``host_path`` (which must lie in the root)."""
        return "/" + str(host_path.resolve().relative_to(self.path.resolve()))

    def mount(self) -> None:
        proc = self.path / "proc"
        if not os.path.ismount(proc):
            subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
            self.mounted.append(proc)
        self.work.mkdir(parents=True, exist_ok=True)

    def unmount(self) -> None:
        """Unmount what this object mounted (lazily, so a process still in the root cannot block it); drop ``work``."""
        for m in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(m)], check=False)
        self.mounted.clear()
        shutil.rmtree(self.work, ignore_errors=True)

    @contextlib.contextmanager
    def session(self) -> Iterator[Arm64Root]:
        self.mount()
        try:
            yield self
        finally:
            self.unmount()

    def command(self, *args: str, env: dict[str, str] | None = None, venv: str = VENV) -> list[str]:
        """A command line that runs ``args`` in the root with ``venv`` first on PATH and only ``env`` set."""
        base = {"PATH": f"{venv}/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        pairs = [f"{k}={v}" for k, v in {**base, **(env or {})}.items()]
        return ["chroot", str(self.path), "/usr/bin/env", "-i", *pairs, *args]

    def run(self, *args: str, env: dict[str, str] | None = None, venv: str = VENV, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.command(*args, env=env, venv=venv), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed in the arm64 root (exit {proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def popen(self, *args: str, env: dict[str, str] | None = None, log: Path) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # noqa: SIM115 - the child owns it
        return subprocess.Popen(self.command(*args, env=env), stdout=out, stderr=subprocess.STDOUT)

    def copy_in(self, src: Path, name: str) -> Path:
        """Copy a file or directory into ``work``; returns the host path of the copy."""
        dst = self.work / name
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        return dst
