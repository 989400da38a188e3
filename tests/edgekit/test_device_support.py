"""edgekit.device_support: supported interpreters and CPUs said plainly; runtimes a bundle needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from device_agents.enroll_token import ENV_VAR, resolve_enroll_token
from edgekit.device_support import check_device_platform, format_unavailable_reason
from edgekit.errors import InputError, RuntimeUnavailableError

ROOT = Path(__file__).resolve().parents[2]
PYENV = Path.home() / ".pyenv" / "versions"


@pytest.mark.parametrize(("machine", "version"), [("x86_64", (3, 10, 13)), ("aarch64", (3, 11, 2)), ("arm64", (3, 13, 0))])
def test_supported_platforms_pass(machine: str, version: tuple[int, int, int]) -> None:
    check_device_platform(machine, version)


def test_32_bit_arm_is_refused_with_what_to_do() -> None:
    with pytest.raises(RuntimeUnavailableError) as e:
        check_device_platform("armv7l", (3, 11, 2))
    assert "armv7l" in e.value.message and "32-bit Arm" in e.value.message and "64-bit" in e.value.hint


def test_an_old_interpreter_is_refused_by_version() -> None:
    with pytest.raises(RuntimeUnavailableError) as e:
        check_device_platform("x86_64", (3, 9, 18))
    assert "3.9.18" in e.value.message and "3.10" in e.value.message


def test_core_ml_needs_macos_and_installed_runtimes_are_found() -> None:
    assert "macOS" in (format_unavailable_reason("coreml", system="Linux") or "")
    assert format_unavailable_reason("tflite") is None and format_unavailable_reason("onnx") is None
    assert "no runtime" in (format_unavailable_reason("tensorrt") or "")


@pytest.mark.skipif(shutil.which("setarch") is None, reason="setarch (util-linux) is missing")
def test_the_agent_refuses_a_32_bit_personality_and_exits_non_zero(tmp_path: Path) -> None:
    """``setarch linux32`` makes the kernel report i686 to the process: the agent names it, exit 6, no traceback."""
    proc = subprocess.run(["setarch", "linux32", sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())",
                           "agent", "run", "--server", "http://127.0.0.1:9", "--data-dir", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 6, proc.stderr
    assert "Error: this CPU architecture (i686) is not supported" in proc.stderr and "Hint:" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not list(PYENV.glob("3.9.*/bin/python")), reason="no Python 3.9 under ~/.pyenv to try an install with")
def test_pip_refuses_to_install_on_python_3_9(tmp_path: Path) -> None:
    """requires-python stops the install on an interpreter the device code does not support."""
    wheel_dir = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheel_dir.glob("edgekit-*.whl")
    py39 = sorted(PYENV.glob("3.9.*/bin/python"))[-1]
    proc = subprocess.run([str(py39), "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "requires a different Python" in proc.stderr and ">=3.10" in proc.stderr, proc.stderr


def test_enroll_token_sources_in_order(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("ekenr_file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "enroll-token").write_text("ekenr_cred")
    env = {ENV_VAR: "ekenr_env", "CREDENTIALS_DIRECTORY": str(creds)}
    assert resolve_enroll_token("ekenr_argv", f, env) == "ekenr_argv"
    assert resolve_enroll_token(None, f, env) == "ekenr_file"
    assert resolve_enroll_token(None, None, env) == "ekenr_env"
    assert resolve_enroll_token(None, None, {"CREDENTIALS_DIRECTORY": str(creds)}) == "ekenr_cred"
    assert resolve_enroll_token(None, None, {}) is None
    with pytest.raises(InputError):
        resolve_enroll_token(None, tmp_path / "missing", {})
