"""``edgekit bundle inspect|verify|pack``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape

from edgekit.bundle import open_bundle, pack as pack_bundle, verify_bundle
from edgekit.cli.output import add_row, emit, stdout
from edgekit.errors import BundleError

__all__ = ["bundle"]


@click.group()
def bundle() -> None:
    """Inspect, verify and pack bundles."""


@bundle.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect(path: Path, as_json: bool) -> None:
    """Show a bundle's manifest: model, I/O, quantization, metrics, op coverage."""
    b = open_bundle(path)
    m = b.manifest

    def render() -> None:
        from rich.table import Table

        stdout.print(f"[bold]{escape(f'{m.name} {m.version}')}[/] · {m.format} for [bold]{escape(m.profile)}[/] · {escape(m.file)} ({m.size_bytes:,} bytes)")
        stdout.print(f"sha256 {m.sha256}", markup=False)
        for role, specs in (("input", m.inputs), ("output", m.outputs)):
            for s in specs:
                q = f" scale={s.quantization.scale:.6g} zero_point={s.quantization.zero_point}" if s.quantization else ""
                stdout.print(f"{role}: {s.name} {list(s.shape)} {s.dtype}{q}", markup=False)
        q = m.quantization
        stdout.print(f"quantization: {q.recipe} (weights {q.weights}, activations {q.activations}, per-channel {q.per_channel}, "
                     f"{q.calibration_samples} calibration samples, {len(q.attempts)} attempt(s))", markup=False)
        t = Table("metric", "value", "status", "note")
        for k, v in m.metrics.items():
            add_row(t, k, "n/a" if v.value is None else f"{v.value:.4g} {v.unit}", v.status, v.note)
        stdout.print(t)
        if m.coverage:
            c = m.coverage
            stdout.print(f"ops: {c.ops_on_target}/{c.total_ops} on {c.target}; fallbacks: {', '.join(c.fallbacks) or 'none'}", markup=False)

    emit(json.loads(m.model_dump_json()), as_json, render)


@bundle.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--trusted-key", multiple=True, metavar="KEY",
              help="Publisher key the signer must match (repeatable): base64, or a PEM key file.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def verify(path: Path, trusted_key: tuple[str, ...], as_json: bool) -> None:
    """Check the signature and every file hash; exits non-zero on any changed byte."""
    from edgekit.signing import parse_public_key

    result = verify_bundle(path, tuple(parse_public_key(k) for k in trusted_key))

    def render() -> None:
        for check, ok, detail in result.checks:
            stdout.print(f"{'[green]ok[/]  ' if ok else '[red]FAIL[/]'} {check}: {detail}", highlight=False)
        if not trusted_key:
            stdout.print("note: the signer was not checked against a trusted key (pass --trusted-key to require one)", highlight=False, markup=False)

    emit({**result.to_dict(), "signer_checked": bool(trusted_key)}, as_json, render)
    if not result.ok:
        failed = [c for c, ok, _ in result.checks if not ok]
        raise BundleError(f"{path}: verification failed ({', '.join(failed)})", "Do not deploy this bundle; rebuild or re-fetch it.")


@bundle.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Archive path (default: PATH.ekb).")
def pack(path: Path, out: Path | None) -> None:
    """Pack a bundle directory into one .ekb archive."""
    target = pack_bundle(path, out)
    click.echo(str(target))


@bundle.command("key")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def key(as_json: bool) -> None:
    """Show the public half of this machine's signing key (what 'server publisher add' and '--trusted-key' take).

    The key comes from EDGEKIT_SIGNING_KEY_PEM, EDGEKIT_SIGNING_KEY or ~/.config/edgekit/signing_key.pem
    (created on first use; passphrase from EDGEKIT_SIGNING_KEY_PASSPHRASE(_FILE)).
    """
    import os

    from edgekit import signing

    source = "EDGEKIT_SIGNING_KEY_PEM" if os.environ.get("EDGEKIT_SIGNING_KEY_PEM") else str(signing.default_key_path())
    pub = signing.public_key_b64(signing.load_or_create_key())
    data = {"public_key": pub, "key_id": signing.fingerprint(pub), "source": source}
    emit(data, as_json, lambda: stdout.print(f"{pub}\nkey id {data['key_id']} ({source})", highlight=False, markup=False))
