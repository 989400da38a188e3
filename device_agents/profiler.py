"""Profiling on the real hardware, in a child process: ``python -m device_agents.profiler``.

The child loads the candidate with :func:`edgekit.runtime.load` (the runtime and delegate the
device really has), then measures: load time; warm-up runs; golden-set agreement
(:func:`edgekit.golden.check_golden`); peak RSS *of the model*: the child's peak resident set
(``getrusage`` high-water mark) minus its RSS (psutil) after the runtime was imported but before
the model was loaded, read before the baseline is loaded. Then it loads the currently active model
(the baseline) in the same process and times both in ``rounds`` interleaved rounds (candidate,
baseline, candidate, ...): ``runs`` batch-1 predictions of the golden inputs per model, split over
the rounds, each model stopping once its ``budget_s`` has passed (at least one prediction per
model). Each round gives a p95; the reported ``p95_ms`` is the median of the rounds
(``p95_rounds_ms``), so one noisy stretch (another process, a frequency step) does not decide a
``max_p95_ratio`` gate; p50/p99 are over all the candidate's predictions. Rounds split the run count
and the budget, they do not multiply them: the worst case stays two budgets plus imports. A child
keeps the agent's own memory out of the figure and survives a model that crashes the runtime
(reported ``load_failed``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.childproc import child_env, end_with_parent
from edgekit.errors import VerificationError

__all__ = ["ProfileSettings", "profile_candidate"]


@dataclass(frozen=True)
class ProfileSettings:
    """How long to profile (defaults: 200 runs or 10 s per model, in 5 rounds; 10 warm-up runs)."""

    runs: int = 200
    budget_s: float = 10.0
    warmup: int = 10
    threads: int | None = None
    rounds: int = 5


def _timing_source() -> dict[str, str]:
    """``measured`` on real hardware; ``emulated`` + a note under qemu-user, where latencies mean nothing."""
    from edgekit.cpuinfo import EMULATED_TIMING_NOTE, read_cpu

    cpu = read_cpu()
    if cpu.emulation:
        return {"timing_source": "emulated", "timing_note": EMULATED_TIMING_NOTE}
    return {"timing_source": "measured"}


@dataclass
class _Timed:
    """A loaded, warmed-up model being timed: one prediction per ``call(i)``, the seconds of each round."""

    call: Callable[[int], Any]
    budget_s: float
    rounds: list[list[float]] = field(default_factory=list)
    spent_s: float = 0.0

    def round(self, runs: int) -> None:
        """Time up to ``runs`` predictions, stopping when the model's whole budget is spent (never fewer than one in all)."""
        times: list[float] = []
        offset = sum(len(r) for r in self.rounds)
        while len(times) < runs and (self.spent_s < self.budget_s or (not times and not self.rounds)):
            t = time.perf_counter()
            self.call(offset + len(times))
            dt = time.perf_counter() - t
            times.append(dt)
            self.spent_s += dt
        if times:
            self.rounds.append(times)

    def p95_rounds_ms(self) -> list[float]:
        import numpy as np

        return [float(np.percentile(np.asarray(r) * 1e3, 95)) for r in self.rounds]


