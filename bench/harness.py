"""What every benchmark script shares: process setup, host facts, the ratio table, the JSON file.

Benchmarks are not tests: they measure two things side by side in one process, print a table
of ratios against the goals from the issue, and write ``bench/results/<name>.json``
(git-ignored). A goal that is missed is reported, never raised.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

__all__ = ["RESULTS_DIR", "ROOT", "OtherLoad", "Ratio", "host_facts", "median", "prepare_process", "print_table", "quiet", "ratio_rows",
           "write_result"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
_DISTS = ("edgekit", "tensorflow-cpu", "tensorflow", "keras", "ai-edge-litert", "onnxruntime", "numpy")


def prepare_process() -> Path:
    """Quiet TensorFlow and give edgekit a throw-away signing key; returns a scratch directory.

    Must run before TensorFlow or edgekit's signing is imported. The scratch directory (and the
    key in it) is removed when the process exits, so nothing lands in the user's home.
    """
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    scratch = Path(tempfile.mkdtemp(prefix="edgekit-bench-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    os.environ["EDGEKIT_SIGNING_KEY"] = str(scratch / "signing_key.pem")
    return scratch


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence prints, warnings and native log lines (TensorFlow's converter is chatty)."""
    from edgekit.nativelog import captured_output

    with warnings.catch_warnings(), captured_output():
        warnings.simplefilter("ignore")
        yield


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16") if f in have]
    return []


def _mem_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def host_facts() -> dict:
    """Date, machine and package versions, recorded with every result."""
    versions = {}
    for dist in _DISTS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpus": os.cpu_count(),
        "mem_gib": _mem_gib(),
        "loadavg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.machine()}",
        "versions": versions,
    }


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How many cores other processes kept busy while a block ran: the machine is shared.

    ``with OtherLoad() as load: ...`` then ``load.cores`` (None where /proc/stat is missing).
    """

    def __enter__(self) -> OtherLoad:
        self._busy, self._own, self._wall = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        self.cores: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _busy_cpu_seconds()
        if busy is None or self._busy is None:
            return
        own = time.process_time() - self._own
        self.cores = max(0.0, (busy - self._busy - own) / (time.perf_counter() - self._wall))

    def describe(self) -> str:
        """One line for the report."""
        if self.cores is None:
            return "load from other processes: not measurable here"
        warn = " (figures disturbed: rerun on a quiet machine)" if self.cores > 0.25 else ""
        return f"other processes kept {self.cores:.2f} of {os.cpu_count()} cores busy during the timed runs{warn}"


def median(values: Sequence[float]) -> float:
    """Median of the repetitions."""
    return float(statistics.median(values))


@dataclass(frozen=True)
class Ratio:
    """A measured ratio and the issue's goal for it (lower is better)."""

    name: str
    value: float
    goal: float | None
    note: str = ""

    @property
    def met(self) -> bool | None:
        """Whether the goal is met; None when there is no goal."""
        return None if self.goal is None else self.value <= self.goal

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {**asdict(self), "met": self.met}


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], *, text_columns: int = 1) -> None:
    """A rich table when rich is installed (edgekit depends on it), plain columns otherwise.

    The first ``text_columns`` columns are left-aligned, the rest (numbers) right-aligned.
    """
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
        print(f"\n{title}")
        for row in (headers, *rows):
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        return
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < text_columns else "right")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    Console().print(table)


def ratio_rows(ratios: Sequence[Ratio]) -> list[list[str]]:
    """Table rows: name, value, goal, met."""
    mark = {True: "yes", False: "NO", None: "-"}
    return [[r.name, f"{r.value:.3f}", "-" if r.goal is None else f"<= {r.goal:g}", mark[r.met]] for r in ratios]


def write_result(name: str, host: dict, payload: dict) -> Path:
    """Write ``bench/results/<name>.json``: the host facts (taken at the start), then the figures."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    host = {**host, "loadavg_at_end": list(os.getloadavg())}  # the machine is shared: say how busy it was
    path.write_text(json.dumps({"benchmark": name, "host": host, **payload}, indent=2) + "\n")
    return path


def build_mobilenet_v2(scratch: Path, seed: int = 0):
    """Save a seeded random-weight MobileNetV2 (224x224, no downloads) and load it the way ``edgekit convert`` does."""
    import keras

    from converters.source import load_source

    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    path = scratch / "mobilenet_v2.keras"
    model.save(path)
    work = scratch / "work"
    work.mkdir()
    with quiet():
        return load_source(path, work)
