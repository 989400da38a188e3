"""Uploads: the happy path, and every bad input leaves the registry and artifact dir unchanged."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from fleet_support import golden_with_wrong_outputs, upload


def snapshot(server) -> tuple:
    """What an upload may change: the registry as the API shows it and the files under artifacts/."""
    models = server.admin.get("/v1/models").json()
    files = sorted(str(p.relative_to(server.data_dir)) for p in (server.data_dir / "artifacts").rglob("*") if p.is_file())
    return models, files


def assert_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["hint"]
    if code:
        assert err["code"] == code, err
    return err


def test_upload_stores_version_and_artifacts_once(live_server, fleet_bundles):
    admin = live_server.admin
    pi = fleet_bundles.ekb["v1"]["raspberry-pi-5"]
    r = upload(admin, "digits", [pi])
    assert r.status_code == 201, r.text
    art = r.json()["artifacts"][0]
    assert art["size_bytes"] == pi.stat().st_size and art["format"] == "tflite" and art["file"] == "digits.tflite"
    assert art["manifest"]["version"] == "1.2.3"
    assert art["validation"]["golden"]["top1_agreement"] >= art["validation"]["golden"]["min_top1_agreement"]
    stored = live_server.data_dir / "artifacts" / art["sha256"][:2] / art["sha256"]
    assert stored.read_bytes() == pi.read_bytes()
    assert admin.get("/v1/models/digits/versions/1.2.3").json()["artifacts"] == r.json()["artifacts"]
    # the same bytes under another version: refused (version truth: the registry version is the manifest's)
    err = assert_error(upload(admin, "digits", [pi], version="1.2.3-again"), 400, "version_mismatch")
    assert "1.2.3-again" in err["message"] and "1.2.3" in err["message"]
    assert len([p for p in (live_server.data_dir / "artifacts").rglob("*") if p.is_file()]) == 1
    assert admin.get("/v1/models").json() == [{"name": "digits", "versions": ["1.2.3"], "latest": "1.2.3"}]
    assert_error(admin.get("/v1/models/digits/versions/9.9.9"), 404, "not_found")
    assert_error(admin.get("/v1/models/nope/versions/1.2.3"), 404, "not_found")


def test_duplicate_version_is_409_and_changes_nothing(live_server, fleet_bundles):
    admin = live_server.admin
    assert upload(admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"]]).status_code == 201
    before = snapshot(live_server)
    # same version from the manifests, and the same version named explicitly with other bytes
    assert_error(upload(admin, "digits", [fleet_bundles.ekb["v1"]["coral-edgetpu"]]), 409, "conflict")
    assert_error(upload(admin, "digits", [fleet_bundles.ekb["v2"]["coral-edgetpu"]], version="1.2.3"), 409, "conflict")
    assert snapshot(live_server) == before
    assert len(admin.get("/v1/models/digits/versions/1.2.3").json()["artifacts"]) == 1


def _tar_with(tmp_path: Path, name: str, members: list[tuple[str, bytes | None, str]]) -> Path:
    """A .ekb whose entries are (name, data, kind) with kind 'file' or 'symlink'."""
    out = tmp_path / name
    with tarfile.open(out, "w:gz") as tar:
        for member, data, kind in members:
            info = tarfile.TarInfo(member)
            if kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = data.decode()
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out


def _bad_bundles(fleet_bundles, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = fleet_bundles.ekb["v1"]["raspberry-pi-5"]
    garbage = tmp_path / "garbage.ekb"
    garbage.write_bytes(b"\x00not a tar at all" * 500)
    truncated = tmp_path / "truncated.ekb"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    d = fleet_bundles.dirs["v1"]["raspberry-pi-5"]
    return {
        "garbage": (garbage, "bad_bundle"),
        "truncated": (truncated, "bad_bundle"),
        "unknown manifest field": (fleet_bundles.make("unknown-field", manifest=lambda m: m.update(surprise=True)), "bad_bundle"),
        "wrong model sha256": (fleet_bundles.make("wrong-sha", manifest=lambda m: m.update(sha256="0" * 64)), "bad_bundle"),
        "changed model byte": (fleet_bundles.make("changed-byte", rehash=False, files=lambda p: _flip_last_byte(p / "digits.tflite")), "bad_bundle"),
        "model does not load": (fleet_bundles.make("no-load", files=lambda p: (p / "digits.tflite").write_bytes(b"TFL3 nonsense" * 64)),
                                "model_load_failed"),
        "golden does not reproduce": (fleet_bundles.make("bad-golden", files=golden_with_wrong_outputs), "golden_mismatch"),
        "another model's bundle": (fleet_bundles.make("other-name", manifest=lambda m: m.update(name="other")), "bad_bundle"),
        "unknown profile": (fleet_bundles.make("unknown-profile", manifest=lambda m: m.update(profile="toaster-9000")), "unknown_profile"),
        "dot-dot path": (_tar_with(tmp_path, "dotdot.ekb", [("b/manifest.json", (d / "manifest.json").read_bytes(), "file"),
                                                             ("b/../../evil.txt", b"owned", "file")]), "bad_bundle"),
        "absolute path": (_tar_with(tmp_path, "abs.ekb", [("/tmp/edgekit-evil.txt", b"owned", "file")]), "bad_bundle"),
        "symlink": (_tar_with(tmp_path, "link.ekb", [("b/manifest.json", b"", "symlink")]), "bad_bundle"),
        "empty archive": (_tar_with(tmp_path, "empty.ekb", []), "bad_bundle"),
    }


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_bad_bundle_is_400_and_changes_nothing(live_server, fleet_bundles, tmp_path):
    admin = live_server.admin
    assert upload(admin, "digits", [fleet_bundles.ekb["v1"]["coral-edgetpu"]]).status_code == 201
    before = snapshot(live_server)
    for label, (path, code) in _bad_bundles(fleet_bundles, tmp_path).items():
        # alone, and next to a good bundle of another profile: the good one must not be stored either
        err = assert_error(upload(admin, "digits", [path], version="2.0.0"), 400, code)
        assert "Traceback" not in err["message"], label
        mixed = upload(admin, "digits", [fleet_bundles.ekb["v2"]["coral-edgetpu"], path], version="2.0.1")
        assert_error(mixed, 400, code)
        assert snapshot(live_server) == before, label
    assert not Path("/tmp/edgekit-evil.txt").exists()
    assert not list((live_server.data_dir / "staging").glob("*")), "staging directories left behind"


def test_two_bundles_for_one_profile_is_400(live_server, fleet_bundles):
    before = snapshot(live_server)
    pi = fleet_bundles.ekb["v1"]["raspberry-pi-5"]
    assert_error(upload(live_server.admin, "digits", [pi, pi]), 400, "bad_bundle")
    assert snapshot(live_server) == before


@pytest.mark.parametrize("name", ["UPPER", "-dash", "a" * 65, "sp ace"])
def test_invalid_model_name_is_422(live_server, fleet_bundles, name):
    r = upload(live_server.admin, name, [fleet_bundles.ekb["v1"]["raspberry-pi-5"]])
    assert r.status_code in (404, 422), r.text  # a name with a space may not even route
    assert r.json()["error"]["code"] in ("invalid_request", "not_found")


def test_upload_that_is_not_multipart_or_empty_is_422(live_server):
    admin = live_server.admin
    before = snapshot(live_server)
    assert_error(admin.post("/v1/models/digits/versions", content=b"{}", headers={"content-type": "application/json"}), 422, "invalid_request")
    assert_error(admin.post("/v1/models/digits/versions", data={"version": "1.0.0"}, files={"other": ("x", b"y")}), 422, "invalid_request")
    assert_error(admin.post("/v1/models/digits/versions", files={"version": (None, "1.0.0")}), 422, "invalid_request")
    broken = b"--XX\r\nContent-Disposition: form-data; name=\"bundles\"; filename=\"a.ekb\"\r\n\r\nabc"  # never terminated
    r = admin.post("/v1/models/digits/versions", content=broken, headers={"content-type": "multipart/form-data; boundary=XX"})
    assert r.status_code in (400, 422), r.text
    assert snapshot(live_server) == before


def test_upload_over_the_limit_is_413(start_fleet_server, fleet_bundles):
    server = start_fleet_server(max_upload_mb=0.05)  # 52 KB
    admin = server.admin
    before = snapshot(server)
    big = b"\x1f\x8b" + b"x" * 200_000
    r = admin.post("/v1/models/digits/versions", files={"bundles": ("big.ekb", big)})
    assert_error(r, 413, "too_large")

    def chunked():  # no Content-Length: the limit is enforced while streaming
        body = b"--BB\r\nContent-Disposition: form-data; name=\"bundles\"; filename=\"big.ekb\"\r\n\r\n"
        yield body
        for _ in range(20):
            yield b"y" * 10_000
        yield b"\r\n--BB--\r\n"

    r = admin.post("/v1/models/digits/versions", content=chunked(), headers={"content-type": "multipart/form-data; boundary=BB"})
    assert_error(r, 413, "too_large")
    assert snapshot(server) == before
    # a real bundle under the limit still goes in
    small = fleet_bundles.ekb["v1"]["raspberry-pi-5"]
    assert small.stat().st_size < 0.05 * 1024 * 1024
    assert upload(admin, "digits", [small]).status_code == 201


def test_version_is_the_manifests_and_a_differing_form_version_is_refused(live_server, fleet_bundles):
    admin = live_server.admin
    r = upload(admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"], fleet_bundles.ekb["v2"]["coral-edgetpu"]])
    assert_error(r, 400, "bad_bundle")
    r = upload(admin, "digits", [fleet_bundles.ekb["v1"]["raspberry-pi-5"], fleet_bundles.ekb["v2"]["coral-edgetpu"]], version="mixed.1")
    err = assert_error(r, 400, "version_mismatch")
    assert "says 1.2.3" in err["message"] and "says 1.3.0" in err["message"]
    r = upload(admin, "digits", [fleet_bundles.ekb["v2"]["raspberry-pi-5"], fleet_bundles.ekb["v2"]["coral-edgetpu"]], version="1.3.0")
    assert r.status_code == 201, r.text
    assert json.loads(json.dumps(r.json()))["version"] == "1.3.0"
    assert admin.get("/v1/models").json() == [{"name": "digits", "versions": ["1.3.0"], "latest": "1.3.0"}]


def test_every_format_is_validated_with_its_runtime(live_server, fleet_format_bundles):
    """.ort runs in ONNX Runtime, .mlpackage is read structurally (Core ML cannot run here); devices get their profile's format."""
    from edgekit.profiles import find_profile
    from fleet_support import SimDevice

    admin = live_server.admin
    r = upload(admin, "digits", list(fleet_format_bundles.values()))
    assert r.status_code == 201, r.text
    arts = {(a["profile"], a["format"]): a for a in r.json()["artifacts"]}
    assert set(arts) == set(fleet_format_bundles)
    onnx = arts[("pixel-8", "onnx")]["validation"]
    assert onnx["loads"] is True and onnx["runtime"] == "onnxruntime" and onnx["golden"]["passed"]
    assert arts[("pixel-8", "tflite")]["validation"]["runtime"] == "litert"
    coreml = arts[("iphone-15-pro", "coreml")]["validation"]
    assert coreml["loads"] is None and coreml["golden"]["measurable"] is False
    assert coreml["structure"].startswith(("structure checked", "structure not checked"))
    devices = [SimDevice(live_server, f"{profile}-1", profile=profile).enroll() for profile in ("pixel-8", "iphone-15-pro")]
    ro = admin.post("/v1/rollouts", json={"model": "digits", "version": "2.0.0", "waves": [100]})
    assert ro.status_code == 201, ro.text
    assert ro.json()["skipped"]["count"] == 0
    for d in devices:
        wanted = next(f for f in find_profile(d.profile).formats.supported() if (d.profile, f) in arts)
        p = d.poll()
        assert (p["artifact"]["profile"], p["artifact"]["format"]) == (d.profile, wanted)
        assert p["artifact"]["sha256"] == arts[(d.profile, wanted)]["sha256"]
