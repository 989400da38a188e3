"""The ``edgekit`` command. Subcommands are imported only when invoked, so ``--help`` is fast
and an agent-only install (no TensorFlow) works."""

from __future__ import annotations

import importlib
import os
import sys

import click

from edgekit import __version__
from edgekit.errors import EdgekitError

__all__ = ["cli", "main"]

# name -> "module:attribute"; the one registry of subcommands.
_COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("edgekit.cli.convert:convert", "Convert a model to INT8 bundles for hardware profiles."),
    "bench": ("edgekit.cli.bench:bench", "Measure a bundle's load time and latency on this machine."),
    "bundle": ("edgekit.cli.bundle:bundle", "Inspect, verify and pack bundles."),
    "profiles": ("edgekit.cli.profiles:profiles", "List, show and validate hardware profiles."),
    "profile": ("edgekit.cli.profiles:profile", "Describe this machine as a hardware profile."),
    "server": ("edgekit.cli.server:server", "Run the fleet server and manage its tokens."),
    "push": ("edgekit.cli.fleet:push", "Upload bundles to a fleet server (and start a rollout), or push to one device over SSH."),
    "rollout": ("edgekit.cli.fleet:rollout", "List, show and steer rollouts: list, status, pause, resume, promote, rollback."),
    "devices": ("edgekit.cli.fleet:devices", "List and decommission the devices enrolled in a fleet server."),
    "fleet": ("edgekit.cli.fleet_ops:fleet", "Field statistics per model version: escalation, errors, latency, drift."),
    "audit": ("edgekit.cli.fleet_ops:audit", "The fleet server's audit log: who did what, when, from where."),
    "token": ("edgekit.cli.fleet_ops:token", "List, create and revoke named tokens on a running fleet server."),
    "agent": ("edgekit.cli.agent:agent", "Run the device agent, install a bundle locally, show the device's state."),
    "router": ("edgekit.cli.router:router", "Calibrate the hybrid router's escalation threshold."),
    "cloud": ("edgekit.cli.cloud:cloud", "Serve a cloud model over KServe v2 with dynamic batching; export it for Triton."),
}


class LazyGroup(click.Group):
    """A group whose subcommands live in modules loaded on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return None
        module, attr = _COMMANDS[cmd_name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, _COMMANDS[name][1]) for name in sorted(_COMMANDS)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(__version__, prog_name="edgekit")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """edgekit: from a trained model to a fleet of edge devices."""
    ctx.obj = {"debug": debug}


def _print_error(message: str, hint: str) -> None:
    click.echo(f"Error: {message}", err=True)
    click.echo(f"Hint: {hint}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every error into Error/Hint lines and an exit code."""
    code = _main(sys.argv[1:] if argv is None else argv)
    if argv is None and "tensorflow" in sys.modules:
        _exit_without_teardown(code)
    return code


def _exit_without_teardown(code: int) -> None:
    """End the process now, as the console script would, minus the interpreter's module teardown.

    With TensorFlow imported (``convert``), tearing the interpreter down took 1-2 s here after the work was done
    and every file written and closed. The exit handlers (``atexit``, which also runs ``weakref.finalize`` clean-ups
    such as temporary directories) and logging's flush still run; only the module-by-module teardown is skipped.
    Only for the console script (``argv`` None): a Python caller of :func:`main` keeps its process.
    """
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _main(args: list[str]) -> int:
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="edgekit", standalone_mode=False)
    except EdgekitError as e:
        if debug:
            raise
        _print_error(e.message, e.hint)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except click.ClickException as e:
        _print_error(e.format_message(), "See --help for the command's options.")
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback without --debug
        if debug:
            raise
        _print_error(f"internal error: {type(e).__name__}: {e}", "Run again with --debug and report the traceback.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
