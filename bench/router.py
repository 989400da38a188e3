"""The hybrid router's own cost: time beyond the two models, and what an open breaker adds.

Setup: the MNIST example's INT8 TFLite bundle (``run_convert``, raspberry-pi-5), calibrated
with ``calibrate_router(--max-loss 0.5)`` against the example's cloud CNN, which a real
``edgekit cloud serve`` process serves on 127.0.0.1. Inputs: the 1,000 held-out images in turn.

- Router overhead: every ``HybridClassifier.predict`` is timed end to end, and inside it the
  device model's ``predict`` and the cloud's HTTP exchange (the ``httpx`` ``post`` in the
  client's worker) are timed too. Overhead = total - device - HTTP: the decision, the breaker,
  the hand-off to the worker thread, JSON encoding and decoding, building the answer. Reported
  for confident (device-only) and escalated calls; the goal is p99 <= 1 ms over all calls.
- Calibration goal (issue 15): ``--max-loss 0.5`` at 95% repeated on ``--resplits`` random 800/200
  re-splits of the 1,000 held-out images, before (the INT8 softmax) and after (the logits output
  the conversion keeps), against the float model's logits and the oracle: mean escalation on the
  test halves (goal <= 20%), the share of test halves within 0.5 points of cloud-only (goal >= 95%),
  the point-estimate escalation and the cost of the guarantee. Also ``router calibrate`` on the
  example's own 800 calibration images, with a bundle converted with ``--confidence-output none``
  (before) and the default (after).
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

    def run(self, feeds: dict) -> dict:  # the classifier's call when the policy scores the logits output
        t0 = time.perf_counter()
        out = self.model.run(feeds)
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


HELD_OUT_KEYS = ("score", "score_output", "escalation_rate", "loss_bound_points", "threshold_examples", "escalates_everything",
                 "device_accuracy", "cloud_accuracy", "best_certifiable_loss_points", "best_certifiable_escalation_rate")


def build(scratch: Path) -> tuple[Path, dict, dict]:
    """The MNIST bundle (``edgekit convert``'s default: the logits output kept) calibrated with ``--max-loss 0.5``, the
    example's files, and the held-out calibration before (a bundle converted with ``--confidence-output none``) and after."""
    from converters.pipeline import ConvertOptions, run_convert
    from examples.mnist.cloud import ensure_cloud_model
    from examples.mnist.train import ensure_example
    from hybrid_router.calibrate import calibrate_router

    out = ROOT / ".cache" / "examples" / "mnist"
    device, files = ensure_example(out), ensure_cloud_model(out)
    files = {**files, "device_model": device["model"]}
    held_out = {}
    bundle = None
    for mode in ("none", "auto"):
        opts = ConvertOptions(model=device["model"], profiles=("raspberry-pi-5",), calibration=device["calib"], out=scratch / f"bundles-{mode}",
                              formats=("tflite",), eval=device["eval"], confidence_output=mode)
        with quiet():
            converted = run_convert(opts).results[0]
            cal = calibrate_router(converted.bundle_dir, files["onnx"], files["router_calib"], scratch / f"calibrated-{mode}", max_loss=0.5)
        held_out["before" if mode == "none" else "after"] = {k: cal.summary.get(k) for k in HELD_OUT_KEYS}
        held_out[("before" if mode == "none" else "after")]["conversion"] = {
            k: v.value for k, v in converted.manifest.metrics.items() if k.startswith("confidence_output") or k in ("size_bytes", "host_latency_ms_p50")}
        bundle = cal.bundle
    return bundle, files, held_out


def print_held_out(held_out: dict) -> None:
    for k, h in held_out.items():
        print(f"router calibrate --max-loss 0.5 on the example's 800 router_calib images ({h['threshold_examples']} choose the threshold), "
              f"{k} (score read from {h['score_output'] or 'the INT8 softmax'}): score {h['score']}, escalates {h['escalation_rate']:.1%}, "
              f"bound {h['loss_bound_points']:.2f} pt; device {h['device_accuracy']:.1%}, cloud {h['cloud_accuracy']:.1%} on that split; "
              f"smallest certifiable keeping any on the device {h['best_certifiable_loss_points']:.2f} pt", flush=True)


def _float_logits(model_path: Path, x: np.ndarray) -> np.ndarray:
    """The float Keras model's logits (its last layer's pre-activation, from the weights): the reference for the int8 logits."""
    import keras

    m = keras.models.load_model(model_path, compile=False)
    hidden = keras.Model(m.inputs[0], m.layers[-2].output).predict(x, verbose=0)
    w, b = m.layers[-1].get_weights()
    return (hidden @ w + b).astype(np.float64)


def device_signals(bundle: Path, files: dict) -> dict:
    """On the 1,000 held-out images: the bundle's app output (INT8 softmax), its logits output, the float model's logits, cloud answers."""
    from edgekit.runtime import load
    from hybrid_router.cloud_model import OnnxCloudModel

    d = np.load(ROOT / ".cache" / "examples" / "mnist" / "eval.npz")
    x, y = d["x"], d["y"]
    device = load(bundle)
    logits = device.manifest.confidence_output
    out = device.run({device.inputs[0].name: x})
    signals = {"softmax": ("probabilities", np.asarray(out[device.outputs[0].name], dtype=np.float64),
                           device.manifest.outputs[0].quantization.scale / 2)}
    if logits is not None:
        signals["logits"] = ("logits", np.asarray(out[logits.name], dtype=np.float64), 1e-6)
    signals["float_logits"] = ("logits", _float_logits(files["device_model"], x), 1e-6)
    cloud = OnnxCloudModel(files["onnx"], providers=["CPUExecutionProvider"]).predict(x).argmax(axis=1)
    return {"y": y, "cloud": cloud, "signals": signals, "logits_output": None if logits is None else logits.model_dump()}


def harmful_ranks(sig: dict) -> dict:
    """Why the bound binds: the escalation needed (share of the 1,000 images scoring at or below it) to escalate each of the
    most confident harmful examples (device wrong, cloud right), top-1 calibrated probability at T = 1."""
    from hybrid_router.policy import calibrated_probs, score

    y, c = sig["y"], sig["cloud"]
    out = {}
    for name, (kind, v, floor) in sig["signals"].items():
        conf = score(calibrated_probs(v, 1.0, kind, floor), "max_softmax")
        harmful = (v.argmax(axis=1) != y) & (c == y)
        need = sorted((float((conf <= ci).mean()) for ci in conf[harmful]), reverse=True)
        out[name] = {"harmful": int(harmful.sum()), "escalation_to_catch_top3": [round(e, 3) for e in need[:3]],
                     "tied_at_top_score": float((conf >= conf.max() - 1e-12).mean())}
    return out


def resplits(sig: dict, n_splits: int, max_loss: float = 0.005, delta: float = 0.05) -> dict:
    """The calibration on many random 800/200 re-splits of the 1,000 images neither model saw: before, after, oracle.

    Same split as ``edgekit router calibrate`` (160 fit the temperature, 640 choose the threshold);
    the policy is then applied to the other 200, where the hybrid's loss against cloud-only and
    the escalation are measured.

    - before (top-1): the INT8 softmax (the app's output), top-1 probability only.
    - before (score chosen): the INT8 softmax with ``choose_score`` (top-1, margin or entropy, chosen on the temperature split).
    - after: the bundle's logits output (kept at conversion), ``choose_score`` as ``router calibrate`` runs it.
    - float logits: the float model's logits with ``choose_score``: what a float or int16 output could give at best.
    - oracle: escalate exactly the test examples the device gets wrong and the cloud right (loss 0).

    Every policy escalates everything when nothing kept on the device can be certified (cloud-only: loss 0).
    """
    from hybrid_router.calibrate import choose_score
    from hybrid_router.calibration import choose_for_max_loss, fit_temperature
    from hybrid_router.policy import calibrated_probs, score

    y, c = sig["y"], sig["cloud"]
    rows: dict[str, list[dict]] = {"before_top1": [], "before": [], "after": [], "float_logits": [], "oracle": []}
    picked: dict[str, dict[str, int]] = {k: {} for k in rows}
    source = {"before_top1": "softmax", "before": "softmax", "after": "logits", "float_logits": "float_logits"}
    for seed in range(n_splits):
        idx = np.random.default_rng(1000 + seed).permutation(len(y))
        t_idx, s_idx, test = idx[:160], idx[160:800], idx[800:]
        cloud_test_acc = float((c[test] == y[test]).mean())
        for row, sname in source.items():
            if sname not in sig["signals"]:
                continue
            kind, v, floor = sig["signals"][sname]
            temp = fit_temperature(v[t_idx], y[t_idx], kind, floor)
            probs = calibrated_probs(v[s_idx], temp, kind, floor)
            dev_ok, cloud_ok = probs.argmax(axis=1) == y[s_idx], c[s_idx] == y[s_idx]
            pt = calibrated_probs(v[test], temp, kind, floor)
            if row == "before_top1":
                ch = choose_for_max_loss(probs.max(axis=1), dev_ok, cloud_ok, max_loss, delta)
                method, threshold = "max_softmax", (ch.threshold if ch.feasible else 1.000001)
                point, certified, feasible = ch.point_escalation, (ch.escalation if ch.feasible else 1.0), ch.feasible
            else:
                probs_t = calibrated_probs(v[t_idx], temp, kind, floor)
                method, chosen, _every = choose_score(probs, dev_ok, cloud_ok, max_loss=max_loss * 100, budget=None, confidence=1 - delta,
                                                      select_probs=probs_t, select_ok=probs_t.argmax(axis=1) == y[t_idx])
                threshold, point = chosen["threshold"], chosen["point_estimate"]["escalation_rate"]
                certified, feasible = chosen["escalation_rate"], not chosen["escalates_everything"]
            picked[row][method] = picked[row].get(method, 0) + 1
            esc = score(pt, method) < threshold
            hybrid = np.where(esc, c[test], pt.argmax(axis=1))
            rows[row].append({"escalation": float(esc.mean()), "loss": cloud_test_acc - float((hybrid == y[test]).mean()),
                              "point_escalation": point, "extra": certified - point, "feasible": feasible})
        kind, v, floor = sig["signals"]["softmax"]
        harmful = (v[test].argmax(axis=1) != y[test]) & (c[test] == y[test])
        rows["oracle"].append({"escalation": float(harmful.mean()), "loss": 0.0, "point_escalation": float(harmful.mean()), "extra": 0.0,
                               "feasible": True})

    def summary(rs: list[dict]) -> dict:
        esc, loss = np.array([r["escalation"] for r in rs]), np.array([r["loss"] for r in rs])
        return {"test_escalation_mean": float(esc.mean()), "test_escalation_median": float(np.median(esc)), "test_escalation_max": float(esc.max()),
                "test_within_max_loss": float((loss <= max_loss + 1e-12).mean()), "test_loss_points_mean": float(loss.mean() * 100),
                "test_loss_points_max": float(loss.max() * 100), "point_escalation_mean": float(np.mean([r["point_escalation"] for r in rs])),
                "extra_escalation_mean": float(np.mean([r["extra"] for r in rs])), "kept_some_on_device": int(sum(r["feasible"] for r in rs))}

    return {"splits": n_splits, "max_loss_points": max_loss * 100, "confidence": 1 - delta, "scores_picked": picked,
            **{k: summary(v) for k, v in rows.items() if v}}


LABELS = (("before_top1", "before: INT8 softmax, top-1 only"), ("before", "before: INT8 softmax, score chosen"),
          ("after", "after: logits output (INT8), score chosen"), ("float_logits", "float model's logits, score chosen (reference)"),
          ("oracle", "oracle: escalate exactly the harmful"))


def print_resplits(rs: dict) -> list[list[str]]:
    """The before/after/oracle table; returns its rows."""
    rows = []
    for k, label in LABELS:
        if k not in rs:
            continue
        r = rs[k]
        rows.append([label, f"{r['test_escalation_mean']:.1%}", f"{r['test_escalation_max']:.1%}", f"{r['test_within_max_loss']:.0%}",
                     f"{r['point_escalation_mean']:.1%}", f"{r['extra_escalation_mean'] * 100:.1f}", str(r["kept_some_on_device"]),
                     ", ".join(f"{m} {n}" for m, n in rs["scores_picked"].get(k, {}).items()) or "-"])
    print_table(f"--max-loss {rs['max_loss_points']:g} at {rs['confidence']:.0%} on {rs['splits']} random 800/200 re-splits",
                ["policy", "test escalation mean", "max", "splits within target", "point-estimate escalation", "guarantee cost, pt",
                 "splits keeping any on device", "scores picked"], rows)
    return rows


def goal(rs: dict, sig: dict) -> dict:
    """The re-splits, the held-out calibration on the example's own pair and why the bound binds; printed and returned."""
    print_resplits(rs)
    after = rs.get("after", rs["before"])
    met = after["test_escalation_mean"] <= GOAL_ESCALATION and after["test_within_max_loss"] >= GOAL_WITHIN
    print(f"goal (mean escalation <= {GOAL_ESCALATION:.0%}, target met in >= {GOAL_WITHIN:.0%} of re-splits): {'met' if met else 'NOT met'}")
    ranks = harmful_ranks(sig)
    print_table("Why: escalation needed to catch the most confident harmful examples (device wrong, cloud right; all 1,000 images)",
                ["signal", "harmful", "1st", "2nd", "3rd", "answers tied at the top score"],
                [[k, str(r["harmful"]), *(f"{e:.1%}" for e in r["escalation_to_catch_top3"]), f"{r['tied_at_top_score']:.1%}"]
                 for k, r in ranks.items()])
    return {"goal_met": met, "harmful_ranks": ranks}


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
    bundle, files, held_out = build(scratch)
    print_held_out(held_out)
    if args.goal_only:
        sig = device_signals(bundle, files)
        rs = resplits(sig, args.resplits)
        g = goal(rs, sig)
        path = write_result(NAME + "_goal", host, {"resplits": rs, "held_out_calibration": held_out, **g,
                                                   "logits_output": sig["logits_output"], "what": resplits.__doc__})
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
    sig = device_signals(bundle, files)
    rs = resplits(sig, args.resplits)
    g = goal(rs, sig)
    path = write_result(NAME, host, {
        "resplits": rs, "held_out_calibration": held_out, **g,
        "what": __doc__, "calls": args.calls, "escalation_rate": escalation, "degraded": degraded, "other_load_cores": others, "server_cores": server_cores,
        "ms": {r[0]: {"p50": float(r[1]), "p99": float(r[2]), "n": int(r[3])} for r in rows},
        "ratios": [r.to_dict() for r in ratios],
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
