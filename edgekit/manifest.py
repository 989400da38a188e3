"""The bundle manifest: the versioned, validated description of one converted model."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "CONFIDENCE_OUTPUT_METRIC",
    "Attempt",
    "ConfidenceHistogram",
    "Coverage",
    "EvaluationSplit",
    "ExtraFile",
    "GoldenSet",
    "Manifest",
    "Metric",
    "OpPlacement",
    "Preprocessing",
    "Provenance",
    "QuantParams",
    "Quantization",
    "RouterPolicy",
    "RouterTarget",
    "SplitScore",
    "TensorSpec",
]

MANIFEST_SCHEMA_VERSION = 1
CONFIDENCE_OUTPUT_METRIC = "confidence_output"
"""``metrics[CONFIDENCE_OUTPUT_METRIC].value`` is the index of the output holding the pre-softmax logits (the router's
confidence signal); output 0 stays the app's. A metric, not a new key: agents older than it refuse unknown keys."""


class _Model(BaseModel):
    """What the device acts on (tensors, files, golden set, policy): an unknown key is refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class _Report(BaseModel):
    """What the device only reads or shows (figures, attempts, coverage, provenance): unknown keys are ignored,
    so a newer converter's extra report fields never make an agent refuse the bundle. The signature covers
    the manifest's bytes, so an ignored key is still signed; nothing an agent acts on lives in these models."""

    model_config = ConfigDict(frozen=True, extra="ignore")


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
    """How raw data becomes the model's float input: x = (raw * scale - mean) / std.

    ``mean``/``std`` hold one value, or one per channel (the last axis for NHWC, axis 1 for
    NCHW). ``embedded``: the model file already does this and takes ``raw_dtype`` input.
    """

    layout: Literal["NHWC", "NCHW", "NC", "other"] = "other"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    raw_dtype: str = "float32"
    embedded: bool = False

    def _broadcast(self, values: tuple[float, ...], ndim: int) -> np.ndarray:
        v = np.asarray(values, dtype=np.float32)
        if v.size == 1:
            return v.reshape(())
        if self.layout == "NCHW":
            return v.reshape((1, -1) + (1,) * (ndim - 2))
        return v  # channels last

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Raw data to the model's float input."""
        raw = np.asarray(raw)
        return ((raw.astype(np.float32) * np.float32(self.scale) - self._broadcast(self.mean, raw.ndim))
                / self._broadcast(self.std, raw.ndim)).astype(np.float32)

    def invert(self, x: np.ndarray) -> np.ndarray:
        """The model's float input back to raw data, rounded and clipped to ``raw_dtype``."""
        x = np.asarray(x, dtype=np.float32)
        raw = (x * self._broadcast(self.std, x.ndim) + self._broadcast(self.mean, x.ndim)) / np.float32(self.scale)
        dtype = np.dtype(self.raw_dtype)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            return np.clip(np.rint(raw), info.min, info.max).astype(dtype)
        return raw.astype(dtype)


class Metric(_Report):
    """A figure together with how it was obtained."""

    value: float | None
    unit: str = ""
    status: Literal["measured", "estimated", "not_measurable"]
    note: str = ""


class SplitScore(_Report):
    """An attempt's figures on one split of the evaluation data (see ``EvaluationSplit``)."""

    split: Literal["selection", "test", "same"] = Field(description="'same': chosen and measured on the same examples (optimistic).")
    examples: int = Field(ge=0)
    accuracy: float | None = None
    accuracy_ci95: tuple[float, float] | None = Field(default=None, description="Wilson 95% interval of the accuracy, %.")
    accuracy_drop: float | None = None
    accuracy_drop_ci95: tuple[float, float] | None = Field(default=None, description="Agresti-Min 95% interval of the paired drop vs float, points.")
    agreement: float | None = None
    agreement_ci95: tuple[float, float] | None = None
    min_sqnr_db: float | None = None
    metric: float | None = None
    within_budget: bool | None = None


