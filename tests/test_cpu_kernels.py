"""The toy's CPU kernels: pinned to AVX2 for the toy, torch's own choice for real data, and loud when they
cannot be pinned (common/cpu_kernels.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import cpu_kernels

REPO = Path(__file__).resolve().parents[1]

# a matrix product (MKL), elementwise and reduction kernels (ATen), hashed to the bit
COMPUTE = """
import hashlib, torch
torch.manual_seed(0)
a, b = torch.randn(257, 333), torch.randn(333, 129)
out = torch.cat([(a @ b).flatten(), torch.nn.functional.silu(a).flatten(), torch.log_softmax(a, -1).flatten(),
                 torch.rsqrt(a.abs() + 1).flatten()])
print(hashlib.sha256(out.numpy().tobytes()).hexdigest())
"""


def python(code: str, **env) -> subprocess.CompletedProcess:
    """A fresh interpreter whose environment holds none of the pins the tests' own process set."""
    pinned = {name for variables in cpu_kernels.MODES.values() for name in variables} | {cpu_kernels.ENV}
    clean = {k: v for k, v in os.environ.items() if k not in pinned}
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n" + code],
                          env={**clean, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                          timeout=120)


def test_the_mode_comes_from_the_environment_and_is_native_by_default(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    assert cpu_kernels.mode_from_env() == "native"
    for mode in ("avx2", "reproducible"):
        monkeypatch.setenv(cpu_kernels.ENV, mode)
        assert cpu_kernels.mode_from_env() == mode
    monkeypatch.setenv(cpu_kernels.ENV, "fast")
    with pytest.raises(SystemExit, match="must be one of reproducible, avx2, native"):
        cpu_kernels.mode_from_env()


@pytest.mark.skipif(not cpu_kernels.has_avx2(), reason="the reproducible kernels need AVX2")
def test_kernels_pinned_after_import_torch_are_the_ones_torch_runs():
    # torch reads both variables at its first kernel, not at import: configure() after `import torch` must
    # give the bits of a process started with the variables already set
    pinned_before = python(COMPUTE, **cpu_kernels.MODES["reproducible"])
    pinned_after = python("import torch\nfrom common import cpu_kernels\ncpu_kernels.configure('reproducible')\n"
                          + COMPUTE)
    assert pinned_before.returncode == 0 and pinned_after.returncode == 0, pinned_after.stderr
    assert pinned_after.stdout == pinned_before.stdout


def test_the_mode_is_what_the_run_records():
    line = python("from common import cpu_kernels\ncpu_kernels.configure('reproducible')\n"
                  "print(cpu_kernels.describe())").stdout
    assert line.startswith("reproducible (ATen ") and "MKL_CBWR=COMPATIBLE" in line
    assert python("from common import cpu_kernels\ncpu_kernels.configure('native')\n"
                  "print(cpu_kernels.describe())").stdout.startswith("native (ATen ")


def test_a_process_that_already_ran_other_kernels_stops_with_a_message():
    done = python("import torch\ntorch.ones(8).exp()\nprint(torch.backends.cpu.get_cpu_capability())")
    if done.stdout.strip() == "AVX2":
        pytest.skip("torch's own choice on this CPU is AVX2: nothing to conflict with")
    out = python("import torch\ntorch.ones(8).exp()\nfrom common import cpu_kernels\n"
                 "cpu_kernels.configure('reproducible')")
    assert out.returncode != 0 and "already chose its" in out.stderr and "SOD_CPU_KERNELS=native" in out.stderr


def test_a_conflicting_kernel_variable_stops_the_reproducible_mode():
    out = python("from common import cpu_kernels\ncpu_kernels.configure('reproducible')",
                 ATEN_CPU_CAPABILITY="default")
    assert out.returncode != 0 and "conflicts" in out.stderr


@pytest.mark.parametrize("mode", ["native", "avx2", "reproducible"])
def test_a_script_pins_the_kernels_of_its_mode_before_main_runs(mode):
    # common/cli.run_script, what `python evaluate.py ...` does, before the stage's first tensor
    out = python("import sys\nsys.argv = ['evaluate.py', '--model', 'toy-student']\n"
                 "import evaluate\nfrom common import cli, cpu_kernels\n"
                 "cli.run_script(lambda cfg: print(cpu_kernels.describe()), evaluate.Config)",
                 SOD_CPU_KERNELS=mode)
    line = out.stdout.strip()
    assert line.startswith(f"{mode} (ATen "), out.stderr
    if mode != "native" and cpu_kernels.has_avx2():
        assert line == f"{mode} (ATen AVX2, MKL_CBWR={cpu_kernels.MODES[mode]['MKL_CBWR']})"
