"""Push one bundle straight to one device over SSH, no fleet server: verify locally, upload
over SFTP, check the sha256 on the device, then run edgekit there.

Host keys follow OpenSSH's ``StrictHostKeyChecking=accept-new`` only when asked: an unknown
host is refused unless ``accept_new_host_key`` (then its key is appended to the known_hosts
file), and a host whose key changed is always refused, with both fingerprints. paramiko is
imported inside the functions so edgekit's core imports without it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekit.bundle import open_bundle, pack, sha256_file, verify_bundle
from edgekit.errors import BundleError, HostKeyError, InputError, RemoteError, RuntimeUnavailableError, UsageError

if TYPE_CHECKING:
    import paramiko

__all__ = ["SshPushResult", "SshTarget", "default_known_hosts", "host_key_fingerprint", "push_over_ssh", "pusher_publisher_keys",
           "remote_install_argv"]

Progress = Callable[[int, int], None]
_TARGET = re.compile(r"^(?:(?P<user>[^@\s:]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^@\s:\[\]]+)(?::(?P<port>\d{1,5}))?$")


def remote_install_argv(edgekit: str, remote_bundle: str, remote_dir: str, trusted_keys: tuple[str, ...] = ()) -> list[str]:
    """The command run on the device once the bundle is there and its sha256 matches.

    The device agent takes it from here: it verifies, profiles and activates the bundle in its
    own data directory (the previous model stays active if anything fails) and prints its result
    as JSON. ``trusted_keys`` are passed as ``--trusted-key`` (added to any the device has configured).
    """
    keys = [arg for k in trusted_keys for arg in ("--trusted-key", k)]
    return [edgekit, "agent", "install", remote_bundle, "--data-dir", f"{remote_dir}/agent", *keys, "--json"]


def pusher_publisher_keys() -> tuple[str, ...]:
    """The public half of this machine's signing key when it has one (the device is told to trust the
    bundles its pusher publishes: whoever can log in over SSH could install anything anyway)."""
    import os

    from edgekit import signing
    from edgekit.errors import InputError

    if not (os.environ.get("EDGEKIT_SIGNING_KEY_PEM") or signing.default_key_path().exists()):
        return ()
    try:
        return (signing.public_key_b64(signing.load_or_create_key()),)
    except InputError:  # e.g. encrypted and no passphrase here: the device's own trusted keys decide
        return ()


def default_known_hosts() -> Path:
    """OpenSSH's per-user known_hosts file."""
    return Path.home() / ".ssh" / "known_hosts"


@dataclass(frozen=True)
class SshTarget:
    """``USER@HOST[:PORT]`` parsed; IPv6 hosts in brackets (``root@[::1]:2222``)."""

    user: str
    host: str
    port: int = 22

    @classmethod
    def parse(cls, text: str) -> SshTarget:
        """Parse ``USER@HOST[:PORT]``; the user defaults to the local login name."""
        m = _TARGET.match(text.strip())
        if not m or (m["port"] and not 0 < int(m["port"]) < 65536):
            raise UsageError(f"--ssh {text!r}: expected USER@HOST[:PORT]", "For example: --ssh pi@192.168.1.20 or --ssh root@[::1]:2222.")
        user = m["user"] or os.environ.get("USER") or "root"
        return cls(user, m["host"].strip("[]"), int(m["port"] or 22))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + (f":{self.port}" if self.port != 22 else "")


@dataclass(frozen=True)
class SshPushResult:
    """What ``push_over_ssh`` did; ``remote`` is the JSON the device's edgekit printed."""

    target: str
    host_key: str
    host_key_added: bool
    local_bundle: str
    remote_bundle: str
    sha256: str
    size_bytes: int
    sha256_verified_remotely: bool
    remote_command: str
    remote: Any

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def host_key_fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a host key."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _host_key_policy(known_hosts: Path, accept_new: bool, added: list[str]) -> paramiko.MissingHostKeyPolicy:
    """paramiko calls ``missing_host_key`` when no known key of the offered type matches the host."""
    import paramiko

    class KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
            known = client.get_host_keys().lookup(hostname)
            if known:
                # A known host offering a key of another type is a changed key, as in OpenSSH.
                old = next(iter(known.values()))
                raise _changed(hostname, key, old, known_hosts)
            if not accept_new:
                raise HostKeyError(
                    f"{hostname}: host key {key.get_name()} {host_key_fingerprint(key)} is not in {known_hosts}",
                    "Check the fingerprint on the device (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), then pass "
                    "--accept-new-host-key to trust and save it.",
                )
            known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(known_hosts, "a", encoding="utf-8") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            added.append(host_key_fingerprint(key))

    return KnownHostsPolicy()