def _split(runs: int, rounds: int) -> list[int]:
    """``runs`` predictions over at most ``rounds`` rounds, as evenly as possible (the total stays ``runs``)."""
    rounds = max(1, min(rounds, runs))
    return [runs // rounds + (1 if i < runs % rounds else 0) for i in range(rounds)]


def _load(bundle_dir: Path, s: ProfileSettings) -> tuple[Any, Any, Callable[[int], Any], float]:
    """Open, load and warm up one bundle: (bundle, model, call, load_ms)."""
    from edgekit.bundle import open_bundle
    from edgekit.golden import golden_feeds
    from edgekit.runtime import load

    bundle = open_bundle(bundle_dir)
    t0 = time.perf_counter()
    model = load(bundle_dir, num_threads=s.threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    feeds = golden_feeds(bundle.golden(), bundle.manifest)  # every input by name (x, x_1, ... in golden.npz)
    n = len(next(iter(feeds.values())))
    if len(feeds) == 1:  # the single-input call path apps use
        (xs,) = feeds.values()
        call = lambda i: model.predict(xs[i % n][None])  # noqa: E731
    else:
        call = lambda i: model.run({k: v[i % n : i % n + 1] for k, v in feeds.items()})  # noqa: E731
    for i in range(s.warmup):
        call(i)
    return bundle, model, call, load_ms


def _candidate(bundle_dir: Path, s: ProfileSettings) -> tuple[dict, _Timed]:
    """Load and warm up the candidate; its load time, golden agreement and model peak RSS, and its timer."""
    import resource

    import psutil

    from edgekit.bundle import open_bundle
    from edgekit.golden import check_golden
    from edgekit.runtime import load_model_file

    with contextlib.suppress(Exception):  # import the runtime first so its libraries are not counted as the model
        load_model_file(Path("/nonexistent"), open_bundle(bundle_dir).manifest.format)
    rss_before = psutil.Process().memory_info().rss
    bundle, model, call, load_ms = _load(bundle_dir, s)
    g = check_golden(model, bundle)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; read before the baseline loads
    out = {"load_ms": load_ms, "warmup_runs": s.warmup, "runtime": model.runtime, "delegate": model.delegate,
           "golden_top1_agreement": g.top1_agreement, "golden_max_abs_err": g.max_abs_err, "golden_passed": g.passed,
           "golden_min_top1_agreement": g.min_top1_agreement, "golden_atol": g.atol, "golden_count": g.count,
           "peak_rss_mb": max(0, peak - rss_before) / 2**20, "process_peak_rss_mb": peak / 2**20,
           "rss_method": "child process: getrusage peak minus RSS before load, before the baseline is loaded",
           **_timing_source()}
    return out, _Timed(call, s.budget_s)


def _child(argv: list[str]) -> int:
    end_with_parent()  # a SIGKILLed agent must not leave a profiler running
    import numpy as np

    ap = argparse.ArgumentParser(prog="python -m device_agents.profiler")
    ap.add_argument("candidate", type=Path)
    ap.add_argument("--baseline", type=Path)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--budget-s", type=float, default=10.0)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    s = ProfileSettings(max(1, a.runs), a.budget_s, a.warmup, a.threads, max(1, a.rounds))
    from edgekit.errors import EdgekitError

    try:
        result, cand = _candidate(a.candidate, s)
    except EdgekitError as e:
        print(json.dumps({"error": {"reason": "load_failed", "message": e.message}}))
        return 3
    base: _Timed | None = None
    baseline: dict | None = None
    if a.baseline is not None:
        try:
            base = _Timed(_load(a.baseline, s)[2], s.budget_s)
        except EdgekitError as e:  # the active model no longer loads: no baseline, said so
            baseline = {"error": e.message}
    for runs in _split(s.runs, s.rounds):  # interleaved: a slow stretch of the machine hits both models alike
        cand.round(runs)
        if base is not None:
            base.round(runs)
    ms = np.concatenate([np.asarray(r) for r in cand.rounds]) * 1e3
    rounds = cand.p95_rounds_ms()
    result |= {"runs": int(ms.size), "rounds": len(rounds), "p95_rounds_ms": rounds, "p95_ms": float(statistics.median(rounds)),
               "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
    if base is not None:
        b_rounds = base.p95_rounds_ms()
        baseline = {"p95_ms": float(statistics.median(b_rounds)), "p95_rounds_ms": b_rounds}
    print(json.dumps({"candidate": result, "baseline": baseline}))
    return 0


def profile_candidate(candidate: Path, baseline: Path | None, baseline_sha: str | None, s: ProfileSettings,
                      should_stop=lambda: False) -> dict:
    """Run the profiler child; the ``profiled`` report's metrics. Raises VerificationError(load_failed) or InterruptedError."""
    cmd = [sys.executable, "-m", "device_agents.profiler", str(candidate), "--runs", str(s.runs), "--budget-s", str(s.budget_s),
           "--warmup", str(s.warmup), "--rounds", str(s.rounds)]
    if baseline is not None:
        cmd += ["--baseline", str(baseline)]
    if s.threads:
        cmd += ["--threads", str(s.threads)]
    env = child_env({**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))})
    out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files, not pipes: a chatty runtime cannot block it
    proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, env=env)  # the child ends with this process
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
    metrics["baseline"] = ({"sha256": baseline_sha, "p95_ms": base["p95_ms"], "p95_rounds_ms": base.get("p95_rounds_ms")}
                           if base and "p95_ms" in base else None)
    return metrics


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
