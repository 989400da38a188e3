"""``edgekit bench``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from edgekit.cli.output import emit, stdout

__all__ = ["bench"]


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--runs", type=click.IntRange(min=1), default=200, show_default=True, help="Timed invocations.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed invocations first.")
@click.option("--threads", type=click.IntRange(min=1), help="Interpreter threads (default: the runtime's choice).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench(bundle: Path, runs: int, warmup: int, threads: int | None, as_json: bool) -> None:
    """Measure BUNDLE's load time and p50/p95/p99 latency on this machine."""
    from edgekit.benchmark import benchmark_bundle

    result = benchmark_bundle(bundle, runs=runs, warmup=warmup, threads=threads)

    def render() -> None:
        r = result
        stdout.print("[bold]" + escape(f"{r['name']} {r['version']}") + "[/] "
                     + escape(f"({r['format']}, {r['runtime']}, threads {r['threads'] or 'auto'}) on {r['host']}"))
        stdout.print(f"load {r['load_ms']:.2f} ms · p50 {r['p50_ms']:.3f} ms · p95 {r['p95_ms']:.3f} ms · p99 {r['p99_ms']:.3f} ms "
                     f"· mean {r['mean_ms']:.3f} ms over {r['runs']} runs", markup=False)

    emit(result, as_json, render)
