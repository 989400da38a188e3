"""``edgekit convert``."""

from __future__ import annotations

import math
from pathlib import Path

import click
from rich.markup import escape

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
        try:
            if key in ("mean", "std"):
                fields[key] = tuple(float(v) for v in value.split(":"))
            elif key == "scale":
                fields[key] = float(value)
            else:
                fields[key] = value
        except ValueError:
            raise UsageError(f"--preprocessing: {key}={value!r} is not a number" + (" list (a:b:c)" if key in ("mean", "std") else ""),
                             "Example: --preprocessing scale=0.00392157,mean=0.485:0.456:0.406,std=0.229:0.224:0.225,layout=NHWC") from None
        if key in ("scale", "mean", "std") and not all(math.isfinite(v) for v in (fields[key] if key != "scale" else (fields[key],))):  # type: ignore[union-attr]
            raise UsageError(f"--preprocessing: {key}={value!r} must be finite", "Give finite numbers.")
        if key == "std" and any(v == 0 for v in fields[key]):  # type: ignore[union-attr]
            raise UsageError("--preprocessing: std must not be 0", "Give the per-channel standard deviations, e.g. std=0.229:0.224:0.225.")
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


def _shapes(specs: tuple[str, ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``NAME=1,3,224,224`` (or just ``1,3,224,224`` for a single-input model) per --input-shape."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims_text = spec.rpartition("=")
        name = name.strip() if sep else ""
        try:
            dims = tuple(int(d) for d in dims_text.replace("x", ",").split(","))
        except ValueError:
            raise UsageError(f"--input-shape '{spec}' is not NAME=list of integers", "Example: --input-shape input_ids=1,128") from None
        if not dims or any(d <= 0 for d in dims):
            raise UsageError(f"--input-shape '{spec}' must be positive sizes", "Example: --input-shape 1,3,224,224")
        if name in out:
            raise UsageError(f"--input-shape gives input '{name or '(the only input)'}' twice", "Give each input once.")
        out[name] = dims
    return tuple(out.items())


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--profile", "profiles", multiple=True, required=True, help="Hardware profile id (repeat for several).")
@click.option("--format", "formats", multiple=True, default=("all",), show_default=True, help="tflite, onnx, coreml, or all: every format each profile takes.")
@click.option("--calibration", type=click.Path(path_type=Path), required=True, help=".npz with one array per model input, by input name ('x' for a single input), batch first.")
@click.option("--eval", "eval_", type=click.Path(path_type=Path), help=".npz like --calibration, plus integer labels 'y' for classification accuracy.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bundles"), show_default=True, help="Directory for the bundles and report.")
@click.option("--name", help="Model name (default: the file name).")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Model version recorded in the manifests.")
@click.option("--max-accuracy-drop", type=float, help="Classification budget in accuracy points (default 1.0; without labels, the disagreement with the float model); with --metric, in the metric's units.")
@click.option("--allow-over-budget", is_flag=True, help="Keep the best attempt even if it misses the budget.")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=500, show_default=True, help="Calibration samples per recipe.")
@click.option("--latency-runs", type=click.IntRange(min=1), default=50, show_default=True, help="Runs for the host latency figures.")
@click.option("--labels", "labels_file", type=click.Path(path_type=Path), help="Text file of class names, one per line.")
@click.option("--preprocessing", help="How raw data maps to x: scale=...,mean=a:b:c,std=a:b:c,layout=NHWC,raw_dtype=uint8.")
@click.option("--embed-preprocessing", is_flag=True, help="Bake --preprocessing into ONNX graphs so apps feed raw data (e.g. uint8 pixels).")
@click.option("--input-shape", "input_shapes", multiple=True,
              help="Fix an ONNX/PyTorch input's dynamic dims: NAME=1,3,224,224 (repeat per input; the name may be left out for one input).")
@click.option("--task", type=click.Choice(["classification", "detection", "regression", "embedding", "generic"]),
              help="What the outputs mean (default: inferred from the output shapes; the report says what it inferred).")
