"""Every bad input: Error + Hint, non-zero exit, no traceback, nothing left in --out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from edgekit.profiles import find_profile


def _convert(run_cli, model, calib, out: Path, *extra: str, profile: str = "raspberry-pi-5"):
    return run_cli("convert", model, "--profile", profile, "--calibration", calib, "--out", out, "--latency-runs", "3", *extra)


def _assert_clean_failure(result, out: Path, code: int, *needles: str) -> None:
    rc, _, err = result
    assert rc == code, err
    lines = err.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("Error: "))
    assert any(line.startswith("Hint: ") for line in lines[i + 1 :]) and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists() or list(out.iterdir()) == []


def test_missing_model_path(run_cli, digits, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _assert_clean_failure(_convert(run_cli, tmp_path / "nope.keras", digits["calib"], out), out, 3, "no such file")


def test_file_that_is_not_a_model(run_cli, digits, tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    out = tmp_path / "out"
    _assert_clean_failure(_convert(run_cli, f, digits["calib"], out), out, 3, "not a model format")
    g = tmp_path / "fake.keras"
    g.write_text("not a zip")
    _assert_clean_failure(_convert(run_cli, g, digits["calib"], out), out, 3, "damaged or truncated")


def test_truncated_keras(run_cli, digits, tmp_path: Path) -> None:
    data = digits["model"].read_bytes()
    t = tmp_path / "cut.keras"
    t.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _assert_clean_failure(_convert(run_cli, t, digits["calib"], out), out, 3, "cut.keras")


def test_directory_that_is_not_a_saved_model(run_cli, digits, tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    out = tmp_path / "out"
    _assert_clean_failure(_convert(run_cli, d, digits["calib"], out), out, 3, "saved_model.pb")


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.zeros((10, 9, 9, 1), np.float32)}, "shape (10, 9, 9, 1)"),
        ({"x": np.zeros((10, 8, 8), np.float32)}, "shape (10, 8, 8)"),
        ({"x": np.zeros((10, 8, 8, 1), np.uint8)}, "dtype uint8"),
        ({"x": np.zeros((0, 8, 8, 1), np.float32)}, "'x' is empty"),
        ({"x": np.full((4, 8, 8, 1), np.nan, np.float32)}, "NaN or Inf in 4 of 4"),
        ({"x": np.array([[[[np.inf]] * 8] * 8] * 2, np.float32)}, "NaN or Inf"),
        ({"images": np.zeros((4, 8, 8, 1), np.float32)}, "no array named 'x'"),
    ],
)
def test_bad_calibration(run_cli, digits, tmp_path: Path, arrays: dict, needle: str) -> None:
    f = tmp_path / "calib.npz"
    np.savez(f, **arrays)
    out = tmp_path / "out"
    _assert_clean_failure(_convert(run_cli, digits["model"], f, out), out, 3, "--calibration", needle)


def test_calibration_not_an_npz(run_cli, digits, tmp_path: Path) -> None:
    f = tmp_path / "calib.npz"
    f.write_bytes(b"\x00" * 100)
    out = tmp_path / "out"
    _assert_clean_failure(_convert(run_cli, digits["model"], f, out), out, 3, "not a readable .npz")


def test_eval_labels_length_mismatch(run_cli, digits, tmp_path: Path) -> None:
    f = tmp_path / "eval.npz"
    np.savez(f, x=np.zeros((10, 8, 8, 1), np.float32), y=np.zeros(9, np.int64))
    out = tmp_path / "out"
    _assert_clean_failure(_convert(run_cli, digits["model"], digits["calib"], out, "--eval", f), out, 3, "y has 9 labels but the inputs have 10")


def test_eval_without_labels(run_cli, digits, tmp_path: Path) -> None:
    f = tmp_path / "eval.npz"
    np.savez(f, x=np.zeros((10, 8, 8, 1), np.float32))
    out = tmp_path / "out"
    _assert_clean_failure(_convert(run_cli, digits["model"], digits["calib"], out, "--eval", f), out, 3, "no array named 'y'")


def test_unknown_profile_lists_valid_ids(run_cli, digits, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _assert_clean_failure(_convert(run_cli, digits["model"], digits["calib"], out, profile="pixel-99"), out, 3,
                          "unknown hardware profile 'pixel-99'", "coral-edgetpu", "raspberry-pi-5")


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda d: d["cpu"].update(vector_width=512), "cpu.vector_width: unknown key"),
    (lambda d: d["memory"].update(ram_mb="lots"), "memory.ram_mb"),
])
def test_invalid_profile_yaml_names_file_and_field(run_cli, digits, tmp_path: Path, monkeypatch, mutate, needle) -> None:
    data = find_profile("raspberry-pi-5").model_dump(mode="json") | {"id": "broken-board"}
    mutate(data)
    d = tmp_path / "profiles"
    d.mkdir()
    (d / "broken.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("EDGEKIT_PROFILE_PATH", str(d))
    out = tmp_path / "out"
    _assert_clean_failure(_convert(run_cli, digits["model"], digits["calib"], out, profile="broken-board"), out, 3, "broken.yaml", needle)


def test_profile_without_tflite(run_cli, digits, tmp_path: Path, monkeypatch) -> None:
    data = find_profile("iphone-15-pro").model_dump(mode="json") | {"id": "coreml-only"}
    data["formats"] = {"coreml": data["formats"]["coreml"]}
    d = tmp_path / "profiles"
    d.mkdir()
    (d / "c.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("EDGEKIT_PROFILE_PATH", str(d))
    out = tmp_path / "out"
    _assert_clean_failure(_convert(run_cli, digits["model"], digits["calib"], out, "--format", "tflite", profile="coreml-only"), out, 4,
                          "does not take tflite")
    data["formats"] = {}
    (d / "c.yaml").write_text(yaml.safe_dump(data))
    _assert_clean_failure(_convert(run_cli, digits["model"], digits["calib"], out, profile="coreml-only"), out, 4, "supports none")


def test_model_over_the_memory_budget(run_cli, digits, tmp_path: Path, monkeypatch) -> None:
    data = find_profile("raspberry-pi-5").model_dump(mode="json") | {"id": "tiny-mcu"}
    data["memory"] = {"ram_mb": 1, "model_budget_mb": 0.001}
    d = tmp_path / "profiles"
    d.mkdir()
    (d / "m.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("EDGEKIT_PROFILE_PATH", str(d))
    out = tmp_path / "out"
    _assert_clean_failure(_convert(run_cli, digits["model"], digits["calib"], out, profile="tiny-mcu"), out, 4, "model budget")


def test_output_directory_that_cannot_be_written(run_cli, digits, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = _convert(run_cli, digits["model"], digits["calib"], blocker / "out")
    assert rc == 7 and "Error: cannot write to --out" in err and "Hint:" in err and "Traceback" not in err
    assert blocker.read_text() == "x"
