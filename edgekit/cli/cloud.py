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


@cloud.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="The model's name in the URL (/v2/models/NAME).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8500, show_default=True, type=int)
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 4096), help="Rows per model call (1: no batching).")
@click.option("--max-delay-us", default=2000, show_default=True, type=click.IntRange(0, 10_000_000),
              help="Longest the oldest request waits for a batch to fill.")
@click.option("--max-queue", default=1024, show_default=True, type=click.IntRange(1, 1_000_000), help="Queued requests before 429.")
@click.option("--providers", default=None, help="Comma-separated ONNX Runtime execution providers to require, e.g. "
              "CUDAExecutionProvider,CPUExecutionProvider (default: CUDA when available, else CPU).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's choice).")
def serve(model: Path, name: str, host: str, port: int, max_batch: int, max_delay_us: int, max_queue: int, providers: str | None,
          threads: int | None) -> None:
    """Serve MODEL (.onnx, or .keras exported once with tf2onnx) over the KServe v2 REST protocol."""
    from hybrid_router.batcher import BatchConfig
    from hybrid_router.server import CloudServerSettings, serve as run

    wanted = tuple(p.strip() for p in providers.split(",") if p.strip()) if providers else None
    run(CloudServerSettings(model=str(model), name=_check_name(name), host=host, port=port,
                            batch=BatchConfig(max_batch, max_delay_us, max_queue), providers=wanted, require_providers=wanted is not None,
                            intra_op_threads=threads))


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
        stdout.print(f"Triton model repository: {r.repository}")
        stdout.print(f"  {r.config}")
        stdout.print(f"  {r.model_file}")
        stdout.print(f"Serve it with: tritonserver --model-repository {r.repository}")

    emit(data, as_json, render)
