"""Keep native libraries' log lines (TensorFlow, LiteRT) off the user's terminal."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

__all__ = ["captured_stderr"]


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Silence native-library chatter on fd 2; the captured text is available after the block."""
    sink: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))
