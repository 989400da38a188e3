"""Hardware profiles: what a kind of device can run (ops, dtypes, memory, formats).

Profiles are YAML files validated into a frozen pydantic model that forbids unknown keys.
They are found in the ``hardware_profiles`` package (shipped in the wheel) and in the
directories listed in ``EDGEKIT_PROFILE_PATH`` (``os.pathsep``-separated); a user file with
the same id overrides a shipped one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgekit.errors import ProfileError

__all__ = [
    "Accelerator",
    "CoreMLConstraints",
    "CPU",
    "Formats",
    "HardwareProfile",
    "Memory",
    "ONNXConstraints",
    "TFLiteConstraints",
    "find_profile",
    "list_profiles",
    "load_profile_file",
    "profile_json_schema",
    "rule_citations",
]

SCHEMA_VERSION = 1
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: ~10x faster
FormatName = Literal["tflite", "onnx", "coreml"]
DType = Literal["int4", "int8", "uint8", "int16", "float16", "bfloat16", "float32"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CPU(_Frozen):
    """The application processor."""

    arch: Literal["arm64", "armv7", "x86_64"]
    model: str = Field(description="Marketing name of the cores, e.g. 'Cortex-A76'.")
    cores: int = Field(ge=1)
    features: tuple[str, ...] = Field(
        default=(), description="ISA features the kernels use: neon, dotprod, i8mm, fp16, avx2, avx512_vnni, ..."
    )


class Memory(_Frozen):
    """Memory the model may use."""

    ram_mb: int = Field(ge=1, description="Total device RAM.")
    model_budget_mb: float = Field(gt=0, description="Most RAM one model (weights + activations) may take.")


class Accelerator(_Frozen):
    """One compute unit a runtime can hand ops to (a delegate or execution provider)."""

    id: str = Field(description="Name used by the format constraints, e.g. 'edgetpu', 'nnapi', 'xnnpack'.")
    kind: Literal["cpu", "gpu", "npu", "tpu", "dsp"]
    name: str
    runtime: FormatName = Field(description="The format whose runtime reaches this unit.")
    dtypes: tuple[DType, ...]
    supported_ops: tuple[str, ...] = Field(
        description="Op names in the format's own spelling (TFLite builtin codes, ONNX op types, MIL ops)."
    )
    partitioning: Literal["any", "prefix"] = Field(
        default="any",
        description="'prefix': only ops before the first unsupported op run here (the Edge TPU compiler's rule).",
    )
    memory_mb: float | None = Field(default=None, description="On-chip memory for weights, if any.")
    int16x8_kernels: bool = Field(
        default=False, description="The unit has kernels for int16 activations with int8 weights (16x8); default none."
    )
    int16x8_source: str = Field(default="", description="Where the int16x8 fact comes from (source file or host check).")
    source: str = Field(description="Where the supported-op list comes from (vendor documentation URL).")


class TFLiteConstraints(_Frozen):
    """What a TFLite model must look like to run well on the device."""

    io_dtype: Literal["int8", "uint8", "float32"] = "int8"
    full_integer: bool = Field(default=True, description="Every op must be int8 (no float fallback ops).")
    activations_int16: bool = Field(
        default=False, description="The runtime has int16-activation kernels (16x8 quantization)."
    )
    delegates: tuple[str, ...] = Field(default=(), description="Accelerator ids, in preference order.")


class CoreMLConstraints(_Frozen):
    """Core ML deployment settings."""

    minimum_deployment_target: str = Field(description="coremltools target name, e.g. 'iOS17'.")
    compute_units: Literal["ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"] = "ALL"
    delegates: tuple[str, ...] = ()


class ONNXConstraints(_Frozen):
    """ONNX Runtime (mobile) settings."""

    opset: int = Field(ge=7, le=23)
    ort_format: bool = True
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    per_channel: bool = True
    activation_dtype: Literal["int8", "uint8"] = "int8"
    delegates: tuple[str, ...] = ()


class Formats(_Frozen):
    """Per-format constraints; a format that is absent is not supported by the device."""

    tflite: TFLiteConstraints | None = None
    onnx: ONNXConstraints | None = None
    coreml: CoreMLConstraints | None = None

    def supported(self) -> tuple[str, ...]:
        """Names of the formats this device takes, in a stable order."""
        return tuple(name for name in ("tflite", "onnx", "coreml") if getattr(self, name) is not None)


class HardwareProfile(_Frozen):
    """A device kind: CPU, memory, accelerators and the formats it runs."""

    schema_version: Literal[1] = SCHEMA_VERSION
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    name: str
    vendor: str = ""
    os: Literal["android", "ios", "linux", "macos", "windows"]
    cpu: CPU
    memory: Memory
    accelerators: tuple[Accelerator, ...] = ()
    formats: Formats
    sources: tuple[str, ...] = Field(default=(), description="Datasheets and documentation behind the numbers.")
    notes: str = ""

    @model_validator(mode="after")
    def _delegates_exist(self) -> HardwareProfile:
        ids = {a.id for a in self.accelerators}
        for fmt in self.formats.supported():
            for delegate in getattr(self.formats, fmt).delegates:
                if delegate not in ids:
                    raise ValueError(f"formats.{fmt}.delegates names '{delegate}', which is not an accelerator id")
        return self

    def accelerators_for(self, fmt: str) -> tuple[Accelerator, ...]:
        """The accelerators the format's delegates list, in preference order."""
        constraints = getattr(self.formats, fmt, None)
        if constraints is None:
            return ()
        by_id = {a.id: a for a in self.accelerators}
        return tuple(by_id[d] for d in constraints.delegates)


