"""Profiling on the real hardware, in a child process: ``python -m device_agents.profiler``.

The child loads the candidate with :func:`edgekit.runtime.load` (the runtime and delegate the
device really has), then measures: load time; warm-up runs; latency p50/p95/p99 over ``runs``
batch-1 predictions of the golden inputs or until ``budget_s`` has passed, whichever comes
first; peak RSS *of the model*: the child's peak resident set (``getrusage`` high-water mark)
minus its RSS (psutil) after the runtime was imported but before the model was loaded; and
golden-set agreement (:func:`edgekit.golden.check_golden`). Then it measures the currently
active model (the baseline) the same way, in the same process, so ``p95 / baseline p95`` is like
for like. A child keeps the agent's own memory out of the figure and survives a model that
crashes the runtime (reported ``load_failed``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import VerificationError

__all__ = ["ProfileSettings", "profile_candidate"]


@dataclass(frozen=True)
class ProfileSettings:
    """How long to profile (defaults: 200 runs or 10 s, 10 warm-up runs)."""

    runs: int = 200
    budget_s: float = 10.0
    warmup: int = 10
    threads: int | None = None


def _timing_source() -> dict[str, str]:
    """``measured`` on real hardware; ``emulated`` + a note under qemu-user, where latencies mean nothing."""
    from edgekit.cpuinfo import EMULATED_TIMING_NOTE, read_cpu

    cpu = read_cpu()
    if cpu.emulation:
        return {"timing_source": "emulated", "timing_note": EMULATED_TIMING_NOTE}
    return {"timing_source": "measured"}


def _measure(bundle_dir: Path, s: ProfileSettings, *, golden: bool) -> dict:
    import resource

    import numpy as np
    import psutil

    from edgekit.bundle import open_bundle
    from edgekit.runtime import load, load_model_file

    bundle = open_bundle(bundle_dir)
    with contextlib.suppress(Exception):  # import the runtime first so its libraries are not counted as the model
        load_model_file(Path("/nonexistent"), bundle.manifest.format)
    rss_before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    model = load(bundle_dir, num_threads=s.threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    from edgekit.golden import golden_feeds

    feeds = golden_feeds(bundle.golden(), bundle.manifest)  # every input by name (x, x_1, ... in golden.npz)
    n = len(next(iter(feeds.values())))
    if len(feeds) == 1:  # the single-input call path apps use
        (xs,) = feeds.values()
        call = lambda i: model.predict(xs[i % n][None])  # noqa: E731
    else:
        call = lambda i: model.run({k: v[i % n : i % n + 1] for k, v in feeds.items()})  # noqa: E731
    for i in range(s.warmup):
        call(i)
    times: list[float] = []
    deadline = time.perf_counter() + s.budget_s
    while len(times) < s.runs and (len(times) < 1 or time.perf_counter() < deadline):
        i = len(times)
        t = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1e3
    out = {"load_ms": load_ms, "warmup_runs": s.warmup, "runs": len(times), "p50_ms": float(np.percentile(ms, 50)),
           "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
           "runtime": model.runtime, "delegate": model.delegate, **_timing_source()}
    if golden:
        from edgekit.golden import check_golden

        g = check_golden(model, bundle)
        out |= {"golden_top1_agreement": g.top1_agreement, "golden_max_abs_err": g.max_abs_err, "golden_passed": g.passed,
                "golden_min_top1_agreement": g.min_top1_agreement, "golden_atol": g.atol, "golden_count": g.count}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        out |= {"peak_rss_mb": max(0, peak - rss_before) / 2**20, "process_peak_rss_mb": peak / 2**20,
                "rss_method": "child process: getrusage peak minus RSS before load"}
    return out


def _child(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m device_agents.profiler")
    ap.add_argument("candidate", type=Path)
    ap.add_argument("--baseline", type=Path)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--budget-s", type=float, default=10.0)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    s = ProfileSettings(a.runs, a.budget_s, a.warmup, a.threads)
    from edgekit.errors import EdgekitError

    try:
        result = {"candidate": _measure(a.candidate, s, golden=True)}
    except EdgekitError as e:
        print(json.dumps({"error": {"reason": "load_failed", "message": e.message}}))
        return 3
    baseline = None
    if a.baseline is not None:
        try:
            baseline = {"p95_ms": _measure(a.baseline, s, golden=False)["p95_ms"]}
        except EdgekitError as e:  # the active model no longer loads: no baseline, said so
            baseline = {"error": e.message}
    print(json.dumps({**result, "baseline": baseline}))
    return 0


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):  # Linux: a SIGKILLed agent must not leave a profiler running
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def profile_candidate(candidate: Path, baseline: Path | None, baseline_sha: str | None, s: ProfileSettings,
                      should_stop=lambda: False) -> dict:
    """Run the profiler child; the ``profiled`` report's metrics. Raises VerificationError(load_failed) or InterruptedError."""
    cmd = [sys.executable, "-m", "device_agents.profiler", str(candidate), "--runs", str(s.runs), "--budget-s", str(s.budget_s),
           "--warmup", str(s.warmup)]
    if baseline is not None:
        cmd += ["--baseline", str(baseline)]
    if s.threads:
        cmd += ["--threads", str(s.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
    out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files, not pipes: a chatty runtime cannot block it
    proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, env=env, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + 2 * s.budget_s + 120  # two measurements plus imports and golden set
    while proc.poll() is None:
        if should_stop() or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            if should_stop():
                raise InterruptedError("profiling interrupted")
            raise VerificationError("profiling did not finish in time", reason="load_failed")
        time.sleep(0.05)
    out_f.seek(0)
    err_f.seek(0)
    out, err = out_f.read(), err_f.read()
    out_f.close()
    err_f.close()
    try:
        data = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise VerificationError(f"the model crashed the runtime while profiling (exit {proc.returncode}): {err.strip()[-300:]}",
                                reason="load_failed") from None
    if "error" in data:
        raise VerificationError(data["error"]["message"], reason=data["error"]["reason"])
    metrics = data["candidate"]
    base = data.get("baseline")
    metrics["baseline"] = {"sha256": baseline_sha, "p95_ms": base["p95_ms"]} if base and "p95_ms" in base else None
    return metrics


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
