"""Calibration and evaluation data: ``.npz`` files with ``x`` (and ``y`` for evaluation)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.bundle import sha256_file
from edgekit.errors import CalibrationDataError

__all__ = ["Dataset", "load_dataset", "split_holdout"]


@dataclass(frozen=True)
class Dataset:
    """Inputs (float32, the model's layout) and optional integer labels."""

    x: np.ndarray
    y: np.ndarray | None
    sha256: str
    source: str

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_dataset(
    path: str | Path,
    *,
    role: str,
    input_shape: tuple[int, ...],
    num_classes: int | None = None,
    need_labels: bool = False,
) -> Dataset:
    """Load and check an .npz against the model input; every problem is a CalibrationDataError."""
    p = Path(path)
    flag = "--calibration" if role == "calibration" else "--eval"
    if not p.is_file():
        raise CalibrationDataError(f"{flag} {p}: no such file", "Pass an .npz file written with numpy.savez(path, x=...).")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CalibrationDataError(f"{flag} {p}: not a readable .npz file ({e})", "Write it with numpy.savez(path, x=..., y=...).") from None
    if "x" not in arrays:
        raise CalibrationDataError(f"{flag} {p}: no array named 'x' (found: {', '.join(arrays) or 'none'})", "Save the inputs as numpy.savez(path, x=inputs).")
    x = arrays["x"]
    if x.dtype.kind != "f":
        raise CalibrationDataError(
            f"{flag} {p}: x has dtype {x.dtype}, but the model takes float32",
            "Convert to float32 with the model's own preprocessing (e.g. x.astype('float32') / 255).",
        )
    expected = tuple(input_shape[1:])
    if x.ndim != len(input_shape) or tuple(x.shape[1:]) != expected:
        raise CalibrationDataError(
            f"{flag} {p}: x has shape {tuple(x.shape)}, but the model input is (N, {', '.join(map(str, expected))})",
            "Reshape the data to the model's layout, batch first.",
        )
    if x.shape[0] == 0:
        raise CalibrationDataError(f"{flag} {p}: x is empty", "Give at least one example; a few hundred calibrate well.")
    finite = np.isfinite(x)
    if not finite.all():
        bad = int((~finite.reshape(len(x), -1).all(axis=1)).sum())
        raise CalibrationDataError(f"{flag} {p}: x holds NaN or Inf in {bad} of {len(x)} examples", "Clean or drop those examples.")
    y = arrays.get("y")
    if need_labels and y is None:
        raise CalibrationDataError(f"{flag} {p}: no array named 'y' with the labels", "Save labels as numpy.savez(path, x=inputs, y=labels).")
    if y is not None:
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise CalibrationDataError(f"{flag} {p}: y must be a 1-D integer array of class ids, got {y.dtype} {tuple(y.shape)}", "Store class ids, not one-hot vectors.")
        if len(y) != len(x):
            raise CalibrationDataError(f"{flag} {p}: y has {len(y)} labels but x has {len(x)} examples", "Give one label per example.")
        if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
            raise CalibrationDataError(f"{flag} {p}: labels range {int(y.min())}..{int(y.max())}, outside the model's {num_classes} classes", "Check the labels match the model's outputs.")
    return Dataset(x=x.astype(np.float32, copy=False), y=None if y is None else y.astype(np.int64), sha256=sha256_file(p), source=str(p))


def split_holdout(ds: Dataset, fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split calibration data into (calibration, held-out) so agreement is measured on unseen inputs."""
    n = len(ds)
    if n < 2:
        return ds, ds
    idx = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction)))
    hold, cal = idx[:k], idx[k:]
    pick = lambda ix: Dataset(ds.x[ix], None if ds.y is None else ds.y[ix], ds.sha256, ds.source)  # noqa: E731
    return pick(cal), pick(hold)