def rule_citations(profile: HardwareProfile) -> list[dict[str, str]]:
    """Every placement rule of the profile with the source it comes from (for 'edgekit profiles show')."""
    general = "; ".join(profile.sources) or "the profile file's header comments (no sources listed)"
    rules: list[dict[str, str]] = []
    for acc in profile.accelerators:
        rules.append({"rule": f"{acc.id}: supported ops ({len(acc.supported_ops)})", "source": acc.source})
        rules.append({"rule": f"{acc.id}: dtypes {', '.join(acc.dtypes)}", "source": acc.source})
        if acc.partitioning == "prefix":
            rules.append({"rule": f"{acc.id}: only ops before the first unsupported op run here", "source": acc.source})
        rules.append({"rule": f"{acc.id}: int16x8 kernels: {'yes' if acc.int16x8_kernels else 'none'}",
                      "source": acc.int16x8_source or "default: none (no source in the profile claims int16x8 kernels)"})
    for fmt in profile.formats.supported():
        c = getattr(profile.formats, fmt)
        fields = ", ".join(f"{k}={v}" for k, v in c.model_dump(mode="json").items() if k != "delegates")
        rules.append({"rule": f"formats.{fmt}: {fields}; delegates {', '.join(c.delegates) or 'none'}", "source": general})
    return rules


def profile_json_schema() -> dict:
    """The published JSON Schema of a profile file."""
    return HardwareProfile.model_json_schema()


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        else:
            lines.append(f"{loc}: {e['msg']}")
    return f"{path}: invalid hardware profile:\n  " + "\n  ".join(lines)


def load_profile_file(path: str | os.PathLike[str]) -> HardwareProfile:
    """Load and validate one profile YAML; errors name the file and the field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{p}: no such profile file", "Check the path.") from None
    except OSError as e:
        raise ProfileError(f"{p}: cannot read: {e.strerror}", "Check the file's permissions.") from None
    try:
        data = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as e:
        raise ProfileError(f"{p}: not valid YAML: {e}", "Fix the YAML syntax.") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{p}: a profile must be a YAML mapping", "See 'edgekit profiles schema'.")
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as e:
        raise ProfileError(
            _format_validation_error(p, e), "Fix the named fields; 'edgekit profiles schema' prints the schema."
        ) from None


def _builtin_files() -> Iterable[Path]:
    root = resources.files("hardware_profiles")
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yaml", ".yml")):
            yield Path(str(entry))


def _user_files() -> Iterable[Path]:
    for d in filter(None, os.environ.get("EDGEKIT_PROFILE_PATH", "").split(os.pathsep)):
        directory = Path(d)
        if directory.is_dir():
            yield from sorted(list(directory.glob("*.yaml")) + list(directory.glob("*.yml")))


def list_profiles() -> dict[str, tuple[HardwareProfile, Path]]:
    """Every profile by id, with the file it came from; user files override shipped ones."""
    files = [*_builtin_files(), *_user_files()]
    return dict(_load_all(tuple((p, p.stat().st_mtime_ns) for p in files)))


@functools.lru_cache(maxsize=8)
def _load_all(files: tuple[tuple[Path, int], ...]) -> tuple[tuple[str, tuple[HardwareProfile, Path]], ...]:
    # Keyed by (path, mtime): an edited or added file is re-read, an unchanged set is parsed once.
    found: dict[str, tuple[HardwareProfile, Path]] = {}
    for path, _ in files:
        profile = load_profile_file(path)
        found[profile.id] = (profile, path)
    return tuple(sorted(found.items()))


def find_profile(profile_id: str) -> HardwareProfile:
    """The profile with this id, or a ProfileError listing the valid ids."""
    if profile_id.endswith((".yaml", ".yml")) and Path(profile_id).is_file():
        return load_profile_file(profile_id)
    profiles = list_profiles()
    if profile_id not in profiles:
        raise ProfileError(
            f"unknown hardware profile '{profile_id}'",
            f"Valid ids: {', '.join(profiles)}. Add your own with EDGEKIT_PROFILE_PATH.",
        )
    return profiles[profile_id][0]
