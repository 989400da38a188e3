"""``edgekit push --ssh`` against a real OpenSSH sshd on 127.0.0.1 (tests/ssh_support.py).

The "device" is this machine: the remote directory is a temp dir, and the device's edgekit is
this checkout's (``edgekit agent install`` runs there), so what the remote side did can be
checked on disk.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.bundle import pack, sha256_file
from edgekit.errors import UsageError
from edgekit.ssh_push import SshTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ssh_support import SshServer, keygen, sshd  # noqa: E402,F401  (sshd is a fixture)

REMOTE_EDGEKIT = str(Path(sys.executable).with_name("edgekit"))


@pytest.fixture()
def pi5_bundle(digits_bundles, tmp_path: Path) -> Path:
    """A private copy of the raspberry-pi-5 bundle directory."""
    src = next(r for r in digits_bundles.results if r.profile == "raspberry-pi-5").bundle_dir
    return Path(shutil.copytree(src, tmp_path / "bundle" / src.name))


def _push(run_cli, server: SshServer, bundle: Path, tmp_path: Path, *extra: str, identity: Path | None = None):
    return run_cli("push", bundle, "--ssh", server.target, "--identity", identity or server.client_key,
                   "--known-hosts", tmp_path / "known_hosts", "--remote-dir", tmp_path / "device",
                   "--remote-edgekit", REMOTE_EDGEKIT, *extra)


def test_push_places_and_checks_the_bundle_on_the_device(run_cli, sshd: SshServer, pi5_bundle: Path, tmp_path: Path) -> None:
    code, out, err = _push(run_cli, sshd, pi5_bundle, tmp_path, "--accept-new-host-key", "--json")
    assert code == 0, err
    result = json.loads(out)
    remote = Path(result["remote_bundle"])
    assert remote.parent == tmp_path / "device" / "bundles" and remote.suffix == ".ekb"
    assert sha256_file(remote) == result["sha256"] and remote.stat().st_size == result["size_bytes"]
    assert result["sha256_verified_remotely"] is True
    assert not list(remote.parent.glob(".*.part"))  # the partial upload was renamed into place
    assert result["host_key"] == sshd.host_fingerprint and result["host_key_added"] is True
    # The device's agent verified, profiled and activated it in REMOTE_DIR/agent.
    agent = result["remote"]
    assert result["remote_command"].split()[1:3] == ["agent", "install"]
    assert agent["ok"] is True and (agent["name"], agent["version"]) == ("digits", "1.2.3")
    assert agent["active"]["sha256"] == result["sha256"] and "activated" in agent["phases"]
    assert agent["profile"]["p95_ms"] > 0 and agent["profile"]["golden_top1_agreement"] >= 0.99
    assert (tmp_path / "device" / "agent").is_dir()
    assert "100%" in err  # plain progress lines off a terminal


def test_unknown_host_key_is_refused_without_the_flag(run_cli, sshd: SshServer, pi5_bundle: Path, tmp_path: Path) -> None:
    code, out, err = _push(run_cli, sshd, pi5_bundle, tmp_path)
    assert code == 8, err
    assert "Error:" in err and sshd.host_fingerprint in err and "--accept-new-host-key" in err
    assert not (tmp_path / "known_hosts").exists()  # nothing was trusted
    assert not (tmp_path / "device").exists()  # nothing was sent


def test_accepted_host_key_is_saved_and_reused(run_cli, sshd: SshServer, pi5_bundle: Path, tmp_path: Path) -> None:
    code, _, err = _push(run_cli, sshd, pi5_bundle, tmp_path, "--accept-new-host-key")
    assert code == 0, err
    known = (tmp_path / "known_hosts").read_text()
    assert known.startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")
    assert (sshd.host_key.with_suffix(".pub").read_text().split()[1]) in known
    # Known now: no flag needed, and the file is not touched again. An .ekb goes as it is.
    archive = pack(pi5_bundle, tmp_path / "digits.ekb")
    code, out, err = _push(run_cli, sshd, archive, tmp_path, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["host_key_added"] is False and result["sha256"] == sha256_file(archive)
    assert (tmp_path / "known_hosts").read_text() == known
    assert "pushed" not in out  # --json prints JSON only


def test_changed_host_key_is_always_refused(run_cli, sshd: SshServer, pi5_bundle: Path, tmp_path: Path) -> None:
    code, _, err = _push(run_cli, sshd, pi5_bundle, tmp_path, "--accept-new-host-key")
    assert code == 0, err
    old = sshd.host_fingerprint
    sshd.restart(new_host_key=True)
    new = sshd.host_fingerprint
    assert new != old
    before = (tmp_path / "known_hosts").read_text()
    code, out, err = _push(run_cli, sshd, pi5_bundle, tmp_path, "--accept-new-host-key")
    assert code == 8
    assert "HOST KEY CHANGED" in err and old in err and new in err and "ssh-keygen -R" in err
    assert (tmp_path / "known_hosts").read_text() == before


def test_wrong_identity_is_a_clear_error(run_cli, sshd: SshServer, pi5_bundle: Path, tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger_ed25519")
    code, _, err = _push(run_cli, sshd, pi5_bundle, tmp_path, "--accept-new-host-key", identity=stranger)
    assert code == 8
    assert "authentication failed" in err and str(stranger) in err and "authorized_keys" in err
    code, _, err = _push(run_cli, sshd, pi5_bundle, tmp_path, identity=tmp_path / "no-such-key")
    assert code == 3 and "no such key file" in err
    (tmp_path / "garbage").write_text("not a key\n")
    code, _, err = _push(run_cli, sshd, pi5_bundle, tmp_path, identity=tmp_path / "garbage")
    assert code == 3 and "not a private key" in err


def test_corrupted_bundle_is_refused_before_upload(run_cli, sshd: SshServer, pi5_bundle: Path, tmp_path: Path) -> None:
    model = next(p for p in pi5_bundle.iterdir() if p.suffix == ".tflite")
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    code, _, err = _push(run_cli, sshd, pi5_bundle, tmp_path, "--accept-new-host-key")
    assert code == 3
    assert "verification failed before upload" in err and model.name in err
    assert not (tmp_path / "known_hosts").exists() and not (tmp_path / "device").exists()
    assert "Accepted publickey" not in sshd.log  # it never even logged in


def test_remote_command_failure_is_reported(run_cli, sshd: SshServer, pi5_bundle: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("push", pi5_bundle, "--ssh", sshd.target, "--identity", sshd.client_key, "--known-hosts", tmp_path / "kh",
                           "--accept-new-host-key", "--remote-dir", tmp_path / "device", "--remote-edgekit", "/nonexistent/edgekit")
    assert code == 8
    assert "failed (exit 127)" in err and "--remote-edgekit" in err
    assert list((tmp_path / "device" / "bundles").glob("*.ekb"))  # the bundle was placed; only the last step failed


def test_ssh_and_fleet_flags_do_not_mix(run_cli, pi5_bundle: Path) -> None:
    code, _, err = run_cli("push", pi5_bundle, "--ssh", "root@127.0.0.1", "--rollout")
    assert code == 2 and "--start-rollout" not in err and "--rollout" in err
    code, _, err = run_cli("push", pi5_bundle, pi5_bundle, "--ssh", "root@127.0.0.1")
    assert code == 2 and "exactly one bundle" in err
    code, _, err = run_cli("push", pi5_bundle, "--server", "http://127.0.0.1:1", "--token", "t", "--accept-new-host-key")
    assert code == 2 and "only apply with --ssh" in err


@pytest.mark.parametrize(("text", "expected"), [
    ("pi@10.0.0.2", SshTarget("pi", "10.0.0.2", 22)),
    ("root@127.0.0.1:2222", SshTarget("root", "127.0.0.1", 2222)),
    ("admin@[::1]:2200", SshTarget("admin", "::1", 2200)),
    ("dev@host.local", SshTarget("dev", "host.local", 22)),
])
def test_target_parsing(text: str, expected: SshTarget) -> None:
    assert SshTarget.parse(text) == expected


@pytest.mark.parametrize("text", ["pi@", "pi@host:99999", "a@b@c", "pi@host:port", ""])
def test_bad_targets_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        SshTarget.parse(text)


def test_device_refusal_keeps_the_previous_model(run_cli, sshd: SshServer, pi5_bundle: Path, tmp_path: Path) -> None:
    """A bundle that is intact but whose golden set the device cannot reproduce: the agent refuses it."""
    import numpy as np
    from fleet_support import rebundle

    def scramble(d: Path) -> None:
        with np.load(d / "golden.npz") as g:
            data = {k: g[k] for k in g.files}
        data["y_host"] = np.roll(data["y_host"], 1, axis=-1)  # a different top-1 class for every input
        np.savez(d / "golden.npz", **data)

    bad = rebundle(pi5_bundle, tmp_path / "bad" / pi5_bundle.name, version="9.9.9", files=scramble)
    code, _, err = _push(run_cli, sshd, pi5_bundle, tmp_path, "--accept-new-host-key")
    assert code == 0, err
    code, out, err = _push(run_cli, sshd, bad, tmp_path)
    assert code == 8
    assert "golden_mismatch" in err and "previous model stays active" in err
    status = subprocess.run([REMOTE_EDGEKIT, "agent", "status", "--data-dir", str(tmp_path / "device" / "agent"), "--json"],
                            capture_output=True, text=True, check=True)
    assert json.loads(status.stdout)["active"]["version"] == "1.2.3"


def test_a_bundle_from_another_publisher_is_refused_on_the_device(run_cli, sshd: SshServer, pi5_bundle: Path, tmp_path: Path) -> None:
    """The red-team bundle over SSH: one model byte flipped, the hash updated, re-signed with a fresh key.
    It verifies here (its signature is valid) and is refused by the device: not the pusher's publisher key."""
    from fleet_support import rebundle

    from edgekit import signing

    def flip(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        raw = bytearray((d / m["file"]).read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (d / m["file"]).write_bytes(bytes(raw))

    attacker = tmp_path / "attacker.pem"
    signing.load_or_create_key(attacker, passphrase=None)
    bad = rebundle(pi5_bundle, tmp_path / "bad" / pi5_bundle.name, version="6.6.6", files=flip, key_path=attacker)
    code, _, err = _push(run_cli, sshd, pi5_bundle, tmp_path, "--accept-new-host-key")
    assert code == 0, err
    code, out, err = _push(run_cli, sshd, bad, tmp_path)
    assert code == 8 and "untrusted_publisher" in err and "Hint:" in err, err
    status = subprocess.run([REMOTE_EDGEKIT, "agent", "status", "--data-dir", str(tmp_path / "device" / "agent"), "--json"],
                            capture_output=True, text=True, check=True)
    assert json.loads(status.stdout)["active"]["version"] == "1.2.3"
