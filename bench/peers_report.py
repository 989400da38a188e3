"""The peers benchmark's sides, its goals, and the section it writes into docs/benchmarks.md (bench/quantization_peers.py)."""

from __future__ import annotations

import os

from bench.harness import ROOT, Ratio

__all__ = ["BEGIN", "DOC", "END", "FROM_KERAS", "GOAL_WALL_RATIO", "HEADERS", "MAX_DROP", "PROFILE", "SIDES", "goal_ratios", "render_doc",
           "table_rows", "write_doc"]

PROFILE = "x86-64-avx512-server"
MAX_DROP = 0.3
GOAL_WALL_RATIO = 2.0
# side -> (format, venv under PEERS_CACHE or None for the project's own, label)
SIDES = {
    "edgekit": (None, None, "edgekit convert"),
    # the same ``edgekit convert --format onnx``, started from the float .onnx the ONNX peers get (no TensorFlow, no export)
    "edgekit-onnx": ("onnx", None, "edgekit convert (from the peers' float .onnx)"),
    "litert-plain": ("tflite", None, "plain LiteRT PTQ (TFLiteConverter)"),
    "aiq": ("tflite", "aiq", "ai-edge-quantizer static a8w8"),
    # what a user starting from the .keras (as edgekit and litert-plain do) runs: TFLiteConverter's float export, then aiq
    "aiq-keras": ("tflite", "aiq", "ai-edge-quantizer static a8w8, from the .keras (float export + aiq)"),
    "ort-plain": ("onnx", None, "plain ORT quantize_static"),
    "nncf": ("onnx", "nncf", "NNCF quantize"),
    "aimet": ("onnx", "aimet", "AIMET CLE + QuantSim"),
    "inc": ("onnx", "inc", "Intel Neural Compressor (ONNX)"),
    "olive": ("onnx", "olive", "Microsoft Olive static quantization"),
}
FROM_KERAS = {"litert-plain", "aiq-keras"}  # TFLite peers that start from the .keras file, as edgekit does
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- quantization_peers:begin -->", "<!-- quantization_peers:end -->"


def goal_ratios(results: list[dict]) -> list[Ratio]:
    ratios = []
    for m in results:
        by = {(r["format"], r["side"]): r for r in m["rows"] if r["status"] == "ok"}
        for fmt in ("tflite", "onnx"):
            ek = by.get((fmt, "edgekit"))
            peers = [r for (f, s), r in by.items() if f == fmt and not s.startswith("edgekit")]
            if m["accuracy"] and ek is not None:
                if m["model"] == "dsb_cnn":
                    ratios.append(Ratio(f"dsb_cnn {fmt}: edgekit drop (pt)", ek["drop_pt"], MAX_DROP, f"activations {ek['acts']}"))
                    ratios.append(Ratio(f"dsb_cnn {fmt}: edgekit activations not int8 (0 = int8)", 0.0 if ek["acts_int8"] else 1.0, 0.0))
                    if peers:
                        best = min(peers, key=lambda r: r["drop_pt"])
                        ratios.append(Ratio(f"dsb_cnn {fmt}: edgekit drop - best peer drop (pt)", ek["drop_pt"] - best["drop_pt"], 0.0,
                                            f"best peer {best['side']} {best['drop_pt']:+.1f}"))
                within = [r for r in peers if r["drop_pt"] <= MAX_DROP]
                if within:
                    fastest = min(within, key=lambda r: r["wall_s"])
                    ratios.append(Ratio(f"{m['model']} {fmt}: wall edgekit (from .keras) / fastest peer within {MAX_DROP} pt",
                                        ek["wall_s"] / fastest["wall_s"], GOAL_WALL_RATIO, f"{fastest['side']} {fastest['wall_s']:.1f} s"))
                    from_keras = [r for r in within if r["side"] in FROM_KERAS]
                    if fmt == "tflite" and from_keras and fastest not in from_keras:  # the same input file as edgekit's
                        fk = min(from_keras, key=lambda r: r["wall_s"])
                        ratios.append(Ratio(f"{m['model']} {fmt}: wall edgekit / fastest peer from the same .keras within {MAX_DROP} pt",
                                            ek["wall_s"] / fk["wall_s"], GOAL_WALL_RATIO, f"{fk['side']} {fk['wall_s']:.1f} s"))
                    same = by.get((fmt, "edgekit-onnx"))
                    if same is not None:  # the same input file as the ONNX peers
                        ratios.append(Ratio(f"{m['model']} {fmt}: wall edgekit (from the peers' float .onnx) / fastest peer within {MAX_DROP} pt",
                                            same["wall_s"] / fastest["wall_s"], GOAL_WALL_RATIO,
                                            f"{fastest['side']} {fastest['wall_s']:.1f} s; edgekit drop {same['drop_pt']:+.1f} pt"))
                else:
                    ratios.append(Ratio(f"{m['model']} {fmt}: wall edgekit / fastest peer (none within {MAX_DROP} pt)",
                                        ek["wall_s"] / min(r["wall_s"] for r in peers), None) if peers else None)
            if not m["accuracy"] and ek is not None:
                ratios.append(Ratio(f"{m['model']} {fmt}: edgekit int8 / float latency", ek["lat_ratio"], 1.0, f"activations {ek['acts']}"))
    return [r for r in ratios if r is not None]


