"""Which CPU kernels torch runs: its own choice, or kernels pinned so that a toy run's digits travel.

torch picks its CPU kernels from the machine: ATen's own vectorised kernels use the widest instruction set the
CPU has (AVX-512 on most servers, AVX2 elsewhere), and MKL's matrix products take a code path per CPU vendor and
generation. Each path rounds a little differently. For a big model that is noise; for the toy, whose stages are
short runs on tiny models, one changed last bit is another token sampled at some RL step, and the table moves
by points (docs/results.md, "CPU kernels").

    SOD_CPU_KERNELS=native         torch's own choice (the default)
    SOD_CPU_KERNELS=avx2           ATen's AVX2 kernels, MKL's AVX2 branch (MKL_CBWR=AVX2), oneDNN off: the same
                                   kernels on every Intel CPU with AVX2, at about the cost of native. MKL honours
                                   branches other than COMPATIBLE on Intel CPUs only: an AMD CPU runs its own path.
    SOD_CPU_KERNELS=reproducible   the same with MKL_CBWR=COMPATIBLE (SSE2 without the approximate rcpps/rsqrtps,
                                   whose results differ between vendors): the same kernels on every x86-64 CPU
                                   with AVX2, Intel or AMD, at 1.7x the time of the default pipeline.

Both variables are read by torch lazily, at the first kernel that needs them (tests/test_cpu_kernels.py), so
`configure` works after `import torch` as long as no tensor was computed yet, and stops the run otherwise.
"""
import logging
import os
import platform

log = logging.getLogger("cpu_kernels")
ENV = "SOD_CPU_KERNELS"
MODES = {  # mode -> the variables it pins (native pins none)
    "reproducible": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"},
    "native": {},
}
_configured = None  # the mode this process runs, once chosen


def mode_from_env() -> str:
    """$SOD_CPU_KERNELS, native if unset."""
    mode = os.environ.get(ENV, "").strip() or "native"
    if mode not in MODES:
        raise SystemExit(f"{ENV} must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def configure(mode: str) -> str:
    """Pin the CPU kernels of `mode`, or leave them to torch (native), before any tensor is computed.
    Returns the mode. A process keeps the first mode it chose (the kernels cannot change once used)."""
    global _configured
    if _configured is not None:
        return _configured
    if mode != "native":
        for name, value in MODES[mode].items():
            if os.environ.get(name, value) != value:
                raise SystemExit(f"{name}={os.environ[name]} conflicts with the {mode} CPU kernels "
                                 f"({name}={value}); set {ENV}=native to choose the kernels yourself")
            os.environ[name] = value  # read by torch at its first kernel, not at import
        import torch
        capability = torch.backends.cpu.get_cpu_capability()
        if not has_avx2():
            log.warning("CPU kernels: this CPU (%s) has no AVX2, so it runs %s kernels; its digits will differ "
                        "from those of other machines", platform.machine(), capability)
        elif capability != "AVX2":
            raise SystemExit(f"CPU kernels: torch already chose its {capability} kernels in this process, "
                             f"before the {mode} ones could be pinned. Set {ENV}=native, or set "
                             + " ".join(f"{k}={v}" for k, v in MODES[mode].items()) + " before starting python")
        torch.backends.mkldnn.enabled = False  # oneDNN picks its own instruction set per CPU
    _configured = mode
    log.info("CPU kernels: %s", describe())
    return mode


def has_avx2() -> bool:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False  # not Linux on x86-64
    return "avx2" in flags and "fma" in flags


def describe() -> str:
    """One line for logs and run records: the mode and what torch actually runs."""
    import torch
    return (f"{_configured or 'native'} (ATen {torch.backends.cpu.get_cpu_capability()}, "
            f"MKL_CBWR={os.environ.get('MKL_CBWR', '')})")
