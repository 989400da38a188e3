"""Calibration and evaluation data: ``.npz`` files with one array per model input, by input name.

A single-input model's array may be called ``x`` whatever the input's name. ``y`` holds
integer labels (classification). Every other array is kept for a user metric hook
(``--metric``), e.g. boxes for mAP or transcripts for WER.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.bundle import sha256_file
from edgekit.errors import CalibrationDataError
from edgekit.manifest import TensorSpec

__all__ = ["Dataset", "load_dataset", "split_holdout"]


@dataclass(frozen=True)
class Dataset:
    """Inputs by input name (each in the model's dtype and layout), optional labels and extra arrays."""

    x: dict[str, np.ndarray]
    y: np.ndarray | None
    sha256: str
    source: str
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(next(iter(self.x.values())).shape[0])

    def take(self, index: np.ndarray | slice) -> Dataset:
        """The examples at ``index`` (a slice or an index array)."""
        pick = lambda a: a[index]  # noqa: E731
        return Dataset({k: pick(v) for k, v in self.x.items()}, None if self.y is None else pick(self.y), self.sha256, self.source,
                       {k: pick(v) for k, v in self.extra.items() if len(v) == len(self)})

    def batches(self, size: int):
        """Feeds of at most ``size`` examples each, in order (streamed calibration)."""
        for i in range(0, len(self), size):
            yield {k: v[i : i + size] for k, v in self.x.items()}

    @property
    def first(self) -> dict[str, np.ndarray]:
        """Feeds of the first example (batch 1), for latency runs."""
        return {k: v[:1] for k, v in self.x.items()}


def _flag(role: str) -> str:
    return "--calibration" if role == "calibration" else "--eval"


def _check_input(arr: np.ndarray, spec: TensorSpec, key: str, where: str) -> np.ndarray:
    want = np.dtype(spec.dtype)
    if want.kind == "f":
        if arr.dtype.kind != "f":
            raise CalibrationDataError(f"{where}: '{key}' has dtype {arr.dtype}, but input '{spec.name}' takes {want.name}",
                                       "Convert to float32 with the model's own preprocessing (e.g. x.astype('float32') / 255).")
    elif want.kind in "iub":
        if arr.dtype.kind not in "iub":
            raise CalibrationDataError(f"{where}: '{key}' has dtype {arr.dtype}, but input '{spec.name}' takes {want.name} "
                                       "(integer inputs such as token ids, state or sample rates are fed as they are, never quantized)",
                                       f"Save it as {want.name}: numpy.savez(path, {key}=a.astype('{want.name}')).")
        if want.kind in "iu" and arr.size and (arr.min() < np.iinfo(want).min or arr.max() > np.iinfo(want).max):
            raise CalibrationDataError(f"{where}: '{key}' holds values outside {want.name}", f"Store values that fit {want.name}.")
    expected = tuple(spec.shape[1:])
    if arr.ndim != len(spec.shape) or any(e > 0 and e != a for e, a in zip(expected, arr.shape[1:])):
        raise CalibrationDataError(
            f"{where}: '{key}' has shape {tuple(arr.shape)}, but input '{spec.name}' is (N, {', '.join(map(str, expected))})",
            "Reshape the data to the model's layout, batch first.",
        )
    if arr.shape[0] == 0:
        raise CalibrationDataError(f"{where}: '{key}' is empty", "Give at least one example; a few hundred calibrate well.")
    if want.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            bad = int((~finite.reshape(len(arr), -1).all(axis=1)).sum())
            raise CalibrationDataError(f"{where}: '{key}' holds NaN or Inf in {bad} of {len(arr)} examples", "Clean or drop those examples.")
    return arr.astype(want, copy=False)


def load_dataset(
    path: str | Path,
    *,
    role: str,
    inputs: tuple[TensorSpec, ...],
    num_classes: int | None = None,
    need_labels: bool = False,
) -> Dataset:
    """Load and check an .npz against the model inputs; every problem is a CalibrationDataError."""
    p = Path(path)
    flag = _flag(role)
    where = f"{flag} {p}"
    names = [s.name for s in inputs]
    example = ", ".join(f"{'x' if len(names) == 1 else n}=..." for n in names)
    if not p.is_file():
        raise CalibrationDataError(f"{where}: no such file", f"Pass an .npz file written with numpy.savez(path, {example}).")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CalibrationDataError(f"{where}: not a readable .npz file ({e})", f"Write it with numpy.savez(path, {example}).") from None
    x: dict[str, np.ndarray] = {}
    for spec in inputs:
        key = spec.name if spec.name in arrays else ("x" if len(inputs) == 1 and "x" in arrays else None)
        if key is None:
            want = "'x'" if len(inputs) == 1 else f"'{spec.name}'"
            raise CalibrationDataError(
                f"{where}: no array named {want} for model input '{spec.name}' (found: {', '.join(arrays) or 'none'}; "
                f"the model's inputs: {', '.join(names)})",
                f"Save one array per input, by input name: numpy.savez(path, {example}).")
        x[spec.name] = _check_input(arrays[key], spec, key, where)
    counts = {k: len(v) for k, v in x.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(f"{where}: the inputs hold different numbers of examples ({counts})", "Give every input the same number of examples.")
    n = next(iter(counts.values()))
    used = set(x) | ({"x"} if len(inputs) == 1 else set())
    y = arrays.get("y") if "y" not in x else None
    if need_labels and y is None:
        raise CalibrationDataError(f"{where}: no array named 'y' with the labels", f"Save labels as numpy.savez(path, {example}, y=labels).")
    if y is not None and (need_labels or num_classes is not None):
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise CalibrationDataError(f"{where}: y must be a 1-D integer array of class ids, got {y.dtype} {tuple(y.shape)}", "Store class ids, not one-hot vectors.")
        if len(y) != n:
            raise CalibrationDataError(f"{where}: y has {len(y)} labels but the inputs have {n} examples", "Give one label per example.")
        if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
            raise CalibrationDataError(f"{where}: labels range {int(y.min())}..{int(y.max())}, outside the model's {num_classes} classes", "Check the labels match the model's outputs.")
    labels = None
    if y is not None and y.ndim == 1 and y.dtype.kind in "iu" and len(y) == n:
        labels = y.astype(np.int64)
    extra = {k: v for k, v in arrays.items() if k not in used and k != "y"}
    if y is not None and labels is None:
        extra["y"] = y
    return Dataset(x=x, y=labels, sha256=sha256_file(p), source=str(p), extra=extra)


def split_holdout(ds: Dataset, fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split calibration data into (calibration, held-out) so agreement is measured on unseen inputs."""
    n = len(ds)
    if n < 2:
        return ds, ds
    idx = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction)))
    hold, cal = idx[:k], idx[k:]
    return ds.take(cal), ds.take(hold)
