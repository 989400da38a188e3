"""``edgekit profiles ...`` and ``edgekit profile detect``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import yaml

from edgekit.cli.output import add_row, emit, stdout
from edgekit.errors import OutputError
from edgekit.profiles import find_profile, list_profiles, load_profile_file, profile_json_schema

__all__ = ["profile", "profiles"]


@click.group()
def profiles() -> None:
    """List, show and validate hardware profiles (shipped ones and EDGEKIT_PROFILE_PATH)."""


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_cmd(as_json: bool) -> None:
    """List every known profile."""
    found = list_profiles()
    data = [{"id": pid, "name": p.name, "os": p.os, "formats": list(p.formats.supported()),
             "accelerators": [a.id for a in p.accelerators], "ram_mb": p.memory.ram_mb, "file": str(path)}
            for pid, (p, path) in found.items()]

    def render() -> None:
        from rich.table import Table

        t = Table("id", "name", "os", "formats", "accelerators", "RAM")
        for d in data:
            add_row(t, d["id"], d["name"], d["os"], ", ".join(d["formats"]), ", ".join(d["accelerators"]), f"{d['ram_mb']:,} MB")
        stdout.print(t)

    emit(data, as_json, render)


@profiles.command()
@click.argument("profile_id")
@click.option("--json", "as_json", is_flag=True)
def show(profile_id: str, as_json: bool) -> None:
    """Show one profile in full, then every placement rule with the source it comes from."""
    from edgekit.profiles import rule_citations

    p = find_profile(profile_id)
    data = p.model_dump(mode="json")
    rules = rule_citations(p)

    def render() -> None:
        click.echo(yaml.safe_dump(data, sort_keys=False, width=120))
        click.echo("# Rules and their sources:")
        for r in rules:
            click.echo(f"#   {r['rule']}  <- {r['source']}")

    emit({**data, "rules": rules}, as_json, render)


@profiles.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def validate(file: Path, as_json: bool) -> None:
    """Validate a profile YAML file; errors name the file and the field."""
    p = load_profile_file(file)
    emit({"file": str(file), "id": p.id, "valid": True}, as_json, lambda: click.echo(f"{file}: valid profile '{p.id}'"))


@profiles.command()
def schema() -> None:
    """Print the JSON Schema of a profile file."""
    click.echo(json.dumps(profile_json_schema(), indent=2))


@click.group()
def profile() -> None:
    """Describe this machine as a hardware profile."""


@profile.command()
@click.option("--out", type=click.Path(path_type=Path), help="Write the YAML here (default: print it).")
@click.option("--json", "as_json", is_flag=True)
def detect(out: Path | None, as_json: bool) -> None:
    """Write a profile of this machine from what it really has (CPU flags, cores, RAM, runtimes)."""
    from edgekit.detect import detect_profile

    p = detect_profile()
    data = p.model_dump(mode="json")
    text = "# Written by 'edgekit profile detect'.\n" + yaml.safe_dump(data, sort_keys=False, width=120)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, out)
        except OSError as e:
            raise OutputError(f"cannot write {out}: {e.strerror}", "Choose a writable path.") from None
    if as_json:
        emit(data, True, lambda: None)
    elif out is None:
        click.echo(text, nl=False)
    else:
        click.echo(f"wrote {out} (id {p.id}, {p.cpu.model}, {', '.join(p.cpu.features) or 'no SIMD features found'})")
