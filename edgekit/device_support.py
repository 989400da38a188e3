"""Which interpreters, CPUs and bundle formats a device running edgekit supports, said plainly.

The agent extra installs on Python 3.10+ (Ubuntu 22.04 / JetPack 6 ship 3.10, Debian 12 and
Raspberry Pi OS bookworm 3.11.2) on x86_64 and aarch64. 32-bit Arm (armv7l, armv6l) and 32-bit x86
have no ai-edge-litert or onnxruntime wheels, so the agent refuses to start there instead of
failing later at the first model. A bundle whose runtime is not installed (or, for Core ML, not
possible on this OS) is refused at verification, before anything is activated.

Device-side code: runs on Python 3.10 and Debian 12's 3.11.2.
"""

from __future__ import annotations

import importlib.util
import platform
import sys

from edgekit.errors import RuntimeUnavailableError

__all__ = ["MIN_PYTHON", "SUPPORTED_MACHINES", "check_device_platform", "format_unavailable_reason"]

MIN_PYTHON = (3, 10)
SUPPORTED_MACHINES = ("x86_64", "amd64", "aarch64", "arm64")


def check_device_platform(machine: str | None = None, version: tuple[int, ...] | None = None) -> None:
    """Raise RuntimeUnavailableError naming the interpreter or CPU when the agent cannot run here."""
    machine = machine or platform.machine()
    version = version or tuple(sys.version_info[:3])
    if tuple(version[:2]) < MIN_PYTHON:
        raise RuntimeUnavailableError(
            f"Python {'.'.join(map(str, version))} is not supported by the edgekit agent (it needs 3.10 or newer)",
            "Use the OS's python3 on Ubuntu 22.04 / JetPack 6 (3.10) or Debian 12 / Raspberry Pi OS bookworm (3.11.2), "
            "or any newer CPython.")
    if machine.lower() not in SUPPORTED_MACHINES:
        arm32 = machine.lower().startswith(("armv6", "armv7", "armv8l", "arm"))
        why = ("32-bit Arm has no ai-edge-litert or onnxruntime wheels" if arm32
               else "ai-edge-litert and onnxruntime publish wheels only for x86_64 and aarch64")
        hint = ("Install a 64-bit OS (e.g. Raspberry Pi OS 64-bit, uname -m says aarch64) and run the agent there."
                if arm32 else "Run the agent on an x86_64 or aarch64 (arm64) Linux device.")
        raise RuntimeUnavailableError(f"this CPU architecture ({machine}) is not supported by the edgekit agent: {why}", hint)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def format_unavailable_reason(fmt: str, system: str | None = None) -> str | None:
    """Why bundles of ``fmt`` cannot be loaded on this device, or None when the runtime is here."""
    system = system or platform.system()
    if fmt == "tflite":
        if _installed("ai_edge_litert") or _installed("tflite_runtime"):
            return None
        return "no LiteRT runtime is installed (neither ai-edge-litert nor tflite-runtime)"
    if fmt in ("onnx", "ort"):
        return None if _installed("onnxruntime") else "ONNX Runtime (onnxruntime) is not installed"
    if fmt == "coreml":
        if system != "Darwin":
            return f"Core ML models run only on macOS/iOS (this device runs {system})"
        return None if _installed("coremltools") else "coremltools is not installed"
    return f"edgekit has no runtime for the format '{fmt}'"
