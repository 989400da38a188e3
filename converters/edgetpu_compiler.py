"""The Edge TPU compiler: run it when it is on PATH and read its op mapping.

The Edge TPU runs only models compiled by ``edgetpu_compiler``. With ``-s``/``--show_operations``
the compiler prints a table of every op of the input model, one row per (op, status), in the
format documented at https://coral.ai/docs/edgetpu/compiler/ ("Operator  Count  Status" with
statuses such as "Mapped to Edge TPU", "Operation is otherwise supported, but not mapped due to
some unspecified limitation" or "More than one subgraph is not supported"), and the totals
"Number of operations that will run on Edge TPU: N" / "... on CPU: N".
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NOT_COMPILED_NOTE", "CompiledOp", "compile_for_edgetpu", "compiler_path", "parse_compiler_log"]

NOT_COMPILED_NOTE = ("not compiled here: placement estimated; the Edge TPU runs only compiled models "
                     "(run edgetpu_compiler on the bundle's model before deploying it)")
MAPPED = "Mapped to Edge TPU"
_ROW = re.compile(r"^(?P<op>[A-Z][A-Z0-9_]*)\s+(?P<count>\d+)\s+(?P<status>\S.*?)\s*$")


@dataclass(frozen=True)
class CompiledOp:
    """One row of the compiler's operation table."""

    op: str
    count: int
    status: str

    @property
    def mapped(self) -> bool:
        """The compiler put these ops on the Edge TPU."""
        return self.status == MAPPED


def compiler_path() -> str | None:
    """Where ``edgetpu_compiler`` is, or None when it is not on PATH."""
    return shutil.which("edgetpu_compiler")


def parse_compiler_log(text: str) -> list[CompiledOp]:
    """The operation table of an ``edgetpu_compiler -s`` log (rows after the 'Operator Count Status' header)."""
    rows: list[CompiledOp] = []
    in_table = False
    for line in text.splitlines():
        if re.match(r"^\s*Operator\s+Count\s+Status\s*$", line):
            in_table = True
            continue
        if not in_table:
            continue
        m = _ROW.match(line.strip())
        if m:
            rows.append(CompiledOp(m["op"], int(m["count"]), m["status"]))
    return rows


def compile_for_edgetpu(model: Path, out_dir: Path, timeout_s: float = 600) -> tuple[Path, list[CompiledOp], str]:
    """Compile ``model`` with the compiler on PATH; the compiled file, its op table and the raw log."""
    exe = compiler_path()
    if exe is None:
        raise FileNotFoundError("edgetpu_compiler is not on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([exe, "-s", "-o", str(out_dir), str(model)], capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"edgetpu_compiler exited {proc.returncode}: {log.strip()[-500:]}")
    return out_dir / f"{model.stem}_edgetpu.tflite", parse_compiler_log(log), log
