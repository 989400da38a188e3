"""``edgekit.convert``: the Python API over the same pipeline as ``edgekit convert``.

``model`` is a path (.keras/.h5/.onnx/.pt2 or a SavedModel directory), a loaded Keras model,
or a ``torch.nn.Module`` (with ``example_inputs``, batch 1). Options are ConvertOptions'
fields (``formats``, ``task``, ``metric`` (a callable or "module:function"), ``min_sqnr_db``,
``input_shapes``, ...).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from converters.pipeline import ConvertOptions, RunReport, run_convert

__all__ = ["convert"]


def _is_torch_module(obj: Any) -> bool:
    return any(c.__module__.startswith("torch.nn") and c.__name__ == "Module" for c in type(obj).__mro__)


def _is_keras_model(obj: Any) -> bool:
    return any(c.__module__.startswith("keras") and c.__name__ in ("Model", "Functional", "Sequential") for c in type(obj).__mro__)


def convert(model: Any, example_inputs: tuple[Any, ...] | None = None, *, profiles: str | tuple[str, ...] | list[str],
            calibration: str | os.PathLike[str], out: str | os.PathLike[str] = "bundles", name: str | None = None, **options: Any) -> RunReport:
    """Convert ``model`` for every profile; returns the run report (bundles are written under ``out``)."""
    progress = options.pop("progress", lambda _m: None)
    profiles = (profiles,) if isinstance(profiles, str) else tuple(profiles)
    if isinstance(options.get("formats"), str):
        options["formats"] = (options["formats"],)
    source = None
    if _is_torch_module(model):
        from converters.torch_source import module_source

        label = name or type(model).__name__.lower()
        source = module_source(model, tuple(example_inputs or ()), Path("."), label)
        path = Path(f"{label}.pt2")
    elif _is_keras_model(model):
        from converters.source import import_tensorflow, keras_source

        label = name or (model.name or "model")
        digest = hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()
        source = keras_source(model, Path(f"{label}.keras"), Path("."), import_tensorflow(), digest)
        path = Path(f"{label}.keras")
    else:
        path = Path(model)
    opts = ConvertOptions(model=path, profiles=profiles, calibration=Path(calibration), out=Path(out), name=name, source_model=source, **options)
    return run_convert(opts, progress)
