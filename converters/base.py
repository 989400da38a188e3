"""What every converter provides, and the result one conversion yields."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from converters.source import Feeds, SourceModel
from edgekit.errors import IncompatibleError
from edgekit.manifest import Attempt, Coverage, Manifest, Metric, Preprocessing, TensorSpec
from edgekit.profiles import HardwareProfile

__all__ = ["ConversionResult", "Converter", "ModelFacts", "Recipe", "RecipeOptions", "check_weight_budget"]


@dataclass(frozen=True)
class RecipeOptions:
    """What every converter's recipe can ask for; each converter subclasses it with its own typed fields."""

    calibration_all: bool = False  # calibrate on every calibration sample, not the first --calibration-samples
    keep_sensitive: int = 0  # this many most quantization-sensitive nodes stay in higher precision
    embed: Preprocessing | None = None  # preprocessing baked into the graph (set by the search, not by recipes)


@dataclass(frozen=True)
class Recipe:
    """One way to quantize: a name for reports and the converter's typed options."""

    name: str
    description: str
    weights: str = "int8"
    activations: str = "int8"
    per_channel: bool = True
    options: RecipeOptions = field(default_factory=RecipeOptions)


@dataclass(frozen=True)
class ModelFacts:
    """What a converter learns by opening the model it produced."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ops: tuple[str, ...]
    activation_bytes: int
    activation_status: str = "estimated"  # "measured" when read from the runtime's arena
    activation_note: str = "sum of activation tensors, no buffer reuse: an upper bound"
    dtype_violations: tuple[str, ...] = ()
    # Format-specific measured facts for the manifest's metrics (e.g. Core ML int8 weight bytes).
    metrics: tuple[tuple[str, Metric], ...] = ()
    # Files next to the model that belong in the bundle (e.g. ORT's required_operators.config).
    extra_files: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()  # what was and was not verified on this host (manifest "verification")
    warnings: tuple[str, ...] = ()  # quantization gaps the user should know about


@dataclass(frozen=True)
class ConversionResult:
    """One bundle built for one (profile, format)."""

    profile: str
    format: str
    bundle_dir: Path
    manifest: Manifest
    coverage: Coverage
    attempts: tuple[Attempt, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)
    verification: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """JSON-ready summary for report.json and --json."""
        m = self.manifest
        return {
            "profile": self.profile,
            "format": self.format,
            "bundle": str(self.bundle_dir),
            "file": m.file,
            "sha256": m.sha256,
            "size_bytes": m.size_bytes,
            "recipe": m.quantization.recipe,
            "metrics": {k: v.model_dump() for k, v in m.metrics.items()},
            "coverage": self.coverage.model_dump(),
            "attempts": [a.model_dump() for a in self.attempts],
            "warnings": list(self.warnings),
            "verification": list(self.verification),
        }


class Converter(ABC):
    """One target format. Heavy imports happen inside the methods, never at import time."""

    format: ClassVar[str]
    suffix: ClassVar[str]
    sources: ClassVar[tuple[str, ...]] = ("keras", "saved_model")

    def unavailable_for(self, source: SourceModel) -> str | None:
        """Why this format cannot be built from ``source`` here (None: it can), said before any work."""
        if source.kind in self.sources:
            return None
        names = {"keras": "Keras", "saved_model": "SavedModel", "onnx": "ONNX", "torch": "PyTorch"}
        return f"{self.format} is built from {' or '.join(names.get(k, k) for k in self.sources)} sources, not {names.get(source.kind, source.kind)}"

    def runs_here(self) -> tuple[bool, str]:
        """Whether this host can execute the format's models, and if not, why (shown to the user)."""
        return True, ""

    def child_process_bytes(self, source: SourceModel, recipe: Recipe) -> int:
        """Memory a child process of this conversion holds beside this one (0: it converts in this process)."""
        return 0

    @abstractmethod
    def check(self, source: SourceModel, profile: HardwareProfile) -> list[str]:
        """Raise IncompatibleError if the profile cannot take this model; return warnings."""

    @abstractmethod
    def recipes(self, profile: HardwareProfile, calibration_count: int, calibration_cap: int) -> list[Recipe]:
        """Recipes to try in order, the first being the plain post-training default."""

    @abstractmethod
    def convert(self, source: SourceModel, profile: HardwareProfile, recipe: Recipe, calibration: Feeds, out: Path) -> Path:
        """Write the quantized model under ``out`` and return its path; ``calibration`` holds one array per source input."""

    @abstractmethod
    def convert_float(self, source: SourceModel, out: Path) -> Path:
        """Write the unquantized model in this format, the baseline for size and latency."""

    def activation_bytes(self, model_path: Path) -> int | None:
        """Activation memory of a model file of this format as its runtime plans it (None: not measurable here)."""
        return None

    @abstractmethod
    def inspect(self, model_path: Path, profile: HardwareProfile) -> ModelFacts:
        """Open the produced model: I/O specs with quantization, op list, activation memory."""


def weight_byte_metrics(int8_bytes: int, float_bytes: int, int8_what: str, float_what: str) -> tuple[tuple[str, Metric], ...]:
    """The file's constant bytes, measured, as ModelFacts.metrics (the size warning's byte split reads them)."""
    return (("int8_weight_bytes", Metric(value=float(int8_bytes), unit="B", status="measured", note=int8_what)),
            ("float_weight_bytes", Metric(value=float(float_bytes), unit="B", status="measured", note=float_what)))


def check_weight_budget(source: SourceModel, profile: HardwareProfile) -> None:
    """Refuse before any work when the int8 weights alone (one byte each) exceed the profile's model budget."""
    weights_mb = source.param_count / 1e6
    budget = profile.memory.model_budget_mb
    if weights_mb > budget:
        raise IncompatibleError(
            f"the model's {source.param_count:,} weights need about {weights_mb:.1f} MB as int8, over profile "
            f"'{profile.id}''s model budget of {budget:g} MB",
            "Use a smaller model or a profile with more memory.",
        )
