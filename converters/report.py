"""The run report: report.json, report.md and the terminal table, from one set of rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from converters.pipeline import RunReport
    from rich.table import Table

__all__ = ["fallback_lines", "render_table", "rows", "write_reports"]

COLUMNS = ("profile", "format", "recipe", "size", "int8/float size", "on target", "fallback ops", "accuracy", "drop", "agreement", "latency p50",
           "int8/float latency", "min SQNR")
# The terminal gets the columns that fit 100 characters; fallbacks are listed under the table.
TERMINAL = ("profile", "format", "recipe", "size (x float)", "ops on target", "accuracy (drop)", "agreement", "min SQNR", "p50 (x float)")


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def rows(report: RunReport) -> list[tuple[str, ...]]:
    """One row of strings per bundle, in COLUMNS order."""
    out = []
    for r in report.results:
        m = r.manifest.metrics
        val = lambda k: m[k].value if k in m else None  # noqa: E731
        out.append((
            r.profile,
            r.format,
            r.manifest.quantization.recipe + (f" ({r.manifest.quantization.precision})" if r.manifest.quantization.precision not in ("", "INT8") else ""),
            f"{r.manifest.size_bytes / 1024:.1f} KiB",
            _fmt(val("size_ratio"), ".2f", "x"),
            f"{r.coverage.ops_on_target}/{r.coverage.total_ops} on {r.coverage.target}",
            ", ".join(r.coverage.fallbacks) or "-",
            _fmt(val("int8_accuracy"), ".2f", "%"),
            _fmt(val("accuracy_drop"), "+.2f", " pt"),
            _fmt(val("agreement"), ".2f", "%"),
            _fmt(val("host_latency_ms_p50"), ".3f", " ms"),
            _fmt(val("latency_ratio"), ".2f", "x"),
            _fmt(val("min_sqnr_db"), ".1f", " dB"),
        ))
    return out


def _summary(report: RunReport) -> str:
    acc = _fmt(report.float_accuracy, ".2f", "%")
    budget = (f"accuracy budget {report.max_accuracy_drop:g} pt" if report.task == "classification"
              else f"fidelity budget {report.min_sqnr_db:g} dB SQNR per output")
    return (f"{report.name} {report.version} ({report.task}): float accuracy {acc} on {report.eval_count} examples "
            f"({report.eval_source}); {budget}")


def render_table(report: RunReport) -> Table:
    """A rich table of the run."""
    from rich.table import Table

    t = Table(title=_summary(report), title_justify="left")
    for c in TERMINAL:
        t.add_column(c, overflow="fold")
    for r in rows(report):
        t.add_row(r[0], r[1], r[2], f"{r[3]} ({r[4]})", r[5], f"{r[7]} ({r[8]})", r[9], r[12], f"{r[10]} ({r[11]})")
    return t


def fallback_lines(report: RunReport) -> list[str]:
    """One line per bundle whose ops do not all run on the target accelerator."""
    return [f"{r.profile}/{r.format}: off {r.coverage.target}: " + ", ".join(f"{p.op} x{p.count} -> {p.placement}" for p in r.coverage.ops if p.placement != r.coverage.target)
            for r in report.results if r.coverage.fallbacks]


def _markdown(report: RunReport) -> str:
    lines = [f"# Conversion report: {report.name} {report.version}", "", _summary(report), "", f"Task: {report.task} ({report.task_reason}).", "",
             *[f"- warning: {w}" for w in report.warnings], *([""] if report.warnings else []),
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(report)]
    for r in report.results:
        lines += ["", f"## {r.profile} / {r.format}", "", f"Bundle: `{r.bundle_dir.name}`, sha256 `{r.manifest.sha256}`", "",
                  "| recipe | size | accuracy | drop | agreement | min SQNR | within budget | chosen |", "|---|---|---|---|---|---|---|---|"]
        for a in r.attempts:
            if a.skipped:
                lines.append(f"| {a.recipe} | - | - | - | - | - | skipped: {a.skipped} | |")
            elif a.error:
                lines.append(f"| {a.recipe} | - | - | - | - | - | failed: {a.error} | |")
            else:
                lines.append(f"| {a.recipe} | {a.size_bytes} B | {_fmt(a.accuracy, '.2f', '%')} | {_fmt(a.accuracy_drop, '+.2f')} | "
                             f"{_fmt(a.agreement, '.2f', '%')} | {_fmt(a.min_sqnr_db, '.1f', ' dB')} | {'yes' if a.within_budget else 'no'} | "
                             f"{'**yes**' if a.chosen else ''} |")
        lines += ["", "Op placement" + (f", {r.coverage.basis}" if r.coverage.basis else "") + ":", ""]
        lines += [f"- {p.op}" + (f" [{p.dtype}]" if p.dtype else "") + f" x{p.count}: {p.placement}" + (f" ({p.reason})" if p.reason else "")
                  for p in r.coverage.ops]
        if r.coverage.note:
            lines += ["", f"Note: {r.coverage.note}"]
        if r.warnings:
            lines += ["", "Warnings:", ""] + [f"- {w}" for w in r.warnings]
        if r.verification:
            lines += ["", "Verification on the conversion host:", ""] + [f"- {v}" for v in r.verification]
        lines += ["", "Metrics (measured on the conversion host unless marked estimated):", ""]
        lines += [f"- {k}: {_fmt(v.value, '.4g')} {v.unit} [{v.status}] {v.note}".rstrip() for k, v in r.manifest.metrics.items()]
    return "\n".join(lines) + "\n"


def write_reports(report: RunReport, directory: Path) -> None:
    """Write report.json and report.md into ``directory``."""
    (directory / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (directory / "report.md").write_text(_markdown(report))
