"""edgekit.cpuinfo / edgekit.detect: the real CPU, named from the kernel's report, never invented."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from edgekit.cpuinfo import EMULATED_TIMING_NOTE, profile_arch, read_cpu
from edgekit.detect import detect_profile

# The layout of a Raspberry Pi 5's /proc/cpuinfo (BCM2712: 4x Cortex-A76 = implementer 0x41 part 0xd0b).
PI5_BLOCK = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""
X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_vnni
"""


def _auxv(tmp_path: Path, hwcap: int, hwcap2: int = 0) -> Path:
    """An auxiliary vector as the kernel lays it out: (type, value) native words, AT_NULL last."""
    path = tmp_path / "auxv"
    path.write_bytes(struct.pack("@6L", 16, hwcap, 26, hwcap2, 0, 0))
    return path


def test_pi5_cores_are_named_from_implementer_and_part_features_from_hwcap(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("\n".join(PI5_BLOCK.format(n=n) for n in range(4)) + "\nRevision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
    asimd, fphp, asimdhp, asimddp = 1 << 1, 1 << 9, 1 << 10, 1 << 20
    cpu = read_cpu(cpuinfo, _auxv(tmp_path, asimd | fphp | asimdhp | asimddp), machine="aarch64")
    assert cpu.model == "4x Cortex-A76"
    assert cpu.features == ("dotprod", "fp16", "neon")  # no i8mm, no sve: the A76 has neither
    assert cpu.emulation is None and cpu.timing_source == "measured"
    assert cpu.feature_source.startswith("AT_HWCAP")


def test_hwcap2_i8mm_sve2_and_big_little_cores(tmp_path: Path) -> None:
    blocks = [PI5_BLOCK.format(n=n).replace("0xd0b", "0xd82" if n < 2 else "0xd81") for n in range(8)]
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("\n".join(blocks))
    sve, sve2, i8mm = 1 << 22, 1 << 1, 1 << 13
    cpu = read_cpu(cpuinfo, _auxv(tmp_path, 1 << 1 | sve, sve2 | i8mm), machine="aarch64")
    assert cpu.model == "6x Cortex-A720 + 2x Cortex-X4"
    assert {"i8mm", "sve", "sve2", "neon"} <= set(cpu.features)


def test_an_unknown_arm_part_is_printed_as_its_numbers_not_guessed(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(PI5_BLOCK.format(n=0).replace("0xd0b", "0xfff").replace("0x41", "0x99"))
    cpu = read_cpu(cpuinfo, tmp_path / "no-auxv", machine="aarch64")
    assert cpu.model == "1x Arm core implementer 0x99 part 0xfff"
    assert cpu.feature_source == "/proc/cpuinfo Features" and "neon" in cpu.features


def test_aarch64_process_on_an_x86_kernel_is_emulated(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(X86_CPUINFO)
    cpu = read_cpu(cpuinfo, _auxv(tmp_path, 1 << 1 | 1 << 20), machine="aarch64")
    assert cpu.emulation is not None and "qemu-user" in cpu.emulation and "Xeon" in cpu.emulation
    assert cpu.timing_source == "emulated"
    assert "Cortex" not in cpu.model and "emulated" in cpu.model
    assert cpu.features == ("dotprod", "neon")  # what the emulated CPU offers the process
    assert EMULATED_TIMING_NOTE == "emulated (qemu-user): timings not meaningful"


def test_profile_arch_names_only_what_edgekit_has_runtimes_for() -> None:
    assert profile_arch("x86_64") == "x86_64" and profile_arch("aarch64") == "arm64" and profile_arch("arm64") == "arm64"
    assert profile_arch("armv7l") == "armv7"
    assert profile_arch("riscv64") is None


def test_detect_on_this_host_reports_its_real_cpu() -> None:
    """The profile of the machine running the test: the kernel's model and flags, no invented core."""
    text = Path("/proc/cpuinfo").read_text()
    p = detect_profile()
    cpu = read_cpu()
    assert p.cpu.model == cpu.model and p.cpu.cores == cpu.cores
    if cpu.emulation is None and cpu.machine == "x86_64":
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).partition(":")[2].split())
        assert set(p.cpu.features) <= flags | {"neon"}
        assert p.cpu.model in text
        assert all("Cortex" not in a.name for a in p.accelerators)  # the XNNPACK entry names this CPU, not the Coral's
    if cpu.emulation is not None:
        assert EMULATED_TIMING_NOTE in p.name


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_missing_proc_files_give_unknown_not_a_guess(tmp_path: Path, machine: str) -> None:
    cpu = read_cpu(tmp_path / "none", tmp_path / "none", machine=machine)
    assert cpu.emulation is None
    assert cpu.features == ()
    assert "Cortex" not in cpu.model
