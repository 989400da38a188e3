"""Memory the conversion itself may use (``--max-memory``) and the activation sizes that decide it.

Calibration streams: ONNX Runtime's calibrators run on ``CalibStridedMinMax`` chunks, folding
each chunk of intermediate outputs into the ranges/histograms before the next, and the chunk is
sized so that chunk x (activations per example) fits the budget. A recipe whose smallest
chunk would still not fit is skipped with the reason recorded, rather than killed by the OS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from converters.base import Converter, Recipe

if TYPE_CHECKING:
    from converters.pipeline import RunContext
    from converters.source import SourceModel

__all__ = ["MemoryPlan", "current_rss_bytes", "default_max_memory_mb", "release_freed_memory", "source_activation_bytes", "total_ram_bytes"]

MAX_CHUNK = 16  # examples per calibration chunk, at most
# Intermediate outputs held per chunk, at most: streaming costs ORT only a range merge per chunk,
# while holding more grew EfficientNetB0's conversion to 4.4 GB with 19 samples.
CHUNK_BYTES = 512e6


def total_ram_bytes() -> int:
    """Physical memory of this machine (0 when unknown)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def default_max_memory_mb() -> float:
    """Half the machine's RAM, in MB (4096 when it cannot be read)."""
    ram = total_ram_bytes()
    return ram / 2 / 1e6 if ram else 4096.0


def current_rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so one recipe's peak does not become the next one's floor."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def source_activation_bytes(source: SourceModel) -> int:
    """Bytes of every intermediate float tensor of one example through the source (0 when unknown)."""
    if "activation_bytes" in source.cache:
        return source.cache["activation_bytes"]
    total = 0
    try:
        if source.onnx_path is not None:
            import numpy as np
            import onnx

            m = onnx.shape_inference.infer_shapes(onnx.load(str(source.onnx_path), load_external_data=False))
            for v in [*m.graph.value_info, *m.graph.output]:
                dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
                if dims and all(dims):
                    total += int(np.prod(dims)) * 4
        elif source.keras_model is not None:
            for layer in source.keras_model.layers:
                for t in (layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]):
                    n = 1
                    for d in t.shape[1:]:
                        n *= int(d or 1)
                    total += n * 4
    except Exception:  # an estimate only; unknown means no memory-based skipping
        total = 0
    source.cache["activation_bytes"] = total
    return total


@dataclass
class MemoryPlan:
    """The conversion's memory budget and the calibration chunk it allows."""

    max_memory_mb: float

    def chunk(self, source: SourceModel) -> int:
        """Examples whose intermediate outputs may be held at once (1..MAX_CHUNK)."""
        act = source_activation_bytes(source)
        if act <= 0:
            return MAX_CHUNK
        free = self.max_memory_mb * 1e6 - current_rss_bytes()
        # x3: ORT's augmented graph outputs every tensor, about three per Keras layer output (BN, swish...)
        return max(1, min(MAX_CHUNK, int(free / (3 * act)), int(CHUNK_BYTES / (3 * act))))

    def skip_reason(self, ctx: RunContext, conv: Converter, recipe: Recipe) -> str | None:
        """Why ``recipe`` would not fit ``--max-memory`` (None: it fits)."""
        act = source_activation_bytes(ctx.source)
        if act <= 0:
            return None
        per_example = 3 * act  # the chunk's intermediate outputs, the calibrator's copy, the running model
        if recipe.options.keep_sensitive:
            per_example = 4 * act  # the float and the QDQ graph's activations, side by side
        child = conv.child_process_bytes(ctx.source, recipe)  # a conversion in a child process: both held at once
        need = current_rss_bytes() + per_example + ctx.source.param_count * 8 + child
        if need > self.max_memory_mb * 1e6:
            return (f"needs about {need / 1e6:.0f} MB for one calibration example at a time"
                    f"{f' (its conversion process {child / 1e6:.0f} MB of it)' if child else ''}, over --max-memory "
                    f"{self.max_memory_mb:.0f} MB")
        return None
