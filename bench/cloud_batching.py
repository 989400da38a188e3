"""Dynamic batching vs request-by-request serving of the same model: 64 concurrent clients, and a 1-256 client sweep.

Both sides are a real ``edgekit cloud serve`` process on 127.0.0.1 with the same model and
settings except batching: ``--max-batch 32 --max-delay-us 2000`` vs ``--max-batch 1``
(one model call per request). The load generator holds ``--clients`` keep-alive HTTP/1.1
connections, each sending one KServe v2 ``/infer`` request (batch 1, FP32 as binary tensor data
like the router's client, or JSON ``data`` with ``--json-inputs``) after the previous answer; it is a bare asyncio socket loop (prebuilt request bytes, Content-Length
framing) so that the client's own CPU use stays small on a shared 2-core box. Each side runs
``--reps`` times, interleaved, ``--seconds`` each after a one-second warm-up; throughput is
answered requests per second, latency is per request at the client.

Models (``--model``, repeatable):

- ``mnist``: the example's cloud CNN (examples/mnist/cloud.py), conv-bound and tiny (0.1 ms a call).
- ``mlp``: a 784-4096-4096-10 float MLP generated here with seeded random weights (80 MB of
  weights: at batch 1 every call streams all of them, the case batching exists for).
- ``resnet50``: the ONNX wheel's ResNet-50 stand-in (onnx/backend/test/data/light, constant
  weights, meaningless outputs), its batch axis made free; meant for a GPU host with
  ``--provider cuda``. ``squeezenet``, ``shufflenet``, ``inception_v1``, ``densenet121``: the same zoo's.
- any path to an ``.onnx`` file with a free batch axis.

The sweep (``--sweep``, default 1,2,4,...,256 clients; ``--no-sweep`` to skip, ``--sweep-only`` for it alone):
both servers run side by side and, at each client count, each is measured in turn (the order alternating),
closed loop: the window opens once every client has had an answer and lasts at least ``--sweep-seconds`` and
until it holds two answers per client, so p99 at 256 clients rests on at least 512 answers. Its model is
``--sweep-model``: ResNet-50 with ``--provider cuda``; SqueezeNet 1.0 on CPU, because ResNet-50 takes about
0.27 s an image on a 2-core host (256 clients would wait a minute for each answer, hours for the sweep).
``--provider cuda`` where ONNX Runtime has no CUDAExecutionProvider stops with Error/Hint, exit 2.

    python bench/cloud_batching.py [--model mnist --model mlp] [--clients 64] [--seconds 8] [--reps 2] [--providers ...]
    python bench/cloud_batching.py --sweep-only [--sweep 1,2,4,8,16,32,64,128,256] [--sweep-model squeezenet]
    python bench/cloud_batching.py --sweep-only --provider cuda          # on a GPU host: ResNet-50
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time

import numpy as np

from bench.harness import ROOT, OtherLoad, Ratio, host_facts, prepare_process, print_table, ratio_rows, write_result

NAME = "cloud_batching"
GOAL = 1 / 3  # request-by-request throughput / batched throughput: batching must be >= 3x


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc (0 where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlp_model(scratch: Path, seed: int = 0) -> Path:
    """A seeded random-weight 784-4096-4096-10 MLP (softmax output) as ONNX, input 28x28x1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [784, 4096, 4096, 10]
    inits, nodes, prev = [], [helper.make_node("Flatten", ["input"], ["h0"])], "h0"
    for i in range(3):
        w = (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(dims[i + 1], np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"z{i}"]))
        prev = f"z{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [prev], [f"h{i + 1}"]))
            prev = f"h{i + 1}"
    nodes.append(helper.make_node("Softmax", [prev], ["probs"], axis=1))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 28, 28, 1])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])], inits)
    path = scratch / "mlp_4096.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


ZOO = {"resnet50": "ResNet-50", "squeezenet": "SqueezeNet 1.0", "shufflenet": "ShuffleNet", "inception_v1": "Inception v1",
       "densenet121": "DenseNet-121"}  # in the onnx wheel's backend/test/data/light (constant weights, meaningless outputs)


