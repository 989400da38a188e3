"""``edgekit convert``."""

from __future__ import annotations

from pathlib import Path

import click

from edgekit.cli.output import emit, progress, stdout
from edgekit.errors import InputError, UsageError
from edgekit.manifest import Preprocessing

__all__ = ["convert"]


def _preprocessing(spec: str | None) -> Preprocessing:
    if not spec:
        return Preprocessing()
    fields: dict[str, object] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise UsageError(f"--preprocessing: '{part}' is not KEY=VALUE", "Example: --preprocessing scale=0.00392157,mean=0,std=1,layout=NHWC")
        key = key.strip()
        if key in ("mean", "std"):
            fields[key] = tuple(float(v) for v in value.split(":"))
        elif key == "scale":
            fields[key] = float(value)
        else:
            fields[key] = value
    try:
        return Preprocessing.model_validate(fields)
    except Exception as e:
        raise UsageError(f"--preprocessing: {e}", "Keys: layout, scale, mean (a:b:c), std (a:b:c), raw_dtype.") from None


def _labels(path: Path | None) -> tuple[str, ...]:
    if path is None:
        return ()
    try:
        return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except OSError as e:
        raise InputError(f"--labels {path}: {e.strerror}", "Pass a text file with one label per line.") from None


def _shape(spec: str | None) -> tuple[int, ...] | None:
    if not spec:
        return None
    try:
        dims = tuple(int(d) for d in spec.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--input-shape '{spec}' is not a list of integers", "Example: --input-shape 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape '{spec}' must be positive sizes", "Example: --input-shape 1,3,224,224")
    return dims


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--profile", "profiles", multiple=True, required=True, help="Hardware profile id (repeat for several).")
@click.option("--format", "formats", multiple=True, default=("all",), show_default=True, help="tflite, onnx, coreml, or all: every format each profile takes.")
@click.option("--calibration", type=click.Path(path_type=Path), required=True, help=".npz with float32 'x' in the model's input layout.")
@click.option("--eval", "eval_", type=click.Path(path_type=Path), help=".npz with 'x' and integer labels 'y' to measure accuracy.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bundles"), show_default=True, help="Directory for the bundles and report.")
@click.option("--name", help="Model name (default: the file name).")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Model version recorded in the manifests.")
@click.option("--max-accuracy-drop", type=float, help="Budget in accuracy points (default 1.0). Without labels, the disagreement with the float model.")
@click.option("--allow-over-budget", is_flag=True, help="Keep the best attempt even if it misses the budget.")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=500, show_default=True, help="Calibration samples per recipe.")
@click.option("--latency-runs", type=click.IntRange(min=1), default=50, show_default=True, help="Runs for the host latency figures.")
@click.option("--labels", "labels_file", type=click.Path(path_type=Path), help="Text file of class names, one per line.")
@click.option("--preprocessing", help="How raw data maps to x: scale=...,mean=a:b:c,std=a:b:c,layout=NHWC,raw_dtype=uint8.")
@click.option("--embed-preprocessing", is_flag=True, help="Bake --preprocessing into ONNX graphs so apps feed raw data (e.g. uint8 pixels).")
@click.option("--input-shape", help="Fix an ONNX model's dynamic input dims, e.g. 1,3,224,224.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def convert(model: Path, profiles: tuple[str, ...], formats: tuple[str, ...], calibration: Path, eval_: Path | None, out: Path,
            name: str | None, version: str, max_accuracy_drop: float | None, allow_over_budget: bool, calibration_samples: int,
            latency_runs: int, labels_file: Path | None, preprocessing: str | None, embed_preprocessing: bool, input_shape: str | None, as_json: bool) -> None:
    """Convert MODEL (.keras/.h5/.onnx or a SavedModel dir) to INT8 bundles, checked against each profile."""
    from converters.pipeline import ConvertOptions, run_convert
    from converters.report import fallback_lines, render_table

    if max_accuracy_drop is not None and max_accuracy_drop < 0:
        raise UsageError("--max-accuracy-drop must be >= 0", "Give the budget in accuracy points, e.g. 0.5.")
    opts = ConvertOptions(
        model=model, profiles=profiles, calibration=calibration, out=out, formats=tuple(f.lower() for f in formats), eval=eval_,
        name=name, version=version, max_accuracy_drop=max_accuracy_drop, allow_over_budget=allow_over_budget,
        calibration_samples=calibration_samples, latency_runs=latency_runs, labels=_labels(labels_file),
        preprocessing=_preprocessing(preprocessing), input_shape=_shape(input_shape),
        embed_preprocessing=embed_preprocessing,
    )
    with progress(enabled=not as_json) as step:
        report = run_convert(opts, step)

    def render() -> None:
        stdout.print(render_table(report))
        for line in fallback_lines(report):
            stdout.print(f"[cyan]fallback[/] {line}", highlight=False)
        for r in report.results:
            for w in r.warnings:
                stdout.print(f"[yellow]warning[/] {r.profile}/{r.format}: {w}", highlight=False)
            if r.manifest.metrics.get("int8_accuracy") and r.manifest.metrics["int8_accuracy"].status == "not_measurable":
                for v in r.verification:
                    stdout.print(f"[cyan]checked[/] {r.profile}/{r.format}: {v}", highlight=False)
        stdout.print(f"Bundles and report.json / report.md in {report.out}")

    emit(report.to_dict(), as_json, render)
