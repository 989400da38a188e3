"""The run report: report.json, report.md and the terminal table, from one set of rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from converters.pipeline import RunReport
    from rich.table import Table

__all__ = ["fallback_lines", "render_table", "rows", "selection_lines", "write_reports"]

COLUMNS = ("profile", "format", "recipe", "size", "int8/float size", "on target", "fallback ops", "accuracy", "drop", "agreement", "latency p50",
           "int8/float latency", "min SQNR", "accuracy 95% CI", "drop 95% CI")
# The terminal gets the columns that fit 100 characters; fallbacks are listed under the table.
TERMINAL = ("profile", "format", "recipe", "size (x float)", "ops on target", "accuracy (drop)", "agreement", "min SQNR", "p50 (x float)")


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def _ci(lo: float | None, hi: float | None, spec: str = ".2f") -> str:
    return "n/a" if lo is None or hi is None else f"[{lo:{spec}}, {hi:{spec}}]"


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
            _ci(val("int8_accuracy_ci95_low"), val("int8_accuracy_ci95_high")),
            _ci(val("accuracy_drop_ci95_low"), val("accuracy_drop_ci95_high")),
        ))
    return out


def _split_text(report: RunReport) -> str:
    s = report.evaluation_split
    if not s:
        return ""
    return s.get("rule", "")


def selection_lines(report: RunReport) -> list[str]:
    """Per bundle: what chose the recipe, what the reported figures are measured on, and their 95% intervals."""
    out = []
    for r in report.results:
        chosen = next((a for a in r.attempts if a.chosen), None)
        if chosen is None or chosen.test is None:
            continue
        t, sel = chosen.test, chosen.selection
        parts = []
        if t.accuracy is not None:
            parts.append(f"accuracy {t.accuracy:.2f}% {_ci(*(t.accuracy_ci95 or (None, None)))}")
        elif t.agreement is not None:
            parts.append(f"agreement {t.agreement:.2f}% {_ci(*(t.agreement_ci95 or (None, None)))}")
        if t.accuracy_drop is not None:
            parts.append(f"drop {t.accuracy_drop:+.2f} pt {_ci(*(t.accuracy_drop_ci95 or (None, None)))}")
        if t.min_sqnr_db is not None:
            parts.append(f"min SQNR {t.min_sqnr_db:.1f} dB")
        where = "same examples as the choice (optimistic)" if t.split == "same" else f"test split, {t.examples} examples"
        line = f"{r.profile}/{r.format}: {chosen.recipe} on the {where}: " + ", ".join(parts) + " (95% CI)"
        if sel is not None and sel.split == "selection":
            line += f"; chosen on the selection split ({sel.examples} examples" + (
                f", drop {sel.accuracy_drop:+.2f} pt)" if sel.accuracy_drop is not None else ")")
        if chosen.speedup_vs_float is not None:
            line += f"; {1 / chosen.speedup_vs_float:.2f}x float latency"
        out.append(line)
    return out



def _summary(report: RunReport) -> str:
    acc = _fmt(report.float_accuracy, ".2f", "%")
    budget = (f"accuracy budget {report.max_accuracy_drop:g} pt" if report.task == "classification"
              else f"fidelity budget {report.min_sqnr_db:g} dB SQNR per output")
    split = _split_text(report)
    return (f"{report.name} {report.version} ({report.task}): float accuracy {acc} on {report.eval_count} examples "
            f"({report.eval_source}); {budget}" + (f"; {split}" if split else ""))


def render_table(report: RunReport) -> Table:
    """A rich table of the run."""
    from rich.table import Table

    from rich.markup import escape

    t = Table(title=escape(_summary(report)), title_justify="left")  # report text is never markup: '[uint8]' must print
    for c in TERMINAL:
        t.add_column(c, overflow="fold")
    for r in rows(report):
        t.add_row(*map(escape, (r[0], r[1], r[2], f"{r[3]} ({r[4]})", r[5], f"{r[7]} ({r[8]})", r[9], r[12], f"{r[10]} ({r[11]})")))
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
                  "Accuracy, drop and agreement are on the test split (95% intervals in brackets); the budget was decided on the selection "
                  "split; latency is the host's, against the float model timed in the same rounds.", "",
                  "| recipe | class | size | selection drop | accuracy | drop | agreement | min SQNR | p50 (x float) | within budget | chosen | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for a in r.attempts:
            if a.skipped:
                lines.append(f"| {a.recipe} | {a.speed_class or ''} | - | - | - | - | - | - | - | - | | skipped: {a.skipped} |")
            elif a.error:
                lines.append(f"| {a.recipe} | {a.speed_class or ''} | - | - | - | - | - | - | - | - | | failed: {a.error} |")
            else:
                t = a.test
                sel_drop = a.selection.accuracy_drop if a.selection is not None and a.selection.split == "selection" else None
                acc_ci = _ci(*(t.accuracy_ci95 or (None, None))) if t is not None and t.accuracy_ci95 else ""
                drop_ci = _ci(*(t.accuracy_drop_ci95 or (None, None))) if t is not None and t.accuracy_drop_ci95 else ""
                speed = (f"{a.latency_ms_p50:.3f} ms ({1 / a.speedup_vs_float:.2f}x)" if a.latency_ms_p50 is not None and a.speedup_vs_float
                         else "n/a")
                lines.append(f"| {a.recipe} | {a.speed_class or ''} | {a.size_bytes} B | {_fmt(sel_drop, '+.2f')} | "
                             f"{_fmt(a.accuracy, '.2f', '%')} {acc_ci} | {_fmt(a.accuracy_drop, '+.2f')} {drop_ci} | "
                             f"{_fmt(a.agreement, '.2f', '%')} | {_fmt(a.min_sqnr_db, '.1f', ' dB')} | {speed} | {'yes' if a.within_budget else 'no'} | "
                             f"{'**yes**' if a.chosen else ''} | {('slower than float: ' + a.slower_than_float) if a.slower_than_float else ''} |")
        timed = next((a.latency_host for a in r.attempts if a.latency_host), None)
        if timed:
            lines += ["", f"Latency: {timed}."]
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
