"""``LocalModel``: one loaded model, float in and float out, by name (``run``) or for one input (``predict``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from edgekit.errors import InputError
from edgekit.manifest import Manifest, Preprocessing, TensorSpec

__all__ = ["LocalModel", "check_feeds"]


def check_feeds(feeds: Mapping[str, np.ndarray], inputs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """``feeds`` as arrays, checked against the model's inputs by name (every input, batch first, right rank)."""
    names = [s.name for s in inputs]
    unknown = sorted(set(feeds) - set(names))
    missing = [n for n in names if n not in feeds]
    if unknown or missing:
        raise InputError(
            f"feeds do not match the model inputs {names}" + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""),
            "Pass one array per model input, keyed by the input's name.",
        )
    out: dict[str, np.ndarray] = {}
    batch = None
    for spec in inputs:
        a = np.asarray(feeds[spec.name])
        fixed = spec.shape[1:]
        if a.ndim != len(spec.shape) or any(d > 0 and d != s for d, s in zip(fixed, a.shape[1:])):
            raise InputError(f"input '{spec.name}' has shape {tuple(a.shape)}, which does not fit the model input {spec.shape} (batch first)",
                             "Pass data in the model's layout.")
        if batch is None:
            batch = len(a)
        elif len(a) != batch:
            raise InputError(f"input '{spec.name}' has batch {len(a)}, the others {batch}", "Pass the same number of examples for every input.")
        out[spec.name] = a
    return out


class LocalModel(ABC):
    """A model loaded on this machine.

    ``run(feeds)`` takes one array per input name and returns every output by name, float for
    quantized tensors and the model's own dtype for non-float ones (token ids, state, masks).
    ``predict(x)`` is the single-input shorthand returning the first output.
    """

    runtime: str = ""
    delegate: str = "none"
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    manifest: Manifest | None = None

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output by name for a batch of inputs keyed by input name."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Outputs of the first output for a batch ``x`` of the only input (float, the model's layout)."""
        if len(self.inputs) != 1:
            raise InputError(f"this model has {len(self.inputs)} inputs {[s.name for s in self.inputs]}; predict() takes one",
                             "Use run({name: array, ...}) for multi-input models.")
        return self.run({self.inputs[0].name: x})[self.outputs[0].name]

    @property
    def preprocessing(self) -> Preprocessing:
        """The manifest's preprocessing spec (identity for a bare model file)."""
        return self.manifest.preprocessing if self.manifest is not None else Preprocessing()

    def predict_raw(self, raw: np.ndarray) -> np.ndarray:
        """Outputs for raw data (e.g. uint8 pixels): the bundle's preprocessing is applied here or in the model."""
        return self.predict(self.preprocessing.apply(raw))

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        """Outputs for one example without a batch axis."""
        return self.predict(x[None])[0]
