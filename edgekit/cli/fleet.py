"""``edgekit push``, ``edgekit rollout status|pause|resume|promote|rollback`` and ``edgekit devices list``:
the admin side of the fleet (docs/push.md), plus ``push --ssh`` straight to one device."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from edgekit.bundle import open_bundle, pack, verify_bundle
from edgekit.cli.fleet_render import byte_progress, devices_table, print_model_version, print_ssh_push, rollout_summary, rollout_view
from edgekit.cli.output import add_row, emit, stderr, stdout
from edgekit.errors import BundleError, RemoteError, UsageError
from edgekit.fleet_client import TERMINAL_STATES, FleetClient, RolloutSpec, parse_gates, parse_selector, parse_waves

__all__ = ["devices", "push", "rollout"]

_SERVER_HELP = "Fleet server URL (or EDGEKIT_SERVER), e.g. http://127.0.0.1:8400."
_TOKEN_HELP = "Admin token (or EDGEKIT_TOKEN), from 'edgekit server token create --scope admin'."


def _server_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--server, --token and --timeout, shared by every command that talks to the fleet server."""
    f = click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True, help="Seconds to wait for each answer.")(f)
    f = click.option("--token", envvar="EDGEKIT_TOKEN", show_envvar=True, help=_TOKEN_HELP)(f)
    return click.option("--server", envvar="EDGEKIT_SERVER", show_envvar=True, help=_SERVER_HELP)(f)


def _client(server: str | None, token: str | None, timeout: float) -> FleetClient:
    if not server:
        raise UsageError("no fleet server given", "Pass --server URL or set EDGEKIT_SERVER (e.g. http://127.0.0.1:8400).")
    return FleetClient(server, token or "", timeout=timeout)


# -- push -------------------------------------------------------------------------------------------


@click.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@_server_options
@click.option("--model", "model_name", help="Model name in the registry (default: the bundles' manifest name).")
@click.option("--version", help="Version to register (default: the bundles' manifest version).")
@click.option("--rollout", "start_rollout", is_flag=True, help="Create a rollout of the uploaded version and print its id.")
@click.option("--select", "select", multiple=True, metavar="profile=ID,tag=T", help="Rollout target (repeatable); default: every device.")
@click.option("--waves", default="5,25,100", show_default=True, metavar="5,25,100", help="Cumulative percentages of the matched devices per wave.")
@click.option("--gate", "gates", multiple=True, metavar="NAME=VALUE",
              help="Wave gate (repeatable): max_failure_rate, min_agreement, max_p95_ratio, max_peak_rss_mb.")
