"""What ONNX Runtime's static quantizer calibrates on, and how: the data reader, streamed chunks, the ranges cache, and
least-squared-error ranges.

- :class:`CalibrationReader`: ONNX Runtime's ``CalibrationDataReader`` over the run's feeds, one example per call, with
  the range control its strided calibration needs.
- :func:`calibration_stride`: the chunk ``CalibStridedMinMax`` folds at a time, so calibration memory does not grow
  with the sample count.
- :func:`calibration_cache_path`: recipes that calibrate the same float graph the same way share one set of ranges.
- :func:`mse_ranges`: ranges with the least expected quantization error on ONNX Runtime's own histograms
  (``quant_math.mse_range``), written as a MinMax cache ``quantize_static`` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekit.nativelog import captured_output

if TYPE_CHECKING:
    from converters.source import Feeds, SourceModel

__all__ = ["MSE_BINS", "CalibrationReader", "calibration_cache_path", "calibration_stride", "mse_ranges"]


class CalibrationReader:
    """ONNX Runtime CalibrationDataReader over feeds (one array per input), one example per call."""

    def __init__(self, feeds: Feeds | str, dtypes: dict[str, str] | np.ndarray | None = None) -> None:
        if isinstance(feeds, str):  # the single-input form CalibrationReader(name, x)
            feeds, dtypes = {feeds: np.asarray(dtypes)}, None
        assert isinstance(feeds, dict) and (dtypes is None or isinstance(dtypes, dict))
        self._feeds = {k: (v.astype(dtypes[k], copy=False) if dtypes and k in dtypes else v) for k, v in feeds.items()}
        self._n = len(next(iter(feeds.values())))
        self._i, self._end = 0, self._n

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= self._end:
            return None
        self._i += 1
        return {k: v[self._i - 1 : self._i] for k, v in self._feeds.items()}

    def __len__(self) -> int:
        return self._n

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve examples [start_index, end_index) next (ONNX Runtime's CalibStridedMinMax streaming)."""
        self._i, self._end = start_index, min(end_index, self._n)

    def rewind(self) -> None:
        self._i, self._end = 0, self._n

    def __iter__(self):  # the QDQ debugger iterates instead of calling get_next
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


def calibration_stride(n: int, source: SourceModel) -> dict[str, int]:
    """Streamed calibration: ONNX Runtime's ``CalibStridedMinMax`` runs the calibrator on ``stride`` examples at a time and
    folds each chunk into the ranges (or histograms) before the next; the stride must divide the sample count.

    (Not ``CalibMaxIntermediateOutputs``: in ONNX Runtime 1.32 MinMax drops every full chunk unmeasured and histogram
    calibrators ignore it.)
    """
    chunk = max(1, int(source.cache.get("calibration_chunk", 16)))
    if n <= chunk:
        return {}
    stride = next(s for s in range(chunk, 0, -1) if n % s == 0)
    return {"CalibStridedMinMax": stride}


MSE_BINS = 2048  # histogram bins over [-max|x|, max|x|] per tensor for the MSE range search


def mse_ranges(model: Path, reader: CalibrationReader, extra: dict, cache: Path) -> None:
    """Least-squared-error activation ranges (``quant_math.mse_range``) written as ONNX Runtime's MinMax calibration cache.

    ONNX Runtime's own histogram calibrator (``Distribution``, ``MSE_BINS`` bins of each tensor's values) runs on the
    same tensors and the same streamed chunks ``quantize_static`` would calibrate; each histogram then gives the
    range with the least expected quantization error instead of its extremes (MinMax), a percentile or a KL fit.
    """
    import tempfile

    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, create_calibrator, save_tensors_data

    from converters.quant_math import mse_range

    symmetric = bool(extra.get("ActivationSymmetric"))
    stride = extra.get("CalibStridedMinMax")
    with tempfile.TemporaryDirectory(prefix="mse-", dir=model.parent) as tmp, captured_output():
        cal = create_calibrator(model, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                calibrate_method=CalibrationMethod.Distribution, extra_options={"num_bins": MSE_BINS})
        if stride:
            for start in range(0, len(reader), stride):
                reader.set_range(start, start + stride)
                cal.collect_data(reader)
        else:
            cal.collect_data(reader)
        hists = cal.collector.histogram_dict
        del cal
    ranges = {}
    for name, (hist, edges, lo, hi, *_rest) in hists.items():
        a, b = mse_range(hist, edges, float(lo), float(hi), symmetric=symmetric)
        ranges[name] = TensorData(lowest=np.array(a, dtype=np.float32), highest=np.array(b, dtype=np.float32))
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)


def calibration_cache_path(source: SourceModel, model: Path, method: str, data: Feeds, extra: dict, act, weight) -> Path:
    """Where ONNX Runtime keeps the tensor ranges of one calibration (``quantize_static``'s ``calibration_cache_path``).

    Recipes that calibrate the same float graph (``-pre`` or ``-pre-cle``) with the same method, options and
    samples get the same ranges: the first computes them, the others read them (ONNX Runtime checks the method).
    Per-tensor vs per-channel weights, bias correction and the nodes kept in float do not change the activation
    ranges, so those recipes reuse one calibration. The key covers every input of the calibration, the samples
    by content.
    """
    import hashlib

    h = hashlib.sha256(repr((model.name, method, sorted(extra.items()), getattr(act, "name", act), getattr(weight, "name", weight))).encode())
    for name in sorted(data):
        a = np.ascontiguousarray(data[name])
        h.update(f"{name}|{a.dtype}|{a.shape}".encode())
        h.update(a.tobytes())
    return source.workdir / "onnx" / "calibration" / f"{h.hexdigest()[:24]}.json"
