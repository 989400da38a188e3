"""``edgekit router calibrate|eval``: choose the escalation policy, then measure it against a live cloud."""

from __future__ import annotations

from pathlib import Path

import click

from edgekit.cli.output import emit, progress, stdout

__all__ = ["router"]


@click.group()
def router() -> None:
    """Calibrate the hybrid router's escalation threshold and evaluate it."""


@router.command()
@click.option("--device", "device", required=True, type=click.Path(path_type=Path), help="The device bundle (directory or .ekb).")
@click.option("--cloud", "cloud", required=True, type=click.Path(path_type=Path), help="The cloud model: .onnx or .keras.")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path), help=".npz with 'x' (device input layout) and 'y' labels.")
@click.option("--max-loss", type=float, default=None, help="Most accuracy points the hybrid may lose vs cloud-only (finite-sample bound).")
@click.option("--escalation-budget", type=float, default=None, help="Share of traffic (0-1) that may go to the cloud.")
@click.option("--confidence", type=float, default=0.95, show_default=True, help="Confidence of the --max-loss guarantee.")
@click.option("--temperature-fraction", type=float, default=0.2, show_default=True, help="Share of the data that fits the temperature.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the temperature/threshold split.")
@click.option("--score", "score_method", type=click.Choice(["auto", "max_softmax", "margin", "entropy"]), default="auto", show_default=True,
              help="Confidence score; auto picks the one that ranks best on the temperature split.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Directory for the calibrated bundle and the report.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def calibrate(device: Path, cloud: Path, data: Path, max_loss: float | None, escalation_budget: float | None, confidence: float,
              temperature_fraction: float, seed: int, score_method: str, out: Path, as_json: bool) -> None:
    """Fit temperature scaling and pick the escalation threshold; write a re-signed bundle carrying the policy, and a report."""
    from hybrid_router.calibrate import calibrate_router

    with progress(not as_json) as step:
        result = calibrate_router(device, cloud, data, out, max_loss=max_loss, escalation_budget=escalation_budget,
                                  confidence=confidence, temperature_fraction=temperature_fraction, seed=seed,
                                  score_method=score_method, step=step)
    s = {k: v for k, v in result.summary.items() if k != "curve"}

    def render() -> None:
        stdout.print(f"temperature [bold]{s['temperature']:.4f}[/]  ECE {s['ece_before']:.4f} -> {s['ece_after']:.4f}  "
                     f"({s['temperature_examples']} examples fit it, {s['threshold_examples']} chose the threshold)")
        stdout.print(f"device-only {s['device_accuracy'] * 100:.2f}%  cloud-only {s['cloud_accuracy'] * 100:.2f}%  "
                     f"hybrid {s['hybrid_accuracy'] * 100:.2f}%  (threshold split)", markup=False)
        stdout.print(f"threshold [bold]{s['threshold']:.6f}[/]: escalates [bold]{s['escalation_rate'] * 100:.1f}%[/]; loss "
                     f"{s['loss_points']:.2f} pt, upper bound {s['loss_bound_points']:.2f} pt at {s['confidence']:.0%}")
        stdout.print(f"score [bold]{s['score']}[/] (" + ", ".join(f"{m} {c['escalation_rate'] * 100:.1f}%" for m, c in s["scores"].items())
                     + " escalated), read from " + (f"output '{s['score_output']}' (the logits kept beside the app's softmax)"
                                                     if s.get("score_output") else "the app's output (the bundle has no confidence output)"))
        if "point_estimate" in s:
            pe = s["point_estimate"]
            stdout.print(f"point-estimate threshold would escalate {pe['escalation_rate'] * 100:.1f}%: the guarantee costs "
                         f"[bold]{s['guarantee_extra_escalation'] * 100:.1f}[/] points of extra escalation")
            stdout.print(f"certified: 0.00 pt at 100% escalation (cloud only); keeping examples on the device, the smallest certifiable "
                         f"loss is {s['best_certifiable_loss_points']:.2f} pt (escalating {s['best_certifiable_escalation_rate'] * 100:.1f}%)", markup=False)
            if s.get("escalates_everything"):
                stdout.print("[yellow]no threshold keeping examples on the device is certified at this target: the policy escalates "
                             "everything; more labelled data tightens the bound[/]")
        stdout.print(f"bundle: {s['bundle']}", markup=False)
        stdout.print(f"report: {result.report_dir / 'router_report.md'}", markup=False)

    emit(s, as_json, render)


@router.command(name="eval")
@click.option("--bundle", "bundle", required=True, type=click.Path(path_type=Path), help="A calibrated bundle.")
@click.option("--cloud-url", required=True, help="KServe v2 server, e.g. http://127.0.0.1:8500.")
@click.option("--cloud-model", required=True, help="The model's name on that server.")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path), help=".npz with 'x' and 'y'.")
@click.option("--deadline-ms", type=float, default=200.0, show_default=True, help="Per-prediction deadline.")
@click.option("--limit", type=int, default=None, help="Use only the first N examples.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def eval_(bundle: Path, cloud_url: str, cloud_model: str, data: Path, deadline_ms: float, limit: int | None, as_json: bool) -> None:
    """Device-only, cloud-only and hybrid accuracy, escalation rate and degraded answers against a live cloud."""
    from hybrid_router.evaluation import evaluate_router

    r = evaluate_router(bundle, cloud_url, cloud_model, data, deadline_ms=deadline_ms, limit=limit)

    def render() -> None:
        cloud = f"{r['cloud_accuracy'] * 100:.2f}%" if r["cloud_accuracy"] is not None else f"unavailable ({r['cloud_error']})"
        stdout.print(f"{r['examples']} examples, deadline {r['deadline_ms']:g} ms, threshold {r['threshold']:.6f}", markup=False)
        stdout.print(f"accuracy: device-only {r['device_accuracy'] * 100:.2f}%  cloud-only {cloud}  hybrid [bold]{r['hybrid_accuracy'] * 100:.2f}%[/]")
        stdout.print(f"escalated {r['escalation_rate'] * 100:.1f}%  answered by the cloud {r['answered_by_cloud']}  "
                     f"degraded {r['degraded']} {r['degraded_reasons'] or ''}  answered {r['answered']}/{r['examples']}", markup=False)
        lat = r["latency_ms"]
        stdout.print(f"latency p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms  max {lat['max']:.2f} ms; breaker {r['breaker_state']}", markup=False)

    emit(r, as_json, render)
