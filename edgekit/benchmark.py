"""Latency of a bundle on this machine: the numbers behind ``edgekit bench``."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from edgekit.runtime import timed_load

__all__ = ["benchmark_bundle"]


def benchmark_bundle(bundle: str | os.PathLike[str], *, runs: int = 200, warmup: int = 10, threads: int | None = None) -> dict:
    """Load the bundle, feed it its own golden inputs, and time ``runs`` batch-1 predictions."""
    from edgekit.bundle import open_bundle

    model, load_s = timed_load(bundle, num_threads=threads)
    golden = open_bundle(bundle).golden()
    xs = golden["x"]
    for i in range(warmup):
        model.predict(xs[i % len(xs)][None])
    times = np.empty(runs)
    for i in range(runs):
        x = xs[i % len(xs)][None]
        t0 = time.perf_counter()
        model.predict(x)
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    m = model.manifest
    assert m is not None
    return {
        "bundle": str(Path(bundle)),
        "name": m.name,
        "version": m.version,
        "format": m.format,
        "runtime": f"{model.runtime}+{model.delegate}",
        "threads": threads,
        "host": f"{platform.machine()} {os.cpu_count()} cpus",
        "runs": runs,
        "load_ms": load_s * 1e3,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }
