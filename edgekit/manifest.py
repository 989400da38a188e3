"""The bundle manifest: the versioned, validated description of one converted model."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Attempt",
    "Coverage",
    "ExtraFile",
    "GoldenSet",
    "Manifest",
    "Metric",
    "OpPlacement",
    "Preprocessing",
    "Provenance",
    "QuantParams",
    "Quantization",
    "TensorSpec",
]

MANIFEST_SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class QuantParams(_Model):
    """Affine quantization of one tensor: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int


class TensorSpec(_Model):
    """One model input or output as the runtime sees it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    quantization: QuantParams | None = None


class Preprocessing(_Model):
    """How raw data becomes the model's float input: x = (raw * scale - mean) / std."""

    layout: Literal["NHWC", "NCHW", "NC", "other"] = "other"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    raw_dtype: str = "float32"


class Metric(_Model):
    """A figure together with how it was obtained."""

    value: float | None
    unit: str = ""
    status: Literal["measured", "estimated", "not_measurable"]
    note: str = ""


class Attempt(_Model):
    """One quantization recipe tried during conversion."""

    recipe: str
    description: str
    size_bytes: int | None = None
    accuracy: float | None = None
    accuracy_drop: float | None = None
    agreement: float | None = None
    within_budget: bool | None = None
    error: str | None = None
    chosen: bool = False


class Quantization(_Model):
    """The recipe that produced the model and every recipe tried."""

    recipe: str
    weights: str
    activations: str
    io_dtype: str
    per_channel: bool
    calibration_samples: int
    calibration_sha256: str
    max_accuracy_drop: float | None = None
    attempts: tuple[Attempt, ...] = ()


class OpPlacement(_Model):
    """Where one op type of the model runs on the profile's hardware."""

    op: str
    count: int
    placement: str = Field(description="Accelerator id, or 'cpu' for a fallback.")
    reason: str = ""


class Coverage(_Model):
    """The model's ops checked against the profile."""

    target: str = Field(description="The accelerator the model is meant for, or 'cpu'.")
    total_ops: int
    ops_on_target: int
    share_on_target: float
    ops: tuple[OpPlacement, ...]
    fallbacks: tuple[str, ...]
    dtype_violations: tuple[str, ...] = ()


class GoldenSet(_Model):
    """Reference inputs and outputs shipped in golden.npz."""

    file: str = "golden.npz"
    sha256: str
    count: int
    min_top1_agreement: float = Field(description="Device outputs must agree with y_host at least this often.")
    atol: float = Field(description="Largest expected absolute difference from y_host on a conforming runtime.")


class ExtraFile(_Model):
    """A file shipped next to the model (e.g. ORT's required_operators.config)."""

    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    purpose: str = ""


class Provenance(_Model):
    """Where the model came from and what built it."""

    source: str
    source_sha256: str
    tool_versions: dict[str, str]
    created_at: str
    host: dict[str, Any]


class Manifest(_Model):
    """The contents of a bundle's manifest.json."""

    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$")
    format: Literal["tflite", "onnx", "coreml"]
    profile: str
    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...] = ()
    preprocessing: Preprocessing = Preprocessing()
    quantization: Quantization
    metrics: dict[str, Metric]
    coverage: Coverage | None = None
    golden: GoldenSet
    extra_files: tuple[ExtraFile, ...] = ()
    verification: tuple[str, ...] = Field(default=(), description="What was and was not verified on the conversion host.")
    router_policy: dict[str, Any] | None = None
    provenance: Provenance
