"""What CPU this process really runs on: the kernel's /proc/cpuinfo and the HWCAP auxiliary vector.

On Arm the cores are named from ``CPU implementer`` / ``CPU part`` (a part not in the table is
printed as its numbers, never guessed) and the SIMD features come from AT_HWCAP / AT_HWCAP2 (what
the kernel lets user space use: asimd, asimddp, i8mm, sve, ...). On x86 the features are the
kernel's ``flags``.

Under qemu-user (an aarch64 root on an x86 host, as in the test-suite) the kernel's
/proc/cpuinfo still describes the host's x86 CPU, while the process's HWCAP is qemu's emulated
CPU. That disagreement with :func:`platform.machine` is how emulation is detected; latency
measured there says nothing about a real board (:data:`EMULATED_TIMING_NOTE`).

Device-side code: runs on Python 3.10 and Debian 12's 3.11.2.
"""

from __future__ import annotations

import os
import platform
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CPUReport", "EMULATED_TIMING_NOTE", "profile_arch", "read_cpu"]

EMULATED_TIMING_NOTE = "emulated (qemu-user): timings not meaningful"

# AT_HWCAP / AT_HWCAP2 bits on aarch64 (linux/arch/arm64/include/uapi/asm/hwcap.h) -> profile feature
_HWCAP_BITS = {1: "neon", 9: "fp16", 10: "fp16", 20: "dotprod", 22: "sve"}  # asimd, fphp, asimdhp, asimddp, sve
_HWCAP2_BITS = {1: "sve2", 13: "i8mm", 14: "bf16"}
_AT_HWCAP, _AT_HWCAP2 = 16, 26
# /proc/cpuinfo "Features" (Arm) or "flags" (x86) word -> profile feature
_ARM_WORDS = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "fphp": "fp16", "asimdhp": "fp16", "sve": "sve",
              "sve2": "sve2", "bf16": "bf16"}
_X86_WORDS = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni",
              "avx512_bf16": "avx512_bf16", "amx_int8": "amx_int8", "f16c": "f16c"}

# (CPU implementer, CPU part) -> core name, from the Arm / vendor technical reference manuals.
_ARM_CORES = {
    (0x41, 0xD03): "Cortex-A53", (0x41, 0xD04): "Cortex-A35", (0x41, 0xD05): "Cortex-A55", (0x41, 0xD07): "Cortex-A57",
    (0x41, 0xD08): "Cortex-A72", (0x41, 0xD09): "Cortex-A73", (0x41, 0xD0A): "Cortex-A75", (0x41, 0xD0B): "Cortex-A76",
    (0x41, 0xD0C): "Neoverse-N1", (0x41, 0xD0D): "Cortex-A77", (0x41, 0xD0E): "Cortex-A76AE", (0x41, 0xD40): "Neoverse-V1",
    (0x41, 0xD41): "Cortex-A78", (0x41, 0xD42): "Cortex-A78AE", (0x41, 0xD44): "Cortex-X1", (0x41, 0xD46): "Cortex-A510",
    (0x41, 0xD47): "Cortex-A710", (0x41, 0xD48): "Cortex-X2", (0x41, 0xD49): "Neoverse-N2", (0x41, 0xD4A): "Neoverse-E1",
    (0x41, 0xD4B): "Cortex-A78C", (0x41, 0xD4D): "Cortex-A715", (0x41, 0xD4E): "Cortex-X3", (0x41, 0xD4F): "Neoverse-V2",
    (0x41, 0xD80): "Cortex-A520", (0x41, 0xD81): "Cortex-A720", (0x41, 0xD82): "Cortex-X4",
    (0x4E, 0x004): "NVIDIA Carmel", (0x51, 0x805): "Kryo 4xx Silver", (0x51, 0x804): "Kryo 4xx Gold",
}
_X86_MACHINES = {"x86_64", "amd64", "i386", "i686"}
_ARM64_MACHINES = {"aarch64", "arm64"}


@dataclass(frozen=True)
class CPUReport:
    """The CPU as this process sees it; ``emulation`` is None on real hardware."""

    machine: str                 # platform.machine(): what this Python was built for
    model: str                   # core names as the kernel reports them, or an honest 'unknown'
    cores: int
    features: tuple[str, ...]    # profile feature names (neon, dotprod, i8mm, sve, avx2, ...)
    emulation: str | None        # why this looks emulated, e.g. 'qemu-user: aarch64 process, x86 kernel CPU'
    feature_source: str          # where the features came from (HWCAP, /proc/cpuinfo flags)

    @property
    def timing_source(self) -> str:
        """``measured`` on real hardware, ``emulated`` when latencies mean nothing."""
        return "emulated" if self.emulation else "measured"


