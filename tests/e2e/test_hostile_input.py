"""A hostile-input corpus, built here from the real digits bundle, run against every place a bundle enters:
``edgekit bundle verify``, ``edgekit agent install``, ``edgekit push`` and the fleet server's upload
(SQLite and PostgreSQL). Every case must be refused with ``Error:``/``Hint:`` and a non-zero exit (no
traceback), leave the agent's state and active model as they were with no temporary slot, and leave
nothing stored on the server; the server answers 4xx, never 5xx.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit import signing
from fleet_support import LiveServer, pack_raw, upload

Case = Callable[[Path, Path], Path]  # (a copy of the good bundle dir, a work dir) -> the hostile bundle (dir or .ekb)


def _sign(d: Path, key: Ed25519PrivateKey | None = None) -> None:
    key = key or signing.load_or_create_key()
    data = (d / "manifest.json").read_bytes()
    pub = signing.public_key_b64(key)
    (d / "signature.json").write_text(json.dumps({"algorithm": "ed25519", "public_key": pub, "key_id": signing.fingerprint(pub),
                                                  "signature": signing.sign(key, data)}))


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _flip(d: Path) -> Path:
    model = d / _manifest(d)["file"]
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    model.write_bytes(bytes(raw))
    return model


def tampered(d: Path, work: Path) -> Path:
    """One model byte flipped, nothing else changed: the hash no longer matches."""
    _flip(d)
    return d


def tampered_resigned(d: Path, work: Path) -> Path:
    """One model byte flipped, the manifest hash updated, re-signed with a fresh key (the red-team case)."""
    model = _flip(d)
    m = _manifest(d)
    m["sha256"] = hashlib.sha256(model.read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    _sign(d, Ed25519PrivateKey.generate())
    return pack_raw(d, work / "resigned.ekb")


def _with_members(d: Path, work: Path, name: str, extra: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    out = work / f"{name}.ekb"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(d, arcname=d.name)
        for info, payload in extra:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out


def bomb(d: Path, work: Path) -> Path:
    """An unlisted 3 GiB member (header only: a reader that trusts it writes until the disk is full)."""
    info = tarfile.TarInfo(f"{d.name}/payload.bin")
    info.size = 3 << 30
    return _with_members(d, work, "bomb", [(info, None)])


def compressed_bomb(d: Path, work: Path) -> Path:
    """A real 64 MiB of zeros as the model's file (about 64 KB packed): more than the manifest's size."""
    m = _manifest(d)
    (d / m["file"]).unlink()
    with open(d / m["file"], "wb") as f:
        f.truncate(64 << 20)
    return pack_raw(d, work / "zeros.ekb")


def _link(kind: int, target: str) -> Case:
    def case(d: Path, work: Path) -> Path:
        info = tarfile.TarInfo(f"{d.name}/{_manifest(d)['golden']['file']}")
        info.type, info.linkname = kind, target
        (d / _manifest(d)["golden"]["file"]).unlink()  # the link stands where a listed file should be
        return _with_members(d, work, f"link{kind!r}", [(info, None)])
    case.__doc__ = f"a listed member that is a {'symbolic' if kind == tarfile.SYMTYPE else 'hard'} link to {target}"
    return case


def device_member(d: Path, work: Path) -> Path:
    info = tarfile.TarInfo(f"{d.name}/dev")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 5
    return _with_members(d, work, "device", [(info, None)])


def escaping_path(d: Path, work: Path) -> Path:
    info = tarfile.TarInfo("../../escaped.txt")
    info.size = 5
    return _with_members(d, work, "escape", [(info, b"owned")])


def many_members(d: Path, work: Path) -> Path:
    """304 members, like the red team's archive."""
    extra = []
    for i in range(300):
        info = tarfile.TarInfo(f"{d.name}/f{i:03d}")
        info.size = 1
        extra.append((info, b"x"))
    return _with_members(d, work, "many", extra)