def zoo_model(scratch: Path, name: str) -> Path:
    """A model of the onnx wheel's light zoo with a free batch axis (batch-leading Reshape targets copy the batch)."""
    import onnx
    from onnx import numpy_helper

    src = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    m = onnx.load(src)
    weights = {i.name for i in m.graph.initializer}  # IR 3: initializers are listed as graph inputs too; leave them be
    for v in (*m.graph.input, *m.graph.output):
        dims = v.type.tensor_type.shape.dim
        if v.name not in weights and dims and dims[0].dim_value == 1:
            dims[0].dim_param = "N"
    reshape_targets = {n.input[1] for n in m.graph.node if n.op_type == "Reshape"}
    for i, init in enumerate(m.graph.initializer):
        if init.name in reshape_targets:
            shape = numpy_helper.to_array(init).copy()
            if shape.size and shape[0] == 1:
                shape[0] = 0  # 0: copy the input's batch size
                m.graph.initializer[i].CopyFrom(numpy_helper.from_array(shape, init.name))
    del m.graph.value_info[:]
    path = scratch / f"{name}_dynamic.onnx"
    onnx.save(m, path)
    return path


def resnet50_model(scratch: Path) -> Path:
    """The onnx wheel's ResNet-50 stand-in with a free batch axis."""
    return zoo_model(scratch, "resnet50")


def resolve_model(choice: str, scratch: Path) -> tuple[str, Path]:
    if choice == "mnist":
        from examples.mnist.cloud import ensure_cloud_model

        return "mnist cloud CNN", ensure_cloud_model(ROOT / ".cache" / "examples" / "mnist")["onnx"]
    if choice == "mlp":
        return "MLP 784-4096-4096-10", mlp_model(scratch)
    if choice in ZOO:
        return f"{ZOO[choice]} (onnx test data)", zoo_model(scratch, choice)
    return Path(choice).name, Path(choice)


