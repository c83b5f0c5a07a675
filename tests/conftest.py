"""Two tiers. `pytest -m "not slow" tests` runs the spec of every stage in a few minutes (what a forker runs
after changing an equation); `pytest tests` (CI) runs everything, including whole scripts as subprocesses, the
pipeline, vLLM, torchrun, the kill harness and a pretrained model of another family, which are `slow`."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# whole modules of end-to-end runs (each test a subprocess, an engine, or several ranks)
SLOW_MODULES = {"test_smoke", "test_pipeline", "test_distributed", "test_vllm", "test_other_models",
                "test_reliability", "test_real_shapes"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run; left out of the fast tier (-m 'not slow')")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
