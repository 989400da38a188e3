"""Rendering fleet results for people: rollouts (waves, device phases, gate results), devices,
uploaded versions, SSH pushes, and byte progress for uploads. JSON output never passes here."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgekit.cli.output import add_row, stderr, stdout

__all__ = ["byte_progress", "devices_table", "print_model_version", "print_ssh_push", "rollout_view", "rollout_summary"]

_GATE_OPS = {"max_failure_rate": "≤", "max_p95_ratio": "≤", "max_peak_rss_mb": "≤", "min_agreement": "≥", "max_escalation_increase": "≤",
             "max_error_rate": "≤", "max_field_p95_ratio": "≤", "max_drift": "≤"}
_STATE_STYLE = {"baking": "cyan", "running": "cyan", "paused": "yellow", "completed": "green", "passed": "green", "failed": "red",
                "rolled_back": "magenta", "pending": "dim", "activated": "green", "profiled": "cyan", "verified": "cyan",
                "downloaded": "cyan", "assigned": "dim"}


def _styled(value: Any) -> Text:
    text = "-" if value in (None, "") else str(value)
    return Text(text, style=_STATE_STYLE.get(text, ""))


def _short_time(value: Any) -> str:
    """``2026-11-23T10:41:07.123Z`` → ``10:41:07``; anything else as is."""
    if not value:
        return "-"
    text = str(value)
    return text[11:19] if len(text) >= 19 and text[10] in "T " else text


def _num(value: Any, fmt: str = ".3g") -> str:
    return "-" if value is None else (format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value))


def rollout_summary(r: dict[str, Any]) -> str:
    """One line: id, model version, state, wave, device phases."""
    waves = r.get("waves") or []
    phases = Counter(d.get("phase") or "assigned" for w in waves for d in w.get("devices") or [])
    current = r.get("current_wave")
    wave = f"wave {current + 1}/{len(waves)}" if isinstance(current, int) and waves else "no waves"
    counts = ", ".join(f"{n} {p}" for p, n in sorted(phases.items())) or "no devices assigned yet"
    reason = f" ({r['reason']})" if r.get("reason") else ""
    return f"rollout {r.get('id')} · {r.get('model')} {r.get('version')} · {r.get('state')}{reason} · {wave} · {counts}"


def _gates_line(gates: dict[str, Any] | None) -> str:
    if not gates:
        return "none"
    return ", ".join(f"{k} {_GATE_OPS.get(k, '=')} {v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in gates.items() if v is not None)


def rollout_view(r: dict[str, Any]) -> RenderableType:
    """The whole rollout: header, waves, devices and their phases, gate results."""
    sel = r.get("selector") or {}
    header = Text.assemble(
        ("rollout ", "bold"), (str(r.get("id")), "bold"), f" · {r.get('model')} {r.get('version')} · state ",
        _styled(r.get("state")), f"{' (' + str(r['reason']) + ')' if r.get('reason') else ''}",
        f"\nselector: profiles {', '.join(sel.get('profiles') or []) or 'any'} · tags {', '.join(sel.get('tags') or []) or 'any'}"
        f" · waves {', '.join(f'{p:g}%' for p in r.get('waves_pct') or [])} · gates {_gates_line(r.get('gates'))}"
        f" · wave timeout {_num(r.get('wave_timeout_s'), 'g')} s",
    )
    parts: list[RenderableType] = [header]
    skipped = r.get("skipped") or {}
    if skipped.get("count"):
        names = [str(d.get("name") or d.get("device_id") or d) if isinstance(d, dict) else str(d) for d in skipped.get("devices") or []]
        parts.append(Text(f"skipped {skipped['count']} device(s) with no artifact for their profile: {', '.join(names[:10])}"
                          + (" …" if len(names) > 10 else ""), style="yellow"))
    waves = r.get("waves") or []
    names = {d.get("device_id"): d.get("name") for w in waves for d in w.get("devices") or []}
    wt = Table("wave", "percent", "state", "devices", "finished", "started", "ended", title="Waves", title_justify="left")
    dt = Table("wave", "device", "profile", "phase", "p95 ms", "baseline p95", "agreement", "peak MB", "reason", title="Devices",
               title_justify="left")
    gt = Table("wave", "gate", "limit", "value", "result", "device", title="Gate results", title_justify="left")
    for w in waves:
        devices = w.get("devices") or []
        done = sum(1 for d in devices if d.get("phase") in ("activated", "failed", "rolled_back"))
        idx = (w.get("index") or 0) + 1
        add_row(wt, str(idx), f"{_num(w.get('percent'), 'g')}%", _styled(w.get("state")), str(len(devices)), str(done),
                _short_time(w.get("started_at")), _short_time(w.get("finished_at")))
        for d in devices:
            m = d.get("metrics") or {}
            base = m.get("baseline") or {}
            add_row(dt, str(idx), str(d.get("name") or d.get("device_id")), str(d.get("profile") or "-"), _styled(d.get("phase") or "assigned"),
                    _num(m.get("p95_ms")), _num(base.get("p95_ms")), _num(m.get("golden_top1_agreement")), _num(m.get("peak_rss_mb")),
                    str(d.get("reason") or ""))
        for g in w.get("gate_results") or []:
            passed = g.get("passed")
            add_row(gt, str(idx), str(g.get("gate")), f"{_GATE_OPS.get(str(g.get('gate')), '')} {_num(g.get('limit'), 'g')}".strip(),
                    _num(g.get("value"), ".4g"),
                    Text("unknown" if passed is None else "pass" if passed else "FAIL",
                         style="yellow" if passed is None else "green" if passed else "bold red"),
                    str(names.get(g.get("device_id")) or g.get("device_id") or ""))
    parts.append(wt)
    if dt.row_count:
        parts.append(dt)
    if gt.row_count:
        parts.append(gt)
    return Group(*parts)


def devices_table(devices: list[dict[str, Any]]) -> Table:
    """``edgekit devices list`` as a table."""
    t = Table("name", "id", "profile", "tags", "active model", "phase", "serial", "last seen", title=f"{len(devices)} device(s)",
              title_justify="left")
    for d in devices:
        a = d.get("active") or None
        active = f"{a.get('model')} {a.get('version')}" if a else "-"
        add_row(t, str(d.get("name")), str(d.get("id")), str(d.get("profile")), ", ".join(d.get("tags") or []) or "-", active,
                _styled(d.get("phase")), _num(d.get("serial"), "d") if isinstance(d.get("serial"), int) else "-",
                str(d.get("last_seen") or "never").replace("T", " ")[:19])
    return t


def print_model_version(mv: dict[str, Any]) -> None:
    """The uploaded version and its artifacts."""
    arts = mv.get("artifacts") or []
    stdout.print(f"[bold]uploaded {escape(str(mv.get('name')))} {escape(str(mv.get('version')))}[/]: {len(arts)} artifact(s)", highlight=False)
    t = Table("profile", "format", "file", "bytes", "sha256", "loads", "golden")
    for a in arts:
        v = a.get("validation") or {}
        golden = v.get("golden") or {}
        gold = "-" if not golden else ("passed" if golden.get("passed", golden.get("ok")) else "FAILED")
        add_row(t, str(a.get("profile")), str(a.get("format")), str(a.get("file")), f"{a.get('size_bytes', 0):,}",
                str(a.get("sha256", ""))[:16] + "…", "yes" if v.get("loads") else "no" if "loads" in v else "-", gold)
    stdout.print(t)


def print_ssh_push(result: dict[str, Any]) -> None:
    """An SSH push: where the bundle went and what the device's edgekit said."""
    added = " (new: saved to known_hosts)" if result["host_key_added"] else ""
    stdout.print("[bold]pushed[/] " + escape(f"{result['local_bundle']} → {result['target']}:{result['remote_bundle']}"), highlight=False)
    stdout.print(f"host key {result['host_key']}{added}", highlight=False, markup=False)
    stdout.print(f"{result['size_bytes']:,} bytes, sha256 {result['sha256']} (checked on the device)", highlight=False, markup=False)
    stdout.print(f"device ran: {result['remote_command']}", highlight=False, markup=False)
    remote = result.get("remote")
    if isinstance(remote, dict) and "active" in remote:  # edgekit agent install
        prof = remote.get("profile") or {}
        state = "[green]activated[/]" if remote.get("ok") else "[red]not activated[/]"
        stdout.print(f"  {state} {remote.get('name')} {remote.get('version')} · phases {', '.join(remote.get('phases') or []) or '-'}",
                     highlight=False, markup=False)
        if prof:
            stdout.print(f"  on the device: load {_num(prof.get('load_ms'))} ms · p50 {_num(prof.get('p50_ms'))} ms · "
                         f"p95 {_num(prof.get('p95_ms'))} ms · peak RSS {_num(prof.get('peak_rss_mb'))} MB · "
                         f"golden top-1 {_num(prof.get('golden_top1_agreement'))}", highlight=False, markup=False)
        active = remote.get("active") or {}
        stdout.print(f"  active: {active.get('name')} {active.get('version')}" if active else "  active: none", highlight=False, markup=False)
    elif isinstance(remote, dict) and "checks" in remote:
        for c in remote["checks"]:
            stdout.print(f"  {'[green]ok[/]  ' if c.get('ok') else '[red]FAIL[/]'} " + escape(f"{c.get('check')}: {c.get('detail')}"), highlight=False)
    elif isinstance(remote, dict):
        for k, v in remote.items():
            if not isinstance(v, (dict, list)):
                stdout.print(f"  {k}: {v}", highlight=False, markup=False)


@contextmanager
def byte_progress(label: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Progress of ``total`` bytes on stderr: a rich bar on a terminal, a line per quarter otherwise.

    Yields ``advance(n)``, to be called with each chunk's size."""
    if not enabled:
        yield lambda _n: None
        return
    if not stderr.is_terminal:
        stderr.print(f"- {label}: {total:,} bytes", highlight=False, markup=False)
        state = {"done": 0, "next": 25}

        def advance(n: int) -> None:
            state["done"] += n
            quarter = min(100, 100 * state["done"] // max(total, 1)) // 25 * 25
            if quarter >= state["next"]:
                stderr.print(f"- {label}: {quarter}% ({min(state['done'], total):,} bytes)", highlight=False, markup=False)
                state["next"] = quarter + 25

        yield advance
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