def _changed(hostname: str, offered: paramiko.PKey, expected: paramiko.PKey, known_hosts: Path) -> HostKeyError:
    return HostKeyError(
        f"{hostname}: HOST KEY CHANGED: the host offered {offered.get_name()} {host_key_fingerprint(offered)}, "
        f"{known_hosts} has {expected.get_name()} {host_key_fingerprint(expected)}; refusing to connect",
        "Someone may be intercepting the connection, or the device was reinstalled. Confirm the new fingerprint on the device, "
        f"then remove the old entry with: ssh-keygen -R '{hostname}' -f {known_hosts}",
    )


def _paramiko():  # noqa: ANN202 - the module, imported on first use
    try:
        import paramiko
    except ImportError:
        raise RuntimeUnavailableError("'edgekit push --ssh' needs paramiko, which is not installed",
                                      "Install it with: pip install 'edgekit[admin]' (or pip install paramiko).") from None
    return paramiko


def _load_identity(identity: Path | None) -> paramiko.PKey | None:
    import paramiko

    if identity is None:
        return None
    if not identity.is_file():
        raise InputError(f"--identity {identity}: no such key file", "Pass the private key whose public half is in the device's authorized_keys.")
    try:
        return paramiko.PKey.from_path(identity)
    except paramiko.PasswordRequiredException:
        raise InputError(f"--identity {identity}: the key is encrypted", "Load it into ssh-agent (ssh-add) and omit --identity.") from None
    except (paramiko.SSHException, ValueError, OSError) as e:
        raise InputError(f"--identity {identity}: not a private key paramiko can read ({e})",
                         "Pass an OpenSSH or PEM private key (ed25519, ecdsa or rsa).") from None


def _connect(target: SshTarget, identity: Path | None, known_hosts: Path, accept_new: bool, timeout: float) -> tuple[paramiko.SSHClient, str, bool]:
    paramiko = _paramiko()

    pkey = _load_identity(identity)
    client = paramiko.SSHClient()
    if known_hosts.exists():
        try:
            # Never followed by save_host_keys(): new keys are appended by the policy, the file is never rewritten.
            client.load_host_keys(str(known_hosts))
        except (OSError, paramiko.SSHException) as e:
            raise InputError(f"{known_hosts}: unreadable known_hosts file ({e})", "Fix or move the file, or pass --known-hosts.") from None
    added: list[str] = []
    client.set_missing_host_key_policy(_host_key_policy(known_hosts, accept_new, added))
    try:
        client.connect(target.host, port=target.port, username=target.user, pkey=pkey, timeout=timeout, banner_timeout=timeout,
                       auth_timeout=timeout, allow_agent=pkey is None, look_for_keys=pkey is None)
    except paramiko.BadHostKeyException as e:
        client.close()
        name = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
        raise _changed(name, e.key, e.expected_key, known_hosts) from None
    except HostKeyError:
        client.close()
        raise
    except paramiko.AuthenticationException:
        client.close()
        who = f"the key {identity}" if identity else "the keys from ssh-agent and ~/.ssh"
        raise RemoteError(f"{target}: authentication failed with {who}",
                          f"Add the public key to ~{target.user}/.ssh/authorized_keys on the device, or pass the right --identity.") from None
    except (paramiko.SSHException, OSError) as e:
        client.close()
        raise RemoteError(f"{target}: cannot connect ({e or type(e).__name__})",
                          "Check the host and port, that sshd runs on the device and that the network lets you reach it.") from None
    key = client.get_transport().get_remote_server_key()
    return client, host_key_fingerprint(key), bool(added)


def _run(client: paramiko.SSHClient, command: str, timeout: float) -> tuple[int, str, str]:
    """Run a command on the device; returns (exit status, stdout, stderr)."""
    import paramiko

    try:
        _, out, err = client.exec_command(command, timeout=timeout)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        return out.channel.recv_exit_status(), stdout, stderr
    except (paramiko.SSHException, OSError, TimeoutError) as e:
        raise RemoteError(f"remote command failed: {command}: {e or type(e).__name__}", "Check the device's load and disk, then retry.") from None


def _remote_sha256(client: paramiko.SSHClient, path: str, timeout: float) -> str:
    q = shlex.quote(path)
    py = "import hashlib,sys;h=hashlib.sha256();f=open(sys.argv[1],'rb');[h.update(b) for b in iter(lambda:f.read(1<<20),b'')];print(h.hexdigest())"
    code, out, err = _run(client, f"sha256sum -- {q} 2>/dev/null || python3 -c {shlex.quote(py)} {q}", timeout)
    digest = out.split()[0] if out.split() else ""
    if code != 0 or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise RemoteError(f"cannot hash {path} on the device (exit {code}): {err.strip() or out.strip()}",
                          "The device needs sha256sum (coreutils) or python3.")
    return digest