def duplicate_member(d: Path, work: Path) -> Path:
    info = tarfile.TarInfo(f"{d.name}/manifest.json")
    info.size = 2
    return _with_members(d, work, "dup", [(info, b"{}")])


def empty_archive(d: Path, work: Path) -> Path:
    """The red team's 56-byte empty .ekb."""
    out = work / "empty.ekb"
    with tarfile.open(out, "w:gz"):
        pass
    return out


def zero_bytes(d: Path, work: Path) -> Path:
    out = work / "zero.ekb"
    out.write_bytes(b"")
    return out


def garbage(d: Path, work: Path) -> Path:
    out = work / "garbage.ekb"
    out.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(200))
    return out


def truncated(d: Path, work: Path) -> Path:
    full = pack_raw(d, work / "full.ekb").read_bytes()
    out = work / "truncated.ekb"
    out.write_bytes(full[: len(full) // 2])
    return out


def nested_manifest(d: Path, work: Path) -> Path:
    """A manifest nested 100,000 levels deep (Python's json recursion limit), signed."""
    (d / "manifest.json").write_text('{"name": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _sign(d)
    return pack_raw(d, work / "nested.ekb")


def oversized_manifest(d: Path, work: Path) -> Path:
    """A 5 MiB manifest (past the 4 MiB bound)."""
    m = _manifest(d)
    m["labels"] = ["x" * 1000] * 5200
    (d / "manifest.json").write_text(json.dumps(m))
    _sign(d)
    return pack_raw(d, work / "big-manifest.ekb")


def huge_number_manifest(d: Path, work: Path) -> Path:
    """A size written with 5,000 digits (past Python's int-string limit)."""
    text = (d / "manifest.json").read_text()
    m = _manifest(d)
    (d / "manifest.json").write_text(text.replace(f'"size_bytes": {m["size_bytes"]}', '"size_bytes": ' + "9" * 5000))
    _sign(d)
    return pack_raw(d, work / "bignum.ekb")


def model_symlink_to_dev_zero(d: Path, work: Path) -> Path:
    """A bundle directory whose model file is a symlink to /dev/zero."""
    model = d / _manifest(d)["file"]
    model.unlink()
    os.symlink("/dev/zero", model)
    return d


def model_symlink_outside(d: Path, work: Path) -> Path:
    """A bundle directory whose model file is a symlink to an intact copy outside the bundle."""
    model = d / _manifest(d)["file"]
    outside = work / "outside.tflite"
    shutil.copy2(model, outside)
    model.unlink()
    os.symlink(outside, model)
    return d


def unsigned(d: Path, work: Path) -> Path:
    (d / "signature.json").unlink()
    return d


CASES: dict[str, Case] = {f.__name__: f for f in (
    tampered, tampered_resigned, bomb, compressed_bomb, device_member, escaping_path, many_members, duplicate_member,
    empty_archive, zero_bytes, garbage, truncated, nested_manifest, oversized_manifest, huge_number_manifest,
    model_symlink_to_dev_zero, model_symlink_outside, unsigned)}
CASES["symlink_member"] = _link(tarfile.SYMTYPE, "/etc/passwd")
CASES["hardlink_member"] = _link(tarfile.LNKTYPE, "manifest.json")


@pytest.fixture(scope="module")
def good_bundle(digits_bundles) -> Path:
    return next(r for r in digits_bundles.results if r.profile == "raspberry-pi-5").bundle_dir


@pytest.fixture(scope="module")
def corpus(good_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    out = {}
    for name, make in CASES.items():
        work = root / name
        work.mkdir()
        d = work / good_bundle.name
        shutil.copytree(good_bundle, d)
        out[name] = make(d, work)
    return out


def _clean_refusal(code: int, err: str) -> None:
    assert code != 0, err
    assert "Error:" in err and "Hint:" in err and "Traceback" not in err, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bundle_verify_refuses(corpus: dict[str, Path], case: str, run_cli, tmp_path: Path) -> None:
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("edgekit-bundle-*"))
    code, out, err = run_cli("bundle", "verify", corpus[case], "--trusted-key", signing.public_key_b64(signing.load_or_create_key()))
    _clean_refusal(code, err)
    assert not (corpus[case].parent.parent / "escaped.txt").exists()
    for leftover in set(Path(os.environ.get("TMPDIR", "/tmp")).glob("edgekit-bundle-*")) - before:
        # a well-formed archive is unpacked (removed at exit) before its signer is judged; a bomb never gets that far
        written = sum(p.stat().st_size for p in leftover.rglob("*") if p.is_file())
        assert written < 1 << 20, f"{leftover}: {written} bytes unpacked"


@pytest.fixture(scope="module")
def installed(good_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An agent data dir with the good bundle active (copied per test)."""
    from device_agents.install import install_local
    from device_agents.profiler import ProfileSettings
    from device_agents.settings import AgentSettings

    data = tmp_path_factory.mktemp("agent") / "data"
    settings = AgentSettings.from_env(profile="raspberry-pi-5", profiling=ProfileSettings(runs=5, budget_s=0.2, warmup=1))
    assert install_local(data, good_bundle, settings)["ok"]
    return data


def _agent_snapshot(data: Path) -> tuple:
    state = json.loads((data / "state.json").read_text())
    active = json.loads((data / "active.json").read_text())
    slots = sorted(p.name for p in (data / "models").iterdir())
    return state["state"], state["last_serial"], active["sha256"], slots


@pytest.mark.parametrize("case", sorted(CASES))
def test_agent_install_refuses_and_keeps_its_state(corpus: dict[str, Path], installed: Path, case: str, run_cli, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(installed, data, symlinks=True)
    before = _agent_snapshot(data)
    code, out, err = run_cli("agent", "install", corpus[case], "--data-dir", data, "--profile-runs", "5", "--profile-budget-s", "0.2")
    _clean_refusal(code, err)
    after = _agent_snapshot(data)
    assert after == before, (before, after)  # state idle as before, same active model, no temporary slot left
    assert not (tmp_path.parent / "escaped.txt").exists()
    code, out, err = run_cli("agent", "status", "--data-dir", data, "--json")
    assert code == 0 and json.loads(out)["state"] == "idle"


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """One fleet server per database for this module."""
    servers: dict[str, LiveServer] = {}

    def get(db: str) -> LiveServer:
        if db not in servers:
            root = tmp_path_factory.mktemp(f"server-{db}")
            url = f"sqlite:///{root / 'fleet.db'}" if db == "sqlite" else request.getfixturevalue("pg_cluster").new_database()
            servers[db] = LiveServer(data_dir=root / "data", db_url=url).start()
        return servers[db]

    yield get
    for s in servers.values():
        s.stop()


def _nothing_stored(server: LiveServer) -> None:
    assert server.admin.get("/v1/models").json() == []
    artifacts = server.data_dir / "artifacts"
    assert not artifacts.exists() or not [p for p in artifacts.rglob("*") if p.is_file() and not p.name.startswith(".")]
    staging = server.data_dir / "staging"
    assert not staging.exists() or not any(p.is_file() for p in staging.rglob("*"))


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_server_upload_refuses_every_archive(corpus: dict[str, Path], hostile_server, db: str) -> None:
    server = hostile_server(db)
    for case, path in sorted(corpus.items()):
        if path.is_dir():
            continue  # the server takes archives; a directory's links never reach it (push verifies and packs first)
        r = upload(server.admin, "digits", [path])
        assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
        body = r.json()["error"]
        assert body["code"] and body["message"] and body["hint"], (case, body)
        _nothing_stored(server)
    assert server.admin.get("/readyz").status_code == 200


@pytest.mark.parametrize("case", sorted(CASES))
def test_push_refuses_before_or_at_the_server(corpus: dict[str, Path], hostile_server, case: str, run_cli) -> None:
    server = hostile_server("sqlite")
    code, out, err = run_cli("push", corpus[case], "--server", server.url, "--token", server.admin_token)
    _clean_refusal(code, err)
    _nothing_stored(server)