def _status_cell(r: dict) -> str:
    return r["status"] if r["status"] != "ok" else ""


def table_rows(m: dict) -> list[list[str]]:
    out = []
    for r in m["rows"]:
        name = SIDES[r["side"]][2]
        if r["status"] != "ok":
            status = r["status"] if len(r["status"]) <= 220 else r["status"][:217] + "..."
            out.append([m["model"], r["format"], name, "-", "-", "-", "-", "-", f"{r['wall_s']:.1f}" if r.get("wall_s") else "-", status])
            continue
        acc = f"{r['top1']:.1f}%" if "top1" in r else "-"
        drop = f"{r['drop_pt']:+.1f} [{r['drop_lo']:+.1f}, {r['drop_hi']:+.1f}]" if "drop_pt" in r else "-"
        note = r.get("recipe") or ""
        if r["side"].startswith("edgekit"):
            note = f"{r.get('recipe')} ({r.get('precision')}, {r.get('attempts')} attempts)"
        out.append([m["model"], r["format"], name, r["acts"], acc, drop, f"{r['lat_ratio']:.2f}", f"{r['size_ratio']:.2f}",
                    f"{r['wall_s']:.1f}", note])
    return out


HEADERS = ["model", "format", "side", "activations", "top-1", "drop pt [95% CI]", "lat int8/float", "size int8/float", "wall s", "recipe / status"]


def render_doc(host: dict, peers_versions: dict, results: list[dict], ratios: list[Ratio], args, started: str, took: float) -> str:
    v = host["versions"]
    lines = [BEGIN, "## Quantization vs peer tools (issue 11, `bench/quantization_peers.py`)", "",
             (f"Written by `make bench` (`python bench/quantization_peers.py`), run of {started} "
             f"({took / 60:.0f} min). Machine: {host['cpu']}, {host['cpus']} cores "
             f"({', '.join(host['cpu_flags'])}), {host['mem_gib']} GiB, {host['system']}, no GPU; shared, so wall times are "
             f"indicative (load average {host['loadavg_at_start'][0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)."),
             f"Project venv: Python {host['python']}, " + ", ".join(f"{k} {v[k]}" for k in v) + ".",
             "Peers (own venvs, `scripts/peers-venv.sh`): "
             + (", ".join(f"{k} {val}" for k, val in peers_versions.items()) or "none installed") + ".", "",
             (f"Every side quantizes the same float model with the same calibration images; edgekit runs "
             f"`edgekit convert --profile {PROFILE} --max-accuracy-drop {MAX_DROP} --allow-over-budget` with a selection set as `--eval`; "
             "`edgekit convert (from the peers' float .onnx)` is the same command on the float .onnx the ONNX peers get "
             "(no TensorFlow import, no export: the same input as theirs). "
             "Every file is then scored here on a test set no side saw, with one evaluator: LiteRT (XNNPACK) for .tflite, "
             "ONNX Runtime CPU EP for .onnx, batch 1, 1 thread. Drop: float minus int8 top-1 in the same runtime, "
             "with an Agresti-Min 95% interval for the paired difference. Latency: median of "
             f"{args.rounds} interleaved rounds (each the median of a block of runs), against the float model the side started "
             "from (edgekit: its own float export). Activations: input dtype of every conv / fully-connected node in the file. "
             f"Wall: the side's whole process (Python start, imports, quantization; edgekit also its recipe search and evaluation), "
             f"median of {args.reps}. MobileNets have random weights (`weights=None`): size and latency only."), ""]
    for m in results:
        n = f"{m['test_images']} test images" if m["test_images"] else "no accuracy (random weights)"
        fl = ", ".join(f"{k} {v:.1f}%" for k, v in m["float_top1"].items())
        fl_lat = ", ".join(f"{k} {v * 1e3:.0f} µs" for k, v in m["float_lat_ms"].items())
        busy = m["latency_other_load_cores"]
        lines.append(f"- `{m['model']}` (measured {m['run_at']}, edgekit at {m['edgekit_commit']}): {n}"
                     + (f"; float top-1 {fl}" if fl else "") + f"; float latency {fl_lat}"
                     + (f"; other processes kept {busy:.1f} cores busy during its latency rounds" if busy is not None else "") + ".")
    lines += ["", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for m in results:
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table_rows(m)]
    lines += ["", "| goal | measured | target | result |", "|---|---:|---:|---|"]
    for r in ratios:
        mark = {True: "met", False: "missed", None: "-"}[r.met]
        lines.append(f"| {r.name}{f' ({r.note})' if r.note else ''} | {r.value:.3f} | {'-' if r.goal is None else f'<= {r.goal:g}'} | {mark} |")
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + text.rstrip("\n") + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    DOC.write_text(doc)
