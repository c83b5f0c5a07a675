"""Which CPU kernels torch runs, so that a toy run gives the same digits on every x86-64 machine.

torch picks its CPU kernels from the machine: ATen's own vectorised kernels use the widest instruction set the
CPU has (AVX-512 on most servers, AVX2 elsewhere), and MKL's matrix products take a code path per CPU vendor and
generation. Each path rounds a little differently. For a big model that is noise; for the toy, whose stages are
short runs on tiny models, one changed last bit is a different trajectory sampled at some RL step, and the
table moves by points (docs/results.md shows four kernel paths of one seed).

The reproducible mode pins both to AVX2, which every x86-64 CPU sold since about 2015 has (Intel Haswell, AMD
Zen): ATEN_CPU_CAPABILITY=avx2 for ATen, MKL_CBWR=AVX2 (MKL's conditional numerical reproducibility) for MKL,
and oneDNN off. The same instructions then run on Intel and AMD alike. It costs little on the toy (measured in
docs/speed.md); MKL_CBWR=COMPATIBLE with ATen's scalar kernels, which would cover CPUs without AVX2 as well, cost
1.6x there and is not used.

Both variables are read by torch lazily, at the first kernel that needs them (checked in
tests/test_cpu_kernels.py), so `configure` works after `import torch` as long as no tensor was computed yet, and
says so loudly otherwise.

    SOD_CPU_KERNELS=reproducible   the default for toy runs (the toy's data, and pipeline.py)
    SOD_CPU_KERNELS=native         torch's own choice: the default for real data (its runs belong on GPUs)
"""
import logging
import os
import platform

log = logging.getLogger("cpu_kernels")
ENV = "SOD_CPU_KERNELS"
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
_configured = None  # the mode this process runs, once chosen


def mode_for(toy: bool) -> str:
    """The mode of a run: $SOD_CPU_KERNELS if set, else reproducible for the toy and native for real data."""
    mode = os.environ.get(ENV, "").strip() or ("reproducible" if toy else "native")
    if mode not in ("reproducible", "native"):
        raise SystemExit(f"{ENV} must be reproducible or native, not {mode!r}")
    return mode


def configure(mode: str) -> str:
    """Pin the CPU kernels (mode reproducible) or leave them to torch (native), before any tensor is computed.
    Returns the mode. A process keeps the first mode it chose (the kernels cannot change once used)."""
    global _configured
    if _configured is not None:
        return _configured
    if mode == "reproducible":
        for name, value in PINNED.items():
            if os.environ.get(name, value) != value:
                raise SystemExit(f"{name}={os.environ[name]} conflicts with the reproducible CPU kernels "
                                 f"({name}={value}); set {ENV}=native to choose the kernels yourself")
            os.environ[name] = value  # read by torch at its first kernel, not at import
        import torch
        capability = torch.backends.cpu.get_cpu_capability()
        if not has_avx2():
            log.warning("CPU kernels: this CPU (%s) has no AVX2, so it runs %s kernels; the toy's digits will "
                        "differ from the README's", platform.machine(), capability)
        elif capability != "AVX2":
            raise SystemExit(f"CPU kernels: torch already chose its {capability} kernels in this process, "
                             f"before the reproducible ones could be pinned. Set {ENV}=native, or set "
                             + " ".join(f"{k}={v}" for k, v in PINNED.items()) + " before starting python")
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
    if _configured == "reproducible":
        return f"reproducible (ATen {torch.backends.cpu.get_cpu_capability()}, MKL_CBWR={os.environ['MKL_CBWR']})"
    return f"native (ATen {torch.backends.cpu.get_cpu_capability()}, MKL_CBWR={os.environ.get('MKL_CBWR', '')})"