@contextlib.contextmanager
def server(model: Path, extra: list[str]):
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-c", "import sys; from edgekit.cli import main; sys.exit(main())", "cloud", "serve", str(model), "--name", "m",
           "--port", str(port), "--no-grpc", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > end:
                raise RuntimeError("server not ready")
            time.sleep(0.2)
        meta = httpx.get(f"http://127.0.0.1:{port}/v2/models/m").json()
        yield port, meta, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _client(port: int, request: bytes, start_at: float, stop_at: float, lat: list[float], codes: dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            t0 = time.monotonic()
            if t0 >= stop_at:
                return
            writer.write(request)
            status = await reader.readuntil(b"\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            t1 = time.monotonic()
            if t0 >= start_at:
                code = int(status.split()[1])
                codes[code] = codes.get(code, 0) + 1
                if code == 200:
                    lat.append(t1 - t0)
    finally:
        writer.close()


async def _load(port: int, request: bytes, clients: int, seconds: float) -> tuple[list[float], dict[int, int], float]:
    now = time.monotonic()
    start_at, stop_at = now + 1.0, now + 1.0 + seconds
    lat: list[float] = []
    codes: dict[int, int] = {}
    await asyncio.gather(*(_client(port, request, start_at, stop_at, lat, codes) for _ in range(clients)))
    return lat, codes, seconds


def request_bytes(meta: dict, binary: bool) -> bytes:
    """One batch-1 KServe v2 /infer request for the model's first input (binary tensor data or JSON ``data``)."""
    inp = meta["inputs"][0]
    shape = [1, *[d if d > 0 else 1 for d in inp["shape"][1:]]]
    x = np.random.default_rng(0).uniform(0, 1, size=shape).astype(np.float32)
    tensor = {"name": inp["name"], "shape": shape, "datatype": "FP32"}
    if binary:  # what hybrid_router's client sends: the binary tensor extension
        tensor["parameters"] = {"binary_data_size": x.nbytes}
        header = json.dumps({"inputs": [tensor]}).encode()
        body, extra = header + x.tobytes(), f"Inference-Header-Content-Length: {len(header)}\r\n"
    else:
        tensor["data"] = x.ravel().tolist()
        body, extra = json.dumps({"inputs": [tensor]}).encode(), ""
    return (f"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n{extra}"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def run_side(port: int, meta: dict, clients: int, seconds: float, binary: bool) -> dict:
    lat, codes, secs = asyncio.run(_load(port, request_bytes(meta, binary), clients, seconds))
    lat_ms = np.asarray(lat) * 1000
    return {"rps": len(lat) / secs, "answered": len(lat), "codes": codes,
            "p50_ms": float(np.percentile(lat_ms, 50)) if len(lat_ms) else None,
            "p99_ms": float(np.percentile(lat_ms, 99)) if len(lat_ms) else None}


async def _sweep_point(port: int, request: bytes, clients: int, seconds: float, max_seconds: float) -> dict:
    """``clients`` closed-loop clients (each sends its next request when its answer is in). The window opens once every
    client has had one answer (the queue is in its steady state) and lasts at least ``seconds`` and until it holds
    two answers per client (capped at ``max_seconds``), so p99 at 256 slow clients still rests on hundreds of answers.
    Throughput and latency are of the answers that arrived in the window; requests in flight at its end finish before
    the next point starts."""
    records: list[tuple[float, float, int]] = []  # (answered at, latency s, status)
    first = asyncio.Event()
    answered_once = 0
    stop = False

    async def client() -> None:
        nonlocal answered_once
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        seen = False
        try:
            while not stop:
                t0 = time.monotonic()
                writer.write(request)
                status = await reader.readuntil(b"\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                t1 = time.monotonic()
                records.append((t1, t1 - t0, int(status.split()[1])))
                if not seen:
                    seen, answered_once = True, answered_once + 1
                    if answered_once == clients:
                        first.set()
        finally:
            writer.close()

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    t_start = time.monotonic()
    warm = True
    try:
        await asyncio.wait_for(first.wait(), max_seconds)
    except (asyncio.TimeoutError, TimeoutError):
        warm = False  # not every client had an answer within max_seconds: measured anyway, flagged
    ws = time.monotonic()
    while True:
        await asyncio.sleep(0.1)
        now = time.monotonic()
        if any(t.done() and t.exception() for t in tasks):
            break
        got = sum(1 for r in records if r[0] >= ws)
        if now - ws >= seconds and (got >= 2 * clients or now - ws >= max_seconds):
            break
    we = time.monotonic()
    stop = True
    _, pending = await asyncio.wait(tasks, timeout=max_seconds)
    for t in pending:
        t.cancel()
    failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()]
    window = [r for r in records if ws <= r[0] < we]
    lat_ms = np.asarray([r[1] for r in window if r[2] == 200]) * 1000
    return {"clients": clients, "window_s": round(we - ws, 2), "warmup_s": round(ws - t_start, 2), "steady": warm,
            "answered": int(len(lat_ms)), "non_200": sum(1 for r in window if r[2] != 200), "client_errors": [repr(e) for e in failed[:3]],
            "rps": len(lat_ms) / (we - ws), "p50_ms": float(np.percentile(lat_ms, 50)) if len(lat_ms) else None,
            "p99_ms": float(np.percentile(lat_ms, 99)) if len(lat_ms) else None}


def run_sweep(path: Path, sides: dict[str, list[str]], counts: list[int], seconds: float, max_seconds: float, binary: bool) -> tuple[dict, str]:
    """Both servers up side by side; at each client count the two are measured one after the other, the order
    alternating from one count to the next. Returns ({side: [point, ...]}, the provider the servers run on)."""
    out: dict[str, list[dict]] = {side: [] for side in sides}
    with contextlib.ExitStack() as stack:
        up = {side: stack.enter_context(server(path, extra)) for side, extra in sides.items()}
        provider = next(iter(up.values()))[1]["parameters"]["execution_provider"]
        requests = {side: request_bytes(meta, binary) for side, (_, meta, _) in up.items()}
        for i, n in enumerate(counts):
            order = list(sides) if i % 2 == 0 else list(sides)[::-1]
            for side in order:
                port, _, pid = up[side]
                c0 = proc_cpu_s(pid)
                point = asyncio.run(_sweep_point(port, requests[side], n, seconds, max_seconds))
                point["server_cores"] = round((proc_cpu_s(pid) - c0) / max(1e-9, point["window_s"] + point["warmup_s"]), 2)
                out[side].append(point)
                p99 = "-" if point["p99_ms"] is None else f"{point['p99_ms']:.1f}"
                print(f"  {n:>4} clients, {side:<18} {point['rps']:8.1f} req/s  p99 {p99:>9} ms  ({point['answered']} answers in "
                      f"{point['window_s']:g} s{'' if point['steady'] else ', not every client answered before the window'}; "
                      f"non-200 {point['non_200']})", flush=True)
    return out, provider


def _print_wide(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """A table wide enough for nine columns in a log (rich assumes 80 columns off a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(140, shutil.get_terminal_size().columns)).print(table)


def _cuda_or_exit() -> None:
    """``--provider cuda`` on an ONNX Runtime without CUDA: Error + Hint, exit 2 (never a silent CPU run)."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        print(f"Error: --provider cuda, but this ONNX Runtime ({ort.__version__}) has no CUDAExecutionProvider "
              f"(available: {', '.join(have)}).\nHint: on a GPU host install onnxruntime-gpu built for its CUDA and cuDNN "
              f"(pip install onnxruntime-gpu, in place of onnxruntime), check `nvidia-smi`; or run with --provider cpu.",
              file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="mnist, mlp, resnet50 or an .onnx path (repeatable; default: mnist and mlp).")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-delay-us", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads for both sides (default: ORT's choice).")
    ap.add_argument("--json-inputs", action="store_true", help="Send inputs as JSON 'data' instead of binary tensors.")
    ap.add_argument("--providers", default=None, help="Passed to 'edgekit cloud serve --providers' (e.g. CUDAExecutionProvider,CPUExecutionProvider).")
    ap.add_argument("--provider", choices=("cpu", "cuda"), default=None,
                    help="Shorthand: cuda = CUDAExecutionProvider then CPU (required: a clear error where ONNX Runtime lacks it), cpu = CPU only.")
    ap.add_argument("--sweep", default="1,2,4,8,16,32,64,128,256", metavar="N,N,...",
                    help="Concurrent-client counts of the sweep, batched vs request-by-request at each ('' or --no-sweep: none).")
    ap.add_argument("--no-sweep", action="store_true", help="Only the fixed --clients comparison.")
    ap.add_argument("--sweep-only", action="store_true", help="Only the sweep (e.g. on a GPU host).")
    ap.add_argument("--sweep-model", default=None,
                    help="Model of the sweep (as --model). Default: resnet50 with --provider cuda; squeezenet on CPU (ResNet-50 takes "
                         "~0.27 s an image on this 2-core host, so 256 clients would wait a minute an answer).")
    ap.add_argument("--sweep-seconds", type=float, default=4.0, help="Shortest measurement window per point (it also holds 2 answers per client).")
    ap.add_argument("--sweep-max-seconds", type=float, default=60.0, help="Longest warm-up, and longest window, per point.")
    args = ap.parse_args(argv)
    if args.provider and args.providers:
        print("Error: --provider and --providers both given.\nHint: use one (--provider cuda is CUDAExecutionProvider,CPUExecutionProvider).",
              file=sys.stderr)
        return 2
    try:
        counts = [int(x) for x in args.sweep.split(",") if x.strip()] if not args.no_sweep else []
    except ValueError:
        counts = [0]
    if any(n < 1 or n > 4096 for n in counts) or (args.sweep_only and not counts):
        print(f"Error: --sweep {args.sweep!r} is not a list of client counts from 1 to 4096.\nHint: e.g. --sweep 1,2,4,8,16,32,64,128,256.",
              file=sys.stderr)
        return 2
    if args.provider == "cuda":
        _cuda_or_exit()
    providers = {"cuda": "CUDAExecutionProvider,CPUExecutionProvider", "cpu": "CPUExecutionProvider", None: args.providers}[args.provider]
    scratch = prepare_process()
    host = host_facts()
    common = (["--providers", providers] if providers else []) + (["--threads", str(args.threads)] if args.threads else [])
    sides = {"batched": ["--max-batch", str(args.max_batch), "--max-delay-us", str(args.max_delay_us), *common],
             "request-by-request": ["--max-batch", "1", *common]}
    results: dict[str, dict] = {}
    ratios: list[Ratio] = []
    rows = []
    for choice in [] if args.sweep_only else args.model or ["mnist", "mlp"]:
        label, path = resolve_model(choice, scratch)
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        provider = None
        server_cpu = wall = 0.0
        print(f"cloud_batching: {label}: {args.reps} reps x {args.seconds:g} s per side, {args.clients} clients ...", flush=True)
        with OtherLoad() as load:
            for rep in range(args.reps):
                order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
                for side in order:
                    with server(path, sides[side]) as (port, meta, pid):
                        provider = meta["parameters"]["execution_provider"]
                        c0, t0 = proc_cpu_s(pid), time.perf_counter()
                        runs[side].append(run_side(port, meta, args.clients, args.seconds, not args.json_inputs))
                        server_cpu, wall = server_cpu + proc_cpu_s(pid) - c0, wall + time.perf_counter() - t0
        summary = {}
        for side, rs in runs.items():
            summary[side] = {"rps": float(np.median([r["rps"] for r in rs])), "p50_ms": float(np.median([r["p50_ms"] for r in rs])),
                             "p99_ms": float(np.median([r["p99_ms"] for r in rs])), "runs": rs}
            rows.append([label, side, f"{summary[side]['rps']:.0f}", f"{summary[side]['p50_ms']:.2f}", f"{summary[side]['p99_ms']:.2f}",
                         str(sum(sum(v for k, v in r["codes"].items() if k != 200) for r in rs))])
        speedup = summary["batched"]["rps"] / summary["request-by-request"]["rps"]
        ratios.append(Ratio(f"{label}: request-by-request / batched throughput", 1 / speedup, GOAL,
                            f"batching {speedup:.2f}x on {provider}"))
        server_cores = server_cpu / wall if wall else 0.0
        others = None if load.cores is None else max(0.0, load.cores - server_cores)
        results[label] = {"model": str(path), "provider": provider, "speedup": speedup, "server_cores": server_cores,
                          "other_load_cores": others, **summary}
        print(f"the server used {server_cores:.2f} cores; other processes (not this benchmark's) kept "
              + ("n/a" if others is None else f"{others:.2f}") + f" of {os.cpu_count()} cores busy")
    if rows:
        print_table(f"KServe v2 /infer, {args.clients} concurrent clients, batch-1 requests (median of {args.reps} runs)",
                    ["model", "serving", "req/s", "p50 ms", "p99 ms", "non-200"], rows, text_columns=2)
    sweep = None
    if counts:
        choice = args.sweep_model or ("resnet50" if args.provider == "cuda" else "squeezenet")
        label, path = resolve_model(choice, scratch)
        print(f"cloud_batching sweep: {label}, {', '.join(map(str, counts))} concurrent clients, batched (--max-batch {args.max_batch}) "
              f"vs request-by-request ...", flush=True)
        with OtherLoad() as load:
            points, provider = run_sweep(path, sides, counts, args.sweep_seconds, args.sweep_max_seconds, not args.json_inputs)
        where = f"GPU ({provider})" if "CUDA" in provider else f"host CPU ({host['cpu']}, {os.cpu_count()} cores), not a GPU"
        srows = []
        for b, r in zip(points["batched"], points["request-by-request"]):
            f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
            srows.append([str(b["clients"]), f"{b['rps']:.1f}", f(b["p50_ms"]), f(b["p99_ms"]), f"{r['rps']:.1f}", f(r["p50_ms"]), f(r["p99_ms"]),
                          f"{b['rps'] / r['rps']:.2f}" if r["rps"] else "-", str(b["non_200"] + r["non_200"])])
        _print_wide(f"Sweep: {label} on {where}; batch-1 KServe v2 requests, closed loop",
                    ["clients", "batched req/s", "p50 ms", "p99 ms", "req-by-req req/s", "p50 ms", "p99 ms", "throughput x", "non-200"], srows)
        print(load.describe())
        top_b, top_r = points["batched"][-1], points["request-by-request"][-1]
        if top_b["rps"] and top_r["rps"]:
            ratios.append(Ratio(f"sweep {label}, {top_b['clients']} clients: request-by-request / batched throughput", top_r["rps"] / top_b["rps"],
                                None, where))
        if top_b["p99_ms"] and top_r["p99_ms"]:
            ratios.append(Ratio(f"sweep {label}, {top_b['clients']} clients: batched / request-by-request p99", top_b["p99_ms"] / top_r["p99_ms"],
                                None, where))
        sweep = {"model": label, "model_file": str(path), "provider": provider, "where": where, "counts": counts,
                 "seconds": args.sweep_seconds, "max_seconds": args.sweep_max_seconds, "other_load_cores": load.cores, **points}
    if ratios:
        print_table("Ratios (lower is better; goal: batching >= 3x)", ["ratio", "value", "goal", "met"], ratio_rows(ratios))
    path = write_result(NAME, host, {"what": __doc__, "clients": args.clients, "seconds": args.seconds, "reps": args.reps,
                                     "max_batch": args.max_batch, "max_delay_us": args.max_delay_us, "providers": providers, "threads": args.threads,
                                     "inputs": "json" if args.json_inputs else "binary",
                                     "models": results, "sweep": sweep, "ratios": [r.to_dict() for r in ratios]})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
