"""The CLI prints report text as written: rich markup never eats a bracketed word ('[uint8]', a file or device named with brackets)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgekit.cli.output import add_row


def _flat(text: str) -> str:
    return "".join(text.split())  # the console wraps long lines at 120 columns


def test_table_rows_print_brackets_as_given() -> None:
    console = Console(record=True, width=200)
    t = Table("op", "device")
    add_row(t, "DequantizeLinear [uint8] x48", "[red]kitchen[/red]")
    console.print(t)
    out = console.export_text()
    assert "DequantizeLinear [uint8] x48" in out and "[red]kitchen[/red]" in out


def test_convert_prints_every_warning_and_line_of_its_report_as_written(digits, tmp_path: Path, run_cli) -> None:
    ev = tmp_path / "eval[uint8].npz"  # a file name that reads as a rich tag; it is in the table's title
    shutil.copy(digits["eval"], ev)
    out = tmp_path / "out"
    code, stdout, err = run_cli("convert", digits["model"], "--profile", "x86-64-avx512-server", "--format", "onnx", "--calibration",
                                digits["calib"], "--eval", ev, "--out", out, "--latency-runs", "5")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    flat = _flat(stdout)
    assert "eval[uint8].npz" in flat
    lines = list(report["warnings"]) + [f"{r['profile']}/{r['format']}: {w}" for r in report["results"] for w in r["warnings"]
                                         if w not in report["warnings"]]
    assert lines
    for line in lines:
        assert _flat(line) in flat, line
