"""``edgekit agent run|install|status``: the device agent (needs only the ``agent`` extra)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click
from rich.markup import escape

from edgekit.cli.output import emit, stdout

__all__ = ["agent"]


def _settings(profile: str | None, **flags):
    from device_agents.profiler import ProfileSettings
    from device_agents.settings import AgentSettings

    formats = None
    if profile == "auto":
        from edgekit.detect import detect_profile

        hp = detect_profile()
        profile, formats = hp.id, hp.formats.supported()
    elif profile:
        from edgekit.profiles import find_profile

        formats = find_profile(profile).formats.supported()
    base = AgentSettings.from_env()
    runs, budget, warmup = flags.pop("profile_runs"), flags.pop("profile_budget_s"), flags.pop("warmup")
    prof = ProfileSettings(runs or base.profiling.runs, budget or base.profiling.budget_s,
                           base.profiling.warmup if warmup is None else warmup, base.profiling.threads)
    return AgentSettings.from_env(profile=profile, formats=formats, profiling=prof, **flags, **_trust_flags())


_TRUST_META = "edgekit.agent.trust"


def _trust_options(f):
    """``--trusted-key`` (repeatable) and ``--insecure-any-publisher``, handed to :func:`_settings` through the click context."""
    import functools

    @functools.wraps(f)
    def wrapper(*args, trusted_keys: tuple[str, ...] = (), insecure_any_publisher: bool = False, **kwargs):
        click.get_current_context().meta[_TRUST_META] = (trusted_keys, insecure_any_publisher)
        return f(*args, **kwargs)

    wrapper = click.option("--insecure-any-publisher", is_flag=True,
                           help="INSECURE: install a bundle signed by any key (env EDGEKIT_AGENT_INSECURE_ANY_PUBLISHER=1). "
                                "Never on a production device.")(wrapper)
    return click.option("--trusted-key", "trusted_keys", multiple=True, metavar="KEY",
                        help="Publisher key whose bundles this device runs (repeatable): base64, or a PEM key file "
                             "(env EDGEKIT_AGENT_TRUSTED_KEYS, comma-separated).")(wrapper)


def _trust_flags() -> dict:
    """The trust flags of the running command (none given: the settings' environment values stay)."""
    ctx = click.get_current_context(silent=True)
    keys, insecure = ctx.meta.get(_TRUST_META, ((), False)) if ctx else ((), False)
    from device_agents.settings import parse_trusted_keys

    from device_agents.settings import trusted_keys_from_env

    out: dict = {}
    if keys:  # added to the device's configured keys (EDGEKIT_AGENT_TRUSTED_KEYS), never replacing them
        out["trusted_keys"] = tuple(dict.fromkeys((*trusted_keys_from_env(), *parse_trusted_keys(keys))))
    if insecure:
        out["insecure_any_publisher"] = True
    return out


def _profiling_options(f):
    f = click.option("--profile-runs", type=int, help="Latency runs when profiling (default 200; env EDGEKIT_AGENT_PROFILE_RUNS).")(f)
    f = click.option("--profile-budget-s", type=float, help="Stop profiling latency after this many seconds (default 10).")(f)
    f = click.option("--warmup", type=int, help="Warm-up runs before timing (default 10).")(f)
    f = click.option("--max-attempts", type=int, help="Loop guard: entries into one state before rolling back (default 3).")(f)
    f = click.option("--keep-slots", type=int, help="Model slots kept on disk, active and previous included (default 3).")(f)
    return f


@click.group()
def agent() -> None:
    """Run the device agent, install a bundle locally, show the device's state."""


@agent.command()
@click.option("--server", required=True, help="Fleet server URL, e.g. http://fleet:8080.")
@click.option("--enroll-token", help="Enroll token (first start only; the device token is pinned afterwards). Visible in ps: "
              "prefer --enroll-token-file, EDGEKIT_AGENT_ENROLL_TOKEN or the systemd credential 'enroll-token'.")
@click.option("--enroll-token-file", type=click.Path(path_type=Path), help="Read the enroll token from this file.")
@click.option("--data-dir", required=True, type=click.Path(path_type=Path), help="Where the agent keeps its state and models.")
@click.option("--profile", "profile_id", help="Hardware profile id of this device, or 'auto' to detect it.")
@click.option("--name", help="Device name (default: the host name).")
@click.option("--tag", "tags", multiple=True, help="Device tag (repeatable).")
@click.option("--poll-interval-s", type=float, help="Override the server's poll interval (env EDGEKIT_AGENT_POLL_INTERVAL_S).")
@click.option("--backoff-max-s", type=float, help="Longest wait between tries while the server is down (default 300).")
@click.option("--server-ca", type=click.Path(path_type=Path), help="PEM CA (or certificate) of an https server, pinned at enrollment "
              "(env EDGEKIT_AGENT_SERVER_CA).")
@_profiling_options
@_trust_options
@click.option("-v", "--verbose", is_flag=True, help="Log every step to stderr.")
def run(server: str, enroll_token: str | None, enroll_token_file: Path | None, data_dir: Path, profile_id: str | None,
        name: str | None, tags: tuple[str, ...],
        poll_interval_s: float | None, backoff_max_s: float | None, server_ca: Path | None, profile_runs: int | None, profile_budget_s: float | None,
        warmup: int | None, max_attempts: int | None, keep_slots: int | None, verbose: bool) -> None:
    """Enroll once, then poll the server and apply assignments until SIGTERM."""
    from edgekit.device_support import check_device_platform

    check_device_platform()  # an unsupported interpreter or CPU is named here, not met later at the first model
    from device_agents.daemon import Agent

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = _settings(profile_id, profile_runs=profile_runs, profile_budget_s=profile_budget_s, warmup=warmup,
                         max_attempts=max_attempts, keep_slots=keep_slots, poll_interval_s=poll_interval_s, backoff_max_s=backoff_max_s,
                         server_ca=str(server_ca) if server_ca else None)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from device_agents.enroll_token import resolve_enroll_token

    token = resolve_enroll_token(enroll_token, enroll_token_file)
    Agent(str(data_dir), server, settings, enroll_token=token, name=name, tags=tags, stop=stop).run()


@agent.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data-dir", required=True, type=click.Path(path_type=Path), help="The agent's data directory.")
@click.option("--profile", "profile_id", help="This device's profile id (checked against the bundle), or 'auto'.")
@_profiling_options
@_trust_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result.")
def install(bundle: Path, data_dir: Path, profile_id: str | None, profile_runs: int | None, profile_budget_s: float | None,
            warmup: int | None, max_attempts: int | None, keep_slots: int | None, as_json: bool) -> None:
    """Verify, profile and activate one local bundle (directory or .ekb), no server."""
    from edgekit.device_support import check_device_platform

    check_device_platform()
    from device_agents.install import install_local
    from edgekit.errors import VerificationError

    settings = _settings(profile_id, profile_runs=profile_runs, profile_budget_s=profile_budget_s, warmup=warmup,
                         max_attempts=max_attempts, keep_slots=keep_slots)
    result = install_local(data_dir, bundle, settings)

    def render() -> None:
        if result["ok"]:
            p = result["profile"] or {}
            stdout.print("[green]activated[/] " + escape(f"{result['name']} {result['version']} ({result['sha256'][:12]})"), highlight=False)
            stdout.print(f"load {p.get('load_ms', 0):.1f} ms · p50 {p.get('p50_ms', 0):.3f} ms · p95 {p.get('p95_ms', 0):.3f} ms · "
                         f"p99 {p.get('p99_ms', 0):.3f} ms over {p.get('runs')} runs · peak RSS {p.get('peak_rss_mb', 0):.1f} MB · "
                         f"golden top-1 {p.get('golden_top1_agreement')} · {p.get('runtime')}+{p.get('delegate')}"
                         + (f" · {p['timing_note']}" if p.get("timing_note") else ""), highlight=False, markup=False)
        else:
            stdout.print("[red]not activated[/]: " + escape(f"{result['failure']['reason']}: {result['failure']['message']}"), highlight=False)
        active = result["active"]
        stdout.print(f"active: {active['name']} {active['version']} ({active['sha256'][:12]})" if active else "active: none",
                     highlight=False, markup=False)

    emit(result, as_json, render)
    if not result["ok"]:
        f = result["failure"]
        raise VerificationError(f"{bundle}: not activated ({f['reason']}): {f['message']}", reason=f["reason"])


@agent.command()
@click.option("--data-dir", required=True, type=click.Path(path_type=Path), help="The agent's data directory.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status(data_dir: Path, as_json: bool) -> None:
    """State, active and previous model, last profile, telemetry buffer, last contact."""
    from device_agents.status import agent_status

    st = agent_status(data_dir)

    def render() -> None:
        a, p = st["active"], st["previous"]
        stdout.print(f"device: {st['name'] or '-'} ({st['device_id'] or 'not enrolled'}) · profile {st['profile'] or '-'} · "
                     f"server {st['server'] or '-'}", highlight=False, markup=False)
        stdout.print(f"state: {st['state']}" + (f" (serial {st['assignment']['serial']}, attempt {st['attempts']})" if st["assignment"] else ""),
                     highlight=False, markup=False)
        stdout.print(f"active: {a['name']} {a['version']} {a['sha256'][:12]}" if a else "active: none", highlight=False, markup=False)
        stdout.print(f"previous: {p['name']} {p['version']} {p['sha256'][:12]}" if p else "previous: none", highlight=False, markup=False)
        lp = st["last_profile"]
        if lp:
            m = lp["metrics"]
            stdout.print(f"last profile: {lp['name']} {lp['version']} at {lp['at']}: p95 {m['p95_ms']:.3f} ms, peak RSS "
                         f"{m['peak_rss_mb']:.1f} MB, golden top-1 {m['golden_top1_agreement']}"
                         + (f" ({m['timing_note']})" if m.get("timing_note") else ""), highlight=False, markup=False)
        lr = st["last_result"]
        if lr:
            stdout.print(f"last result: {'failed: ' + lr['failure']['reason'] if lr.get('failure') else 'ok'} "
                         f"({lr.get('action') or 'install'} {lr.get('version')}, finished {lr.get('finished_at')})", highlight=False, markup=False)
        t = st["telemetry"]
        stdout.print(f"telemetry buffer: {t['buffered_points']}/{t['capacity']} points, {t['dropped_unreported']} dropped (unreported); "
                     f"reports queued: {st['reports_queued']}", highlight=False, markup=False)
        c = st["last_contact"]
        stdout.print(f"last contact: {c['at']}" if c else "last contact: never", highlight=False, markup=False)

    emit(st, as_json, render)
