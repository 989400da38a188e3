"""A real OpenSSH ``sshd`` on 127.0.0.1 for the SSH push tests: its own host key, its own
authorized_keys, a free port, started and stopped by a fixture.

sshd must be started by absolute path, as root (it re-executes itself and needs the
privilege-separation directory ``/run/sshd``). Everything else lives in a temp directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["SshServer", "sshd", "free_port", "keygen"]

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, kind: str = "ed25519") -> Path:
    """Write an unencrypted OpenSSH key pair (``path`` and ``path.pub``); returns ``path``."""
    path.unlink(missing_ok=True)
    path.with_suffix(".pub").unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "edgekit-test", "-f", str(path)], check=True)
    return path


def _host_fingerprint(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], check=True, capture_output=True, text=True).stdout
    return out.split()[1]  # "256 SHA256:... comment (ED25519)"


@dataclass
class SshServer:
    """One sshd instance: ``start()``, ``restart(new_host_key=True)``, ``stop()``."""

    root: Path
    port: int = field(default_factory=free_port)
    user: str = "root"
    proc: subprocess.Popen | None = None

    @property
    def host_key(self) -> Path:
        return self.root / "ssh_host_ed25519_key"

    @property
    def client_key(self) -> Path:
        """The identity whose public half is in authorized_keys."""
        return self.root / "id_ed25519"

    @property
    def target(self) -> str:
        """``USER@HOST:PORT`` as ``edgekit push --ssh`` takes it."""
        return f"{self.user}@127.0.0.1:{self.port}"

    @property
    def host_fingerprint(self) -> str:
        """The current host key's OpenSSH SHA256 fingerprint."""
        return _host_fingerprint(self.host_key.with_suffix(".pub"))

    @property
    def log(self) -> str:
        """What sshd wrote to stderr (it runs with -e)."""
        p = self.root / "sshd.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def setup(self) -> None:
        """Keys, authorized_keys and sshd_config in ``root``."""
        self.root.mkdir(parents=True, exist_ok=True)
        keygen(self.host_key)
        keygen(self.client_key)
        shutil.copy(self.client_key.with_suffix(".pub"), self.root / "authorized_keys")
        (self.root / "sshd_config").write_text(
            "\n".join([
                f"Port {self.port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {self.host_key}",
                f"PidFile {self.root / 'sshd.pid'}",
                f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",  # the temp dir's permissions are not sshd's business here
                "Subsystem sftp internal-sftp",
                "LogLevel VERBOSE",
                "",
            ])
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    def start(self) -> None:
        """Start sshd in the foreground (-D) and wait until it answers with its banner."""
        config = self.root / "sshd_config"
        subprocess.run([SSHD, "-t", "-f", str(config)], check=True, capture_output=True)
        log = open(self.root / "sshd.log", "ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}:\n{self.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not answer on port {self.port} within 10 s:\n{self.log}")

    def stop(self) -> None:
        """Stop the sshd this object started (by its pid only)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, new_host_key: bool = False) -> None:
        """Stop and start again on the same port, with a fresh host key when asked."""
        self.stop()
        if new_host_key:
            keygen(self.host_key)
        self.start()


def _can_run_sshd() -> str | None:
    if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
        return "OpenSSH server not installed (scripts/setup-test-system.sh installs it)"
    if os.geteuid() != 0:
        return "sshd needs root to run as a test server"
    return None


@pytest.fixture()
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    """A running sshd on 127.0.0.1 (a free port) that accepts ``server.client_key`` for root."""
    reason = _can_run_sshd()
    if reason:
        pytest.skip(reason)
    server = SshServer(tmp_path / "sshd")
    server.setup()
    server.start()
    try:
        yield server
    finally:
        server.stop()
