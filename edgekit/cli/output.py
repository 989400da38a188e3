"""Printing results: one JSON path, one rich path, progress on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

__all__ = ["add_row", "emit", "progress", "stderr", "stdout"]

stdout = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 120)
stderr = Console(stderr=True)


def add_row(table: Any, *cells: Any) -> None:
    """Add a row whose strings print as given: rich ``Text``, never markup ('[uint8]' or a device named '[red]x' shows as is)."""
    from rich.text import Text

    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))


def emit(data: Any, as_json: bool, render: Callable[[], None]) -> None:
    """Print ``data`` as JSON, or call ``render`` to print it for people."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        render()


@contextmanager
def progress(enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A spinner with elapsed time on stderr; yields a function that names the current step."""
    if not enabled:
        yield lambda _msg: None
        return
    if not stderr.is_terminal:  # logs and pipes get one plain line per step
        yield lambda msg: stderr.print(f"- {msg}", highlight=False, markup=False)
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=stderr, transient=True) as bar:
        task = bar.add_task("starting", total=None)
        done: list[str] = []

        def step(msg: str) -> None:
            if done:
                stderr.print(f"[green]✓[/] {escape(done[-1])}", highlight=False)
            done.append(msg)
            bar.update(task, description=escape(msg))

        yield step
        if done:
            stderr.print(f"[green]✓[/] {escape(done[-1])}", highlight=False)