@click.option("--wave-timeout", type=click.FloatRange(min=1), help="Seconds a wave may take before unfinished devices count as failed.")
@click.option("--ssh", "ssh_target", metavar="USER@HOST[:PORT]", help="Push to one device over SSH instead of a fleet server.")
@click.option("--identity", type=click.Path(path_type=Path), help="SSH private key (default: ssh-agent and ~/.ssh keys).")
@click.option("--accept-new-host-key", is_flag=True, help="Trust an unknown SSH host key and save it (a changed key is always refused).")
@click.option("--known-hosts", type=click.Path(path_type=Path), help="known_hosts file (default: ~/.ssh/known_hosts).")
@click.option("--remote-dir", default="edgekit", show_default=True, help="Directory on the device (relative: under the login's home).")
@click.option("--remote-edgekit", default="edgekit", show_default=True, help="edgekit executable on the device.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def push(ctx: click.Context, bundles: tuple[Path, ...], server: str | None, token: str | None, timeout: float, model_name: str | None,
         version: str | None, start_rollout: bool, select: tuple[str, ...], waves: str, gates: tuple[str, ...], wave_timeout: float | None,
         ssh_target: str | None, identity: Path | None, accept_new_host_key: bool, known_hosts: Path | None, remote_dir: str,
         remote_edgekit: str, as_json: bool) -> None:
    """Upload BUNDLE... (directories or .ekb) to a fleet server as one model version, or push one bundle
    to one device with --ssh.

    \b
    edgekit push bundles/digits-*-tflite --server http://127.0.0.1:8400 --rollout \\
        --select profile=raspberry-pi-5 --waves 5,25,100 --gate max_p95_ratio=1.2 --gate min_agreement=0.99
    edgekit push bundles/digits-raspberry-pi-5-tflite --ssh pi@192.168.1.20
    """
    flags = {"select": "--select", "waves": "--waves", "gates": "--gate", "wave_timeout": "--wave-timeout", "server": "--server",
             "token": "--token", "model_name": "--model", "version": "--version", "start_rollout": "--rollout"}
    given = {n for n in flags if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE}  # not env vars or defaults
    rollout_flags = sorted(flags[n] for n in given & {"select", "waves", "gates", "wave_timeout"})
    if ssh_target:
        if given:
            raise UsageError(f"--ssh pushes to one device; {', '.join(sorted(flags[n] for n in given))} belong to a fleet server push",
                             "Drop them, or drop --ssh and use --server.")
        if len(bundles) != 1:
            raise UsageError("--ssh takes exactly one bundle", "A device runs one bundle: pass the one built for its profile.")
        _push_ssh(bundles[0], ssh_target, identity, accept_new_host_key, known_hosts, remote_dir, remote_edgekit, timeout, as_json)
        return
    ssh_only = [o for o, v in (("--identity", identity), ("--accept-new-host-key", accept_new_host_key), ("--known-hosts", known_hosts)) if v]
    ssh_only += [o for n, o in (("remote_dir", "--remote-dir"), ("remote_edgekit", "--remote-edgekit"))
                 if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
    if ssh_only:
        raise UsageError(f"{', '.join(ssh_only)} only apply with --ssh", "Add --ssh USER@HOST, or drop them.")
    if rollout_flags and not start_rollout:
        raise UsageError(f"{', '.join(rollout_flags)} describe a rollout", "Add --rollout.")
    _push_fleet(bundles, server, token, timeout, model_name, version, start_rollout, select, waves, gates, wave_timeout, as_json)


def _checked_manifests(bundles: tuple[Path, ...]) -> list[Any]:
    """Verify each bundle here first, so a damaged one fails fast with a clear error and nothing is sent."""
    manifests = []
    for b in bundles:
        result = verify_bundle(b)
        if not result.ok:
            failed = ", ".join(f"{c}: {d}" for c, ok, d in result.checks if not ok)
            raise BundleError(f"{b}: verification failed ({failed}); nothing was uploaded", "Rebuild the bundle with 'edgekit convert'.")
        manifests.append(open_bundle(b).manifest)
    seen: dict[tuple[str, str], Path] = {}
    for b, m in zip(bundles, manifests):
        if (m.profile, m.format) in seen:
            raise UsageError(f"{seen[(m.profile, m.format)]} and {b} are both {m.format} for {m.profile}",
                             "A version holds at most one bundle per profile and format; push them as separate versions.")
        seen[(m.profile, m.format)] = b
    return manifests


def _push_fleet(bundles: tuple[Path, ...], server: str | None, token: str | None, timeout: float, model_name: str | None,
                version: str | None, start_rollout: bool, select: tuple[str, ...], waves: str, gates: tuple[str, ...],
                wave_timeout: float | None, as_json: bool) -> None:
    spec_parts = (parse_selector(select), parse_waves(waves), parse_gates(gates)) if start_rollout else None
    scratch = Path(tempfile.mkdtemp(prefix="edgekit-push-"))
    try:
        with _client(server, token, timeout) as client:  # flags are checked before the (slower) bundle verification
            manifests = _checked_manifests(bundles)
            names = sorted({m.name for m in manifests})
            if model_name is None and len(names) > 1:
                raise UsageError(f"the bundles name different models ({', '.join(names)})", "Pass --model NAME to register them under one name.")
            versions = sorted({m.version for m in manifests})
            if version is None and len(versions) > 1:
                raise UsageError(f"the bundles carry different versions ({', '.join(versions)})",
                                 "Pass --version V to register them as one version.")
            archives = [pack(b, scratch / f"{m.name}-{m.profile}-{m.format}.ekb") if b.is_dir() else b for b, m in zip(bundles, manifests)]
            total = sum(a.stat().st_size for a in archives)
            with byte_progress(f"uploading {len(archives)} bundle(s) to {client.server}", total) as advance:
                mv = client.upload(model_name or names[0], archives, version, progress=advance)
            created = None
            if spec_parts is not None:
                (profiles, tags), wave_list, gate_map = spec_parts
                spec = RolloutSpec(mv["name"], mv["version"], profiles, tags, wave_list, gate_map, wave_timeout)
                created = _create_rollout(client, spec)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def render() -> None:
        print_model_version(mv)
        if created is not None:
            stdout.print(rollout_summary(created), highlight=False)
            stdout.print(f"rollout id: {created.get('id')}", highlight=False, markup=False)
            stderr.print(f"Follow it with: edgekit rollout status {created.get('id')} --watch", highlight=False, markup=False)

    emit({"model": mv, "rollout": created}, as_json, render)


def _create_rollout(client: FleetClient, spec: RolloutSpec) -> dict[str, Any]:
    try:
        return client.create_rollout(spec)
    except RemoteError as e:
        raise RemoteError(f"uploaded {spec.model} {spec.version}, but the rollout was not created: {e.message}", e.hint) from None


def _push_ssh(bundle: Path, target: str, identity: Path | None, accept_new: bool, known_hosts: Path | None, remote_dir: str,
              remote_edgekit: str, timeout: float, as_json: bool) -> None:
    from edgekit.ssh_push import SshTarget, push_over_ssh

    parsed = SshTarget.parse(target)
    with ExitStack() as stack:
        sent = {"bytes": 0}
        advance: list[Callable[[int], None]] = []

        def on_bytes(done: int, total: int) -> None:  # paramiko's SFTP callback: (bytes so far, total)
            if not advance:  # the bar starts with the first callback, once the (packed) size is known
                advance.append(stack.enter_context(byte_progress(f"uploading {bundle.name}", total)))
            advance[0](done - sent["bytes"])
            sent["bytes"] = done

        result = push_over_ssh(bundle, parsed, identity=identity, known_hosts=known_hosts, accept_new_host_key=accept_new,
                               remote_dir=remote_dir, remote_edgekit=remote_edgekit, timeout=timeout, progress=on_bytes)
    data = result.to_dict()
    emit(data, as_json, lambda: print_ssh_push(data))


# -- rollout ----------------------------------------------------------------------------------------


@click.group()
def rollout() -> None:
    """Show and steer a rollout: status, pause, resume, promote, rollback."""


@rollout.command()
@click.argument("rollout_id", metavar="ID")
@_server_options
@click.option("--watch", is_flag=True, help="Poll until the rollout is completed, failed or rolled back.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True, help="Seconds between polls with --watch.")
@click.option("--watch-timeout", type=click.FloatRange(min=1), default=1800.0, show_default=True,
              help="Give up watching after this many seconds (exit 8).")
@click.option("--json", "as_json", is_flag=True, help="Print the rollout as JSON (with --watch: its final state).")
def status(rollout_id: str, server: str | None, token: str | None, timeout: float, watch: bool, interval: float, watch_timeout: float,
           as_json: bool) -> None:
    """Waves, device phases and gate results of rollout ID."""
    with _client(server, token, timeout) as client:
        if not watch:
            r = client.rollout(rollout_id)
        else:
            r = _watch(client, rollout_id, interval, watch_timeout, live=not as_json and stdout.is_terminal, lines=not as_json)
    emit(r, as_json, lambda: stdout.print(rollout_view(r)))


def _watch(client: FleetClient, rollout_id: str, interval: float, watch_timeout: float, live: bool, lines: bool) -> dict[str, Any]:
    """Poll until terminal: a live view on a terminal, one line per change otherwise (nothing with --json)."""
    polls = client.watch_rollout(rollout_id, interval, watch_timeout)
    r: dict[str, Any] = {}
    if live:
        from rich.live import Live

        with Live(console=stdout, refresh_per_second=4, transient=True) as view:
            for r in polls:
                view.update(rollout_view(r))
        return r
    last = None
    for r in polls:
        line = rollout_summary(r)
        if lines and line != last:
            stderr.print(f"- {line}", highlight=False, markup=False)
        last = line
    return r


def _action(verb: str, doc: str) -> click.Command:
    @click.argument("rollout_id", metavar="ID")
    @_server_options
    @click.option("--json", "as_json", is_flag=True, help="Print the rollout as JSON.")
    def command(rollout_id: str, server: str | None, token: str | None, timeout: float, as_json: bool) -> None:
        with _client(server, token, timeout) as client:
            r = client.rollout_action(rollout_id, verb)

        def render() -> None:
            stdout.print(f"{verb}: {rollout_summary(r)}", highlight=False, markup=False)
            if r.get("state") not in TERMINAL_STATES:
                stderr.print(f"Follow it with: edgekit rollout status {r.get('id')} --watch", highlight=False, markup=False)

        emit(r, as_json, render)

    command.__doc__ = doc
    return rollout.command(name=verb)(command)


_action("pause", "Start no new wave of rollout ID (assignments already issued stand).")
_action("resume", "Continue a paused rollout ID.")
_action("promote", "Give every remaining device of rollout ID the version now (one last wave; its gates are still recorded).")
_action("rollback", "Return every device rollout ID assigned to its previous version; the rollout becomes rolled_back.")


# -- devices ----------------------------------------------------------------------------------------


@click.group()
def devices() -> None:
    """List and decommission the devices enrolled in a fleet server."""


@devices.command(name="list")
@_server_options
@click.option("--profile", help="Only devices of this hardware profile.")
@click.option("--tag", help="Only devices with this tag.")
@click.option("--json", "as_json", is_flag=True, help="Print the devices as JSON.")
def list_devices(server: str | None, token: str | None, timeout: float, profile: str | None, tag: str | None, as_json: bool) -> None:
    """Every enrolled device: profile, tags, active model, phase, last seen."""
    with _client(server, token, timeout) as client:
        found = client.devices(profile, tag)
    emit(found, as_json, lambda: stdout.print(devices_table(found)))


@devices.command()
@click.argument("device_id", metavar="ID")
@_server_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def decommission(device_id: str, server: str | None, token: str | None, timeout: float, as_json: bool) -> None:
    """Retire device ID: its token stops working and no rollout targets it again."""
    with _client(server, token, timeout) as client:
        data = client.decommission(device_id)
    emit(data, as_json, lambda: stdout.print(f"decommissioned {data['name']} ({data['id']}) at {data['decommissioned_at']}",
                                             highlight=False, markup=False))


@rollout.command(name="list")
@_server_options
@click.option("--state", type=click.Choice(["running", "paused", "completed", "failed", "rolled_back"]), help="Only rollouts in this state.")
@click.option("--model", help="Only rollouts of this model.")
@click.option("--version", help="Only rollouts of this version.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the page as JSON.")
def list_rollouts(server: str | None, token: str | None, timeout: float, state: str | None, model: str | None, version: str | None,
                  limit: int, offset: int, as_json: bool) -> None:
    """Rollouts, newest first, with their wave states."""
    from rich.table import Table

    with _client(server, token, timeout) as client:
        page = client.rollouts(state=state, model=model, version=version, limit=limit, offset=offset)

    def render() -> None:
        t = Table("id", "model", "version", "state", "waves", "created", "reason", title=f"{page['total']} rollout(s)", title_justify="left")
        for r in page["items"]:
            add_row(t, r["id"], r["model"], r["version"], r["state"], " ".join(w["state"] for w in r["waves"]), r["created_at"] or "",
                    r["reason"] or "")
        stdout.print(t)

    emit(page, as_json, render)
