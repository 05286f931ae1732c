"""The OS branches (Linux, macOS) of the kernel build and of paging, run here with their inputs given: CPU features
from /proc/cpuinfo and from sysctl, the build target and its flags (no -fopenmp for Apple clang), uncached reads
(O_DIRECT vs F_NOCACHE), resident memory and the memory limit."""
from __future__ import annotations

import os
import resource

import pytest

from moepage.kernels import cpu, native
from moepage.paging import platform

X86_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma f16c avx512f avx512_bf16\n\n" \
              "processor\t: 1\nflags\t\t: fpu\n"
ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes crc32 asimddp bf16 i8mm\n"
SYSCTL_M2 = "hw.optional.arm.FEAT_BF16: 1\nhw.optional.arm.FEAT_DotProd: 1\nhw.optional.arm.FEAT_I8MM: 0\n" \
            "hw.optional.neon: 1\nhw.optional.floatingpoint: 1\nhw.optional.arm.FEAT_SME: 0\n"
SYSCTL_INTEL = "hw.optional.avx1_0: 1\nhw.optional.avx2_0: 1\nhw.optional.fma: 1\nhw.optional.avx512f: 0\n"


def test_cpu_features_from_linux_cpuinfo_and_macos_sysctl():
    assert cpu.features_from_cpuinfo(X86_CPUINFO) == {"fpu", "sse2", "avx2", "fma", "f16c", "avx512f", "avx512_bf16"}
    assert {"asimd", "asimddp", "bf16", "i8mm"} <= cpu.features_from_cpuinfo(ARM_CPUINFO)
    assert cpu.features_from_cpuinfo("no flags here\n") == set()
    assert cpu.features_from_sysctl(SYSCTL_M2) == {"bf16", "asimddp", "asimd"}
    assert cpu.features_from_sysctl(SYSCTL_INTEL) == {"avx", "avx2", "fma"}


def test_target_features_from_the_compilers_macros():
    macros = "#define __AVX2__ 1\n#define __FMA__ 1\n#define __F16C__ 1\n#define __SSE2__ 1\n#define __x86_64__ 1\n"
    assert cpu.features_from_macros(macros) == {"avx2", "fma", "f16c"}
    assert cpu.features_from_macros("#define __ARM_NEON 1\n#define __ARM_FEATURE_BF16 1\n") == {"asimd", "bf16"}


@pytest.mark.parametrize("env,system,machine,flags,ld", [
    ({}, "linux", "x86_64", ["-O3", "-ffp-contract=off", "-march=native", "-fopenmp"], ["-fopenmp"]),
    ({"MOEPAGE_KERNEL_ARCH": "haswell"}, "linux", "x86_64", ["-O3", "-ffp-contract=off", "-march=haswell",
                                                             "-fopenmp"], ["-fopenmp"]),
    ({}, "linux", "aarch64", ["-O3", "-ffp-contract=off", "-mcpu=native", "-fopenmp"], ["-fopenmp"]),
    ({}, "darwin", "arm64", ["-O3", "-ffp-contract=off"], []),  # Apple clang: its default target, no OpenMP
    ({}, "darwin", "x86_64", ["-O3", "-ffp-contract=off", "-march=native"], []),
    ({"MOEPAGE_KERNEL_OPENMP": "0"}, "linux", "x86_64", ["-O3", "-ffp-contract=off", "-march=native"], []),
])
def test_build_target_per_os(env, system, machine, flags, ld):
    target = cpu.build_target(env, system, machine)
    assert (target.cflags(), target.ldflags()) == (flags, ld)