class Attempt(_Report):
    """One quantization recipe tried during conversion.

    The flat figures (``accuracy``, ``accuracy_drop``, ``agreement``, ``min_sqnr_db``, ``metric``) are the
    reported ones, on the test split; ``within_budget`` is the search's decision, on the selection split.
    Fields after ``chosen`` arrived with issue 11 and are absent from older manifests.
    """

    recipe: str
    description: str
    size_bytes: int | None = None
    accuracy: float | None = None
    accuracy_drop: float | None = None
    agreement: float | None = None
    min_sqnr_db: float | None = Field(default=None, description="Lowest per-output SQNR against the float model, dB.")
    metric: float | None = Field(default=None, description="The --metric hook's score of this attempt.")
    within_budget: bool | None = None
    error: str | None = None
    skipped: str | None = Field(default=None, description="Why the recipe was not run (e.g. over --max-memory, or the search's early stop).")
    chosen: bool = False
    speed_class: str | None = Field(default=None, description="'int8', 'mixed' (float islands) or 'int16x8': the search's speed order.")
    latency_ms_p50: float | None = Field(default=None, description="Host latency, batch 1, median of the timing rounds, ms.")
    float_latency_ms_p50: float | None = Field(default=None, description="The float model's, timed in the same rounds, ms.")
    speedup_vs_float: float | None = Field(default=None, description="Float latency / this latency (median of per-round ratios).")
    latency_host: str | None = Field(default=None, description="Where the latency was measured: runtime, delegate or EP, threads, CPU.")
    slower_than_float: str | None = Field(default=None, description="Why it is slower than float on that host, from measured facts.")
    selection: SplitScore | None = None
    test: SplitScore | None = None


class EvaluationSplit(_Report):
    """How the evaluation data was split between choosing the recipe and reporting on it."""

    total: int = Field(ge=0)
    selection_examples: int = Field(ge=0)
    test_examples: int = Field(ge=0)
    seed: int
    stratified: bool
    optimistic: bool = Field(description="True when the recipe was chosen and measured on the same examples.")
    rule: str
    intervals: str = ""


class Quantization(_Report):
    """The recipe that produced the model and every recipe tried."""

    recipe: str
    precision: str = Field(default="", description="What the model really is: 'INT8', 'INT16x8 (... not INT8)', mixed, ...")
    weights: str
    activations: str
    io_dtype: str
    per_channel: bool
    calibration_samples: int
    calibration_sha256: str
    max_accuracy_drop: float | None = None
    min_sqnr_db: float | None = None
    attempts: tuple[Attempt, ...] = ()
    evaluation_split: EvaluationSplit | None = None


class OpPlacement(_Report):
    """Where one op type of the model runs on the profile's hardware."""

    op: str
    count: int
    placement: str = Field(description="Accelerator id, or 'cpu' for a fallback.")
    reason: str = ""
    dtype: str = Field(default="", description="The op's input dtype as the runtime saw it: int8, float32, int16x8, ...")


class Coverage(_Report):
    """The model's ops checked against the profile."""

    target: str = Field(description="The accelerator the model is meant for, or 'cpu'.")
    total_ops: int
    ops_on_target: int
    share_on_target: float
    ops: tuple[OpPlacement, ...]
    fallbacks: tuple[str, ...]
    dtype_violations: tuple[str, ...] = ()
    basis: str = Field(default="", description="'measured on host (...)' when the runtime reported the placement, else 'estimated (...)'.")
    note: str = Field(default="", description="What is still needed before the placement holds, e.g. a model the Edge TPU compiler has not compiled.")


