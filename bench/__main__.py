"""Run every benchmark, each in its own process: ``python -m bench [name ...]`` (``make bench``).

Each benchmark gets a fresh interpreter so TensorFlow state and memory from one cannot skew
the next. A missed goal is reported in the summary, not turned into a failing exit status;
a benchmark that crashes is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.harness import RESULTS_DIR, ROOT, print_table

BENCHMARKS = ("convert_tflite", "mobilenet_tflite", "runtime_overhead", "convert_onnx", "mobilenet_onnx", "fleet_load", "rollout")
BENCHMARKS += ("router",)  # hybrid router overhead and breaker-open cost
BENCHMARKS += ("cloud_batching",)  # cloud server: dynamic batching vs request-by-request
BENCHMARKS += ("field_stats",)  # field statistics over a 10,000-device hour of telemetry, and writes while they run
BENCHMARKS += ("convert_memory",)  # peak RSS and wall time per recipe vs the plain converter scripts (issue 10)
BENCHMARKS += ("quantization_peers",)  # INT8 vs LiteRT/ORT PTQ, ai-edge-quantizer, NNCF, AIMET, INC; writes docs/benchmarks.md (issue 11)


def main(argv: list[str] | None = None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed, rows = [], []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(ROOT / "bench" / f"{name}.py")], cwd=ROOT)
        took = time.perf_counter() - t0
        if rc != 0:
            failed.append(name)
            rows.append([name, "FAILED", "", "", f"{took:.0f}"])
            continue
        result = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        for r in result["ratios"]:
            if r["goal"] is not None:
                rows.append([name, r["name"], f"{r['value']:.3f}", f"<= {r['goal']:g} {'met' if r['met'] else 'NOT met'}", f"{took:.0f}"])
    print()
    print_table("Goals", ["benchmark", "ratio", "value", "goal", "run s"], rows, text_columns=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
