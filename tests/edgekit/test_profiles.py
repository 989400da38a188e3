"""Hardware profiles: shipped files, validation errors, user paths, detection, packaging."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from edgekit.errors import ProfileError
from edgekit.profiles import HardwareProfile, find_profile, list_profiles, load_profile_file

SHIPPED = ["coral-edgetpu", "iphone-15-pro", "jetson-orin-nano", "pixel-8", "raspberry-pi-5", "x86-64-avx512-server"]
ROOT = Path(__file__).resolve().parents[2]


def test_every_required_profile_ships_and_cites_its_op_lists() -> None:
    found = list_profiles()
    assert set(SHIPPED) <= set(found)
    for pid in SHIPPED:
        p = found[pid][0]
        assert p.formats.supported(), pid
        assert p.accelerators, pid
        for acc in p.accelerators:
            assert acc.supported_ops and acc.source.startswith("http"), (pid, acc.id)


def test_coral_takes_only_full_integer_uint8_tflite() -> None:
    p = find_profile("coral-edgetpu")
    assert p.formats.supported() == ("tflite",)
    assert p.formats.tflite.io_dtype == "uint8" and p.formats.tflite.full_integer
    tpu = p.accelerators_for("tflite")[0]
    assert tpu.partitioning == "prefix" and "float32" not in tpu.dtypes


def test_unknown_id_lists_the_valid_ids() -> None:
    with pytest.raises(ProfileError) as e:
        find_profile("pixel-9000")
    assert "pixel-9000" in e.value.message and "raspberry-pi-5" in e.value.hint


def _write(tmp_path: Path, data: dict, name: str = "custom.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _base() -> dict:
    return find_profile("raspberry-pi-5").model_dump(mode="json") | {"id": "my-board"}


def test_unknown_key_names_file_and_field(tmp_path: Path) -> None:
    data = _base()
    data["memory"]["ram_gb"] = 8
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as e:
        load_profile_file(path)
    assert str(path) in e.value.message and "memory.ram_gb: unknown key" in e.value.message


def test_wrong_type_names_file_and_field(tmp_path: Path) -> None:
    data = _base()
    data["cpu"]["cores"] = "four"
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as e:
        load_profile_file(path)
    assert str(path) in e.value.message and "cpu.cores" in e.value.message


def test_profile_is_frozen() -> None:
    p = find_profile("pixel-8")
    with pytest.raises(Exception):
        p.id = "other"  # type: ignore[misc]


def test_delegate_must_name_an_accelerator(tmp_path: Path) -> None:
    data = _base()
    data["formats"]["tflite"]["delegates"] = ["hexagon"]
    with pytest.raises(ProfileError, match="hexagon"):
        load_profile_file(_write(tmp_path, data))


def test_user_directory_adds_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, _base())
    over = find_profile("pixel-8").model_dump(mode="json") | {"name": "My Pixel"}
    _write(tmp_path, over, "pixel.yaml")
    monkeypatch.setenv("EDGEKIT_PROFILE_PATH", str(tmp_path))
    found = list_profiles()
    assert found["my-board"][1] == tmp_path / "custom.yaml"
    assert found["pixel-8"][0].name == "My Pixel"


def test_json_schema_is_published_and_strict(run_cli) -> None:
    code, out, _ = run_cli("profiles", "schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["additionalProperties"] is False
    assert {"id", "cpu", "memory", "formats"} <= set(schema["properties"])


def test_cli_list_show_validate(run_cli, tmp_path: Path) -> None:
    code, out, _ = run_cli("profiles", "list", "--json")
    assert code == 0 and {d["id"] for d in json.loads(out)} >= set(SHIPPED)
    code, out, _ = run_cli("profiles", "show", "coral-edgetpu", "--json")
    assert code == 0 and json.loads(out)["formats"]["tflite"]["io_dtype"] == "uint8"
    code, out, _ = run_cli("profiles", "validate", _write(tmp_path, _base()))
    assert code == 0 and "valid profile 'my-board'" in out
    bad = _base()
    bad["os"] = "beos"
    code, _, err = run_cli("profiles", "validate", _write(tmp_path, bad, "bad.yaml"))
    assert code == 3 and "bad.yaml" in err and "os" in err and "Hint:" in err


def test_detect_describes_this_machine(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "me.yaml"
    code, _, _ = run_cli("profile", "detect", "--out", out)
    assert code == 0
    p = load_profile_file(out)
    assert isinstance(p, HardwareProfile)
    import os
    import platform

    assert p.cpu.cores == os.cpu_count()
    flags = Path("/proc/cpuinfo").read_text().split()
    if platform.machine() == "x86_64":
        assert p.cpu.arch == "x86_64"
        assert ("avx512_vnni" in p.cpu.features) == ("avx512_vnni" in flags)
        assert ("avx2" in p.cpu.features) == ("avx2" in flags)
    assert p.memory.ram_mb > 0 and "tflite" in p.formats.supported()


def test_yaml_files_ship_in_the_wheel(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("edgekit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for pid in SHIPPED:
        assert f"hardware_profiles/{pid}.yaml" in names
    assert "edgekit/cli/__init__.py" in names and "converters/tflite.py" in names


def test_profiles_show_cites_the_source_of_every_rule() -> None:
    from click.testing import CliRunner

    from edgekit.cli import cli

    for pid in SHIPPED:
        res = CliRunner().invoke(cli, ["profiles", "show", pid, "--json"])
        assert res.exit_code == 0, res.output
        rules = json.loads(res.output)["rules"]
        accels = find_profile(pid).accelerators
        assert len([r for r in rules if "int16x8 kernels" in r["rule"]]) == len(accels)
        assert all(r["source"] for r in rules), pid
        text = CliRunner().invoke(cli, ["profiles", "show", pid]).output
        assert "# Rules and their sources:" in text and text.count("  <- ") == len(rules)


def test_int16x8_kernels_default_to_none_and_xnnpack_cites_the_host_check() -> None:
    for pid in SHIPPED:
        for acc in find_profile(pid).accelerators:
            assert not acc.int16x8_kernels, (pid, acc.id)
            if acc.id == "xnnpack":
                assert "ai-edge-litert 2.3.0" in acc.int16x8_source