class GoldenSet(_Model):
    """Reference inputs and outputs shipped in golden.npz.

    Keys follow the manifest's order: ``x`` is the first input, ``x_1``, ``x_2``, ... the others;
    ``y_float``/``y_host`` the first output, ``y_float_1``/``y_host_1``, ... the others.
    """

    file: str = Field(default="golden.npz", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    count: int
    min_top1_agreement: float = Field(description="Device outputs must agree with y_host at least this often.")
    atol: float = Field(description="Largest expected absolute difference from y_host on a conforming runtime.")


class ExtraFile(_Model):
    """A file shipped next to the model (e.g. ORT's required_operators.config)."""

    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    purpose: str = ""


class Provenance(_Report):
    """Where the model came from and what built it."""

    source: str
    source_sha256: str
    tool_versions: dict[str, str]
    created_at: str
    host: dict[str, Any]


class RouterTarget(_Model):
    """What the router's threshold was chosen for.

    ``max_loss``: hybrid accuracy within ``value`` percentage points of cloud-only accuracy, held
    with probability ``confidence`` (a finite-sample bound). ``escalation_budget``: ``value`` is the
    share of traffic (0-1) sent to the cloud.
    """

    kind: Literal["max_loss", "escalation_budget"]
    value: float = Field(ge=0)
    confidence: float | None = Field(default=None, gt=0, lt=1)


MAX_HISTOGRAM_BINS = 50


class ConfidenceHistogram(_Model):
    """Counts of the router's confidence score over bins ``[edges[i], edges[i+1])`` (the last bin also holds its right edge)."""

    edges: list[float] = Field(min_length=2, max_length=MAX_HISTOGRAM_BINS + 1)
    counts: list[int] = Field(min_length=1, max_length=MAX_HISTOGRAM_BINS)

    @model_validator(mode="after")
    def _consistent(self) -> ConfidenceHistogram:
        if len(self.counts) != len(self.edges) - 1:
            raise ValueError(f"{len(self.edges)} edges need {len(self.edges) - 1} counts, not {len(self.counts)}")
        if any(not (0.0 <= e <= 1.0) for e in self.edges) or any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError("edges must rise strictly within [0, 1]")
        if any(c < 0 for c in self.counts):
            raise ValueError("counts must not be negative")
        return self


class RouterPolicy(_Model):
    """The hybrid router's escalation policy, written by ``edgekit router calibrate``.

    The device output is scaled by ``temperature`` (on logits, or on log-probabilities when
    ``device_output`` is ``probabilities``, floored at ``probability_floor``) and softmaxed; the
    input is escalated to the cloud when the top-1 probability is below ``threshold``.
    """

    method: Literal["max_softmax", "margin", "entropy"] = Field(
        default="max_softmax", description="The confidence score: top-1 probability, top-1 minus top-2, or 1 - entropy/log(classes).")
    device_output: Literal["probabilities", "logits"]
    score_output: str | None = Field(default=None, description="The device output the score reads (None: the first output).")
    classes: int | None = Field(default=None, ge=1, description="Classes of the device model (and of the cloud model).")
    device_model_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                                            description="sha256 of the device model file the policy was calibrated for.")
    temperature: float = Field(gt=0)
    probability_floor: float = Field(default=1e-6, gt=0, lt=1)
    threshold: float = Field(ge=0, le=1.000001)
    target: RouterTarget
    expected_escalation_rate: float = Field(ge=0, le=1)
    expected_loss_points: float | None = Field(default=None, description="Cloud-only minus hybrid accuracy on the threshold data, points.")
    loss_bound_points: float | None = Field(default=None, description="Upper confidence bound on that loss (max_loss target), points.")
    point_estimate_threshold: float | None = None
    point_estimate_escalation_rate: float | None = None
    bound: str = Field(default="", description="How the threshold was certified, e.g. Learn-then-Test with Clopper-Pearson p-values.")
    cloud_model: str = Field(description="Cloud model file name the policy was calibrated against.")
    cloud_model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    data_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    temperature_samples: int = Field(ge=1)
    threshold_samples: int = Field(ge=1)
    ece_before: float | None = None
    ece_after: float | None = None
    confidence_histogram: ConfidenceHistogram | None = Field(
        default=None, description="The calibrated confidence score of the threshold data, binned as device telemetry bins it; "
                                  "the fleet server's drift reference.")
    created_at: str = ""


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
    task: Literal["classification", "detection", "regression", "embedding", "generic"] = "classification"
    preprocessing: Preprocessing = Preprocessing()
    quantization: Quantization
    metrics: dict[str, Metric]
    coverage: Coverage | None = None
    golden: GoldenSet
    extra_files: tuple[ExtraFile, ...] = ()
    verification: tuple[str, ...] = Field(default=(), description="What was and was not verified on the conversion host.")
    router_policy: RouterPolicy | None = None
    provenance: Provenance

    @property
    def confidence_output(self) -> TensorSpec | None:
        """The output kept for the router's confidence (the logits before the app's softmax), or None."""
        m = self.metrics.get(CONFIDENCE_OUTPUT_METRIC)
        if m is None or m.value is None or m.value != int(m.value) or not 0 < int(m.value) < len(self.outputs):
            return None
        return self.outputs[int(m.value)]
