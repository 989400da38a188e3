"""``edgekit cloud serve|export-triton``: the cloud side of the hybrid router."""

from __future__ import annotations

import re
from pathlib import Path

import click

from edgekit.cli.output import emit, stdout
from edgekit.errors import UsageError

__all__ = ["cloud"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(f"--name '{name}' is not a valid model name", "Use letters, digits, '.', '_' and '-'.")
    return name


@click.group()
def cloud() -> None:
    """Serve a cloud model over KServe v2 with dynamic batching; export it for Triton."""


def _model_option(text: str) -> tuple[str, str, str]:
    """``NAME[:VERSION]=PATH`` as (name, version, path)."""
    key, sep, path = text.partition("=")
    name, _, version = key.partition(":")
    if not sep or not path or not name:
        raise UsageError(f"--model {text!r} is not NAME[:VERSION]=PATH", "E.g. --model detector:2=models/detector.onnx")
    version = version or "1"
    if not version.isdigit():
        raise UsageError(f"--model {text!r}: the version must be a positive number", "E.g. --model detector:2=models/detector.onnx")
    return _check_name(name), version, path


def _warmup_option(text: str, default_name: str | None) -> tuple[str, tuple[int, ...]]:
    from hybrid_router.tensors import parse_shape

    name, sep, shape = text.rpartition("=")
    if not sep:
        if default_name is None:
            raise UsageError(f"--warmup-shape {text!r} needs a model name", "E.g. --warmup-shape detector=1x3x320x320")
        name, shape = default_name, text
    try:
        return name, parse_shape(shape)
    except ValueError as e:
        raise UsageError(f"--warmup-shape: {e}", "E.g. --warmup-shape detector=1x3x320x320 (batch first).") from None


@cloud.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--name", default=None, help="The model's name in the URL (/v2/models/NAME); needed with MODEL.")
@click.option("--model", "more", multiple=True, metavar="NAME[:VERSION]=PATH", help="Another model or version to serve (repeatable).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8500, show_default=True, type=click.IntRange(1, 65535), help="REST port.")
@click.option("--grpc-port", default=None, type=click.IntRange(1, 65535), help="gRPC port (default: --port + 1).")
@click.option("--no-grpc", is_flag=True, help="Serve REST only.")
@click.option("--warmup-shape", "warmup", multiple=True, metavar="[NAME=]SHAPE",
              help="Warm-up shape for a model with free axes, batch first, e.g. detector=1x3x320x320 (repeatable).")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 4096), help="Rows per model call (1: no batching).")
@click.option("--max-delay-us", default=2000, show_default=True, type=click.IntRange(0, 10_000_000),
              help="Longest the oldest request waits for a batch to fill.")
@click.option("--max-queue", default=1024, show_default=True, type=click.IntRange(1, 1_000_000), help="Queued requests before 429.")
@click.option("--providers", default=None, help="Comma-separated ONNX Runtime execution providers to require, e.g. "
              "CUDAExecutionProvider,CPUExecutionProvider (default: CUDA when available, else CPU).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="ONNX Runtime intra-op threads (default: ORT's choice).")
def serve(model: Path | None, name: str | None, more: tuple[str, ...], host: str, port: int, grpc_port: int | None, no_grpc: bool,
          warmup: tuple[str, ...], max_batch: int, max_delay_us: int, max_queue: int, providers: str | None, threads: int | None) -> None:
    """Serve MODEL (.onnx, or .keras exported once with tf2onnx), and any --model, over KServe v2 REST and gRPC."""
    from hybrid_router.batcher import BatchConfig
    from hybrid_router.repository import ModelSpec
    from hybrid_router.server import CloudServerSettings, serve as run

    if model is not None and name is None:
        raise UsageError("MODEL needs --name", "E.g. edgekit cloud serve cloud.onnx --name mnist")
    if model is None and not more:
        raise UsageError("nothing to serve", "Give MODEL --name NAME, or --model NAME[:VERSION]=PATH (repeatable).")
    specs = ([("_first", "1", str(model))] if model is not None else []) + [_model_option(m) for m in more]
    names = {(name if n == "_first" else n) for n, _, _ in specs}
    shapes = dict(_warmup_option(w, name if model is not None else (next(iter(names)) if len(names) == 1 else None)) for w in warmup)
    unknown = set(shapes) - names
    if unknown:
        raise UsageError(f"--warmup-shape for {', '.join(sorted(unknown))}, which is not served", f"Served: {', '.join(sorted(names))}.")
    seen: set[tuple[str, str]] = set()
    models = []
    for n, v, p in specs:
        n = _check_name(name) if n == "_first" else n
        if (n, v) in seen:
            raise UsageError(f"model {n} version {v} is given twice", "Give each NAME:VERSION once.")
        seen.add((n, v))
        models.append(ModelSpec(n, p, v, shapes.get(n)))
    if no_grpc and grpc_port is not None:
        raise UsageError("--grpc-port and --no-grpc contradict each other")
    grpc = None if no_grpc else (grpc_port if grpc_port is not None else port + 1)
    if grpc is not None and (grpc == port or grpc > 65535):
        raise UsageError(f"gRPC port {grpc} is not usable beside REST port {port}", "Pass --grpc-port, or --no-grpc.")
    wanted = tuple(p.strip() for p in providers.split(",") if p.strip()) if providers else None
    run(CloudServerSettings(host=host, port=port, batch=BatchConfig(max_batch, max_delay_us, max_queue), providers=wanted,
                            require_providers=wanted is not None, intra_op_threads=threads, models=tuple(models), grpc_port=grpc,
                            grpc_required=grpc_port is not None))


@cloud.command(name="export-triton")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="The model's name in the repository.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="The model repository directory.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--max-delay-us", default=2000, show_default=True, type=click.IntRange(0, 10_000_000))
@click.option("--max-queue", default=1024, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def export_triton(model: Path, name: str, out: Path, max_batch: int, max_delay_us: int, max_queue: int, as_json: bool) -> None:
    """Write a Triton model repository (config.pbtxt with dynamic batching, 1/model.onnx) for MODEL."""
    from hybrid_router.triton import export_triton as export

    r = export(model, _check_name(name), out, max_batch=max_batch, max_delay_us=max_delay_us, max_queue=max_queue)
    data = {"repository": str(r.repository), "config": str(r.config), "model": str(r.model_file)}

    def render() -> None:
        stdout.print(f"Triton model repository: {r.repository}", markup=False)
        stdout.print(f"  {r.config}", markup=False)
        stdout.print(f"  {r.model_file}", markup=False)
        stdout.print(f"Serve it with: tritonserver --model-repository {r.repository}", markup=False)

    emit(data, as_json, render)