def _as_archive(bundle: Path, scratch: Path) -> Path:
    """The ``.ekb`` to upload: the file itself, or a directory packed into ``scratch``."""
    if bundle.is_dir():
        m = open_bundle(bundle).manifest
        return pack(bundle, scratch / f"{m.name}-{m.profile}-{m.format}-{m.version}.ekb")
    return bundle


def _verify_local(bundle: Path) -> None:
    result = verify_bundle(bundle)
    if not result.ok:
        failed = ", ".join(f"{c}: {d}" for c, ok, d in result.checks if not ok)
        raise BundleError(f"{bundle}: verification failed before upload ({failed})", "Nothing was sent. Rebuild the bundle with 'edgekit convert'.")


def push_over_ssh(
    bundle: Path,
    target: SshTarget,
    *,
    identity: Path | None = None,
    known_hosts: Path | None = None,
    accept_new_host_key: bool = False,
    remote_dir: str = "edgekit",
    remote_edgekit: str = "edgekit",
    timeout: float = 15.0,
    command_timeout: float = 600.0,
    progress: Progress | None = None,
    trusted_keys: tuple[str, ...] | None = None,
) -> SshPushResult:
    """Verify ``bundle`` here, upload it to ``remote_dir/bundles/`` on ``target``, check its sha256 there
    and run :func:`remote_install_argv` on the device. Relative remote paths are under the login's home.

    ``trusted_keys``: publisher keys the device is told to trust for this install (default: this
    machine's signing key, :func:`pusher_publisher_keys`)."""
    known_hosts = known_hosts or default_known_hosts()
    remote_dir = remote_dir.rstrip("/") or "/"
    if remote_dir.startswith("~/"):
        remote_dir = remote_dir[2:]  # SFTP and the remote shell both start in the home directory
    _verify_local(bundle)
    scratch = Path(tempfile.mkdtemp(prefix="edgekit-push-"))
    try:
        archive = _as_archive(bundle, scratch)
        digest, size = sha256_file(archive), archive.stat().st_size
        client, fingerprint, added = _connect(target, identity, known_hosts, accept_new_host_key, timeout)
        try:
            bundles_dir = f"{remote_dir}/bundles"
            final = f"{bundles_dir}/{archive.name}"
            part = f"{bundles_dir}/.{archive.name}.part"
            code, _, err = _run(client, f"mkdir -p -- {shlex.quote(bundles_dir)}", timeout)
            if code != 0:
                raise RemoteError(f"{target}: cannot create {bundles_dir}: {err.strip()}", "Pick a writable --remote-dir.")
            import paramiko

            try:
                with client.open_sftp() as sftp:
                    sftp.put(str(archive), part, callback=progress, confirm=True)
                    remote_digest = _remote_sha256(client, part, command_timeout)
                    if remote_digest != digest:
                        sftp.remove(part)
                        raise RemoteError(f"{target}: sha256 on the device {remote_digest[:16]}… != local {digest[:16]}…; upload removed",
                                          "The transfer was damaged: retry, and check the device's storage.")
                    sftp.posix_rename(part, final)
            except (paramiko.SSHException, OSError) as e:
                raise RemoteError(f"{target}: upload to {part} failed ({e or type(e).__name__})",
                                  "Check free space and permissions under --remote-dir on the device.") from None
            keys = pusher_publisher_keys() if trusted_keys is None else trusted_keys
            argv = remote_install_argv(remote_edgekit, final, remote_dir, keys)
            command = shlex.join(argv)
            code, out, err = _run(client, command, command_timeout)
        finally:
            client.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    remote = _parse_remote_json(out)
    if code != 0:
        detail = [line.removeprefix("Error: ") for line in err.strip().splitlines() if not line.startswith("Hint: ")]
        hint = "Install edgekit on the device (pip install 'edgekit[agent]') or pass --remote-edgekit PATH."
        if isinstance(remote, dict) and remote.get("failure"):  # the agent refused the bundle: its previous model stays active
            hint = "The bundle is on the device but was not activated; the previous model stays active. See the reason above."
        raise RemoteError(f"{target}: '{command}' failed (exit {code}): {' / '.join(detail[-3:]) or 'no message'}", hint)
    return SshPushResult(str(target), fingerprint, added, str(bundle), final, digest, size, True, command, remote)


def _parse_remote_json(out: str) -> Any:
    try:
        return json.loads(out)
    except ValueError:
        return {"stdout": out.strip()}
