"""Keep native libraries' log lines (TensorFlow, LiteRT, ONNX Runtime tools) off the user's terminal."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["captured_output"]


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Capture fd 1 and fd 2 and Python's own stdout/stderr; the text is in the list after the block."""
    sink: list[str] = []
    py_out, py_err = io.StringIO(), io.StringIO()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            with contextlib.redirect_stdout(py_out), contextlib.redirect_stderr(py_err):
                yield sink
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace") + py_out.getvalue() + py_err.getvalue())
