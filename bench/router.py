"""The hybrid router's own cost: time beyond the two models, and what an open breaker adds.

Setup: the MNIST example's INT8 TFLite bundle (``run_convert``, raspberry-pi-5), calibrated
with ``calibrate_router(--max-loss 0.5)`` against the example's cloud CNN, which a real
``edgekit cloud serve`` process serves on 127.0.0.1. Inputs: the 1,000 held-out images in turn.

- Router overhead: every ``HybridClassifier.predict`` is timed end to end, and inside it the
  device model's ``predict`` and the cloud's HTTP exchange (the ``httpx`` ``post`` in the
  client's worker) are timed too. Overhead = total - device - HTTP: the decision, the breaker,
  the hand-off to the worker thread, JSON encoding and decoding, building the answer. Reported
  for confident (device-only) and escalated calls; the goal is p99 <= 1 ms over all calls.
- Guarantee check: the calibration repeated on ``--resplits`` random 800/200 re-splits of the
  1,000 held-out images; the share of test splits where the hybrid stays within 0.5 points of
  cloud-only, and the escalation it takes (not a goal: how the bound behaves on this data).
- Breaker open: every input escalates (threshold above any confidence) and the breaker is held
  open. Added latency = ``predict`` - the device model's own time in the same call; side by side
  with bare ``LocalModel.predict`` calls. Goal: <= 0.1 ms (median; p99 reported too).

The bundle build imports TensorFlow into this process; its ~400k objects would make every full
garbage collection pause 100-200 ms and land in some call's figure, so they are frozen
(``gc.freeze()``) before timing, as a serving process without TensorFlow would not have them.

    python bench/router.py [--calls 3000]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import gc
import socket
import subprocess
import time

import numpy as np

from bench.harness import ROOT, OtherLoad, Ratio, host_facts, prepare_process, print_table, quiet, ratio_rows, write_result

NAME = "router"
GOAL_OVERHEAD_P99_MS = 1.0
GOAL_OPEN_MS = 0.1
GOAL_ESCALATION = 0.20
GOAL_WITHIN = 0.95


class TimedDevice:
    """The device model, remembering how long its last predict took."""

    def __init__(self, model) -> None:
        self.model = model
        self.last = 0.0

    def predict(self, x: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.model.predict(x)
        self.last = time.perf_counter() - t0
        return out

    def __getattr__(self, name: str):  # manifest, inputs, outputs: the classifier checks shapes and classes from them
        return getattr(self.model, name)


class TimedHttp:
    """The client's httpx.Client, remembering how long its last streamed POST took, body read included
    (the cloud's own time, network included)."""

    def __init__(self, http) -> None:
        self.http = http
        self.last = 0.0

    @contextlib.contextmanager
    def stream(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            with self.http.stream(*a, **kw) as r:
                yield r
        finally:
            self.last = time.perf_counter() - t0

    def __getattr__(self, name: str):
        return getattr(self.http, name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cloud_server(model: Path):
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "cloud", "serve",
                             str(model), "--name", "mnist", "--port", str(port), "--no-grpc"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read()[-2000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > end:
                raise RuntimeError("cloud server not ready")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(15)


def build(scratch: Path) -> tuple[Path, dict]:
    """The calibrated MNIST bundle and the example's files."""
    from converters.pipeline import ConvertOptions, run_convert
    from examples.mnist.cloud import ensure_cloud_model
    from examples.mnist.train import ensure_example
    from hybrid_router.calibrate import calibrate_router

    out = ROOT / ".cache" / "examples" / "mnist"
    device, files = ensure_example(out), ensure_cloud_model(out)
    opts = ConvertOptions(model=device["model"], profiles=("raspberry-pi-5",), calibration=device["calib"], out=scratch / "bundles",
                          formats=("tflite",), eval=device["eval"])
    with quiet():
        bundle = run_convert(opts).results[0].bundle_dir
        cal = calibrate_router(bundle, files["onnx"], files["router_calib"], scratch / "calibrated", max_loss=0.5)
    return cal.bundle, files, cal


def resplits(bundle: Path, files: dict, n_splits: int, max_loss: float = 0.005, delta: float = 0.05) -> dict:
    """The calibration on many random 800/200 re-splits of the 1,000 images neither model saw: before, after, oracle.

    Same split as ``edgekit router calibrate`` (160 fit the temperature, 640 choose the threshold);
    the policy is then applied to the other 200, where the hybrid's loss against cloud-only and
    the escalation are measured.

    - before: the top-1 probability only, and an infeasible target means no policy (the whole split
      escalates, as the old "no threshold" error left a user no better choice).
    - margin, entropy: one fixed score each, Learn-then-Test at the full delta.
    - after: ``choose_score`` as ``router calibrate`` runs it (the score chosen on the temperature
      split, its threshold certified on the threshold split; escalate everything when nothing kept
      can be certified).
    - oracle: escalate exactly the test examples the device gets wrong and the cloud right (loss 0).
    """
    from edgekit.runtime import load
    from hybrid_router.calibrate import choose_score
    from hybrid_router.calibration import choose_for_max_loss, fit_temperature
    from hybrid_router.cloud_model import OnnxCloudModel
    from hybrid_router.policy import calibrated_probs, score

    d = np.load(ROOT / ".cache" / "examples" / "mnist" / "eval.npz")
    x, y = d["x"], d["y"]
    device = load(bundle)
    p = np.asarray(device.predict(x), dtype=np.float64)
    c = OnnxCloudModel(files["onnx"], providers=["CPUExecutionProvider"]).predict(x).argmax(axis=1)
    floor = device.manifest.router_policy.probability_floor
    rows: dict[str, list[dict]] = {"before": [], "margin": [], "entropy": [], "after": [], "oracle": []}
    picked: dict[str, int] = {}
    for seed in range(n_splits):
        idx = np.random.default_rng(1000 + seed).permutation(len(x))
        t_idx, s_idx, test = idx[:160], idx[160:800], idx[800:]
        temp = fit_temperature(p[t_idx], y[t_idx], "probabilities", floor)
        probs = calibrated_probs(p[s_idx], temp, "probabilities", floor)
        dev_ok, cloud_ok = probs.argmax(axis=1) == y[s_idx], c[s_idx] == y[s_idx]
        pt = calibrated_probs(p[test], temp, "probabilities", floor)
        cloud_test_acc = float((c[test] == y[test]).mean())

        def on_test(method: str, threshold: float, point_escalation: float, certified_escalation: float) -> dict:
            esc = score(pt, method) < threshold
            hybrid = np.where(esc, c[test], pt.argmax(axis=1))
            return {"escalation": float(esc.mean()), "loss": cloud_test_acc - float((hybrid == y[test]).mean()),
                    "point_escalation": point_escalation, "extra": certified_escalation - point_escalation}

        ch = choose_for_max_loss(probs.max(axis=1), dev_ok, cloud_ok, max_loss, delta)
        rows["before"].append(on_test("max_softmax", ch.threshold if ch.feasible else 1.000001, ch.point_escalation,
                                      ch.escalation if ch.feasible else 1.0) | {"feasible": ch.feasible})
        probs_t = calibrated_probs(p[t_idx], temp, "probabilities", floor)
        method, chosen, every = choose_score(probs, dev_ok, cloud_ok, max_loss=max_loss * 100, budget=None, confidence=1 - delta,
                                             select_probs=probs_t, select_ok=probs_t.argmax(axis=1) == y[t_idx])
        picked[method] = picked.get(method, 0) + 1
        for name, m, ch_ in (("margin", "margin", every["margin"]), ("entropy", "entropy", every["entropy"]), ("after", method, chosen)):
            rows[name].append(on_test(m, ch_["threshold"], ch_["point_estimate"]["escalation_rate"], ch_["escalation_rate"])
                              | {"feasible": not ch_["escalates_everything"]})
        harmful = (pt.argmax(axis=1) != y[test]) & (c[test] == y[test])
        rows["oracle"].append({"escalation": float(harmful.mean()), "loss": 0.0, "point_escalation": float(harmful.mean()), "extra": 0.0,
                               "feasible": True})

    def summary(rs: list[dict]) -> dict:
        esc, loss = np.array([r["escalation"] for r in rs]), np.array([r["loss"] for r in rs])
        return {"test_escalation_mean": float(esc.mean()), "test_escalation_median": float(np.median(esc)), "test_escalation_max": float(esc.max()),
                "test_within_max_loss": float((loss <= max_loss + 1e-12).mean()), "test_loss_points_mean": float(loss.mean() * 100),
                "test_loss_points_max": float(loss.max() * 100), "point_escalation_mean": float(np.mean([r["point_escalation"] for r in rs])),
                "extra_escalation_mean": float(np.mean([r["extra"] for r in rs])), "kept_some_on_device": int(sum(r["feasible"] for r in rs))}

    return {"splits": n_splits, "max_loss_points": max_loss * 100, "confidence": 1 - delta, "scores_picked": picked,
            **{k: summary(v) for k, v in rows.items()}}


def print_resplits(rs: dict) -> list[list[str]]:
    """The before/after/oracle table; returns its rows."""
    rows = []
    for k, label in (("before", "before: top-1 probability only"), ("margin", "margin (fixed)"), ("entropy", "entropy (fixed)"),
                     ("after", "after: score chosen on the temperature split"), ("oracle", "oracle: escalate exactly the harmful")):
        r = rs[k]
        rows.append([label, f"{r['test_escalation_mean']:.1%}", f"{r['test_escalation_max']:.1%}", f"{r['test_within_max_loss']:.0%}",
                     f"{r['point_escalation_mean']:.1%}", f"{r['extra_escalation_mean'] * 100:.1f}", str(r["kept_some_on_device"])])
    print_table(f"--max-loss {rs['max_loss_points']:g} at {rs['confidence']:.0%} on {rs['splits']} random 800/200 re-splits "
                f"(scores picked: {rs['scores_picked']})",
                ["policy", "test escalation mean", "max", "splits within target", "point-estimate escalation", "guarantee cost, pt",
                 "splits keeping any on device"], rows)
    return rows


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000, help="Calls per measurement (default 3000).")
    ap.add_argument("--resplits", type=int, default=100, help="Random calibration/test re-splits to check the guarantee on (default 100).")
    ap.add_argument("--goal-only", action="store_true", help="Only the calibration goal (re-splits), no latency measurements.")
    args = ap.parse_args(argv)
    scratch = prepare_process()
    host = host_facts()
    print("router: building and calibrating the MNIST bundle ...", flush=True)
    bundle, files, cal = build(scratch)
    held_out = {k: cal.summary[k] for k in ("score", "escalation_rate", "loss_bound_points", "threshold_examples", "escalates_everything",
                                             "device_accuracy", "cloud_accuracy")}
    print(f"router calibrate --max-loss 0.5 on the example's 800 router_calib images ({held_out['threshold_examples']} choose the "
          f"threshold): score {held_out['score']}, escalates {held_out['escalation_rate']:.1%}, bound {held_out['loss_bound_points']:.2f} pt; "
          f"device {held_out['device_accuracy']:.1%}, cloud {held_out['cloud_accuracy']:.1%} on that split", flush=True)
    if args.goal_only:
        rs = resplits(bundle, files, args.resplits)
        print_resplits(rs)
        goal = rs["after"]["test_escalation_mean"] <= GOAL_ESCALATION and rs["after"]["test_within_max_loss"] >= GOAL_WITHIN
        print(f"goal (mean escalation <= {GOAL_ESCALATION:.0%}, target met in >= {GOAL_WITHIN:.0%} of re-splits): "
              f"{'met' if goal else 'NOT met'}")
        path = write_result(NAME + "_goal", host, {"resplits": rs, "held_out_calibration": held_out, "goal_met": goal, "what": resplits.__doc__})
        print(f"wrote {path}")
        return 0
    from edgekit.runtime import load
    from hybrid_router import BreakerConfig, CircuitBreaker, EscalationPolicy, HybridClassifier, KServeClient

    x = np.concatenate([np.load(files["router_calib"])["x"], np.load(files["router_test"])["x"]])
    gc.collect()
    gc.freeze()
    from bench.cloud_batching import proc_cpu_s

    with cloud_server(files["onnx"]) as (url, pid), OtherLoad() as other:
        c0, w0 = proc_cpu_s(pid), time.perf_counter()
        # --- overhead beyond the two models -------------------------------------------------------
        device = TimedDevice(load(bundle))
        clf = HybridClassifier(device, KServeClient(url, "mnist"), None, deadline_ms=1000)
        http = TimedHttp(clf.cloud._http)
        clf.cloud._http = http
        for i in range(200):  # warm-up: connections, metadata, caches
            clf.predict(x[i % len(x)])
        conf_over, esc_over, totals, degraded = [], [], [], 0
        print(f"router: {args.calls} calls through HybridClassifier.predict ...", flush=True)
        for i in range(args.calls):
            t0 = time.perf_counter()
            p = clf.predict(x[i % len(x)])
            total = time.perf_counter() - t0
            totals.append(total)
            degraded += p.degraded
            if p.escalated:
                esc_over.append(total - device.last - http.last)
            else:
                conf_over.append(total - device.last)
        clf.close()
        escalation = len(esc_over) / args.calls
        # --- breaker open ---------------------------------------------------------------------------
        local = load(bundle)
        dev2 = TimedDevice(local)
        breaker = CircuitBreaker(BreakerConfig(consecutive_failures=1, cooldown_s=1e9))
        breaker.record_failure()
        opened = HybridClassifier(dev2, KServeClient(url, "mnist"), EscalationPolicy(1.0, 1.000001), breaker=breaker)
        added, bare, reasons = [], [], set()
        print(f"router: {args.calls} calls with the breaker open, interleaved with bare device calls ...", flush=True)
        for i in range(args.calls):
            xi = x[i % len(x)]
            t0 = time.perf_counter()
            p = opened.predict(xi)
            added.append(time.perf_counter() - t0 - dev2.last)
            reasons.add(p.reason)
            t0 = time.perf_counter()
            local.predict(xi[None])
            bare.append(time.perf_counter() - t0)
        opened.close()
        server_cores = (proc_cpu_s(pid) - c0) / (time.perf_counter() - w0)
    assert reasons == {"circuit_open"}, reasons
    from hybrid_router import decide

    policy = EscalationPolicy.from_router_policy(load(bundle).manifest.router_policy)
    outs = [np.asarray(local.predict(x[i][None]))[0] for i in range(200)]
    decide_s = []
    for i in range(args.calls):
        t0 = time.perf_counter()
        decide(outs[i % len(outs)], policy)
        decide_s.append(time.perf_counter() - t0)
    all_over = conf_over + esc_over
    rows = [
        ["overhead, all calls", f"{pct(all_over, 50):.3f}", f"{pct(all_over, 99):.3f}", str(len(all_over))],
        ["overhead, confident (device only)", f"{pct(conf_over, 50):.3f}", f"{pct(conf_over, 99):.3f}", str(len(conf_over))],
        ["overhead, escalated (beyond HTTP)", f"{pct(esc_over, 50):.3f}", f"{pct(esc_over, 99):.3f}", str(len(esc_over))],
        ["HybridClassifier.predict total", f"{pct(totals, 50):.3f}", f"{pct(totals, 99):.3f}", str(len(totals))],
        ["breaker open: added to the device call", f"{pct(added, 50):.3f}", f"{pct(added, 99):.3f}", str(len(added))],
        ["bare LocalModel.predict (same inputs)", f"{pct(bare, 50):.3f}", f"{pct(bare, 99):.3f}", str(len(bare))],
        ["decide() alone (the pure decision)", f"{pct(decide_s, 50):.3f}", f"{pct(decide_s, 99):.3f}", str(len(decide_s))],
    ]
    ratios = [
        Ratio("router overhead p99, ms (all calls)", pct(all_over, 99), GOAL_OVERHEAD_P99_MS, "beyond device model + cloud HTTP"),
        Ratio("breaker-open added latency median, ms", pct(added, 50), GOAL_OPEN_MS, f"p99 {pct(added, 99):.3f} ms"),
        Ratio("breaker-open added latency p99, ms", pct(added, 99), None, ""),
    ]
    print_table(f"Router cost, ms ({args.calls} calls each; escalation {escalation:.1%}, degraded {degraded})",
                ["what", "p50 ms", "p99 ms", "calls"], rows)
    print_table("Goals", ["figure", "value", "goal", "met"], ratio_rows(ratios))
    others = None if other.cores is None else max(0.0, other.cores - server_cores)
    print(f"the cloud server used {server_cores:.2f} cores; other processes (not this benchmark's) kept "
          + ("n/a" if others is None else f"{others:.2f}") + " cores busy")
    print(f"router: calibration on {args.resplits} random re-splits of the 1,000 held-out images ...", flush=True)
    rs = resplits(bundle, files, args.resplits)
    print_resplits(rs)
    path = write_result(NAME, host, {
        "resplits": rs, "held_out_calibration": held_out,
        "what": __doc__, "calls": args.calls, "escalation_rate": escalation, "degraded": degraded, "other_load_cores": others, "server_cores": server_cores,
        "ms": {r[0]: {"p50": float(r[1]), "p99": float(r[2]), "n": int(r[3])} for r in rows},
        "ratios": [r.to_dict() for r in ratios],
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
