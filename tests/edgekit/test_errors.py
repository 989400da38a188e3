"""The CLI's one error path: Error/Hint on stderr, an exit code, a traceback only with --debug."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgekit.errors import EdgekitError, InputError, ProfileError


def test_tree_carries_hint_and_exit_code() -> None:
    e = ProfileError("bad")
    assert isinstance(e, InputError) and isinstance(e, EdgekitError)
    assert e.exit_code == 3 and e.hint


def test_error_without_traceback(run_cli) -> None:
    code, out, err = run_cli("profiles", "show", "no-such-device")
    assert code == 3
    assert err.startswith("Error: unknown hardware profile 'no-such-device'")
    assert "Hint: Valid ids:" in err and "Traceback" not in err


def test_debug_shows_the_traceback(run_cli) -> None:
    with pytest.raises(ProfileError):
        run_cli("--debug", "profiles", "show", "no-such-device")


def test_bad_flag_is_a_usage_error(run_cli) -> None:
    code, _, err = run_cli("convert", "--no-such-flag")
    assert code == 2 and "Error:" in err and "Hint:" in err


def test_console_script_is_fast_and_needs_no_tensorflow() -> None:
    code = "import sys, edgekit.cli; sys.argv=['edgekit','--help']\ntry:\n edgekit.cli.main()\nexcept SystemExit: pass\nprint('tensorflow' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip().endswith("False")
    assert "convert" in r.stdout
