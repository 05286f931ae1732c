"""What the CPU has and what the C++ kernels are compiled for, per OS: small functions that take their inputs
(file text, command output, environment) as parameters, so every branch is unit-tested on any machine.

- CPU features: Linux reads /proc/cpuinfo (x86 `flags`, aarch64 `Features`), macOS `sysctl hw.optional`.
- The build target: `-march=native` on x86-64 (`-mcpu=native` on Linux aarch64; Apple clang's default, apple-m1,
  on macOS arm64), overridden by MOEPAGE_KERNEL_ARCH (e.g. `haswell` for an AVX2 + FMA + F16C only build);
  OpenMP where the compiler has it (not Apple clang: the kernels use their own thread pool there), overridden by
  MOEPAGE_KERNEL_OPENMP=0/1. What the target compiles for is read from the compiler's predefined macros, so an
  AVX2 build never enables a kernel that needs AVX-512.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

# sysctl hw.optional names (Apple Silicon and Intel Macs) -> the Linux names the kernels' needs are written in
SYSCTL_FEATURES = {
    "hw.optional.neon": "asimd", "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_FP16": "fphp", "hw.optional.arm.FEAT_I8MM": "i8mm", "hw.optional.avx2_0": "avx2",
    "hw.optional.fma": "fma", "hw.optional.f16c": "f16c", "hw.optional.avx512f": "avx512f",
    "hw.optional.avx512bw": "avx512bw", "hw.optional.avx1_0": "avx", "hw.optional.popcnt": "popcnt",
}
# compiler predefined macros -> the same names: what code built for the target may use
MACRO_FEATURES = {
    "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c", "__POPCNT__": "popcnt",
    "__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw", "__AVX512BF16__": "avx512_bf16",
    "__AVX512VBMI2__": "avx512_vbmi2", "__AVX512VL__": "avx512vl", "__ARM_NEON": "asimd",
    "__ARM_FEATURE_BF16": "bf16", "__ARM_FEATURE_DOTPROD": "asimddp", "__ARM_FEATURE_MATMUL_INT8": "i8mm",
}


def features_from_cpuinfo(text: str) -> set[str]:
    """The first `flags` (x86) or `Features` (aarch64) line of /proc/cpuinfo, as a set."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def features_from_sysctl(text: str) -> set[str]:
    """`sysctl hw.optional` output (lines `hw.optional.NAME: 0|1`) -> the features set to 1, by their Linux names."""
    out = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip() == "1" and key.strip() in SYSCTL_FEATURES:
            out.add(SYSCTL_FEATURES[key.strip()])
    return out


def features_from_macros(text: str) -> set[str]:
    """`c++ -dM -E` output (lines `#define NAME VALUE`) -> the features the target compiles for."""
    names = {line.split()[1] for line in text.splitlines() if line.startswith("#define ") and len(line.split()) > 1}
    return {feature for macro, feature in MACRO_FEATURES.items() if macro in names}


def cpu_features(system: str = sys.platform) -> set[str]:
    """This machine's CPU features (empty where neither source can be read)."""
    if system == "darwin":
        try:
            run = subprocess.run(["sysctl", "hw.optional"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return set()
        return features_from_sysctl(run.stdout)
    try:
        with open("/proc/cpuinfo") as f:
            return features_from_cpuinfo(f.read(1 << 20))
    except OSError:
        return set()


@dataclass(frozen=True)
class BuildTarget:
    """How the kernels are compiled: `arch` for -march (x86) / -mcpu (arm), "" for the compiler's default."""
    arch: str
    openmp: bool
    arm: bool

    def cflags(self) -> list[str]:
        flags = ["-O3", "-ffp-contract=off"]  # bf16_portable.h's arithmetic is defined: no contraction into FMA
        if self.arch:
            flags.append(f"-mcpu={self.arch}" if self.arm else f"-march={self.arch}")
        return flags + (["-fopenmp"] if self.openmp else [])

    def ldflags(self) -> list[str]:
        return ["-fopenmp"] if self.openmp else []

    def key(self) -> str:
        """What separates two builds' cache directories."""
        return f"{self.arch or 'default'}-{'omp' if self.openmp else 'pool'}"


def build_target(env: Mapping[str, str] = os.environ, system: str = sys.platform,
                 machine: str = platform.machine()) -> BuildTarget:
    arm = machine.lower() in ("arm64", "aarch64")
    default_arch = "" if (system == "darwin" and arm) else "native"  # Apple clang targets apple-m1 by default
    arch = env.get("MOEPAGE_KERNEL_ARCH", "").strip() or default_arch
    if not all(c.isalnum() or c in "-_.+" for c in arch):
        raise ValueError(f"MOEPAGE_KERNEL_ARCH={arch!r} is not a -march value")
    openmp = env.get("MOEPAGE_KERNEL_OPENMP", "").strip()
    return BuildTarget(arch=arch, openmp=(openmp != "0") if openmp else system != "darwin", arm=arm)


def target_features(target: BuildTarget, compiler: str | None = None) -> set[str] | None:
    """The features code built for `target` may use, from the compiler's predefined macros; None without a
    compiler."""
    cxx = compiler or os.environ.get("CXX") or "c++"
    flags = [f for f in target.cflags() if f.startswith(("-march", "-mcpu"))]
    try:
        run = subprocess.run([cxx, *flags, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return features_from_macros(run.stdout) if run.returncode == 0 else None