@click.option("--min-sqnr-db", type=float, default=20.0, show_default=True,
              help="Fidelity budget for non-classification tasks: the lowest per-output SQNR against the float model.")
@click.option("--metric", "metric", help="Score outputs with module:function(outputs, data) -> float (higher is better); drives the budget.")
@click.option("--max-memory", "max_memory", type=float, help="MB the conversion may use; recipes that would exceed it are skipped (default: half the RAM).")
@click.option("--confidence-output", "confidence_output", type=click.Choice(["auto", "logits", "none"]), default="auto", show_default=True,
              help="Keep a classifier's pre-softmax logits as a second output for the hybrid router (auto: when the softmax is found).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def convert(model: Path, profiles: tuple[str, ...], formats: tuple[str, ...], calibration: Path, eval_: Path | None, out: Path,
            name: str | None, version: str, max_accuracy_drop: float | None, allow_over_budget: bool, calibration_samples: int,
            latency_runs: int, labels_file: Path | None, preprocessing: str | None, embed_preprocessing: bool, input_shapes: tuple[str, ...],
            task: str | None, min_sqnr_db: float, metric: str | None, max_memory: float | None, confidence_output: str,
            as_json: bool) -> None:
    """Convert MODEL (.keras/.h5/.onnx/.pt2 or a SavedModel dir) to INT8 bundles, checked against each profile."""
    from converters.pipeline import ConvertOptions, run_convert
    from converters.report import fallback_lines, render_table, selection_lines

    for flag, value in (("--max-accuracy-drop", max_accuracy_drop), ("--min-sqnr-db", min_sqnr_db), ("--max-memory", max_memory)):
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, not {value}", "Give a plain number, e.g. 0.5.")
    if max_accuracy_drop is not None and max_accuracy_drop < 0:
        raise UsageError("--max-accuracy-drop must be >= 0", "Give the budget in accuracy points, e.g. 0.5.")
    if max_memory is not None and max_memory <= 0:
        raise UsageError("--max-memory must be > 0 MB", "Example: --max-memory 4000")
    opts = ConvertOptions(
        model=model, profiles=profiles, calibration=calibration, out=out, formats=tuple(f.lower() for f in formats), eval=eval_,
        name=name, version=version, max_accuracy_drop=max_accuracy_drop, allow_over_budget=allow_over_budget,
        calibration_samples=calibration_samples, latency_runs=latency_runs, labels=_labels(labels_file),
        preprocessing=_preprocessing(preprocessing), input_shapes=_shapes(input_shapes),
        embed_preprocessing=embed_preprocessing, task=task, min_sqnr_db=min_sqnr_db, metric=metric, max_memory_mb=max_memory,
        confidence_output=confidence_output,
    )
    with progress(enabled=not as_json) as step:
        report = run_convert(opts, step)

    def render() -> None:
        stdout.print(f"task: {report.task} ({report.task_reason})", highlight=False, markup=False)
        for w in report.warnings:
            stdout.print(f"[yellow]warning[/] {escape(w)}", highlight=False)
        stdout.print(render_table(report))
        if report.confidence_output:
            c = report.confidence_output
            stdout.print(f"[cyan]confidence output[/] {escape(c['note'] if c['output'] else 'none: ' + c['note'])}", highlight=False)
        for line in fallback_lines(report):
            stdout.print(f"[cyan]fallback[/] {escape(line)}", highlight=False)
        for line in selection_lines(report):
            stdout.print(f"[cyan]measured[/] {escape(line)}", highlight=False)
        for r in report.results:
            for w in (w for w in r.warnings if w not in report.warnings):
                stdout.print(f"[yellow]warning[/] {escape(f'{r.profile}/{r.format}: {w}')}", highlight=False)
            if r.manifest.metrics.get("int8_accuracy") and r.manifest.metrics["int8_accuracy"].status == "not_measurable":
                for v in r.verification:
                    stdout.print(f"[cyan]checked[/] {escape(f'{r.profile}/{r.format}: {v}')}", highlight=False)
        stdout.print(f"Bundles and report.json / report.md in {report.out}", highlight=False, markup=False)

    emit(report.to_dict(), as_json, render)