def test_build_targets_keep_separate_caches_and_bad_arch_is_refused(monkeypatch):
    keys = {cpu.build_target(e, "linux", "x86_64").key() for e in ({}, {"MOEPAGE_KERNEL_ARCH": "haswell"},
                                                                    {"MOEPAGE_KERNEL_OPENMP": "0"})}
    assert len(keys) == 3
    with pytest.raises(ValueError, match="MOEPAGE_KERNEL_ARCH"):
        cpu.build_target({"MOEPAGE_KERNEL_ARCH": "native -o /tmp/x"}, "linux", "x86_64")
    dirs = set()
    for arch in ("native", "haswell"):
        monkeypatch.setenv("MOEPAGE_KERNEL_ARCH", arch)
        dirs.add(native.build_directory("bf16_decode"))
    assert len(dirs) == 2
    monkeypatch.setenv("MOEPAGE_KERNEL_ARCH", "native")  # a -march=native cache carried to another CPU is not used
    monkeypatch.setitem(native._features, "cpu", {"avx2", "fma"})
    assert native.build_directory("bf16_decode") not in dirs


def test_an_avx2_build_target_runs_every_module_and_disables_one_that_needs_avx512(monkeypatch):
    """-march=haswell compiles no AVX-512: every shipped module is portable and runs; a module that needed an
    AVX-512 feature would not, whatever the CPU has."""
    haswell = cpu.target_features(cpu.BuildTarget("haswell", True, False))
    if haswell is None:
        pytest.skip("no C++ compiler")
    assert {"avx2", "fma", "f16c"} <= haswell and not {"avx512f", "avx512_bf16"} & haswell
    monkeypatch.setenv("MOEPAGE_KERNEL_ARCH", "haswell")
    kernels_on = os.environ.get("MOEPAGE_KERNELS", "auto") != "torch"
    assert all(native.runs_here(m) == kernels_on for m in native.MODULES)
    monkeypatch.setitem(native.MODULES, "avx512_only", ({"avx512_vbmi2"}, []))
    assert not native.runs_here("avx512_only")


def test_uncached_reads_o_direct_on_linux_f_nocache_on_macos(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    assert platform.uncached_reads("linux", True) == "o_direct"
    assert platform.uncached_reads("darwin", False) == "f_nocache"
    assert platform.uncached_reads("win32", False) is None
    calls = []
    fd = platform.open_uncached(str(path), "darwin", fcntl_call=lambda *a: calls.append(a[1:]))
    try:
        assert calls == [(platform.F_NOCACHE, 1)] and os.pread(fd, 4, 0) == b"xxxx"
    finally:
        os.close(fd)

    def refuse(*a):
        raise OSError(22, "Invalid argument")

    assert platform.open_uncached(str(path), "darwin", fcntl_call=refuse) is None
    if hasattr(os, "O_DIRECT"):
        def opener(p, flags):
            assert flags & os.O_DIRECT
            raise OSError(22, "tmpfs refuses O_DIRECT")

        assert platform.open_uncached(str(path), "linux", opener=opener) is None
    assert platform.open_uncached(str(path), "win32") is None


def test_rss_units_and_sources():
    assert platform.peak_rss_bytes(1000, "linux") == 1024000
    assert platform.peak_rss_bytes(1024000, "darwin") == 1024000
    assert platform.rss_from_statm("5000 1200 300 10 0 900 0\n", 4096) == 1200 * 4096
    with pytest.raises(ValueError, match="statm"):
        platform.rss_from_statm("garbage", 4096)
    if os.path.exists("/proc/self/statm"):  # the live value: between 10 MB and the peak so far
        now = platform.current_rss_bytes("linux")
        assert 10 << 20 < now <= platform.peak_rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) + (1 << 20)


def test_memory_limit_from_cgroups_or_the_machine():
    assert platform.limit_from_cgroup("max\n", None) is None
    assert platform.limit_from_cgroup("1073741824\n", None) == 1 << 30
    assert platform.limit_from_cgroup(None, "9223372036854771712\n") is None  # v1 "unlimited"
    assert platform.limit_from_cgroup(None, "524288000\n") == 524288000
    files = {platform.CGROUP_V2: "2147483648\n"}
    assert platform.memory_limit_bytes("linux", files.get, lambda: 64 << 30) == 2 << 30
    assert platform.memory_limit_bytes("linux", {}.get, lambda: 64 << 30) == 64 << 30
    assert platform.memory_limit_bytes("darwin", files.get, lambda: 16 << 30) == 16 << 30  # no cgroups on macOS
    assert platform.memory_limit_bytes() > 100 << 20
