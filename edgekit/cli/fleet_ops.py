"""``edgekit fleet stats``, ``edgekit audit`` and ``edgekit token list|create|revoke``: what versions do in the
field, who did what, and the server's named tokens (docs/server.md)."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from edgekit.cli.fleet import _client, _server_options
from edgekit.cli.output import add_row, emit, stderr, stdout

__all__ = ["audit", "fleet", "token"]


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


@click.group()
def fleet() -> None:
    """What the fleet's model versions do in the field."""


@fleet.command()
@click.argument("model")
@click.argument("version", required=False)
@_server_options
@click.option("--since", help="Start, ISO 8601 (default: 24 h before --until).")
@click.option("--until", help="End, ISO 8601, exclusive (default: now).")
@click.option("--bucket", "bucket_s", type=int, help="Bucket width in seconds (>= 60) for a time series.")
@click.option("--profile", help="Only devices of this hardware profile.")
@click.option("--reference-version", help="Version the drift is measured against (default: the one uploaded before VERSION).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def stats(model: str, version: str | None, server: str | None, token: str | None, timeout: float, since: str | None, until: str | None,
          bucket_s: int | None, profile: str | None, reference_version: str | None, as_json: bool) -> None:
    """Field statistics of MODEL VERSION (or of every version of MODEL side by side): requests, escalation,
    degraded and error rates, latency p50/p95/p99, confidence histogram, drift (PSI)."""
    with _client(server, token, timeout) as client:
        data = client.stats(model, version, since=since, until=until, bucket_s=bucket_s, profile=profile, reference_version=reference_version)
    emit(data, as_json, lambda: _print_stats(data))


def _print_stats(data: dict[str, Any]) -> None:
    w = data["window"]
    if "versions" in data:
        t = Table("version", "requests", "escalation", "degraded", "errors", "p50 ms", "p95 ms", "p99 ms",
                  title=f"{data['model']}: {w['since']} → {w['until']}", title_justify="left")
        for v in data["versions"]:
            lat = v["latency_ms"]
            add_row(t, v["version"], f"{v['requests']:,}", _pct(v["escalation_rate"]), _pct(v["degraded_rate"]), _pct(v["error_rate"]),
                    _ms(lat["p50"]), _ms(lat["p95"]), _ms(lat["p99"]))
        stdout.print(t)
        return
    tot = data["totals"]
    lat, drift = tot["latency_ms"], tot["drift"]
    stdout.print(f"{data['model']} {data['version']}: {w['since']} → {w['until']}", markup=False)
    stdout.print(f"  requests {tot['requests']:,}  escalation {_pct(tot['escalation_rate'])}  degraded {_pct(tot['degraded_rate'])}  "
                 f"errors {_pct(tot['error_rate'])}  latency p50/p95/p99 {_ms(lat['p50'])}/{_ms(lat['p95'])}/{_ms(lat['p99'])} ms",
                 highlight=False, markup=False)
    value = "-" if drift["value"] is None else f"{drift['value']:.3f}"
    stdout.print(f"  drift: PSI {value} (drifted above {drift['threshold']}) against {drift['reference']}", highlight=False, markup=False)
    if data.get("buckets"):
        t = Table("start", "requests", "escalation", "errors", "p95 ms", title_justify="left")
        for b in data["buckets"]:
            add_row(t, b["start"], f"{b['requests']:,}", _pct(b["escalation_rate"]), _pct(b["error_rate"]), _ms(b["latency_ms"]["p95"]))
        stdout.print(t)


@click.command()
@_server_options
@click.option("--since", help="Only events from this time on (ISO 8601).")
@click.option("--actor", help="Only this token name.")
@click.option("--action", help="Only actions containing this text (e.g. rollback).")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the events as JSON.")
def audit(server: str | None, token: str | None, timeout: float, since: str | None, actor: str | None, action: str | None, limit: int,
          as_json: bool) -> None:
    """The audit log: every admin action with who, what, when, from where and its result (newest first)."""
    with _client(server, token, timeout) as client:
        data = client.audit(since=since, actor=actor, action=action, limit=limit)

    def render() -> None:
        t = Table("at", "who", "action", "target", "from", "result", title=f"{data['total']} event(s)", title_justify="left")
        for e in data["items"]:
            add_row(t, e["at"], e["actor"], e["action"], e["target"] or "", e["remote_addr"] or "", f"{e['status']} {e['result']}")
        stdout.print(t)

    emit(data, as_json, render)


@click.group()
def token() -> None:
    """Named tokens on a running fleet server: list, create, revoke (needs an admin token)."""


@token.command(name="list")
@_server_options
@click.option("--scope", type=click.Choice(["admin", "enroll", "device"]), help="Only tokens of this scope.")
@click.option("--include-revoked", is_flag=True, help="Also list revoked tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print the tokens as JSON.")
def list_tokens(server: str | None, token: str | None, timeout: float, scope: str | None, include_revoked: bool, as_json: bool) -> None:
    """Tokens by id, name, scope and dates (never the token itself)."""
    with _client(server, token, timeout) as client:
        data = client.tokens(scope=scope, include_revoked=include_revoked)

    def render() -> None:
        t = Table("id", "name", "scope", "label", "created", "revoked", title=f"{data['total']} token(s)", title_justify="left")
        for x in data["items"]:
            add_row(t, str(x["id"]), x["name"] or "-", x["scope"], x["label"] or "", x["created_at"] or "", x["revoked_at"] or "")
        stdout.print(t)

    emit(data, as_json, render)


@token.command(name="create")
@_server_options
@click.option("--name", required=True, help="Who acts with it, as the audit log names it (e.g. ci-pipeline).")
@click.option("--scope", type=click.Choice(["admin", "enroll"]), default="admin", show_default=True)
@click.option("--label", default="", help="A note stored with it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def create_token(server: str | None, token: str | None, timeout: float, name: str, scope: str, label: str, as_json: bool) -> None:
    """Create a named token and print it once."""
    with _client(server, token, timeout) as client:
        data = client.create_token(name, scope, label)
    emit(data, as_json, lambda: (stdout.print(data["token"], highlight=False, markup=False, soft_wrap=True),
                                 stderr.print("Store it now: the server keeps only its hash.", markup=False)))


@token.command(name="revoke")
@click.argument("ref", metavar="ID_OR_NAME")
@_server_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def revoke_token(ref: str, server: str | None, token: str | None, timeout: float, as_json: bool) -> None:
    """Revoke a token: refused from the next request on."""
    with _client(server, token, timeout) as client:
        data = client.revoke_token(ref)
    emit(data, as_json, lambda: stdout.print(f"revoked token {data['id']} ({data['name'] or data['scope']}) at {data['revoked_at']}",
                                             highlight=False, markup=False))
