import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The tests run the toy, in this process and in the scripts they start (which inherit the environment): pin the
# CPU kernels before any test computes a tensor, as `python pipeline.py` does.
from common import cpu_kernels  # noqa: E402

cpu_kernels.configure(cpu_kernels.mode_for(toy=True))