def profile_arch(machine: str) -> str | None:
    """The hardware-profile arch for a platform.machine() value, None when edgekit has no runtime for it."""
    m = machine.lower()
    if m in ("x86_64", "amd64"):
        return "x86_64"
    if m in _ARM64_MACHINES:
        return "arm64"
    if m.startswith("armv7") or m.startswith("armv6") or m == "arm":
        return "armv7"
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _cpuinfo_records(text: str) -> list[dict[str, str]]:
    """One dict per ``processor`` block (plus any trailing global lines in the last)."""
    records: list[dict[str, str]] = [{}]
    for line in text.splitlines():
        if not line.strip():
            if records[-1]:
                records.append({})
            continue
        key, _, value = line.partition(":")
        records[-1][key.strip().lower()] = value.strip()
    return [r for r in records if r]


def _auxv_hwcaps(path: Path) -> tuple[int, int] | None:
    """(AT_HWCAP, AT_HWCAP2) of this process, None when the auxiliary vector cannot be read."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    word = struct.calcsize("@L")
    values: dict[int, int] = {}
    for key, value in struct.iter_unpack(f"@{'L' * 2}", data[: len(data) - len(data) % (2 * word)]):
        if key == 0:
            break
        values[key] = value
    if _AT_HWCAP not in values:
        return None
    return values[_AT_HWCAP], values.get(_AT_HWCAP2, 0)


def _arm_core_names(records: list[dict[str, str]]) -> str | None:
    """'4x Cortex-A76' / '2x Cortex-X4 + 6x Cortex-A720', from implementer/part; None without them."""
    parts: Counter[str] = Counter()
    for r in records:
        if "cpu implementer" not in r or "cpu part" not in r:
            continue
        try:
            key = (int(r["cpu implementer"], 0), int(r["cpu part"], 0))
        except ValueError:
            continue
        parts[_ARM_CORES.get(key, f"Arm core implementer 0x{key[0]:02x} part 0x{key[1]:03x}")] += 1
    if not parts:
        return None
    return " + ".join(f"{n}x {name}" for name, n in parts.most_common())


def read_cpu(cpuinfo: Path = Path("/proc/cpuinfo"), auxv: Path = Path("/proc/self/auxv"), machine: str | None = None) -> CPUReport:
    """Read this process's CPU from the kernel; paths and machine are parameters for tests."""
    machine = (machine or platform.machine()).lower()
    records = _cpuinfo_records(_read_text(cpuinfo))
    merged: dict[str, str] = {}
    for r in records:
        for k, v in r.items():
            merged.setdefault(k, v)
    kernel_is_x86 = "vendor_id" in merged or ("flags" in merged and "cpu implementer" not in merged)
    kernel_is_arm = "cpu implementer" in merged
    cores = os.cpu_count() or 1
    emulation: str | None = None
    if machine in _ARM64_MACHINES and kernel_is_x86:
        emulation = f"qemu-user: {machine} process, the kernel reports an x86 CPU ({merged.get('model name', 'unknown model')})"
    elif machine in _X86_MACHINES and kernel_is_arm:
        emulation = f"{machine} process, the kernel reports an Arm CPU: emulated (qemu-user or a translator)"

    if machine in _ARM64_MACHINES:
        hwcaps = _auxv_hwcaps(auxv)
        if hwcaps is not None:
            hw, hw2 = hwcaps
            found = {name for bit, name in _HWCAP_BITS.items() if hw >> bit & 1}
            found |= {name for bit, name in _HWCAP2_BITS.items() if hw2 >> bit & 1}
            source = "AT_HWCAP/AT_HWCAP2 of this process" + (" (qemu's emulated CPU)" if emulation else "")
        else:
            found = {_ARM_WORDS[w] for w in merged.get("features", "").split() if w in _ARM_WORDS}
            source = "/proc/cpuinfo Features"
        cores_text = None if emulation else _arm_core_names(records)
        if emulation:
            model = "unknown Arm core (emulated by qemu-user; the host CPU is not an Arm core)"
        else:
            model = cores_text or merged.get("model name") or "unknown Arm core (no CPU implementer/part in /proc/cpuinfo)"
    else:
        words = merged.get("flags", "") or merged.get("features", "")
        table = _X86_WORDS if machine in _X86_MACHINES else _ARM_WORDS
        found = {table[w] for w in words.split() if w in table}
        source = "/proc/cpuinfo flags"
        model = merged.get("model name") or merged.get("cpu model") or platform.processor() or f"unknown {machine} CPU"
        if emulation:
            model = f"unknown x86 CPU (emulated; the kernel reports {_arm_core_names(records) or 'an Arm CPU'})"
    return CPUReport(machine=machine, model=model, cores=cores, features=tuple(sorted(found)), emulation=emulation,
                     feature_source=source)
