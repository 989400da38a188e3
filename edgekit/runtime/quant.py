"""Affine int8/uint8/int16 quantization of one tensor, as LiteRT does it (round half away from zero)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekit.manifest import TensorSpec

__all__ = ["Affine", "dequantize", "quantize"]


@dataclass(frozen=True)
class Affine:
    """A tensor's quantization, precomputed once so the per-call path does no lookups."""

    dtype: np.dtype
    scale: float
    zero_point: int
    lo: int
    hi: int

    @classmethod
    def of(cls, spec: TensorSpec) -> Affine | None:
        """The affine parameters of a quantized integer tensor; None for float or unquantized tensors."""
        dtype = np.dtype(spec.dtype)
        if spec.quantization is None or dtype.kind == "f":
            return None
        info = np.iinfo(dtype)
        return cls(dtype, spec.quantization.scale, spec.quantization.zero_point, int(info.min), int(info.max))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float to integers (saturating)."""
        # LiteRT rounds half away from zero (std::round). In float64 so that v + 0.5 cannot round up
        # (in float32, 0.49999997 + 0.5 == 1.0).
        v = np.asarray(x, dtype=np.float64) / self.scale
        return np.clip(np.trunc(v + np.copysign(0.5, v)) + self.zero_point, self.lo, self.hi).astype(self.dtype)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zp32", np.float32(self.zero_point))
        object.__setattr__(self, "_scale32", np.float32(self.scale))

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Integers back to float32."""
        return (q.astype(np.float32) - self._zp32) * self._scale32


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float to the tensor's integer dtype with its scale/zero point (round half away from zero, saturate)."""
    a = Affine.of(spec)
    return np.asarray(x, dtype=np.dtype(spec.dtype)) if a is None else a.quantize(x)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The tensor's integer values back to float32."""
    a = Affine.of(spec)
    return q.astype(np.float32, copy=False) if a is None or q.dtype.kind == "f" else a.dequantize(q)
