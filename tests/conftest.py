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


@pytest.fixture
def default_sandbox():
    """The test starts and ends with the default sandbox: local, warm."""
    from common import sandbox
    sandbox.configure()
    yield
    sandbox.configure()


@pytest.fixture
def one_worker(monkeypatch):
    """A warm pool of one worker, so that consecutive calls land on the same interpreter (tests of the warm
    sandbox: test_sandbox.py, test_tools.py)."""
    from common import sandbox
    isolation = sandbox.sandbox_isolation()
    if isolation.level != "full":
        pytest.skip(f"the warm path needs full isolation, not {isolation.level}")
    pool = sandbox._WarmPool(isolation.python, isolation.view, size=1, cgroups=isolation.cgroups)
    monkeypatch.setattr(sandbox, "_warm_pool", pool)
    yield pool
    pool.close()
