"""Framework-neutral quantization math in NumPy: what TFLite and ONNX Runtime do to weights, and the
data-free corrections of Nagel et al. (2019) that make int8 keep the float model's accuracy.

Nothing here imports TensorFlow or ONNX: callers pass arrays and say which axis holds the output
channels (and the input channels, for the two-layer rules). Layouts seen by callers:

    Keras Conv2D          kernel [kh, kw, cin/groups, cout]   out_axis=-1, in_axis=-2
    Keras DepthwiseConv2D kernel [kh, kw, cin, mult]          use ``depthwise_as_grouped`` first
    Keras Dense           kernel [in, out]                    out_axis=-1, in_axis=0
    ONNX Conv             W [cout, cin/groups, kh, kw]        out_axis=0,  in_axis=1, groups=group
    ONNX MatMul / Gemm    B [in, out] (transB=0)              out_axis=1,  in_axis=0

Weight quantizers (``flavor``):

* ``"tflite"``: TensorFlow's converter (tensorflow/lite/tools/optimize/quantization_utils.cc,
  ``SymmetricPerChannelQuantizeValues``; the MLIR quantizer uses the same narrow symmetric range):
  scale = max|w| / 127 per output channel, q = round_half_away_from_zero(w * (1/scale)), clamp to
  [-127, 127]. Checked bit for bit against produced models in tests/converters/test_tflite_recipes.py.
* ``"ort"``: onnxruntime.quantization (quant_utils ``compute_scale_zp`` with symmetric int8 range
  (-127, 127), ``quantize_nparray``): scale = max|w| / 127, q = round_half_to_even(w / scale).

A channel whose weights are all zero gets scale 1.0 (both tools do the same), so no division by zero.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = [
    "Flavor",
    "activation_qparams",
    "channel_ranges",
    "depthwise_as_grouped",
    "equalization_scales",
    "expected_output_shift",
    "fake_quant_activation",
    "fake_quant_weights",
    "grouped_as_depthwise",
    "measured_output_shift",
    "mse_range",
    "quantize_weights",
    "round_half_away",
    "symmetric_scales",
]

Flavor = Literal["tflite", "ort"]


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero (C's ``std::round``, TFLite's ``TfLiteRound``)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _reduce_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axis = axis % ndim
    return tuple(a for a in range(ndim) if a != axis)


def channel_ranges(w: np.ndarray, axis: int) -> np.ndarray:
    """max|w| over every axis but ``axis``: one range per channel of that axis (float64)."""
    w = np.asarray(w, dtype=np.float64)
    return np.abs(w).max(axis=_reduce_axes(w.ndim, axis))


def symmetric_scales(w: np.ndarray, axis: int | None = None, bits: int = 8) -> np.ndarray:
    """Symmetric weight scales as the tools store them (float32): max|w| / (2**(bits-1) - 1).

    ``axis`` is the output-channel axis for per-channel scales; None gives one per-tensor scale (shape ()).
    """
    w = np.asarray(w, dtype=np.float64)
    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(w).max(axis=_reduce_axes(w.ndim, axis)) if w.size else np.zeros(())
    scale = absmax / qmax
    return np.where(absmax > 0, scale, 1.0).astype(np.float32)


def _broadcast(scale: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None:
        return scale.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return scale.reshape(shape)


def quantize_weights(w: np.ndarray, axis: int | None = None, bits: int = 8, flavor: Flavor = "tflite") -> tuple[np.ndarray, np.ndarray]:
    """Integer weights and their scales, as ``flavor``'s tool computes them (see the module doc).

    Returns (q, scales): q as int8 (int16 when bits > 8) with w's shape, scales float32 per channel of ``axis``.
    """
    w32 = np.asarray(w, dtype=np.float32)
    scale = symmetric_scales(w32, axis, bits)
    s = _broadcast(scale, w32.ndim, axis)
    qmax = 2 ** (bits - 1) - 1
    if flavor == "tflite":
        inv = (np.float32(1.0) / s).astype(np.float32)
        q = round_half_away(w32 * inv)
    elif flavor == "ort":
        q = np.round(w32 / s)  # numpy rounds ties to even, as quantize_nparray does
    else:
        raise ValueError(f"unknown flavor {flavor!r}")
    q = np.clip(q, -qmax, qmax)
    return q.astype(np.int8 if bits <= 8 else np.int16), scale


def fake_quant_weights(w: np.ndarray, axis: int | None = None, bits: int = 8, flavor: Flavor = "tflite") -> np.ndarray:
    """w quantized and dequantized (float32, w's shape): what the int8 kernel effectively multiplies by."""
    q, scale = quantize_weights(w, axis, bits, flavor)
    return (q.astype(np.float32) * _broadcast(scale, q.ndim, axis)).astype(np.float32)


def activation_qparams(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """Asymmetric signed activation quantization from a calibrated [lo, hi] (both tools' min/max rule).

    The range is widened to hold 0; scale = (hi - lo) / (2**bits - 1); zero point = qmin - round(lo / scale),
    clamped to [qmin, qmax]. Returns (scale, zero_point).
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if hi - lo <= 0:
        return 1.0, 0
    scale = (hi - lo) / (qmax - qmin)
    zp = int(np.clip(qmin - round_half_away(np.float64(lo / scale)), qmin, qmax))
    return float(np.float32(scale)), zp


def fake_quant_activation(x: np.ndarray, lo: float, hi: float, bits: int = 8) -> np.ndarray:
    """x through int8 (per tensor, asymmetric, range [lo, hi]) and back to float32."""
    scale, zp = activation_qparams(lo, hi, bits)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = np.clip(round_half_away(np.asarray(x, dtype=np.float32) / np.float32(scale)) + zp, qmin, qmax)
    return ((q - zp) * np.float32(scale)).astype(np.float32)


def depthwise_as_grouped(w: np.ndarray) -> np.ndarray:
    """Keras depthwise kernel [kh, kw, C, M] -> grouped-conv layout [kh, kw, 1, C*M] (groups=C, out_axis=-1, in_axis=-2).

    Output channel c*M + m reads input channel c, the order TFLite's DEPTHWISE_CONV_2D and ONNX use.
    """
    kh, kw, c, m = w.shape
    return np.asarray(w).reshape(kh, kw, 1, c * m)


def grouped_as_depthwise(w: np.ndarray, multiplier: int) -> np.ndarray:
    """Inverse of ``depthwise_as_grouped``: [kh, kw, 1, C*M] -> [kh, kw, C, M]."""
    kh, kw, _, cm = w.shape
    return np.asarray(w).reshape(kh, kw, cm // multiplier, multiplier)


def _out_in_matrix(w: np.ndarray, out_axis: int, in_axis: int) -> np.ndarray:
    """w summed over its spatial axes as an [out, in_per_group] matrix (float64)."""
    w = np.moveaxis(np.asarray(w, dtype=np.float64), (out_axis % w.ndim, in_axis % w.ndim), (0, 1))
    return w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)


def expected_output_shift(w: np.ndarray, w_q: np.ndarray, input_mean: np.ndarray, out_axis: int, in_axis: int, groups: int = 1) -> np.ndarray:
    """E[W_q x] - E[W x] per output channel, from the per-channel mean of the layer's input (analytic bias correction).

    ``input_mean`` has one entry per input channel (all groups). Exact for dense layers and for
    convolutions without padding; with zero padding the border sees fewer taps, which
    ``measured_output_shift`` on real outputs accounts for. Subtract the result from the bias.
    """
    m = _out_in_matrix(np.asarray(w_q, dtype=np.float64) - np.asarray(w, dtype=np.float64), out_axis, in_axis)
    out_ch, in_per_group = m.shape
    mean = np.asarray(input_mean, dtype=np.float64).reshape(-1)
    if mean.size != in_per_group * groups or out_ch % groups:
        raise ValueError(f"input_mean has {mean.size} channels; the weights expect {in_per_group} x {groups} groups")
    per_group_out = out_ch // groups
    idx = (np.arange(out_ch) // per_group_out)[:, None] * in_per_group + np.arange(in_per_group)[None, :]
    return (m * mean[idx]).sum(axis=1)


def measured_output_shift(y_float: np.ndarray, y_quant: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean of (y_quant - y_float) per channel of ``axis`` over calibration outputs (empirical bias correction).

    Pass the layer's pre-activation outputs: the float model's, and those of the model with quantized
    weights (and, upstream, the already-corrected biases). Subtract the result from the bias.
    """
    d = np.asarray(y_quant, dtype=np.float64) - np.asarray(y_float, dtype=np.float64)
    return d.mean(axis=_reduce_axes(d.ndim, axis))


def equalization_scales(range_a: np.ndarray, range_b: np.ndarray, max_scale: float = 1e3) -> np.ndarray:
    """Cross-layer equalization factors s (Nagel et al. 2019, eq. 10): s_i = sqrt(r_a,i / r_b,i).

    ``range_a``: per-output-channel weight ranges of the first layer; ``range_b``: the second layer's
    ranges for the matching input channels. Dividing the first layer's channel i (weights and bias)
    by s_i and multiplying the second layer's input channel i by s_i gives both the range
    sqrt(r_a,i * r_b,i), and keeps the function when what lies between is positive-homogeneous
    (ReLU, linear, pooling; not ReLU6 or hard-swish). Channels with a zero range keep s = 1; s is
    clipped to [1/max_scale, max_scale].
    """
    ra, rb = np.asarray(range_a, dtype=np.float64), np.asarray(range_b, dtype=np.float64)
    if ra.shape != rb.shape:
        raise ValueError(f"range shapes differ: {ra.shape} vs {rb.shape}")
    ok = (ra > 0) & (rb > 0)
    s = np.ones_like(ra)
    s[ok] = np.sqrt(ra[ok] / rb[ok])
    return np.clip(s, 1.0 / max_scale, max_scale)


MSE_SHRINK_STEPS = 100  # clipping candidates between the observed range and 5% of it


def mse_range(hist: np.ndarray, edges: np.ndarray, lo: float, hi: float, bits: int = 8, symmetric: bool = False) -> tuple[float, float]:
    """The clipping range of one activation tensor with the least expected squared int8 error, from its histogram.

    Candidates shrink the observed range ``[lo, hi]`` toward zero by a factor s in [0.05, 1] (``symmetric``:
    ``[-m, m]`` with m = s * max(|lo|, |hi|)); each costs, per value, the rounding noise scale^2 / 12 of a
    uniform quantizer for values inside the range (scale = width / (2^bits - 1)) and the squared distance to
    the nearer bound for values clipped, with every value taken at its bin's centre. The least-error
    candidate wins (s = 1, the MinMax range, on ties), so a tensor without outliers keeps its full range
    and one with a long thin tail gives it up for finer steps where its values are. This is the "MSE"
    range search of TensorRT's and NVIDIA's pytorch-quantization calibrators, on ONNX Runtime's histograms.
    """
    n = np.asarray(hist, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    if n.sum() <= 0 or not hi > lo:
        return float(lo), float(hi)
    centres = (e[:-1] + e[1:]) / 2
    s = np.linspace(1.0, 0.05, MSE_SHRINK_STEPS)[:, None]
    if symmetric:
        m = max(abs(lo), abs(hi))
        a, b = -s * m, s * m
    else:
        a, b = np.minimum(s * lo, 0.0), np.maximum(s * hi, 0.0)  # the range always holds zero (both quantizers keep it exact)
    scale = (b - a) / (2**bits - 1)
    clipped = np.clip(centres[None, :], a, b)
    inside = centres[None, :] == clipped
    err = (n[None, :] * np.where(inside, scale**2 / 12, (centres[None, :] - clipped) ** 2)).sum(axis=1)
    i = int(np.argmin(err))  # the first minimum: the widest range among equals
    return float(a[i, 0]), float(b[i, 0])
